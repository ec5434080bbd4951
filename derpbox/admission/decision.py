"""Admission results and counters."""

from __future__ import annotations

from dataclasses import dataclass

from ..counters import counter, gauge

CHECKS = ("tailscaled", "tailscale_api", "url", "allowlist", "none")
OUTCOMES = ("allow", "reject", "fail_open", "error")


@dataclass(frozen=True, slots=True)
class Decision:
    """What the relay acts on: admit or close before ServerInfo."""

    allow: bool
    check: str  # the check that decided: tailscaled, tailscale_api, url, allowlist, or none
    reason: str  # short human text for logs


@dataclass(frozen=True, slots=True)
class Verdict:
    """One check's answer, with what the relay does not need to know.

    outcome: allow / reject are definitive answers from the backend; fail_open is
    an admit because the backend could not be asked; error is a reject because
    it could not be asked (or answered nonsense). Only definitive answers may be
    cached: anything else must be asked again once the backend recovers.
    """

    allow: bool
    check: str
    reason: str
    outcome: str

    @property
    def cacheable(self) -> bool:
        return self.outcome in ("allow", "reject")


class AdmissionStats:
    """Plain counters, exported later as Prometheus metrics.

    ``decisions[(check, outcome)]`` counts one per check consulted (a client that
    passes tailscaled and then the URL counts once for each); cache hits count in
    ``cache_hits`` only. ``admitted`` + ``rejected`` equals the number of
    ``Admission.check`` calls.
    """

    METRICS = (
        counter("decisions", "derpbox_admission_decisions", "Client verification decisions, by check and outcome.",
                ("check", "outcome")),
        counter("admitted", "derpbox_admission_admitted", "Clients admitted by client verification."),
        counter("rejected", "derpbox_admission_rejected", "Clients rejected by client verification."),
        counter("cache_hits", "derpbox_admission_cache_hits", "Admission decisions served from the decision cache."),
        counter("cache_misses", "derpbox_admission_cache_misses", "Admission decisions not found in the decision cache."),
        counter("allowlist_reloads", "derpbox_admission_allowlist_reloads", "Successful reloads of the allowlist file."),
        counter("allowlist_reload_errors", "derpbox_admission_allowlist_reload_errors",
                "Failed reloads of the allowlist file (previous list kept)."),
        counter("internal_errors", "derpbox_admission_internal_errors", "Internal errors while checking a client."),
        counter("shared_checks", "derpbox_admission_shared_checks",
                "Checks that waited for the answer of a simultaneous check of the same key."),
        gauge("allowlist_entries", "derpbox_admission_allowlist_entries", "Keys in the loaded allowlist file."),
    )
    __slots__ = (
        "decisions",
        "admitted",
        "rejected",
        "cache_hits",
        "cache_misses",
        "rejection_logs",
        "rejection_logs_suppressed",
        "allowlist_entries",
        "allowlist_reloads",
        "allowlist_reload_errors",
        "internal_errors",
        "shared_checks",
        "tailscale_api",
    )

    def __init__(self):
        self.decisions: dict[tuple[str, str], int] = {(c, o): 0 for c in CHECKS for o in OUTCOMES}
        self.admitted = 0
        self.rejected = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.rejection_logs = 0
        self.rejection_logs_suppressed = 0
        self.allowlist_entries = 0
        self.allowlist_reloads = 0
        self.allowlist_reload_errors = 0
        self.internal_errors = 0
        self.shared_checks = 0
        # The Tailscale API list's own stats (derpbox.admission.tailscale_api), when that check is on.
        self.tailscale_api = None

    def count(self, verdict: Verdict) -> None:
        self.decisions[(verdict.check, verdict.outcome)] += 1
