"""A metric declared once: its exposition name, type and help beside the counter it reads.

Each stats object (relay, STUN, TLS, admission, certificates) lists its metrics in
a ``METRICS`` tuple next to the attributes they read; ``derpbox.metrics`` renders
every declared metric from that list and nothing else, so a name, type or help
text is never written twice. Plain attributes keep the hot path to one add.
"""

from __future__ import annotations

from typing import NamedTuple

COUNTER, GAUGE, HISTOGRAM, UNTYPED = "counter", "gauge", "histogram", "untyped"


class Metric(NamedTuple):
    attr: str  # the attribute of the stats object holding the value
    name: str  # the exposition name (derper's, where derper has the metric)
    type: str  # COUNTER, GAUGE, UNTYPED (as derper's float expvars) or HISTOGRAM (the attribute is a Histogram)
    help: str
    # With labels, the attribute is a dict keyed by the label value (a tuple of
    # values for several labels); every key present is one sample.
    labels: tuple[str, ...] = ()


def counter(attr: str, name: str, help: str, labels: tuple[str, ...] = ()) -> Metric:
    return Metric(attr, name, COUNTER, help, labels)


def gauge(attr: str, name: str, help: str, labels: tuple[str, ...] = ()) -> Metric:
    return Metric(attr, name, GAUGE, help, labels)


def untyped(attr: str, name: str, help: str) -> Metric:
    return Metric(attr, name, UNTYPED, help)


def histogram(attr: str, name: str, help: str) -> Metric:
    return Metric(attr, name, HISTOGRAM, help)


class Histogram:
    """Observations counted into buckets with upper bounds (Prometheus semantics, le)."""

    __slots__ = ("bounds", "counts", "sum", "count", "_bucket_of")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0
        # For whole-number bounds: the bucket of each whole number up to the last bound.
        whole = all(isinstance(b, int) for b in bounds) and bounds and bounds[-1] <= 1000
        self._bucket_of = tuple(next(i for i, b in enumerate(bounds) if v <= b)
                                for v in range(bounds[-1] + 1)) if whole else ()

    def observe_int(self, n: int) -> None:
        """observe() of a whole number >= 0 on whole-number bounds, by table (the hot path's)."""
        self.sum += n
        self.count += 1
        if n < len(self._bucket_of):
            self.counts[self._bucket_of[n]] += 1

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return


def attributes(metrics: tuple[Metric, ...]) -> tuple[str, ...]:
    """The plain (unlabelled) counters and gauges a stats object must start at zero."""
    return tuple(m.attr for m in metrics if not m.labels and m.type != HISTOGRAM)
