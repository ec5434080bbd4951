"""The keepalive wheel: one timer for every connection's KeepAlive (derpbox.relay.keepalive)."""

import pytest
from twisted.internet.task import Clock

from derpbox.relay.keepalive import MAX_TICKS, MIN_TICKS, KeepAliveWheel, keepalive_ticks


def wheel_at(start=0.0):
    clock = Clock()
    clock.advance(start)
    fired = []
    wheel = KeepAliveWheel(clock, lambda due: fired.append((clock.seconds(), sorted(due))))
    return clock, wheel, fired


def test_periods_are_whole_seconds_from_61_to_65():
    seen = {keepalive_ticks() for _ in range(500)}
    assert seen == set(range(MIN_TICKS, MAX_TICKS + 1)) and MIN_TICKS == 61 and MAX_TICKS == 65


def test_due_every_period_and_the_first_within_the_last_second_before_it():
    clock, wheel, fired = wheel_at(100.0)
    wheel.add("a", 3)
    clock.advance(0.5)
    wheel.add("b", 3)
    clock.pump([0.25] * 38)
    # "a" joined on a tick, "b" half a tick later: both first due 3 ticks after the first.
    assert fired == [(103.0, ["a", "b"]), (106.0, ["a", "b"]), (109.0, ["a", "b"])]


def test_items_with_different_periods_keep_their_own():
    clock, wheel, fired = wheel_at()
    wheel.add("two", 2)
    wheel.add("three", 3)
    clock.pump([1.0] * 7)
    assert fired == [(2.0, ["two"]), (3.0, ["three"]), (4.0, ["two"]), (6.0, ["three", "two"])]


def test_a_late_timer_catches_up_on_every_tick_that_passed():
    clock, wheel, fired = wheel_at()
    wheel.add("a", 2)
    wheel.add("b", 5)
    clock.advance(5.5)
    # One late run covers ticks 1-5: "a" was due at 2 and 4, "b" at 5.
    assert fired == [(5.5, ["a", "a", "b"])]
    clock.advance(0.5)
    assert fired[-1] == (6.0, ["a"])


def test_removed_items_are_not_called_and_an_empty_wheel_has_no_timer():
    clock, wheel, fired = wheel_at()
    wheel.add("a", 2)
    wheel.add("b", 2)
    wheel.remove("a")
    clock.advance(2)
    assert fired == [(2.0, ["b"])]
    wheel.remove("b")
    wheel.remove("never added")
    assert len(wheel) == 0 and clock.getDelayedCalls() == []
    clock.advance(10)
    assert fired == [(2.0, ["b"])]


def test_adding_again_replaces_the_period():
    clock, wheel, fired = wheel_at()
    wheel.add("a", 5)
    wheel.add("a", 2)
    clock.pump([1.0] * 5)
    assert len(wheel) == 1 and fired == [(2.0, ["a"]), (4.0, ["a"])]


def test_a_wheel_restarted_after_it_emptied_counts_from_the_new_start():
    clock, wheel, fired = wheel_at()
    wheel.add("a", 2)
    wheel.remove("a")
    clock.advance(7.3)
    wheel.add("b", 2)
    clock.pump([0.5] * 6)
    assert fired == [(9.3, ["b"])]


@pytest.mark.parametrize("ticks", [0, MAX_TICKS + 1])
def test_a_period_the_ring_cannot_hold_is_refused(ticks):
    _, wheel, _ = wheel_at()
    with pytest.raises(ValueError, match="keepalive period"):
        wheel.add("a", ticks)
