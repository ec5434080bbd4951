"""derpbox settings: one immutable Settings from four sources.

Precedence: command line > DERP_* environment (primary name, then aliases)
> YAML config file > derper's defaults.

The command line speaks derper's Go ``flag`` syntax, so an operator can keep
the derper command line; the environment accepts the variable names of the
popular derper Docker images. SETTINGS_TABLE is the single description of
every setting; the parser, the usage text and generated docs all read it.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import math
import os
import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping, NamedTuple
from urllib.parse import urlsplit

import yaml

from . import keys
from .mesh import spec as mesh_spec
from .mesh.spec import MeshPeerSpec
from .netaddr import IPNetwork, is_ip, parse_networks
from .protocol.stun import DEFAULT_STUN_PORT
from .tls import pins

DEV_HOST = "127.0.0.1"
DEV_PORT = 3340
# derper reads the mesh key from this variable in -dev mode only.
DEV_MESH_KEY_ENV = "TAILSCALE_DERPER_MESH_KEY"
# derper's debug knob for the per-client send queue, read from the environment only.
QUEUE_DEPTH_ENV = "TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH"
RTT_STATS_OFF_ENV = "TS_DERP_DISABLE_RTT_STATS"
DEFAULT_QUEUE_DEPTH = 32
DEFAULT_HOSTNAME = "derp.tailscale.com"
CERTMODES = ("manual", "letsencrypt", "gcp")


class ConfigError(ValueError):
    """A setting is malformed, or settings contradict each other."""


class UsageRequested(Exception):
    """-h / -help was given; ``usage`` is the text to show."""

    def __init__(self, usage: str):
        super().__init__(usage)
        self.usage = usage


@dataclass(frozen=True, slots=True)
class Settings:
    dev: bool
    version_requested: bool
    addr: str
    listen_host: str
    listen_port: int
    http_port: int
    stun_port: int
    stun: bool
    derp: bool
    key_path: str | None  # None: random in-memory key (-dev only)
    certmode: str
    certdir: str
    hostname: str
    acme_eab_kid: str
    acme_eab_key: str = field(repr=False)
    acme_email: str
    acme_directory: str  # "" = the certmode's default CA
    acme_ca_file: str
    acme_challenge: str  # auto | http-01 | tls-alpn-01
    acme_ip_certs: bool
    home: str
    mesh_psk_file: str
    mesh_with: tuple[str, ...]
    mesh_key: str = field(repr=False)
    mesh_peers_file: str
    mesh_ca_file: str
    mesh_cert_names: tuple[str, ...]
    mesh_peers: tuple[MeshPeerSpec, ...]  # -mesh-with parsed, with -mesh-cert-names
    workers: int  # 0 = auto
    strict_env: bool  # an unknown DERP_*/DERPER_* variable stops start-up instead of a warning
    secrets_url: str
    secrets_path_prefix: str
    secrets_cache_dir: str
    bootstrap_dns_names: tuple[str, ...]
    unpublished_bootstrap_dns_names: tuple[str, ...]
    verify_clients: bool
    verify_client_urls: tuple[str, ...]
    verify_client_url_fail_open: bool
    socket: str
    verify_allowlist_file: str
    verify_cache_ttl: float  # seconds; 0 = no cache
    verify_tailscale_api_tailnet: str
    verify_tailscale_api_token: str = field(repr=False)
    verify_tailscale_api_token_file: str
    verify_tailscale_api_oauth_client_id: str
    verify_tailscale_api_oauth_secret_file: str
    verify_tailscale_api_interval: float  # seconds
    verify_tailscale_api_fail_open: bool
    verify_tailscale_api_url: str
    accept_connection_limit: float
    accept_connection_burst: int
    rate_config: str
    tcp_keepalive_time: float  # seconds; Go semantics: 0 = default (15s), negative = off
    tcp_user_timeout: float  # seconds
    tcp_write_timeout: float  # seconds; 0 = no write deadline
    ace: bool
    config_file: str | None
    tls: str  # auto | on | off
    tls_groups: str  # OpenSSL group list; "" = OpenSSL's default
    log_level: str
    log_format: str
    proxy_protocol: str  # off | v1 | v2 | auto
    trusted_proxies: tuple[str, ...]
    proxy_networks: tuple[IPNetwork, ...]  # -trusted-proxies parsed when -proxy-protocol is on, else ()
    metrics_addr: str  # "" = no metrics listener
    metrics_listen: tuple[str, int] | None  # -metrics-addr split as (host, port); None = no listener
    metrics_allow: tuple[str, ...]
    metrics_allow_networks: tuple[IPNetwork, ...]  # -metrics-allow parsed
    region_id: int
    region_code: str
    region_name: str
    public_ipv4: str  # "" = unknown, "none" = disabled
    public_ipv6: str
    public_port: int  # 0 = listen_port
    public_stun_port: int  # 0 = stun_port
    public_http_port: int  # 0 = http_port
    derpmap_path: str
    send_queue_depth: int  # TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH
    rtt_stats: bool  # derp_tcp_rtt sampling, off with TS_DERP_DISABLE_RTT_STATS
    warnings: tuple[str, ...]

    @property
    def use_tls(self) -> bool:
        """derper's rule (port 443 or certmode manual) unless -tls forces it; -dev is plain HTTP."""
        if self.dev:
            return False
        if self.tls != "auto":
            return self.tls == "on"
        return self.listen_port == 443 or self.certmode == "manual"

    @property
    def verify_tailscale_api(self) -> bool:
        """The Tailscale API device-list check is on (credentials are given)."""
        return bool(self.verify_tailscale_api_token or self.verify_tailscale_api_token_file
                    or self.verify_tailscale_api_oauth_client_id or self.verify_tailscale_api_oauth_secret_file)

    @property
    def hostname_is_ip(self) -> bool:
        return is_ip(self.hostname)

    @property
    def accept_limited(self) -> bool:
        """-accept-connection-limit or -accept-connection-burst set to other than derper's defaults."""
        return self.accept_connection_limit != math.inf or self.accept_connection_burst != sys.maxsize


# Tailscale-internal services: ignoring them would run a different relay than asked for
# (no mesh key, no CONNECT proxy), so the server refuses to start (load_serve_settings).
_REFUSED_DERPER_FEATURES = {
    "secrets_url": "-secrets-url: fetching the mesh key from a setec server (Tailscale's internal secrets "
                   "service) is not supported; use -mesh-psk-file or -mesh-key",
    "ace": "-ace: derper's experimental CONNECT proxy serves Tailscale's own infrastructure and is not "
           "part of derpbox; remove the flag (DERP_ACE)",
}


# --- value parsers: text -> value, raising ValueError(reason) -------------------------------

_GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def _go_bool(text: str) -> bool:
    """Go's strconv.ParseBool, as used by flag.Bool."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise ValueError("not a boolean")


def _env_bool(text: str) -> bool:
    value = text.lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError("not a boolean")


def _go_int(text: str) -> int:
    """Go's strconv.ParseInt(s, 0, 64), as used by flag.Int: 0x/0o/0b, '_', and a leading 0 is octal."""
    if not text.isascii() or text != text.strip():
        raise ValueError("not an integer")
    legacy_octal = re.fullmatch(r"([+-]?)0([0-7_]+)", text)
    try:
        value = int(legacy_octal[1] + "0o" + legacy_octal[2] if legacy_octal else text, 0)
    except ValueError:
        raise ValueError("not an integer") from None
    if not -(2**63) <= value < 2**63:
        raise ValueError("out of range")
    return value


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _go_int(text)
        if not low <= value <= high:
            raise ValueError("out of range")
        return value

    return parse


def _rate_limit(text: str) -> float:
    # Python's float() also takes spaces and '_' separators, which Go's ParseFloat does not.
    if "_" in text or text != text.strip():
        raise ValueError("not a number")
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number") from None
    if math.isnan(value) or value < 0:
        raise ValueError("must be zero or more")
    return value


_DURATION_UNITS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,  # U+00B5
    "μs": 10**3,  # U+03BC
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")


def parse_go_duration(text: str) -> float:
    """Go's time.ParseDuration ("1h30m", "500ms", "0"), returned as float seconds."""
    rest = text
    negative = rest[:1] == "-"
    if rest[:1] in ("-", "+"):
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError("empty duration")
    nanos = Fraction(0)
    pos = 0
    while pos < len(rest):
        match = _DURATION_PART.match(rest, pos)
        whole, frac, unit = match.groups()
        if not whole and not frac:
            raise ValueError("expected a number")
        if not unit:
            raise ValueError("missing unit")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown unit {unit!r}")
        number = int(whole or "0") + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
        nanos += number * _DURATION_UNITS[unit]
        pos = match.end()
    if nanos > 2**63 - (0 if negative else 1):
        raise ValueError("out of range")
    # Go truncates to whole nanoseconds.
    return (-1 if negative else 1) * int(nanos) / 1e9


def _nonnegative_duration(text: str) -> float:
    value = parse_go_duration(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        # Any case, as booleans are: DERP_CERT_MODE=Manual means manual.
        if text.strip().lower() not in allowed:
            raise ValueError("not one of the accepted values")
        return text.strip().lower()

    return parse


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def _hostname(text: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError("must not be empty")
    if is_ip(text):
        return text
    name = text[:-1] if text.endswith(".") else text
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        raise ValueError("not a valid DNS name: labels of letters, digits and inner hyphens, separated by dots")
    return text


def _tls_groups(text: str) -> str:
    # Imported when used: pyOpenSSL and Twisted are heavy for the entrypoint, which loads settings before exec.
    from .tls.context import check_groups

    return check_groups(text.strip())


def _text(text: str) -> str:
    return text


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _mesh_entries(text: str) -> tuple[str, ...]:
    entries = _names(text)
    for entry in entries:
        mesh_spec.parse_entry(entry)
    return entries


def _mesh_cert_names(text: str) -> tuple[str, ...]:
    pairs = _names(text)
    for pair in pairs:
        host, sep, cert_name = pair.partition("=")
        if not sep or not host or not cert_name:
            raise ValueError(f"{pair!r} is not host[:port]=CertName")
        pins.parse_pin(cert_name)
    return pairs


def _mesh_key_text(text: str) -> str:
    if text:
        keys.parse_mesh_key(text, "the mesh key")
    return text.strip()


def _workers(text: str) -> int:
    """A number of worker processes, or 0 for "auto" (the CPUs this process may use)."""
    if text.strip().lower() == "auto":
        return 0
    value = _go_int(text)
    if not 1 <= value <= 1024:
        raise ValueError("must be between 1 and 1024, or auto")
    return value


def _check_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("not an http:// or https:// URL")
    return text


def _optional_url(text: str) -> str:
    return _check_url(text) if text else text


def _url_list(text: str) -> tuple[str, ...]:
    return tuple(_check_url(url) for url in _names(text))


# Tailscale publishes no API rate limit; a relay (times its workers) should not poll faster.
TAILSCALE_API_MIN_INTERVAL = 10.0


def _api_interval(text: str) -> float:
    value = parse_go_duration(text)
    if value < TAILSCALE_API_MIN_INTERVAL:
        raise ValueError(f"must be at least {TAILSCALE_API_MIN_INTERVAL:g}s")
    return value


def _api_url(text: str) -> str:
    url = _check_url(text).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme == "http" and parts.hostname != "localhost" and not _is_loopback(parts.hostname or ""):
        raise ValueError("http:// would send the API token in clear; use https:// (http:// only for loopback)")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError("give the base URL only, like https://api.tailscale.com")
    return url


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _home(text: str) -> str:
    # derper's -home: anything else is fatal at start-up.
    if text in ("", "blank") or text.startswith(("http://", "https://")):
        return text
    raise ValueError("unknown home page value")


def _eab_key(text: str) -> str:
    # derper accepts base64url or standard base64, padded or not.
    if text:
        padded = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
        try:
            base64.b64decode(padded, validate=True)
        except binascii.Error:
            raise ValueError("not base64") from None
    return text


_NAMED_PORTS = {"http": 80, "https": 443}  # Go's net package resolves these service names
_ADDR = re.compile(r"\[(?P<v6>[^\[\]]*)\]:(?P<p6>[^:\[\]]*)|(?P<host>[^:\[\]]*):(?P<port>[^:\[\]]*)")


def split_listen_addr(text: str) -> tuple[str, int]:
    """Split derper's -a value into (host, port); host "" means all interfaces."""
    match = _ADDR.fullmatch(text)
    if not match:
        raise ValueError("not of the form :port, host:port or [ipv6]:port")
    if match["v6"] is not None:
        host, port = match["v6"], match["p6"]
        if not is_ip(host) or ":" not in host:
            raise ValueError(f"{host!r} inside brackets is not an IPv6 address")
    else:
        host, port = match["host"], match["port"]
    if port in _NAMED_PORTS:
        return host, _NAMED_PORTS[port]
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"port {port!r} is not a number 0-65535, 'http' or 'https'")
    return host, int(port)


def _listen_addr(text: str) -> str:
    split_listen_addr(text)
    return text


def _optional_listen_addr(text: str) -> str:
    return _listen_addr(text) if text else ""


def _cidrs(text: str) -> tuple[str, ...]:
    items = _names(text)
    parse_networks(items)
    return items


def _ip_or_none(version: int):
    def parse(text: str) -> str:
        text = text.strip()
        if text.lower() in ("", "none"):
            return text.lower()
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an IPv{version} address") from None
        if addr.version != version:
            raise ValueError(f"{text!r} is not an IPv{version} address")
        return str(addr)

    return parse


def _region_id(text: str) -> int:
    value = _go_int(text)
    if not 1 <= value <= 2**53 - 1:
        raise ValueError("must be between 1 and 2^53-1 (900-999 are reserved for your own relays)")
    return value


# --- environment-only transforms for image-specific aliases ---------------------------------


def _bare_port_to_addr(text: str) -> str:
    # DERP_PORT / DERP_PORT_HTTPS hold a bare port; -a wants ":port".
    return ":" + text if text.isascii() and text.isdigit() else text


def _enable_http(text: str) -> str | None:
    # ngc7331's DERP_ENABLE_HTTP=false turns the port-80 listener off; true leaves the port alone.
    return None if _env_bool(text) else "-1"


# --- the table --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    type_name: str  # as Go's flag usage prints it; "" for booleans
    parse: Callable[[str], Any]
    forms: str  # accepted forms, for error messages and docs
    file_types: tuple[type, ...] = (str,)  # YAML scalar types accepted in the config file


class Env(NamedTuple):
    name: str
    transform: Callable[[str], str | None] | None = None  # raw value -> flag text (None = unset)
    forms: str | None = None  # accepted forms when they differ from the setting's


@dataclass(frozen=True, slots=True)
class Option:
    field: str  # Settings attribute
    flag: str  # derper's flag name, without dashes
    kind: Kind
    default: Any  # a value, or a function of the environment mapping
    help: str
    env: tuple[Env, ...] = ()  # primary first, then aliases in priority order
    in_file: bool = True
    secret: bool = False  # never echo the value
    default_text: str = ""  # for usage/docs when the default is not a plain value


def _env(*names: str | Env) -> tuple[Env, ...]:
    return tuple(n if isinstance(n, Env) else Env(n) for n in names)


BOOL_FORMS = "1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False"
ENV_BOOL_FORMS = "true, false, 1, 0, yes, no, on, off (any case)"
DURATION_FORMS = 'a Go duration such as "500ms", "2s", "10m", "1h30m" or "0" (units ns, us, ms, s, m, h)'
_NUMBERS = (str, int)
_DURATIONS = (str, int, float)

BOOL = Kind("", _go_bool, BOOL_FORMS, (bool,))
TEXT = Kind("string", _text, "any text")
PORT = Kind("int", _int_range(0, 65535), "a port number 0-65535", _NUMBERS)
HTTP_PORT = Kind("int", _int_range(-1, 65535), "a port number 0-65535, or -1 to disable", _NUMBERS)
DURATION = Kind("duration", _nonnegative_duration, DURATION_FORMS + ", not negative", _DURATIONS)
NAMES = Kind("string", _names, "a comma-separated list of names", (str, list))


def _choices(*allowed: str) -> Kind:
    return Kind("string", _choice(*allowed), ", ".join(allowed))


def _user_cache_dir(environ: Mapping[str, str]) -> str:
    # Go's os.UserCacheDir on Unix; "" when it would fail, as derper's default then is.
    xdg = environ.get("XDG_CACHE_HOME", "")
    if xdg:
        return xdg if os.path.isabs(xdg) else ""
    home = environ.get("HOME", "")
    return os.path.join(home, ".cache") if home else ""


def _default_certdir(environ: Mapping[str, str]) -> str:
    cache = _user_cache_dir(environ)
    return os.path.join(cache, "tailscale", "derper-certs") if cache else ""


def _default_mesh_psk_file(environ: Mapping[str, str]) -> str:
    candidates = ("/home/derp/keys/derp-mesh.key", os.path.join(environ.get("HOME", ""), "keys", "derp-mesh.key"))
    return next((path for path in candidates if os.path.exists(path)), "")


def _default_secrets_cache_dir(environ: Mapping[str, str]) -> str:
    return os.path.join(environ.get("HOME", ""), ".cache", "derper-secrets")


SETTINGS_TABLE: tuple[Option, ...] = (
    Option("dev", "dev", BOOL, False,
           f"localhost development mode: plain HTTP on {DEV_HOST}:{DEV_PORT}, STUN on, random in-memory key",
           _env("DERP_DEV")),
    Option("version_requested", "version", BOOL, False, "print the version and exit", in_file=False),
    Option("addr", "a", Kind("string", _listen_addr, ':PORT, HOST:PORT or [IPV6]:PORT (port may be "http" or "https")'),
           ":443",
           "listen address; serves TLS if the port is 443 or -certmode is manual (see -tls)",
           _env("DERP_ADDR",
                Env("DERP_PORT_HTTPS", _bare_port_to_addr, "a port number (becomes :PORT) or a listen address"),
                Env("DERP_PORT", _bare_port_to_addr, "a port number (becomes :PORT) or a listen address"),
                "ADDR")),
    Option("http_port", "http-port", HTTP_PORT, 80,
           "plain-HTTP port used in TLS mode (ACME http-01, redirects); -1 disables; bound to the IP of -a",
           _env("DERP_HTTP_PORT", Env("DERP_ENABLE_HTTP", _enable_http, ENV_BOOL_FORMS),
                "DERP_PORT_HTTP", "HTTP_PORT")),
    Option("stun_port", "stun-port", PORT, DEFAULT_STUN_PORT, "UDP STUN port, bound to the IP of -a",
           _env("DERP_STUN_PORT", "DERP_PORT_STUN", "STUN_PORT")),
    Option("stun", "stun", BOOL, True, "run the STUN server",
           _env("DERP_STUN", "DERP_RUN_STUN", "DERP_STUN_ENABLE", "DERP_ENABLE_STUN", "RUN_STUN")),
    Option("derp", "derp", BOOL, True, "serve DERP; false keeps only STUN and bootstrap DNS",
           _env("DERP_DERP", "DERP_RUN_DERP", "RUN_DERP")),
    Option("key_path", "c", TEXT, "",
           f"node key file (derper's JSON format); default {keys.ROOT_KEY_PATH} when running as root",
           _env("DERP_CONFIG_PATH", "DERP_CONFIG", "DERP_KEY_FILE", "CONFIG_PATH")),
    Option("certmode", "certmode", _choices(*CERTMODES), "letsencrypt",
           "how to get the TLS certificate: manual, letsencrypt or gcp",
           _env("DERP_CERT_MODE", "DERP_CERTMODE", "TAILSCALE_DERP_CERTMODE", "CERT_MODE")),
    Option("certdir", "certdir", TEXT, _default_certdir, "certificate and ACME cache directory",
           _env("DERP_CERT_DIR", "DERP_CERTDIR", "DERP_CERTS", "CERT_DIR"),
           default_text="<user cache dir>/tailscale/derper-certs"),
    Option("hostname", "hostname", Kind("string", _hostname, "a DNS name or an IP address"), DEFAULT_HOSTNAME,
           "TLS hostname; an IP address with -certmode manual (self-signed) or -acme-ip-certs",
           _env("DERP_DOMAIN", "DERP_HOSTNAME", "DERP_HOST", "TAILSCALE_DERP_HOSTNAME", "DERPER_HOST")),
    Option("acme_eab_kid", "acme-eab-kid", TEXT, "", "ACME external account binding key ID (required for gcp)",
           _env("DERP_ACME_EAB_KID", "DERP_ACME_EABKID")),
    Option("acme_eab_key", "acme-eab-key", Kind("string", _eab_key, "base64url or standard base64"), "",
           "ACME external account binding HMAC key (required for gcp)",
           _env("DERP_ACME_EAB_KEY", "DERP_ACME_EABKEY"), secret=True),
    Option("acme_email", "acme-email", TEXT, "", "ACME contact email (required for gcp)",
           _env("DERP_ACME_EMAIL", "ACME_SH_EMAIL")),
    Option("acme_directory", "acme-directory", Kind("string", _optional_url, "an https:// (or http://) URL"), "",
           "ACME directory URL; default Let's Encrypt production (letsencrypt) or Google Trust Services (gcp)",
           _env("DERP_ACME_DIRECTORY")),
    Option("acme_ca_file", "acme-ca-file", TEXT, "",
           "PEM file of CA certificates to trust for the ACME server's own HTTPS (private ACME servers)",
           _env("DERP_ACME_CA_FILE")),
    Option("acme_challenge", "acme-challenge", _choices("auto", "http-01", "tls-alpn-01"), "auto",
           "ACME challenge: auto uses http-01 when the port-80 listener runs, else tls-alpn-01",
           _env("DERP_ACME_CHALLENGE")),
    Option("acme_ip_certs", "acme-ip-certs", BOOL, False,
           "with an IP -hostname (letsencrypt mode): a CA-signed certificate for that address "
           "(Let's Encrypt's 6-day shortlived profile), no CertName pin needed",
           _env("DERP_ACME_IP_CERTS")),
    Option("home", "home", Kind("string", _home, '"" (default page), "blank", or an http:// or https:// URL'), "",
           "what to serve at /", _env("DERP_HOME", "FLAGHOME")),
    Option("mesh_psk_file", "mesh-psk-file", TEXT, _default_mesh_psk_file,
           "file holding the mesh pre-shared key (64 hex digits)",
           _env("DERP_MESH_PSK_FILE", "MESH_PSKFILE"),
           default_text="first existing of /home/derp/keys/derp-mesh.key, $HOME/keys/derp-mesh.key"),
    Option("mesh_with", "mesh-with", Kind("string", _mesh_entries, "a comma-separated list of host[:port][/dialhost]",
                                          (str, list)), (),
           "comma-separated hostnames to mesh with (host/dialhost dials dialhost); this node may be listed",
           _env("DERP_MESH_WITH", "MESH_WITH")),
    Option("mesh_key", "mesh-key", Kind("string", _mesh_key_text, "64 hex digits"), "",
           "the mesh pre-shared key itself (64 hex digits), instead of -mesh-psk-file",
           _env("DERP_MESH_KEY"), secret=True),
    Option("mesh_peers_file", "mesh-peers-file", TEXT, "",
           "file of mesh peers, one 'host[:port][/dialhost] [CertName]' a line; re-read when it changes or on SIGHUP",
           _env("DERP_MESH_PEERS_FILE")),
    Option("mesh_ca_file", "mesh-ca-file", TEXT, "",
           "PEM CA certificates trusted for mesh peers, besides the system roots",
           _env("DERP_MESH_CA_FILE")),
    Option("mesh_cert_names", "mesh-cert-names",
           Kind("string", _mesh_cert_names, "a comma-separated list of host[:port]=CertName", (str, list)), (),
           "certificate name or sha256-raw:<hex> pin per mesh peer, as the DERP map's CertName",
           _env("DERP_MESH_CERT_NAMES")),
    Option("workers", "workers", Kind("string", _workers, "a number of worker processes (1-1024) or auto",
                                      (str, int)), 1,
           "worker processes sharing the listeners, meshed with each other; auto: one per CPU this process "
           "may use (affinity and cgroup quota)", _env("DERP_WORKERS"), default_text="1"),
    Option("strict_env", "strict-env", BOOL, False,
           "refuse to start when a DERP_* or DERPER_* environment variable is not a setting (a misspelling); "
           "without it, a warning names the closest setting", _env("DERP_STRICT_ENV")),
    Option("secrets_url", "secrets-url", Kind("string", _optional_url, "an http:// or https:// URL"), "",
           "refused (derper: a setec server URL to fetch the mesh key from; Tailscale-internal): "
           "use -mesh-psk-file or -mesh-key", _env("DERP_SECRETS_URL")),
    Option("secrets_path_prefix", "secrets-path-prefix", TEXT, "prod/derp",
           "setec path prefix of the meshkey secret (only with -secrets-url, which is refused)",
           _env("DERP_SECRETS_PATH_PREFIX")),
    Option("secrets_cache_dir", "secrets-cache-dir", TEXT, _default_secrets_cache_dir,
           "directory to cache setec secrets in (only with -secrets-url, which is refused)", _env("DERP_SECRETS_CACHE_DIR"),
           default_text="$HOME/.cache/derper-secrets"),
    Option("bootstrap_dns_names", "bootstrap-dns-names", NAMES, (), "comma-separated names published at /bootstrap-dns",
           _env("DERP_BOOTSTRAP_DNS_NAMES", "BOOTSTRAP_DNS")),
    Option("unpublished_bootstrap_dns_names", "unpublished-bootstrap-dns-names", NAMES, (),
           "comma-separated names answered at /bootstrap-dns?q= only (name/txtname for rollout)",
           _env("DERP_UNPUBLISHED_BOOTSTRAP_DNS_NAMES", "UNPUBLISHED_DNS")),
    Option("verify_clients", "verify-clients", BOOL, False, "admit only node keys known to the local tailscaled",
           _env("DERP_VERIFY_CLIENTS", "TAILSCALE_DERP_VERIFY_CLIENTS", "VERIFY_CLIENTS")),
    Option("verify_client_urls", "verify-client-url",
           Kind("string", _url_list, "an http:// or https:// URL, or a comma-separated list of them", (str, list)), (),
           "admission controller URL(s)", _env("DERP_VERIFY_CLIENT_URL", "VERIFY_CLIENT_URL")),
    Option("verify_client_url_fail_open", "verify-client-url-fail-open", BOOL, True,
           "admit clients when the admission controller is unreachable",
           _env("DERP_VERIFY_CLIENT_URL_FAIL_OPEN", "VERIFY_FAIL_OPEN")),
    Option("socket", "socket", TEXT, "",
           "tailscaled socket path for -verify-clients; a comma-separated list for several tailnets "
           "(a client is admitted when any of them knows its key)",
           _env("DERP_SOCKET", "TS_SOCKET", "TAILSCALED_SOCKET_PATH", "SOCKET")),
    Option("verify_allowlist_file", "verify-allowlist-file", TEXT, "",
           "JSON array of nodekey: strings allowed to connect, reloaded when the file changes",
           _env("DERP_VERIFY_ALLOWLIST_FILE")),
    Option("verify_cache_ttl", "verify-cache-ttl", DURATION, 0.0,
           "cache admission decisions per node key for this long; 0 disables the cache",
           _env("DERP_VERIFY_CACHE_TTL")),
    Option("verify_tailscale_api_tailnet", "verify-tailscale-api-tailnet", TEXT, "-",
           "tailnet whose devices' node keys are admitted (Tailscale API); - is the token's own tailnet",
           _env("DERP_VERIFY_TAILSCALE_API_TAILNET")),
    Option("verify_tailscale_api_token", "verify-tailscale-api-token", TEXT, "",
           "Tailscale API access token (tskey-api-...) for the device-list check; prefer the -file form",
           _env("DERP_VERIFY_TAILSCALE_API_TOKEN"), secret=True),
    Option("verify_tailscale_api_token_file", "verify-tailscale-api-token-file", TEXT, "",
           "file holding a Tailscale API access token; turns on the Tailscale API device-list check",
           _env("DERP_VERIFY_TAILSCALE_API_TOKEN_FILE")),
    Option("verify_tailscale_api_oauth_client_id", "verify-tailscale-api-oauth-client-id", TEXT, "",
           "Tailscale OAuth client ID (scope devices:core:read) instead of an access token",
           _env("DERP_VERIFY_TAILSCALE_API_OAUTH_CLIENT_ID")),
    Option("verify_tailscale_api_oauth_secret_file", "verify-tailscale-api-oauth-secret-file", TEXT, "",
           "file holding the OAuth client secret (tskey-client-...)",
           _env("DERP_VERIFY_TAILSCALE_API_OAUTH_SECRET_FILE")),
    Option("verify_tailscale_api_interval", "verify-tailscale-api-interval",
           Kind("duration", _api_interval, DURATION_FORMS + ", at least 10s", _DURATIONS), 60.0,
           "how often the tailnet's device list is fetched", _env("DERP_VERIFY_TAILSCALE_API_INTERVAL"),
           default_text="1m0s"),
    Option("verify_tailscale_api_fail_open", "verify-tailscale-api-fail-open", BOOL, False,
           "admit clients while no device list was ever fetched (never once one was)",
           _env("DERP_VERIFY_TAILSCALE_API_FAIL_OPEN")),
    Option("verify_tailscale_api_url", "verify-tailscale-api-url",
           Kind("string", _api_url, "an https:// base URL (http:// only for loopback)"), "https://api.tailscale.com",
           "Tailscale API base URL", _env("DERP_VERIFY_TAILSCALE_API_URL")),
    Option("accept_connection_limit", "accept-connection-limit",
           Kind("float", _rate_limit, 'a number of connections per second, zero or more, or "inf"', (str, int, float)),
           math.inf, "TLS connections accepted per second",
           _env("DERP_ACCEPT_CONNECTION_LIMIT", "ACCEPT_CONNECTION_LIMIT"), default_text="+Inf"),
    Option("accept_connection_burst", "accept-connection-burst",
           Kind("int", _int_range(0, sys.maxsize), "a whole number, zero or more", _NUMBERS),
           sys.maxsize, "burst for -accept-connection-limit",
           _env("DERP_ACCEPT_CONNECTION_BURST", "ACCEPT_CONNECTION_BURST")),
    Option("rate_config", "rate-config", TEXT, "", "JSON file of per-client receive rate limits (reloaded on SIGHUP)",
           _env("DERP_RATE_CONFIG")),
    Option("tcp_keepalive_time", "tcp-keepalive-time",
           Kind("duration", parse_go_duration, DURATION_FORMS + "; negative disables keepalive", _DURATIONS),
           600.0, "TCP keepalive time", _env("DERP_TCP_KEEPALIVE_TIME", "TCP_KEEPALIVE_TIME"), default_text="10m0s"),
    Option("tcp_user_timeout", "tcp-user-timeout", DURATION, 15.0, "TCP_USER_TIMEOUT on accepted sockets",
           _env("DERP_TCP_USER_TIMEOUT", "TCP_USER_TIMEOUT"), default_text="15s"),
    Option("tcp_write_timeout", "tcp-write-timeout", DURATION, 2.0, "per-write deadline for clients; 0 means none",
           _env("DERP_TCP_WRITE_TIMEOUT", "TCP_WRITE_TIMEOUT"), default_text="2s"),
    Option("ace", "ace", BOOL, False, "refused (derper: an experimental CONNECT proxy for Tailscale's own "
           "infrastructure)", _env("DERP_ACE")),
    Option("config_file", "config-file", TEXT, "", "YAML file of settings (keys are flag names)",
           _env("DERP_CONFIG_FILE"), in_file=False),
    Option("tls", "tls", _choices("auto", "on", "off"), "auto",
           "serve TLS: auto follows derper (port 443 or certmode manual)", _env("DERP_TLS")),
    Option("tls_groups", "tls-groups", Kind("string", _tls_groups, "an OpenSSL group list such as X25519:P-256"), "",
           "TLS key-exchange groups in preference order; empty keeps OpenSSL's default (post-quantum "
           "X25519MLKEM768 first, as Go's derper); X25519:P-256 saves about 8 KiB per idle connection",
           _env("DERP_TLS_GROUPS")),
    Option("log_level", "log-level", _choices("debug", "info", "warn", "error"), "info", "log level",
           _env("DERP_LOG_LEVEL")),
    Option("log_format", "log-format", _choices("text", "json"), "text", "log format", _env("DERP_LOG_FORMAT")),
    Option("proxy_protocol", "proxy-protocol", _choices("off", "v1", "v2", "auto"), "off",
           "accept a PROXY protocol header (from -trusted-proxies only) on the TLS and HTTP listeners",
           _env("DERP_PROXY_PROTOCOL")),
    Option("trusted_proxies", "trusted-proxies",
           Kind("string", _cidrs, "a comma-separated list of IPs or CIDRs", (str, list)), (),
           "addresses allowed to send a PROXY protocol header", _env("DERP_TRUSTED_PROXIES")),
    Option("metrics_addr", "metrics-addr",
           Kind("string", _optional_listen_addr, "empty, :PORT, HOST:PORT or [IPV6]:PORT"), "",
           "plain-HTTP listener for /metrics and /healthz (Prometheus); empty disables it",
           _env("DERP_METRICS_ADDR")),
    Option("metrics_allow", "metrics-allow", Kind("string", _cidrs, "a comma-separated list of IPs or CIDRs", (str, list)),
           ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"),
           "who may reach the metrics listener", _env("DERP_METRICS_ALLOW"),
           default_text="loopback and private (RFC 1918, ULA) addresses"),
    Option("region_id", "region-id", Kind("int", _region_id, "an integer 1..2^53-1 (900-999 for your own relays)", _NUMBERS),
           900, "DERP map region ID of this relay (for derpbox derpmap)", _env("DERP_REGION_ID")),
    Option("region_code", "region-code", TEXT, "", "DERP map region code; default derived from the hostname",
           _env("DERP_REGION_CODE")),
    Option("region_name", "region-name", TEXT, "", "DERP map region name; default derived from the hostname",
           _env("DERP_REGION_NAME")),
    Option("public_ipv4", "public-ipv4", Kind("string", _ip_or_none(4), "an IPv4 address, or none"), "",
           "this relay's public IPv4 address for the DERP map (none disables IPv4)", _env("DERP_PUBLIC_IPV4")),
    Option("public_ipv6", "public-ipv6", Kind("string", _ip_or_none(6), "an IPv6 address, or none"), "",
           "this relay's public IPv6 address for the DERP map (none disables IPv6)", _env("DERP_PUBLIC_IPV6")),
    Option("public_port", "public-port", PORT, 0, "DERP port as seen from outside; 0 means the listen port",
           _env("DERP_PUBLIC_PORT")),
    Option("public_stun_port", "public-stun-port", PORT, 0, "STUN port as seen from outside; 0 means -stun-port",
           _env("DERP_PUBLIC_STUN_PORT")),
    Option("public_http_port", "public-http-port", PORT, 0,
           "plain-HTTP port as seen from outside; 0 means -http-port (CanPort80 when it is 80)",
           _env("DERP_PUBLIC_HTTP_PORT")),
    Option("derpmap_path", "derpmap-path", TEXT, "", "also serve this relay's DERP map JSON at this path, e.g. /derpmap.json",
           _env("DERP_DERPMAP_PATH")),
)

_BY_FLAG = {opt.flag: opt for opt in SETTINGS_TABLE}


# --- loading -------------------------------------------------------------------------------------


def load_settings(argv: list[str], environ: Mapping[str, str]) -> Settings:
    """Build Settings from argv (without the program name) and an environment mapping."""
    cli = _parse_argv(argv)
    warnings: list[str] = []
    config_file = _resolve(_BY_FLAG["config-file"], cli, environ, {}, warnings)
    from_file = _read_config_file(config_file) if config_file else {}
    values = {
        opt.field: _resolve(opt, cli, environ, from_file, warnings)
        for opt in SETTINGS_TABLE
        if opt.field != "config_file"
    }
    values["config_file"] = config_file or None
    values["key_path"] = values["key_path"] or None
    if values["dev"]:
        # derper -dev overrides -a and uses a throwaway key; derpbox also keeps it off the network.
        values.update(addr=f"{DEV_HOST}:{DEV_PORT}", stun=True, key_path=None)
    elif values["key_path"] is None and not values["version_requested"]:
        values["key_path"] = keys.default_key_path(os.geteuid() == 0)
        if values["key_path"] is None:
            raise ConfigError(
                "no node key file: derper's rule is that without -c only root gets the default "
                f"{keys.ROOT_KEY_PATH}; set -c PATH or DERP_CONFIG_PATH=PATH (the file is created if missing)"
            )
    values["listen_host"], values["listen_port"] = split_listen_addr(values["addr"])
    values["metrics_listen"] = split_listen_addr(values["metrics_addr"]) if values["metrics_addr"] else None
    values["metrics_allow_networks"] = parse_networks(values["metrics_allow"])
    values["proxy_networks"] = () if values["proxy_protocol"] == "off" else parse_networks(values["trusted_proxies"])
    values["send_queue_depth"] = _send_queue_depth(environ)
    values["rtt_stats"] = not _env_knob_bool(environ, RTT_STATS_OFF_ENV)
    cert_names = dict(pair.split("=", 1) for pair in values["mesh_cert_names"])
    values["mesh_peers"] = mesh_spec.parse_entries(values["mesh_with"], cert_names)
    unknown = unknown_env_names(environ)
    if unknown and values["strict_env"]:
        raise ConfigError("; ".join(unknown) + " (strict mode: -strict-env / DERP_STRICT_ENV)")
    if values["region_id"] < 900:
        warnings.append(f"-region-id {values['region_id']} is below 900: Tailscale's own DERP regions use low IDs, "
                        "and a custom region with the same ID replaces Tailscale's in your tailnet's DERP map; "
                        "use 900-999")
    settings = Settings(warnings=(*unknown, *warnings), **values)
    if not settings.version_requested:
        _check_consistency(settings, environ)
    return settings


# DERP_*/DERPER_* names that are no settings but belong to the appliance: the container
# entrypoint's, and the compose variants' proxy backends (one .env may feed every service).
OTHER_ENV_NAMES = frozenset({"DERP_EXTRA_ARGS", "DERPER_EXTRA_ARGS", "DERP_BACKEND", "DERP_HTTP_BACKEND"})
ENV_PREFIXES = ("DERP_", "DERPER_")


def unknown_env_names(environ: Mapping[str, str]) -> list[str]:
    """A line for each set variable that looks like a setting but is none (a misspelling)."""
    known = {env.name for opt in SETTINGS_TABLE for env in opt.env} | OTHER_ENV_NAMES
    # Compared without the prefix, which every candidate shares and would make anything look close;
    # of DERP_X and DERPER_X, DERP_X (sorted last) is the one suggested.
    by_stem = {_env_stem(name): name for name in sorted(known, key=lambda n: (n.startswith("DERP_"), n))
               if name.startswith(ENV_PREFIXES)}
    lines = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIXES) and name not in known:
            close = difflib.get_close_matches(_env_stem(name), list(by_stem), n=1, cutoff=0.75)
            hint = f"did you mean {by_stem[close[0]]}?" if close else "no setting has a similar name"
            lines.append(f"environment variable {name} is not a derpbox setting and is ignored: {hint}")
    return lines


def _env_stem(name: str) -> str:
    return name.split("_", 1)[1]


def _env_knob_bool(environ: Mapping[str, str], name: str) -> bool:
    """A Tailscale envknob boolean: unset or empty is false, else Go's ParseBool."""
    text = environ.get(name, "")
    if not text:
        return False
    try:
        return _go_bool(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is invalid: expected true or false (1, t, TRUE, 0, f, FALSE, ...)") from None


def _send_queue_depth(environ: Mapping[str, str]) -> int:
    text = environ.get(QUEUE_DEPTH_ENV, "")
    if not text:
        return DEFAULT_QUEUE_DEPTH
    try:
        depth = int(text)
    except ValueError:
        depth = 0
    if depth < 1:
        raise ConfigError(
            f"{QUEUE_DEPTH_ENV}={text!r} is invalid: expected a positive integer (default {DEFAULT_QUEUE_DEPTH})"
        )
    return depth


def _parse_argv(argv: list[str]) -> dict[str, tuple[str, str]]:
    """Go flag-package syntax -> {flag: (flag as written, value text)}."""
    found: dict[str, tuple[str, str]] = {}
    last_bare_bool = ""
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest = list(args)
            if rest:
                raise ConfigError(f"unexpected argument {rest[0]!r}: derpbox takes only flags")
            break
        if len(arg) < 2 or arg[0] != "-":
            hint = ""
            if last_bare_bool and arg in _GO_TRUE + _GO_FALSE:
                hint = f"; {last_bare_bool} is a boolean flag and takes no separate value, write {last_bare_bool}={arg}"
            raise ConfigError(f"unexpected argument {arg!r}: derpbox takes only flags{hint}")
        dashes = 2 if arg.startswith("--") else 1
        name, has_value, value = arg[dashes:].partition("=")
        if not name or name[0] in "-=":
            raise ConfigError(f"bad flag syntax: {arg}")
        spelled = arg[: dashes + len(name)]
        opt = _BY_FLAG.get(name)
        if opt is None:
            if name in ("h", "help"):
                raise UsageRequested(usage())
            raise ConfigError(f"flag provided but not defined: {spelled} (run with -help for the list)")
        last_bare_bool = spelled if opt.kind is BOOL and not has_value else ""
        if opt.kind is BOOL:
            text = value if has_value else "true"
        elif has_value:
            text = value
        else:
            text = next(args, None)
            if text is None:
                raise ConfigError(f"flag needs an argument: {spelled} ({opt.kind.forms})")
        found[opt.flag] = (spelled, text)
    return found


_UNSET = object()


def _resolve(
    opt: Option,
    cli: dict[str, tuple[str, str]],
    environ: Mapping[str, str],
    from_file: dict[str, tuple[str, Any]],
    warnings: list[str],
) -> Any:
    if opt.flag in cli:
        spelled, text = cli[opt.flag]
        return _parse(opt, opt.kind.parse, text, f"flag {spelled}", opt.kind.forms)
    value = _from_env(opt, environ, warnings)
    if value is not _UNSET:
        return value
    if opt.flag in from_file:
        return _from_file(opt, *from_file[opt.flag])
    return opt.default(environ) if callable(opt.default) else opt.default


def _parse(opt: Option, parse: Callable[[str], Any], text: str, where: str, forms: str) -> Any:
    try:
        return parse(text)
    except ValueError as e:
        shown = "(value hidden)" if opt.secret else repr(text)
        raise ConfigError(f"invalid value {shown} for {where}: {e}; accepted: {forms}") from None


def _from_env(opt: Option, environ: Mapping[str, str], warnings: list[str]) -> Any:
    """Primary name first, then aliases; report every other set name whose value differs."""
    parse, forms = (_env_bool, ENV_BOOL_FORMS) if opt.kind is BOOL else (opt.kind.parse, opt.kind.forms)
    candidates = []
    for env in opt.env:
        # Images pass unset variables through as "", so empty means unset.
        raw = environ.get(env.name, "").strip()
        if not raw:
            continue
        where = f"environment variable {env.name} (setting -{opt.flag})"
        env_forms = env.forms or forms
        text = _parse(opt, env.transform, raw, where, env_forms) if env.transform else raw
        if text is not None:
            candidates.append((env.name, raw, text, where, env_forms))
    if not candidates:
        return _UNSET
    chosen, chosen_raw, text, where, env_forms = candidates[0]
    value = _parse(opt, parse, text, where, env_forms)
    for name, raw, other_text, other_where, other_forms in candidates[1:]:
        try:
            same = _parse(opt, parse, other_text, other_where, other_forms) == value
        except ConfigError:
            same = False
        if not same:
            detail = "" if opt.secret else f" ({chosen_raw!r} vs {raw!r})"
            warnings.append(f"{chosen} and {name} are both set and differ{detail}; using {chosen}")
    return value


def _read_config_file(path: str) -> dict[str, tuple[str, Any]]:
    """YAML mapping of flag names (dashes or underscores) -> {flag: (where, value)}."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(
            f"config file {path}: the top level must be a mapping of setting names to values, "
            f"not a {type(doc).__name__}"
        )
    known = {opt.flag: opt for opt in SETTINGS_TABLE if opt.in_file}
    found: dict[str, tuple[str, Any]] = {}
    for key, value in doc.items():
        opt = known.get(key.replace("_", "-")) if isinstance(key, str) else None
        if opt is None:
            close = difflib.get_close_matches(str(key).replace("_", "-"), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config file {path}: unknown setting {key!r}{hint} (keys are derpbox's flag names)")
        if opt.flag in found:
            raise ConfigError(f"config file {path}: {key!r} sets -{opt.flag} a second time")
        # A key with no value (e.g. a template's "hostname:") leaves the setting alone.
        if value is not None:
            found[opt.flag] = (f"{key!r} in config file {path}", value)
    return found


def _from_file(opt: Option, where: str, value: Any) -> Any:
    # bool is an int subclass, so check it separately: "stun-port: yes" must not become 1.
    if isinstance(value, bool) != (opt.kind is BOOL) or not isinstance(value, opt.kind.file_types):
        expected = " or ".join({bool: "true/false", str: "text", int: "an integer", float: "a number",
                                list: "a list"}[t] for t in opt.kind.file_types)
        raise ConfigError(f"wrong type for {where}: got {type(value).__name__}, expected {expected} "
                          f"({opt.kind.forms})")
    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            raise ConfigError(f"wrong type for {where}: list items must be text")
        value = ",".join(value)
    elif isinstance(value, bool):
        value = "true" if value else "false"
    return _parse(opt, opt.kind.parse, str(value), where, opt.kind.forms)


def _check_consistency(s: Settings, environ: Mapping[str, str]) -> None:
    """Cross-setting rules that derper enforces at start-up."""
    _check_tailscale_api(s)
    if s.mesh_with or s.mesh_peers_file:
        has_key = bool(environ.get(DEV_MESH_KEY_ENV)) if s.dev else bool(s.mesh_key or s.mesh_psk_file or s.secrets_url)
        if not has_key:
            source = f"the {DEV_MESH_KEY_ENV} environment variable (-dev)" if s.dev else (
                "-mesh-key (DERP_MESH_KEY), -mesh-psk-file (DERP_MESH_PSK_FILE) or -secrets-url (DERP_SECRETS_URL)")
            what = "-mesh-with (DERP_MESH_WITH)" if s.mesh_with else "-mesh-peers-file (DERP_MESH_PEERS_FILE)"
            raise ConfigError(f"{what} needs a mesh key: set {source}")
    if not s.use_tls:
        return
    if not s.certdir:
        raise ConfigError("-certdir (DERP_CERT_DIR) must not be empty when serving TLS")
    if s.acme_ip_certs and s.certmode != "letsencrypt":
        raise ConfigError(f"-acme-ip-certs needs -certmode letsencrypt, not {s.certmode!r}")
    if s.certmode == "letsencrypt" and s.hostname_is_ip and not s.acme_ip_certs:
        raise ConfigError(
            f"-hostname {s.hostname!r} is an IP address, which -certmode letsencrypt cannot get a certificate for; "
            "use -certmode manual (self-signed) or add -acme-ip-certs"
        )
    if s.certmode == "gcp":
        if s.hostname_is_ip:
            raise ConfigError(f"-certmode gcp needs a DNS -hostname, not the IP address {s.hostname!r}")
        missing = [flag for flag, value in (("-acme-eab-kid", s.acme_eab_kid), ("-acme-eab-key", s.acme_eab_key),
                                            ("-acme-email", s.acme_email)) if not value]
        if missing:
            raise ConfigError(f"-certmode gcp needs {', '.join(missing)} (DERP_ACME_EAB_KID, DERP_ACME_EAB_KEY, "
                              "DERP_ACME_EMAIL)")


def _check_tailscale_api(s: Settings) -> None:
    """One way to authenticate to the Tailscale API, and whole (derpbox-only settings)."""
    ways = [name for name, given in (
        ("-verify-tailscale-api-token", s.verify_tailscale_api_token),
        ("-verify-tailscale-api-token-file", s.verify_tailscale_api_token_file),
        ("-verify-tailscale-api-oauth-client-id", s.verify_tailscale_api_oauth_client_id
         or s.verify_tailscale_api_oauth_secret_file)) if given]
    if len(ways) > 1:
        raise ConfigError(f"{' and '.join(ways)} are both set: give the Tailscale API one access token "
                          "or one OAuth client")
    if bool(s.verify_tailscale_api_oauth_client_id) != bool(s.verify_tailscale_api_oauth_secret_file):
        raise ConfigError("-verify-tailscale-api-oauth-client-id (DERP_VERIFY_TAILSCALE_API_OAUTH_CLIENT_ID) and "
                          "-verify-tailscale-api-oauth-secret-file (DERP_VERIFY_TAILSCALE_API_OAUTH_SECRET_FILE) "
                          "go together")
    if not s.verify_tailscale_api_tailnet.strip():
        raise ConfigError('-verify-tailscale-api-tailnet must not be empty ("-" is the token\'s own tailnet)')


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """What only a starting server needs beyond Settings.

    Kept out of load_settings because the entrypoint, ``derpbox derpmap`` and
    ``derpbox healthcheck`` load the same Settings and must neither read the mesh
    key file nor refuse what only the server cannot do.
    """

    mesh_key: bytes | None = field(repr=False)
    warnings: tuple[str, ...]


def load_serve_settings(settings: Settings, environ: Mapping[str, str]) -> ServeSettings:
    """The server's own checks and values; ConfigError when it must not start."""
    warnings = []
    if settings.proxy_protocol == "off":
        if settings.trusted_proxies:
            warnings.append("-trusted-proxies is set but -proxy-protocol is off: PROXY headers are not accepted")
    elif not settings.trusted_proxies:
        # Refused rather than read as "anyone" (anyone could then name any client address:
        # spoofed admission Source, logs, limits) or as "loopback" (a same-host proxy is the
        # common case, but a silent default would also trust every local process).
        raise ConfigError(
            f"-proxy-protocol={settings.proxy_protocol} needs -trusted-proxies (DERP_TRUSTED_PROXIES): "
            "the IPs or CIDRs of the proxies that send PROXY headers, e.g. 127.0.0.1 for a proxy on this host; "
            "without it anyone could claim any client address"
        )
    for name, refusal in _REFUSED_DERPER_FEATURES.items():
        if getattr(settings, name):
            raise ConfigError(refusal)
    if settings.acme_ip_certs and settings.use_tls and not settings.hostname_is_ip:
        # derper would also order, on first use, a certificate for whichever local address a
        # client without SNI dialled; derpbox orders only for -hostname.
        raise ConfigError(
            f"-acme-ip-certs with the DNS -hostname {settings.hostname!r} is not supported (derper then also "
            "serves IP-address certificates to clients that dial an IP): set -hostname to the relay's public IP "
            "for an IP certificate, or drop -acme-ip-certs (DERP_ACME_IP_CERTS)"
        )
    return ServeSettings(mesh_key=_mesh_key(settings, environ), warnings=tuple(warnings))


def _mesh_key(settings: Settings, environ: Mapping[str, str]) -> bytes | None:
    """derper's rule: TAILSCALE_DERPER_MESH_KEY in -dev, else the -mesh-psk-file; -mesh-key
    (a container's secret variable) before the file."""
    try:
        if settings.dev:
            text = environ.get(DEV_MESH_KEY_ENV, "")
            return keys.parse_mesh_key(text, DEV_MESH_KEY_ENV) if text else None
        if settings.mesh_key:
            return keys.parse_mesh_key(settings.mesh_key, "-mesh-key (DERP_MESH_KEY)")
        if settings.mesh_psk_file:
            return keys.load_mesh_key(settings.mesh_psk_file)
    except keys.MeshKeyError as e:
        raise ConfigError(str(e)) from None
    return None


def usage(prog: str = "derpbox") -> str:
    """Go-flag-style usage text, with each setting's environment variables."""
    lines = [f"Usage of {prog}:"]
    for opt in SETTINGS_TABLE:
        lines.append(f"  -{opt.flag}" + (f" {opt.kind.type_name}" if opt.kind.type_name else ""))
        default = opt.default_text or _default_text(opt.default)
        lines.append(f"    \t{opt.help}" + (f" (default {default})" if default else ""))
        if opt.env:
            lines.append(f"    \tenv: {', '.join(env.name for env in opt.env)}")
    return "\n".join(lines) + "\n"


def _default_text(value: Any) -> str:
    if value is True:
        return "true"
    if isinstance(value, str) and value:
        return f'"{value}"'
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""
