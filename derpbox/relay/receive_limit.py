"""Per-client receive rate limits: derper's ``-rate-config`` (spec sections 1.5 and 4).

derper's file is JSON, ``{"PerClientRateLimitBytesPerSec": N, "PerClientRateBurstBytes": M}``,
read at start and again on SIGHUP. Each client that is not a mesh peer gets a token
bucket of N bytes a second holding up to M bytes (at least one largest SendPacket
frame), charged with each frame's length. When the bucket runs dry the client's
reads pause until it has paid off the debt: backpressure through TCP, never a drop.
A rate of 0 lifts the limits. A changed file gives every connected client a new,
full bucket, as derper replaces each client's limiter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from twisted.logger import Logger

from ..counters import counter, untyped
from ..protocol.frames import KEY_LEN, MAX_PACKET_SIZE

log = Logger(namespace="derpbox.ratelimit")

# derper's minimum bucket: one SendPacket frame with the largest packet must fit.
MIN_BURST = MAX_PACKET_SIZE + KEY_LEN
RATE_FIELD = "PerClientRateLimitBytesPerSec"
BURST_FIELD = "PerClientRateBurstBytes"
_UINT64_MAX = (1 << 64) - 1


class RateConfigError(ValueError):
    """The rate config file cannot be used; the text names the file and the field."""


@dataclass(frozen=True, slots=True)
class RateConfig:
    bytes_per_second: int = 0
    burst_bytes: int = 0

    def applied(self) -> RateConfig:
        """What derper applies: no limits at rate 0, else a burst of at least MIN_BURST."""
        if not self.bytes_per_second:
            return RateConfig()
        return RateConfig(self.bytes_per_second, max(self.burst_bytes, MIN_BURST))


def parse_rate_config(text: bytes | str, source: str) -> tuple[RateConfig, list[str]]:
    """The config in ``text`` and warnings about fields it ignores, as Go's json.Unmarshal
    reads it into derper's struct: field names match case-insensitively, null leaves a
    field at 0, anything but a whole number in 0..2^64-1 is refused."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise RateConfigError(f"{source}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise RateConfigError(f"{source}: want a JSON object with {RATE_FIELD} and {BURST_FIELD}, "
                              f"got {type(doc).__name__}")
    values = {RATE_FIELD: 0, BURST_FIELD: 0}
    ignored = []
    for name, value in doc.items():
        field = next((f for f in values if f.lower() == name.lower()), None)
        if field is None:
            ignored.append(name)
            continue
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
            raise RateConfigError(f"{source}: {field} must be a whole number of bytes, 0 or more; got {value!r}")
        values[field] = value
    warnings = [f"{source}: ignoring unknown field {name!r} (known: {RATE_FIELD}, {BURST_FIELD})"
                for name in ignored]
    return RateConfig(values[RATE_FIELD], values[BURST_FIELD]), warnings


def load_rate_config(path: str) -> tuple[RateConfig, list[str]]:
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 16)
    except OSError as e:
        raise RateConfigError(f"-rate-config {path}: {e.strerror or e}") from None
    return parse_rate_config(text, f"-rate-config {path}")


class ReceiveBucket:
    """One client's token bucket, like Go's rate.Limiter used through ReserveN: a frame
    is always taken (the balance may go negative) and the debt says how long to wait."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, config: RateConfig, now: float):
        self.rate = float(config.bytes_per_second)
        self.burst = float(config.burst_bytes)
        self.tokens = self.burst
        self.at = now

    def take(self, nbytes: int, now: float) -> float:
        """Charge one frame of ``nbytes``; the seconds to wait before reading on (0 if none)."""
        # derper clamps a frame's charge to the minimum burst, so a frame always fits the bucket.
        tokens = min(self.burst, self.tokens + (now - self.at) * self.rate) - min(nbytes, MIN_BURST)
        self.tokens = tokens
        self.at = now
        return -tokens / self.rate if tokens < 0 else 0.0


class RateLimits:
    """The limits in force and derper's three rate-limit metrics (present only with -rate-config)."""

    METRICS = (
        untyped("bytes_per_second", "derp_rate_limit_per_client_bytes_per_second",
                "Per-client receive rate limit in bytes per second (0: no limit)."),
        untyped("burst_bytes", "derp_rate_limit_per_client_burst_bytes",
                "Per-client receive rate limit burst in bytes."),
        counter("waited", "derp_rate_limit_per_client_waited",
                "Times a client's reads were paused by its receive rate limit."),
    )
    __slots__ = ("config", "waited")

    def __init__(self, config: RateConfig = RateConfig()):
        self.config = config.applied()
        self.waited = 0

    @property
    def bytes_per_second(self) -> int:
        return self.config.bytes_per_second

    @property
    def burst_bytes(self) -> int:
        return self.config.burst_bytes

    def new_bucket(self, now: float) -> ReceiveBucket | None:
        return ReceiveBucket(self.config, now) if self.config.bytes_per_second else None


class RateConfigFile:
    """``-rate-config``: read at start (a bad file stops start-up), re-read on SIGHUP
    (a bad file is logged and the limits in force stay)."""

    reload_label = "the rate config"

    def __init__(self, path: str, relay):
        self.path = path
        self.relay = relay
        self._apply(*load_rate_config(path))

    def reload(self) -> bool:
        try:
            loaded = load_rate_config(self.path)
        except RateConfigError as e:
            log.warn("{error}; keeping the rate limits in force", error=e)
            return False
        self._apply(*loaded)
        return True

    def _apply(self, config: RateConfig, warnings: list[str]) -> None:
        for line in warnings:
            log.warn("{line}", line=line)
        self.relay.set_rate_limits(config)
        applied = self.relay.rate_limits.config
        if applied.bytes_per_second:
            log.info("rate config applied: client-rate={rate} bytes/sec, client-burst={burst} bytes "
                     "(mesh peers exempt)", rate=applied.bytes_per_second, burst=applied.burst_bytes)
        else:
            log.info("rate config applied: no per-client rate limit ({field} is 0)", field=RATE_FIELD)
