"""Prometheus text exposition (format 0.0.4) and expvar-style JSON of derpbox's stats.

Family names, types and labels follow derper's `/debug/varz` (spec section 6), so
dashboards built for derper keep working: derper's counters carry no `_total`
suffix, and neither do ours. derpbox-only families are prefixed `derpbox_`.

`promtool check metrics` (2.42 has no option to turn linting off) therefore exits
with rc 3, reporting only `counter metrics should have "_total" suffix` for
derper-named counters, `non-counter metrics should not have "_total" suffix` for
derper's gauge `derp_clients_total` and `metric names should not contain
abbreviated units` for derper's `uptime_sec` and `derp_average_queue_duration_ms`, and `non-histogram metrics should not have "le"
label` for derper's counter `derp_tcp_rtt`; the exposition itself parses cleanly
(rc 1 would mean a parse error). tests/test_metrics.py asserts exactly that.
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field
from operator import attrgetter

from . import __version__
from .counters import HISTOGRAM, Metric
from .logs import ACCEPT_REFUSALS

__all__ = ["CONTENT_TYPE", "Family", "Metrics", "declared", "render", "open_fds", "sample_key", "vars_of"]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def declared(stats, metrics: tuple[Metric, ...]) -> list[Family]:
    """The families a stats object declares (derpbox.counters), read from it now."""
    fams = []
    for m in metrics:
        fam = Family(m.name, m.type, m.help)
        value = attrgetter(m.attr)(stats)
        if m.type == HISTOGRAM:
            cumulative = 0
            for bound, n in zip(value.bounds, value.counts):
                cumulative += n
                fam.add_series("_bucket", cumulative, le=_format_value(bound))
            fam.add_series("_bucket", value.count, le="+Inf")
            fam.add_series("_sum", value.sum)
            fam.add_series("_count", value.count)
        elif m.labels:
            for key, v in value.items():
                fam.add(v, **dict(zip(m.labels, key if isinstance(key, tuple) else (key,))))
        else:
            fam.add(value)
        fams.append(fam)
    return fams


@dataclass
class Family:
    name: str
    type: str  # "counter", "gauge" or "untyped"
    help: str
    # (labels, value, name suffix): histograms add _bucket, _sum and _count series.
    samples: list[tuple[tuple[tuple[str, str], ...], float, str]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> "Family":
        self.samples.append((tuple(labels.items()), value, ""))
        return self

    def add_series(self, suffix: str, value: float, **labels: str) -> "Family":
        self.samples.append((tuple(labels.items()), value, suffix))
        return self


def open_fds() -> int:
    try:
        # Linux 6.2+ gives the count as the directory's size: no listing of 10,000 entries
        # on every scrape. Older kernels say 0 there.
        count = os.stat("/proc/self/fd").st_size
        return count if count else len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _format_value(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def render(families: list[Family]) -> bytes:
    """Prometheus text format 0.0.4, HELP and TYPE for every family."""
    out: list[str] = []
    for fam in families:
        out.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.type}")
        for labels, value, suffix in fam.samples:
            if labels:
                text = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels)
                out.append(f"{fam.name}{suffix}{{{text}}} {_format_value(value)}")
            else:
                out.append(f"{fam.name}{suffix} {_format_value(value)}")
    return ("\n".join(out) + "\n").encode()


WORKER_LINKS = "derpbox_worker_links_up"


class Metrics:
    """All of derpbox's metrics, read from the live stats objects on demand."""

    def __init__(
        self,
        relay,
        stun_stats=None,
        admission_stats=None,
        tls_stats=None,
        *,
        cert_source=None,
        mesh_stats=None,
        bootstrap_dns_stats=None,
        rtt_stats=None,
        worker_links=None,
        start_time: float | None = None,
        clock=time.time,
    ) -> None:
        self.relay = relay
        self.stun_stats = stun_stats
        self.admission_stats = admission_stats
        self.tls_stats = tls_stats
        # The TLS certificate source (manual files or ACME), None without TLS.
        self.cert_source = cert_source
        self.mesh_stats = mesh_stats
        self.bootstrap_dns_stats = bootstrap_dns_stats
        # derp_tcp_rtt (derpbox.web.tcp_stats), None when TS_DERP_DISABLE_RTT_STATS turns it off.
        self.rtt_stats = rtt_stats
        # derper's derp_memstats_sys0 is the Go runtime's memory at start; here the resident size.
        self.memory_at_start = _resident_bytes()
        # A worker (derpbox.workers): how many of its links to the other workers are up.
        self.worker_links = worker_links
        self.clock = clock
        self.start_time = clock() if start_time is None else start_time

    def uptime(self) -> float:
        return max(0.0, self.clock() - self.start_time)

    def families(self) -> list[Family]:
        fams: list[Family] = []
        relay = self.relay
        s = relay.stats
        fds = open_fds()

        fams += declared(s, s.METRICS)
        local, remote = relay.client_counts()
        fams.append(Family("derp_clients_total", "gauge", "Distinct client keys connected, region-wide.").add(local + remote))
        fams.append(Family("derp_clients_local", "gauge", "Distinct client keys connected to this node.").add(local))
        fams.append(Family("derp_clients_remote", "gauge", "Distinct client keys connected only via mesh peers.").add(remote))
        fams.append(Family("derp_current_file_descriptors", "gauge", "Open file descriptors of the process.").add(fds))
        fams += declared(ACCEPT_REFUSALS, ACCEPT_REFUSALS.METRICS)
        if self.worker_links is not None:
            fams.append(Family(WORKER_LINKS, "gauge", "Links from this worker to the node's other workers that are up.")
                        .add(self.worker_links()))
        if self.stun_stats is not None:
            fams += declared(self.stun_stats, self.stun_stats.METRICS)

        api_stats = self.admission_stats.tailscale_api if self.admission_stats is not None else None
        # relay.rate_limits: derper shows its rate-limit metrics only with -rate-config.
        for stats in (self.tls_stats, self.admission_stats, api_stats, self.cert_source, self.mesh_stats,
                      self.bootstrap_dns_stats, relay.rate_limits, self.rtt_stats):
            if stats is not None:
                fams += declared(stats, stats.METRICS)

        fams.append(Family("derp_memstats_sys0", "gauge", "Resident memory of the process at start, in bytes "
                           "(derper: the Go runtime's memory at start).").add(self.memory_at_start))
        fams.append(Family("process_start_unix_time", "gauge", "Process start time, seconds since the Unix epoch.").add(int(self.start_time)))
        fams.append(Family("uptime_sec", "counter", "Seconds since the process started.").add(int(self.uptime())))
        fams.append(Family("version", "gauge", "Version of the running binary.").add(1, version=__version__, binary="derpbox"))
        fams.append(Family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.").add(_resident_bytes()))
        fams.append(Family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.").add(round(_cpu_seconds(), 3)))
        fams.append(Family("process_open_fds", "gauge", "Number of open file descriptors.").add(fds))
        return fams

    def exposition(self) -> bytes:
        return render(self.families())

    def vars(self) -> dict:
        return vars_of(self.families())


def sample_key(labels: tuple[tuple[str, str], ...], suffix: str) -> str:
    """A labelled sample's key in the JSON view: "label=value,...", a histogram's series first."""
    return ",".join([suffix.lstrip("_")] * bool(suffix) + [f"{k}={v}" for k, v in labels])


def vars_of(families: list[Family]) -> dict:
    """The families as JSON: unlabelled ones as numbers, labelled ones as {sample_key: number}
    maps (expvar-like; not derper's exact nesting)."""
    out: dict = {}
    for fam in families:
        if len(fam.samples) == 1 and not fam.samples[0][0] and not fam.samples[0][2]:
            out[fam.name] = fam.samples[0][1]
        else:
            out[fam.name] = {sample_key(labels, suffix): value for labels, value, suffix in fam.samples}
    out["derp_version"] = __version__
    return out
