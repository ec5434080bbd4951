"""`/bootstrap-dns`: derper's rules (derpbox.bootstrap_dns) and the endpoint end to end.

The names are resolved through Twisted's real DNS client against a Twisted Names
server on 127.0.0.1 whose records each test sets and changes. Requests reach the
main site over loopback, through a PROXY v1 line where the rollout needs another
requester address than 127.0.0.1 (derper flips a coin for loopback requesters).
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.application.internet import TimerService
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.names import client, common, dns, error, server

from derpbox.bootstrap_dns import (
    REFRESH_INTERVAL,
    Answers,
    BootstrapDNS,
    BootstrapDNSStats,
    answer,
    encode,
    in_rollout,
    parse_entry,
    rollout_percent,
)

from .support import exchange, wait_for

# --- a DNS server on loopback ----------------------------------------------------------------


class _ServFail(Exception):
    """Raised by the zone for a name that should get SERVFAIL."""


class Zone(common.ResolverBase):
    """The records the loopback server answers with; a test changes them between refreshes."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[bytes, list[dns.RRHeader]] = {}
        self.servfail: set[bytes] = set()

    def set(self, name: str, *, a=(), aaaa=(), txt=()) -> None:
        key = name.encode()
        self.records[key] = (
            [dns.RRHeader(key, dns.A, payload=dns.Record_A(ip)) for ip in a]
            + [dns.RRHeader(key, dns.AAAA, payload=dns.Record_AAAA(ip)) for ip in aaaa]
            + [dns.RRHeader(key, dns.TXT, payload=dns.Record_TXT(*(part.encode() for part in value)))
               for value in txt]
        )

    def remove(self, name: str) -> None:
        self.records.pop(name.encode(), None)

    def _lookup(self, name, cls, type, timeout):
        if name in self.servfail:
            return defer.fail(_ServFail(name))
        if name not in self.records:
            return defer.fail(error.DomainError(name))
        return defer.succeed(([rr for rr in self.records[name] if rr.type == type], [], []))


class _ServerFactory(server.DNSServerFactory):
    def gotResolverError(self, failure, protocol, message, address):
        if not failure.check(_ServFail):
            return super().gotResolverError(failure, protocol, message, address)
        # The base class would also log the failure as an unhandled error.
        response = dns.Message(id=message.id, answer=1, opCode=message.opCode, rCode=dns.ESERVER)
        response.queries = message.queries
        response.timeReceived = message.timeReceived
        self.sendReply(protocol, response, address)


@pytest.fixture
def zone(request):
    """A Twisted Names server on 127.0.0.1 (UDP, random port) serving a Zone; yields
    (zone, a Twisted DNS client resolver pointed at it)."""
    records = Zone()
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(_ServerFactory(clients=[records])), interface="127.0.0.1")
    request.addfinalizer(lambda: pytest_twisted.blockon(defer.maybeDeferred(port.stopListening)))
    return records, client.Resolver(servers=[("127.0.0.1", port.getHost().port)])


# --- the rollout rule --------------------------------------------------------------------------


def _no_coin():
    raise AssertionError("only a loopback requester gets the coin")


# derper's own table (cmd/derper/bootstrap_dns_test.go): Go's PCG seeded with the address.
@pytest.mark.parametrize("ip, percent, expected", [
    ("10.0.0.1", 0.0, False),
    ("10.0.0.1", 1.0, True),
    ("", 1.0, True),
    ("", 0.0, False),
    ("", 0.5, False),
    ("1.2.3.4", 0.5, True),
    ("1.2.3.5", 0.5, True),
    ("1.2.3.6", 0.5, False),
    ("1.2.3.7", 0.5, True),
    ("1.2.3.8", 0.5, False),
    ("1.2.3.9", 0.5, True),
    ("1.2.3.10", 0.5, True),
])
def test_rollout_matches_derper(ip, percent, expected):
    assert in_rollout(ip, percent, _no_coin) is expected


def test_rollout_share_is_the_percentage():
    for percent in (0.5, 0.1):
        share = sum(in_rollout(f"1.2.{a}.{b}", percent, _no_coin) for a in range(256) for b in range(256)) / 65536
        assert abs(share - percent) < 0.005, (percent, share)


def test_rollout_is_fixed_per_address_and_ipv6_is_keyed_by_all_16_bytes():
    addresses = [f"2001:db8::{i:x}" for i in range(200)]
    first = [in_rollout(ip, 0.5, _no_coin) for ip in addresses]
    assert first == [in_rollout(ip, 0.5, _no_coin) for ip in addresses]
    # Addresses differing only in the low half land on both sides.
    assert any(first) and not all(first)
    # A mapped IPv4 address is the IPv4 client (Go reports it so).
    assert in_rollout("::ffff:1.2.3.6", 0.5, _no_coin) is in_rollout("1.2.3.6", 0.5, _no_coin) is False


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.9.9.9", "::1"])
def test_loopback_requester_flips_a_coin(ip):
    assert in_rollout(ip, 0.3, lambda: 0.49) is True
    assert in_rollout(ip, 0.3, lambda: 0.5) is False
    # 0% and 100% are decided before any coin.
    assert in_rollout(ip, 0.0, _no_coin) is False
    assert in_rollout(ip, 1.0, _no_coin) is True


@pytest.mark.parametrize("values, expected", [
    (["50"], 0.5),
    (["0"], 0.0),
    (["100"], 1.0),
    (["+7"], 0.07),
    (["050"], 0.5),
    (["101"], 0.0),
    (["-1"], 0.0),
    ([" 5"], 0.0),
    (["5.0"], 0.0),
    (["1_0"], 0.0),
    (["half"], 0.0),
    ([], 0.0),
    (["10", "junk", "20"], 0.2),
    (["10", "200"], 0.1),
])
def test_rollout_percent_from_txt_values(values, expected):
    assert rollout_percent(values) == expected


def test_parse_entry():
    assert parse_entry("log.example.com") == ("log.example.com", "")
    assert parse_entry("log.example.com/rollout.example.com") == ("log.example.com", "rollout.example.com")


# --- the body and the counters -----------------------------------------------------------------


def test_encode_is_go_marshal_indent():
    body = encode({"b.example": ["1.2.3.4", "2001:db8::1"], "a.example": ["10.0.0.1"]})
    assert body == (b'{\n\t"a.example": [\n\t\t"10.0.0.1"\n\t],\n'
                    b'\t"b.example": [\n\t\t"1.2.3.4",\n\t\t"2001:db8::1"\n\t]\n}')
    assert encode({}) == b"null"


PUBLISHED = {"tailscale.example": ["10.10.10.10"]}


def _answers(percent=1.0):
    return Answers(
        published=PUBLISHED,
        unpublished={"log.example": [], "control.example": ["1.2.3.4"]},
        percent={"log.example": 1.0, "control.example": percent},
        published_json=encode(PUBLISHED),
    )


def _counts(stats):
    return {m.name: getattr(stats, m.attr) for m in stats.METRICS}


def test_answer_without_q_is_the_published_list():
    stats = BootstrapDNSStats()
    assert answer(_answers(), "", "1.2.3.4", stats) == encode(PUBLISHED)
    assert stats.requests == 1
    assert stats.queried_domains == 0
    assert stats.published_hits == stats.unpublished_hits == stats.unpublished_misses == 0


@pytest.mark.parametrize("q", ["log.example", "login.example"])
def test_unpublished_name_without_addresses_or_unknown_is_a_miss(q):
    # derper's TestUnpublishedDNSEmptyList: an empty list is no hit.
    stats = BootstrapDNSStats()
    assert answer(_answers(), q, "1.2.3.4", stats) == encode(PUBLISHED)
    assert (stats.unpublished_hits, stats.unpublished_misses, stats.unpublished_percent_misses) == (0, 1, 0)


def test_unpublished_name_in_rollout_is_answered_alone():
    stats = BootstrapDNSStats()
    body = answer(_answers(), "control.example", "1.2.3.4", stats)
    assert json.loads(body) == {"control.example": ["1.2.3.4"]}
    assert (stats.unpublished_hits, stats.unpublished_misses) == (1, 0)


def test_unpublished_name_out_of_rollout_gets_the_published_list():
    stats = BootstrapDNSStats()
    assert answer(_answers(percent=0.5), "control.example", "1.2.3.6", stats) == encode(PUBLISHED)
    # derper counts it three ways: a hit, a percent miss, and (on no published list) a miss.
    assert (stats.unpublished_hits, stats.unpublished_percent_misses, stats.unpublished_misses) == (1, 1, 1)
    assert json.loads(answer(_answers(percent=0.5), "control.example", "1.2.3.4", stats)) == {
        "control.example": ["1.2.3.4"]}


def test_published_name_asked_by_q_is_a_published_hit():
    stats = BootstrapDNSStats()
    assert answer(_answers(), "tailscale.example", "1.2.3.4", stats) == encode(PUBLISHED)
    assert (stats.published_hits, stats.unpublished_misses) == (1, 0)


def test_queried_domains_counts_distinct_names_and_forgets_past_500():
    stats = BootstrapDNSStats()
    for q in ["a.io", "b.io", "c.io", "d.io", "e.io", "e.io", "e.io", "a.io"]:
        answer(Answers(), q, "1.2.3.4", stats)
    assert stats.queried_domains == 5
    for i in range(495):
        answer(Answers(), f"n{i}.io", "1.2.3.4", stats)
    assert stats.queried_domains == 500
    answer(Answers(), "one-more.io", "1.2.3.4", stats)
    assert stats.queried_domains == 0


def test_nothing_configured_answers_empty_and_is_not_refreshed():
    bootstrap = BootstrapDNS((), ())
    assert not bootstrap.configured
    assert bootstrap.respond("", "1.2.3.4") == b""
    assert bootstrap.stats.requests == 1


# --- resolving through a DNS server -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refresh_resolves_addresses_and_rollout_through_dns(zone):
    records, resolver = zone
    records.set("pub.test", a=["192.0.2.1", "192.0.2.2"], aaaa=["2001:db8::1"])
    records.set("v6only.test", aaaa=["2001:db8::6", "::ffff:192.0.2.9"])
    records.set("hidden.test", a=["192.0.2.10"])
    records.set("rollout.test", txt=[["4", "2"]])
    records.set("plain.test", a=["192.0.2.20"])
    bootstrap = BootstrapDNS(("pub.test", "v6only.test"), ("hidden.test/rollout.test", "plain.test"),
                             resolver=resolver)
    await bootstrap.refresh()
    got = bootstrap.answers
    assert {name: sorted(ips) for name, ips in got.published.items()} == {
        "pub.test": ["192.0.2.1", "192.0.2.2", "2001:db8::1"],
        "v6only.test": ["192.0.2.9", "2001:db8::6"],
    }
    assert got.unpublished == {"hidden.test": ["192.0.2.10"], "plain.test": ["192.0.2.20"]}
    # A TXT record's strings are one value ("4" + "2"); a name without a TXT name is 100%.
    assert got.percent == {"hidden.test": 0.42, "plain.test": 1.0}
    assert json.loads(got.published_json) == got.published
    assert bootstrap.stats.refreshes == 1 and bootstrap.stats.lookup_failures == 0


@pytest_twisted.ensureDeferred
async def test_published_addresses_are_shuffled_each_refresh(zone):
    records, resolver = zone
    records.set("pub.test", a=["192.0.2.1", "192.0.2.2", "192.0.2.3"])
    shuffled = []

    def shuffle(ips):
        shuffled.append(list(ips))
        ips.reverse()

    bootstrap = BootstrapDNS(("pub.test",), (), resolver=resolver, shuffle=shuffle)
    await bootstrap.refresh()
    await bootstrap.refresh()
    # Each refresh shuffles the answer as resolved, not the last refresh's order.
    assert shuffled == [["192.0.2.1", "192.0.2.2", "192.0.2.3"]] * 2
    assert bootstrap.answers.published["pub.test"] == ["192.0.2.3", "192.0.2.2", "192.0.2.1"]


def _lines(log_events, text):
    return [formatEvent(e) for e in log_events if text in formatEvent(e)]


@pytest_twisted.ensureDeferred
async def test_a_failing_name_keeps_its_last_answer_and_is_logged_once_per_outage(zone, log_events):
    records, resolver = zone
    records.set("pub.test", a=["192.0.2.1"])
    records.set("other.test", a=["192.0.2.7"])
    bootstrap = BootstrapDNS(("pub.test", "other.test", "never.test"), (), resolver=resolver)
    await bootstrap.refresh()
    assert bootstrap.answers.published == {"pub.test": ["192.0.2.1"], "other.test": ["192.0.2.7"]}
    assert bootstrap.stats.lookup_failures == 1  # never.test
    assert len(_lines(log_events, "lookup never.test: no such host; no answer for it yet")) == 1

    records.remove("pub.test")
    records.servfail.add(b"other.test")
    await bootstrap.refresh()
    await bootstrap.refresh()
    assert bootstrap.answers.published == {"pub.test": ["192.0.2.1"], "other.test": ["192.0.2.7"]}
    assert bootstrap.stats.lookup_failures == 1 + 3 * 2
    assert len(_lines(log_events, "lookup pub.test: no such host; keeping its last 1 addresses")) == 1
    assert len(_lines(log_events, "lookup other.test: server failure (SERVFAIL); keeping its last 1")) == 1
    assert len(_lines(log_events, "lookup never.test")) == 1

    records.set("pub.test", a=["192.0.2.3"])
    await bootstrap.refresh()
    assert bootstrap.answers.published["pub.test"] == ["192.0.2.3"]
    assert len(_lines(log_events, "lookup pub.test resolves again, after 2 failed refreshes")) == 1


@pytest_twisted.ensureDeferred
async def test_rollout_txt_missing_is_zero_but_a_server_failure_keeps_the_last(zone, log_events):
    records, resolver = zone
    records.set("hidden.test", a=["192.0.2.10"])
    records.set("rollout.test", txt=[["30"]])
    bootstrap = BootstrapDNS((), ("hidden.test/rollout.test",), resolver=resolver)
    await bootstrap.refresh()
    assert bootstrap.answers.percent == {"hidden.test": 0.3}
    # Published list not configured: no ?q= match means an empty body, as derper's nil bytes.
    assert bootstrap.answers.published_json == b""

    records.servfail.add(b"rollout.test")
    await bootstrap.refresh()
    assert bootstrap.answers.percent == {"hidden.test": 0.3}
    assert len(_lines(log_events, "lookup rollout.test TXT: server failure (SERVFAIL); keeping rollout of hidden.test at 30%")) == 1

    records.servfail.clear()
    records.set("rollout.test", txt=[["junk"]])
    await bootstrap.refresh()
    assert bootstrap.answers.percent == {"hidden.test": 0.0}
    assert len(_lines(log_events, "lookup rollout.test TXT resolves again, after 1 failed refreshes")) == 1

    records.set("rollout.test", txt=[["80"]])
    await bootstrap.refresh()
    assert bootstrap.answers.percent == {"hidden.test": 0.8}
    records.remove("rollout.test")
    await bootstrap.refresh()
    assert bootstrap.answers.percent == {"hidden.test": 0.0}
    assert len(_lines(log_events, "lookup rollout.test TXT: no such host; rollout of hidden.test is 0%")) == 1
    assert bootstrap.stats.lookup_failures == 2


# --- end to end through the main site -----------------------------------------------------------


def _get(port: int, target: str, source: str | None) -> tuple[int, dict[str, str], bytes]:
    """One request, through a PROXY v1 line naming ``source`` as the requester if given (debug
    pages refuse requests from the proxy without a debug key); read until the server closes."""
    data = f"GET {target} HTTP/1.1\r\nHost: derp.test\r\nConnection: close\r\n\r\n".encode()
    if source is not None:
        proto, dst = ("TCP6", "::1") if ":" in source else ("TCP4", "127.0.0.1")
        data = f"PROXY {proto} {source} {dst} 40000 {port}\r\n".encode() + data
    raw = exchange(port, data)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, body


def get(port, target, source=None):
    return deferToThread(_get, port, target, source)


def _varz(body: bytes) -> dict[str, float]:
    return {name: float(value) for name, _, value in
            (line.partition(" ") for line in body.decode().splitlines() if line.startswith(("bootstrap_dns", "derpbox_bootstrap")))}


@pytest_twisted.ensureDeferred
async def test_bootstrap_dns_end_to_end(start_server, zone, tmp_path):
    records, resolver = zone
    records.set("pub.test", a=["192.0.2.1"], aaaa=["2001:db8::1"])
    records.set("pub2.test", a=["192.0.2.2"])
    records.set("hidden.test", a=["192.0.2.10"])
    records.set("hidden-rollout.test", txt=[["100"]])
    records.set("half.test", aaaa=["2001:db8::50"])
    records.set("half-rollout.test", txt=[["50"]])
    debug_key = tmp_path / "debug.key"
    debug_key.write_text("sesame\n")
    server_ = await start_server(
        "-bootstrap-dns-names", "pub.test,pub2.test",
        "-unpublished-bootstrap-dns-names", "hidden.test/hidden-rollout.test,half.test/half-rollout.test",
        "-proxy-protocol", "auto", "-trusted-proxies", "127.0.0.1",
        tls=False, dns_resolver=resolver,
        # Connections from the trusted proxy never get address-based debug access: the key does.
        environ={"TS_DEBUG_KEY_PATH": str(debug_key)},
    )
    service = server_.service
    bootstrap = service.bootstrap_dns
    # The service refreshes at start, then every ten minutes.
    timers = [s for s in service if isinstance(s, TimerService) and s.call[0] == bootstrap.refresh_in_background]
    assert [t.step for t in timers] == [REFRESH_INTERVAL]
    await wait_for(lambda: bootstrap.stats.refreshes >= 1)
    port = server_.port

    status, headers, body = await get(port, "/bootstrap-dns")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert headers["x-content-type-options"] == "nosniff" and "strict-transport-security" in headers
    assert body.startswith(b'{\n\t"pub.test": [\n\t\t')
    published = json.loads(body)
    assert {name: sorted(ips) for name, ips in published.items()} == {
        "pub.test": ["192.0.2.1", "2001:db8::1"], "pub2.test": ["192.0.2.2"]}

    # An unpublished name at 100%, asked by name: that name alone.
    _, _, body = await get(port, "/bootstrap-dns?q=hidden.test")
    assert json.loads(body) == {"hidden.test": ["192.0.2.10"]}
    # At 50%, in or out by the requester's address (derper's vectors: 1.2.3.4 in, 1.2.3.6 out).
    _, _, body = await get(port, "/bootstrap-dns?q=half.test", source="1.2.3.4")
    assert json.loads(body) == {"half.test": ["2001:db8::50"]}
    _, _, body = await get(port, "/bootstrap-dns?q=half.test", source="1.2.3.6")
    assert json.loads(body) == published
    # Neither list: the published list, and nothing unpublished leaks into it.
    _, _, body = await get(port, "/bootstrap-dns?q=other.test")
    assert json.loads(body) == published

    # The next refresh sees changed records; a name that fails keeps its last answer.
    records.set("pub.test", a=["192.0.2.99"])
    records.remove("pub2.test")
    records.set("hidden-rollout.test", txt=[["0"]])
    await bootstrap.refresh()
    _, _, body = await get(port, "/bootstrap-dns?q=hidden.test", source="1.2.3.4")
    assert json.loads(body) == {"pub.test": ["192.0.2.99"], "pub2.test": ["192.0.2.2"]}

    status, _, body = await get(port, "/debug/varz?debugkey=sesame")
    assert status == 200
    assert _varz(body) == {
        "bootstrap_dns_requests": 6,
        "bootstrap_dns_published_hits": 0,
        "bootstrap_dns_published_misses": 0,
        "bootstrap_dns_unpublished_hits": 4,  # hidden, half twice, hidden at 0%
        "bootstrap_dns_unpublished_misses": 3,  # half out, other.test, hidden at 0%
        "bootstrap_dns_unpublished_percent_misses": 2,
        "bootstrap_dns_queried_domains": 3,
        "derpbox_bootstrap_dns_refreshes": 2,
        "derpbox_bootstrap_dns_lookup_failures": 1,
    }
    assert b"# TYPE bootstrap_dns_requests counter" in body
    _, _, body = await get(port, "/debug/vars?debugkey=sesame")
    assert json.loads(body)["bootstrap_dns_unpublished_percent_misses"] == 2


@pytest_twisted.ensureDeferred
async def test_no_bootstrap_names_answers_empty_and_counts(start_server):
    server_ = await start_server(tls=False)
    assert not any(isinstance(s, TimerService) and s.call[0] == server_.service.bootstrap_dns.refresh_in_background
                   for s in server_.service)
    status, headers, body = await get(server_.port, "/bootstrap-dns?q=a.test")
    assert (status, body, headers["content-type"]) == (200, b"", "application/json")
    _, _, body = await get(server_.port, "/debug/varz")
    varz = _varz(body)
    assert varz["bootstrap_dns_requests"] == 1 and varz["bootstrap_dns_unpublished_misses"] == 1
