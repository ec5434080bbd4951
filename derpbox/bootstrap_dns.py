"""`/bootstrap-dns`: derper's DNS answers for clients whose own DNS is broken.

derper resolves ``-bootstrap-dns-names`` and ``-unpublished-bootstrap-dns-names``
every ten minutes and serves the cached result (spec 2.2):

- without ``?q=``, or for a ``q`` it cannot answer, the published names as
  tab-indented JSON ``{"name": ["ip", ...]}``, each list shuffled per refresh;
- ``?q=<unpublished name>`` gets that name alone, if the requester is in the
  name's rollout: an entry ``name/txtname`` reads a percentage 0..100 from the
  TXT record ``txtname`` (missing or malformed: 0); a plain entry is 100%. The
  draw is Go's PCG seeded with the requester's IP, so a client is consistently in
  or out; a loopback requester flips a coin instead (derper's local-testing rule).

Unlike derper, which drops a name whose lookup fails until the next refresh, the
last good answer is kept (a DNS outage is when clients need this most); the
failure is counted and logged once per outage. A TXT name that does not exist
still means 0%, so deleting the record stops a rollout.

The pure parts (JSON, the rollout rule, the answer to one request) come first; the
resolving (``BootstrapDNS``) uses a Twisted Names resolver, by default the system's.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
from dataclasses import dataclass, field
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import client, dns, error

from .counters import counter
from .netaddr import ip16, parse_ip

__all__ = [
    "REFRESH_INTERVAL",
    "Answers",
    "BootstrapDNS",
    "BootstrapDNSStats",
    "answer",
    "encode",
    "in_rollout",
    "parse_entry",
    "rollout_percent",
]

log = Logger()

# derper sleeps ten minutes between refreshes. Each lookup is bounded by Twisted's
# default retransmit schedule (1+3+11+45 s), derper's one-minute refresh budget.
REFRESH_INTERVAL = 600.0
# derper forgets every queried name once it has seen more than this many.
MAX_QUERIED = 500


class BootstrapDNSStats:
    """derper's seven bootstrap-DNS counters, and derpbox's view of its lookups."""

    METRICS = (
        counter("requests", "bootstrap_dns_requests", "Requests to /bootstrap-dns."),
        counter("published_hits", "bootstrap_dns_published_hits",
                "?q= queries for a published name that has addresses."),
        counter("published_misses", "bootstrap_dns_published_misses",
                "?q= queries for a published name without addresses."),
        counter("unpublished_hits", "bootstrap_dns_unpublished_hits",
                "?q= queries for an unpublished name that has addresses (in rollout or not)."),
        counter("unpublished_misses", "bootstrap_dns_unpublished_misses",
                "?q= queries not answered by name: neither an unpublished name with addresses nor a published one."),
        counter("unpublished_percent_misses", "bootstrap_dns_unpublished_percent_misses",
                "?q= queries for an unpublished name from a requester outside its rollout percentage."),
        counter("queried_domains", "bootstrap_dns_queried_domains",
                "Distinct ?q= names seen (forgotten all at once past 500, as derper does)."),
        counter("refreshes", "derpbox_bootstrap_dns_refreshes", "Completed refreshes of the bootstrap DNS names."),
        counter("lookup_failures", "derpbox_bootstrap_dns_lookup_failures",
                "Bootstrap DNS lookups (addresses or rollout TXT) that failed; the last good answer is kept."),
    )

    def __init__(self) -> None:
        self.requests = 0
        self.published_hits = 0
        self.published_misses = 0
        self.unpublished_hits = 0
        self.unpublished_misses = 0
        self.unpublished_percent_misses = 0
        self.refreshes = 0
        self.lookup_failures = 0
        self.queried: set[str] = set()

    @property
    def queried_domains(self) -> int:
        return len(self.queried)

    def note_query(self, q: str) -> None:
        self.queried.add(q)
        if len(self.queried) > MAX_QUERIED:
            self.queried.clear()


# --- pure logic ------------------------------------------------------------------------------


def parse_entry(entry: str) -> tuple[str, str]:
    """``name`` or ``name/txtname`` -> (name, txtname or "")."""
    name, _, txt_name = entry.partition("/")
    return name, txt_name


_GO_ATOI = re.compile(r"[+-]?[0-9]+")


def rollout_percent(values: list[str]) -> float:
    """The rollout fraction (0.0..1.0) from a TXT record's values: the last one that is an
    integer 0..100 (Go's strconv.Atoi: no spaces), 0 if none is."""
    percent = 0.0
    for value in values:
        if _GO_ATOI.fullmatch(value) and 0 <= int(value) <= 100:
            percent = int(value) / 100
    return percent


_MASK64 = (1 << 64) - 1
_MASK128 = (1 << 128) - 1
# Go's math/rand/v2 PCG: a 128-bit LCG (multiplier, increment) with the DXSM output step.
_PCG_MUL = (2549297995355413924 << 64) | 4865540595714422341
_PCG_INC = (6364136223846793005 << 64) | 1442695040888963407
_DXSM_MUL = 0xDA942042E4DD58B5


def _go_pcg_float64(seed1: int, seed2: int) -> float:
    """The first Float64 of Go's ``rand.New(rand.NewPCG(seed1, seed2))``."""
    state = (((seed1 << 64) | seed2) * _PCG_MUL + _PCG_INC) & _MASK128
    hi, lo = state >> 64, state & _MASK64
    hi ^= hi >> 32
    hi = (hi * _DXSM_MUL) & _MASK64
    hi ^= hi >> 48
    hi = (hi * (lo | 1)) & _MASK64
    return (hi & ((1 << 53) - 1)) / (1 << 53)


def in_rollout(remote_ip: str, percent: float, coin: Callable[[], float] = random.random) -> bool:
    """Whether a requester at ``remote_ip`` gets an unpublished name rolled out to ``percent``
    (0.0..1.0), decided as derper does so both servers agree on every client."""
    if percent == 0:
        return False
    if percent == 1:
        return True
    ip = parse_ip(remote_ip)
    if ip is None:
        return False
    if ip.is_loopback:
        return coin() < 0.5
    seed = ip16(str(ip))
    return percent > _go_pcg_float64(int.from_bytes(seed[:8], "little"), int.from_bytes(seed[8:], "little"))


def encode(ips: dict[str, list[str]]) -> bytes:
    """Go's json.MarshalIndent(map, "", "\\t"): keys sorted, tab-indented; an empty map is
    ``null`` (derper marshals a nil map when no name resolved)."""
    if not ips:
        return b"null"
    return json.dumps(ips, indent="\t", sort_keys=True, ensure_ascii=False).encode()


@dataclass(frozen=True)
class Answers:
    """What one refresh produced: addresses per name, rollout per unpublished name."""

    published: dict[str, list[str]] = field(default_factory=dict)
    unpublished: dict[str, list[str]] = field(default_factory=dict)
    percent: dict[str, float] = field(default_factory=dict)
    # The body without ?q=; empty until the first refresh, and when no name is published.
    published_json: bytes = b""


def answer(answers: Answers, q: str, remote_ip: str, stats: BootstrapDNSStats,
           coin: Callable[[], float] = random.random) -> bytes:
    """The body for one request (``q`` is "" without ?q=), counted as derper counts it."""
    stats.requests += 1
    if q:
        stats.note_query(q)
        ips = answers.unpublished.get(q)
        if ips:
            stats.unpublished_hits += 1
            if in_rollout(remote_ip, answers.percent.get(q, 0.0), coin):
                return encode({q: ips})
            stats.unpublished_percent_misses += 1
        # derper then counts the query against the published list, or, for a name on
        # neither list (and an unpublished one out of rollout), as an unpublished miss.
        if q in answers.published:
            if answers.published[q]:
                stats.published_hits += 1
            else:
                stats.published_misses += 1
        else:
            stats.unpublished_misses += 1
    return answers.published_json


# --- resolving -------------------------------------------------------------------------------


def _record_text(record: dns.RRHeader) -> str:
    if record.type == dns.A:
        return record.payload.dottedQuad()
    # Go prints an IPv4-mapped AAAA as the IPv4 address.
    return str(parse_ip(str(ipaddress.IPv6Address(record.payload.address))))


_REASONS = (
    (error.DNSNameError, "no such host"),
    (error.DNSServerError, "server failure (SERVFAIL)"),
    (error.DNSQueryRefusedError, "query refused"),
    (defer.TimeoutError, "timed out"),
)


def _reason(exc: BaseException) -> str:
    for kind, text in _REASONS:
        if isinstance(exc, kind):
            return text
    return str(exc) or type(exc).__name__


class BootstrapDNS:
    """Resolves the configured names on ``refresh()`` and answers requests from the result.

    ``resolver`` is a Twisted Names IResolver; None means the system's
    (``twisted.names.client.createResolver()``: /etc/hosts, then /etc/resolv.conf's
    servers), made at the first refresh.
    """

    def __init__(self, published: tuple[str, ...], unpublished: tuple[str, ...], *, resolver=None,
                 stats: BootstrapDNSStats | None = None, coin: Callable[[], float] = random.random,
                 shuffle: Callable[[list], None] = random.shuffle) -> None:
        self.published = tuple(published)
        self.unpublished = tuple(parse_entry(entry) for entry in unpublished)
        self.stats = stats if stats is not None else BootstrapDNSStats()
        self.answers = Answers()
        self._resolver = resolver
        self._coin = coin
        self._shuffle = shuffle
        # Last good addresses per name, rollout fraction per unpublished name.
        self._addresses: dict[str, list[str]] = {}
        self._percent: dict[str, float] = {}
        # Names (or TXT names) failing now -> failed lookups in this outage.
        self._failing: dict[str, int] = {}
        self._refreshing = False

    @property
    def configured(self) -> bool:
        return bool(self.published or self.unpublished)

    def respond(self, q: str, remote_ip: str) -> bytes:
        return answer(self.answers, q, remote_ip, self.stats, self._coin)

    def refresh_in_background(self) -> None:
        """For the service's timer: a refresh that a service stop does not wait for (a DNS
        server that does not answer would hold it a minute), skipped while one runs."""
        if not self._refreshing:
            self.refresh().addErrback(lambda failure: log.failure("bootstrap DNS refresh", failure))

    @defer.inlineCallbacks
    def refresh(self):
        """Resolve every name (concurrently) and swap in the new answers."""
        if self._resolver is None:
            self._resolver = client.createResolver()
        names = dict.fromkeys((*self.published, *(name for name, _ in self.unpublished)))
        lookups = [self._lookup_addresses(name) for name in names]
        lookups += [self._lookup_percent(name, txt_name) for name, txt_name in self.unpublished if txt_name]
        self._refreshing = True
        try:
            # The lookups take every resolver failure themselves.
            yield defer.gatherResults(lookups, consumeErrors=True)
        finally:
            self._refreshing = False
        published = {}
        for name in self.published:
            if name in self._addresses:
                ips = list(self._addresses[name])
                # derper shuffles so that clients do not all pick the same (often IPv6) address.
                self._shuffle(ips)
                published[name] = ips
        unpublished = {name: self._addresses[name] for name, _ in self.unpublished if name in self._addresses}
        percent = {name: (self._percent.get(name, 0.0) if txt_name else 1.0) for name, txt_name in self.unpublished}
        self.answers = Answers(published, unpublished, percent, encode(published) if self.published else b"")
        self.stats.refreshes += 1

    @defer.inlineCallbacks
    def _lookup_addresses(self, name: str):
        # Both families, as Go's LookupIP(ctx, "ip", name): one family suffices.
        results = yield defer.DeferredList(
            [self._resolver.lookupAddress(name), self._resolver.lookupIPV6Address(name)], consumeErrors=True)
        addresses = [_record_text(rr) for ok, result in results if ok for rr in result[0]
                     if rr.type in (dns.A, dns.AAAA)]
        if addresses:
            self._addresses[name] = addresses
            self._resolved(name)
            return
        failures = [result for ok, result in results if not ok]
        # A name with records of neither family is as missing as one that does not exist.
        reason = _reason(failures[0].value) if failures else "no A or AAAA records"
        kept = len(self._addresses.get(name, ()))
        self._failed(name, reason, f"keeping its last {kept} addresses" if kept else "no answer for it yet")

    @defer.inlineCallbacks
    def _lookup_percent(self, name: str, txt_name: str):
        # Its own outage key: the TXT record may sit on a name that is also resolved for addresses.
        key = f"{txt_name} TXT"
        try:
            records, _, _ = yield self._resolver.lookupText(txt_name)
        except error.DNSNameError:
            # derper's rule for a TXT record that does not exist: 0%.
            self._percent[name] = 0.0
            self._failed(key, "no such host", f"rollout of {name} is 0%")
            return
        except Exception as e:  # noqa: BLE001 - any other failure is transient: keep the last percentage
            self._failed(key, _reason(e), f"keeping rollout of {name} at {self._percent.get(name, 0.0):.0%}")
            return
        values = [b"".join(rr.payload.data).decode("utf-8", "replace") for rr in records if rr.type == dns.TXT]
        self._percent[name] = rollout_percent(values)
        self._resolved(key)

    def _failed(self, key: str, reason: str, consequence: str) -> None:
        self.stats.lookup_failures += 1
        count = self._failing.get(key, 0)
        self._failing[key] = count + 1
        if count == 0:
            log.warn("bootstrap DNS lookup {name}: {reason}; {consequence} "
                     "(not logged again until it resolves)", name=key, reason=reason, consequence=consequence)

    def _resolved(self, key: str) -> None:
        failed = self._failing.pop(key, 0)
        if failed:
            log.info("bootstrap DNS lookup {name} resolves again, after {failed} failed refreshes",
                     name=key, failed=failed)
