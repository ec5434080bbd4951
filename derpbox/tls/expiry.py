"""A warning in the log well before the served certificate expires.

ACME renews by itself when a third of the lifetime is left, so its certificate only gets
here when renewal keeps failing: the warning comes when half of that window is gone, or
14 days ahead if that is sooner (1 day ahead for a 6-day IP certificate, 14 for a 90-day
one; a fixed 14 days would warn all the time about certificates shorter than that). A
manual certificate is the operator's to replace under the same rule; an IP-only node's
self-signed one too, and its ``sha256-raw:`` pin changes with it, so the DERP map must be
updated at the same time: that needs warning a month ahead (the README's "Rotating an IP
node's certificate" says how).
"""

from __future__ import annotations

from twisted.logger import Logger

from .certs import CertificateSource, CertifiedKey

log = Logger(namespace="derpbox.tls")

CHECK_INTERVAL = 6 * 3600.0
DAY = 86400.0
SELF_SIGNED_WARNING_DAYS = 30
WARNING_DAYS = 14
# Of the lifetime: half of ACME's renewal window (the last third).
WARNING_FRACTION = 1 / 6


def warning_time(ck: CertifiedKey) -> float:
    """Unix time from which *ck* counts as near expiry (not for the self-signed IP certificate)."""
    end = ck.not_after.timestamp()
    lifetime = end - ck.leaf.not_valid_before_utc.timestamp()
    return end - min(WARNING_DAYS * DAY, WARNING_FRACTION * lifetime)


class ExpiryWatch:
    def __init__(self, source: CertificateSource, clock, self_signed_ip: bool):
        self.source = source
        self.clock = clock
        self.self_signed_ip = self_signed_ip

    def check(self) -> None:
        current = self.source.current()
        if current is None:
            return
        when = current.not_after
        now = self.clock.seconds()
        days = (when.timestamp() - now) / DAY
        due = days < SELF_SIGNED_WARNING_DAYS if self.self_signed_ip else now >= warning_time(current)
        if not due:
            return
        what = ("the self-signed IP certificate (its sha256-raw pin is in the DERP map)" if self.self_signed_ip
                else "the TLS certificate")
        if days <= 0:
            log.error("{what} expired at {when:%Y-%m-%d %H:%M} UTC: clients refuse this relay until it is replaced",
                      what=what, when=when)
            return
        advice = ("make the next one and update the DERP map's pin with it (README: \"Rotating an IP node's "
                  "certificate\")" if self.self_signed_ip else "replace it, or see why renewal fails")
        log.warn("{what} expires in {days:.3g} days ({when:%Y-%m-%d %H:%M} UTC): {advice}",
                 what=what, days=days, when=when, advice=advice)
