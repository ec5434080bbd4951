"""This relay's DERP map: the region and node clients need, from the server's own settings.

``derpbox derpmap [--format F] [--omit-default-regions] [derper flags...]`` reads the
same flags, ``DERP_*`` variables and config file as the server, so the map it prints
matches what the server serves. Formats:

``tailscale``
    the ``derpMap`` block of a Tailscale tailnet policy file (admin console, HuJSON).
    The policy file spells the omit flag ``OmitDefaultRegions`` (capital O, the
    ``hujson`` names of Tailscale's API client ``ACLDERPMap``), while the wire
    ``tailcfg.DERPMap`` that clients fetch spells it ``omitDefaultRegions``.
``headscale``
    a ``derp.yaml`` for Headscale's ``derp.paths``: yaml.v3 decodes straight into
    ``tailcfg.DERPMap``, which has no yaml tags, so every key is the Go field name
    fully lower-cased (``regionid``, ``hostname``, ``derpport``, ...).
``ionscale``
    a DERP map JSON file for ionscale's ``derp.sources`` (the wire form).
``json``
    the wire form, as clients (tailscaled, ``TAILCAT_DERPMAP_URL``) fetch it.

:func:`build_derp_map` gives the wire form as a dict, :func:`render` the text of a
format, :func:`derpmap_resource` a Twisted resource serving the wire JSON.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from typing import Callable, Mapping

from twisted.web.resource import Resource

from .config import DEFAULT_HOSTNAME, ConfigError, Settings, UsageRequested, load_settings
from .protocol.stun import DEFAULT_STUN_PORT
from .tls.certs import CertificateError, CertifiedKey, cert_paths, ensure_ip_self_signed, load_certified_key
from .tls.pins import PIN_PREFIX

# A node without DERPPort is reached on this port (tailcfg.DERPNode).
DEFAULT_DERP_PORT = 443
FORMATS = ("tailscale", "headscale", "ionscale", "json")

# Wire (Go field) names; Headscale's derp.yaml uses each of them lower-cased.
REGION_KEYS = ("RegionID", "RegionCode", "RegionName", "Latitude", "Longitude", "Avoid", "NoMeasureNoHome", "Nodes")
NODE_KEYS = ("Name", "RegionID", "HostName", "CertName", "IPv4", "IPv6", "STUNPort", "STUNOnly", "DERPPort",
             "InsecureForTests", "STUNTestIP", "CanPort80")
WIRE_OMIT_DEFAULT = "omitDefaultRegions"  # tailcfg.DERPMap's json tag
POLICY_OMIT_DEFAULT = "OmitDefaultRegions"  # the tailnet policy file's spelling


class DerpMapError(Exception):
    """The map cannot be built from these settings (the message says what to do)."""


# --- building -----------------------------------------------------------------------------------


def _hostname_ip(settings: Settings) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(settings.hostname)
    except ValueError:
        return None


def region_code(settings: Settings) -> str:
    """-region-code, or derived from the hostname: its first label, or ``ip-<address>`` for an IP."""
    if settings.region_code:
        return settings.region_code
    ip = _hostname_ip(settings)
    if ip is not None:
        return "ip-" + re.sub(r"[.:]", "-", str(ip))
    label = settings.hostname.rstrip(".").split(".")[0].lower()
    return re.sub(r"[^a-z0-9-]", "", label) or "derpbox"


def region_name(settings: Settings) -> str:
    """-region-name, or ``derpbox <hostname>``."""
    return settings.region_name or f"derpbox {settings.hostname.rstrip('.')}"


def _public(public: int, listen: int, what: str, flag: str) -> int:
    port = public or listen
    if port == 0:
        raise DerpMapError(f"the {what} port is 0 (picked by the system at start), so clients cannot be told it; "
                           f"set {flag}")
    return port


def _derp_port(settings: Settings) -> int:
    return _public(settings.public_port, settings.listen_port, "DERP listen", "-public-port")


def _stun_port(settings: Settings) -> int:
    """The node's STUNPort: -1 when STUN is off."""
    if not settings.stun:
        return -1
    return _public(settings.public_stun_port, settings.stun_port, "STUN", "-public-stun-port")


def _can_port80(settings: Settings) -> bool:
    # derpbox runs the port-80 listener only beside a TLS main listener (as derper).
    if not settings.use_tls or settings.http_port < 0:
        return False
    return (settings.public_http_port or settings.http_port) == 80


def _pinned_cert(settings: Settings) -> CertifiedKey | None:
    """The certificate to pin for an IP hostname in manual mode, read from -certdir."""
    crt, key = cert_paths(settings.certdir, settings.hostname)
    if not crt.exists() or not key.exists():
        raise DerpMapError(
            f"no certificate yet at {crt}: derpbox creates a self-signed certificate for "
            f"{settings.hostname} there on first start. Start the server once with the same settings "
            "(same -certdir), then run this again to get the CertName pin"
        )
    try:
        return load_certified_key(crt, key, settings.hostname)
    except CertificateError as e:
        raise DerpMapError(str(e)) from None


def _needs_pin(settings: Settings) -> bool:
    return settings.use_tls and settings.certmode == "manual" and _hostname_ip(settings) is not None


def build_node(settings: Settings, cert: CertifiedKey | None = None) -> dict:
    """This relay's DERPNode (wire names): what ``derpbox derpmap`` prints, the -derpmap-path
    resource serves and the server logs at start-up for an IP certificate.

    *cert* is the certificate to pin; without it the pin is read from -certdir.
    """
    rid = settings.region_id
    node: dict = {"Name": f"{rid}a", "RegionID": rid, "HostName": settings.hostname}
    if _needs_pin(settings):
        cert = cert or _pinned_cert(settings)
        # Clients accept exactly one certificate (besides the meta-certificate) under a
        # sha256-raw pin; a CA-issued chain is verified the usual way instead.
        if len(cert.chain) == 1:
            node["CertName"] = PIN_PREFIX + cert.sha256_hex
    ip = _hostname_ip(settings)
    for family, public in ((4, settings.public_ipv4), (6, settings.public_ipv6)):
        value = public or (str(ip) if ip is not None and ip.version == family else "")
        if value:
            node[f"IPv{family}"] = value
    stun = _stun_port(settings)
    if stun != DEFAULT_STUN_PORT:
        node["STUNPort"] = stun
    derp = _derp_port(settings)
    if derp != DEFAULT_DERP_PORT:
        node["DERPPort"] = derp
    if _can_port80(settings):
        node["CanPort80"] = True
    return node


def build_derp_map(settings: Settings, omit_default_regions: bool = False, *, cert: CertifiedKey | None = None,
                   other_nodes: list[dict] = ()) -> dict:
    """The wire-form ``tailcfg.DERPMap`` with this relay's region: its own node first, then
    ``other_nodes`` (the region's other nodes, e.g. meshed with this one), named {id}a, {id}b, ..."""
    if settings.hostname == DEFAULT_HOSTNAME and not settings.dev:
        raise DerpMapError(f"-hostname is not set (the default {DEFAULT_HOSTNAME} is Tailscale's); "
                           "set -hostname (DERP_DOMAIN / DERP_HOSTNAME) to this relay's DNS name or public IP")
    rid = settings.region_id
    region = {"RegionID": rid, "RegionCode": region_code(settings), "RegionName": region_name(settings),
              "Nodes": [build_node(settings, cert), *(dict(node, RegionID=rid) for node in other_nodes)]}
    for i, node in enumerate(region["Nodes"]):
        node["Name"] = f"{rid}{_node_letters(i)}"
    the_map: dict = {"Regions": {str(rid): region}}
    if omit_default_regions:
        the_map[WIRE_OMIT_DEFAULT] = True
    return the_map


def _node_letters(i: int) -> str:
    """a, b, ..., z, aa, ab, ...: the suffixes of a region's node names."""
    letters = ""
    i += 1
    while i:
        i, rest = divmod(i - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return letters


def read_nodes(path: str) -> list[dict]:
    """The nodes in a file: a wire DERP map (``--format json``, or ``-derpmap-path``) or one node object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DerpMapError(f"--node {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DerpMapError(f"--node {path}: not JSON: {e}") from None
    if isinstance(data, dict) and "HostName" in data:
        return [data]
    regions = data.get("Regions") if isinstance(data, dict) else None
    nodes = [node for region in (regions or {}).values() for node in region.get("Nodes", ())]
    if not nodes or not all(isinstance(n, dict) and n.get("HostName") for n in nodes):
        raise DerpMapError(f"--node {path}: neither a DERP map with nodes nor a node with a HostName")
    return nodes


def notes(settings: Settings) -> list[str]:
    """Warnings about the map worth telling the operator."""
    out = []
    if not 900 <= settings.region_id <= 999:
        out.append(f"region ID {settings.region_id} is outside 900-999, the range reserved for your own relays; "
                   "it may collide with a Tailscale region")
    if not settings.use_tls:
        out.append("this server does not serve TLS; Tailscale clients reach DERP map nodes only over TLS")
    if settings.use_tls and settings.certmode == "manual" and _hostname_ip(settings) is None:
        out.append(f"the certificate for {settings.hostname} must be issued by a CA the clients trust "
                   "(no CertName pin for DNS names)")
    if settings.use_tls and settings.acme_ip_certs and _hostname_ip(settings) is not None:
        out.append(f"the certificate for {settings.hostname} is CA-signed (ACME, -acme-ip-certs): clients verify it "
                   "normally with the IP as the name, so the node needs no CertName sha256-raw pin")
    if settings.listen_host and (settings.listen_host in ("127.0.0.1", "::1", "localhost")):
        out.append(f"the server listens on {settings.listen_host} only; clients elsewhere cannot reach it")
    return out


# --- rendering ----------------------------------------------------------------------------------


def _policy_snippet(the_map: dict) -> dict:
    return {"derpMap": {POLICY_OMIT_DEFAULT: bool(the_map.get(WIRE_OMIT_DEFAULT)), "Regions": the_map["Regions"]}}


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid YAML double-quoted scalar


def _headscale_yaml(the_map: dict, settings: Settings) -> str:
    lines = [
        "# Headscale DERP map for this derpbox relay.",
        "# Save it as e.g. /etc/headscale/derp.yaml and list it in Headscale's config.yaml:",
        "#   derp:",
        "#     paths:",
        "#       - /etc/headscale/derp.yaml",
    ]
    if the_map.get(WIRE_OMIT_DEFAULT):
        lines += [
            "#     urls: []   # do not load Tailscale's default DERP map: use only this relay",
        ]
    lines += ["# Keys are tailcfg.DERPMap's Go field names, fully lower-cased.", ""]
    if the_map.get(WIRE_OMIT_DEFAULT):
        lines.append("omitdefaultregions: true")
    lines.append("regions:")
    for rid, region in the_map["Regions"].items():
        lines.append(f"  {int(rid)}:")
        for key, value in region.items():
            if key == "Nodes":
                lines.append("    nodes:")
                for node in value:
                    for i, (nkey, nvalue) in enumerate(node.items()):
                        lead = "      - " if i == 0 else "        "
                        lines.append(f"{lead}{nkey.lower()}: {_yaml_scalar(nvalue)}")
            else:
                lines.append(f"    {key.lower()}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def render(settings: Settings, fmt: str, omit_default_regions: bool = False, *, cert: CertifiedKey | None = None,
           other_nodes: list[dict] = ()) -> str:
    """The map in format *fmt* (one of :data:`FORMATS`), as text ending in a newline."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    the_map = build_derp_map(settings, omit_default_regions, cert=cert, other_nodes=other_nodes)
    if fmt == "tailscale":
        return json.dumps(_policy_snippet(the_map), indent=2) + "\n"
    if fmt == "headscale":
        return _headscale_yaml(the_map, settings)
    return json.dumps(the_map, indent=2) + "\n"


_HINTS = {
    "tailscale": "Paste the derpMap entry into your tailnet policy file (admin console > Access controls), "
                 "at the top level next to \"acls\".",
    "headscale": "Save as a file listed under derp.paths in Headscale's config.yaml, then restart Headscale.",
    "ionscale": "Save as a JSON file and list it under derp.sources in ionscale's config "
                "(e.g. file:///etc/ionscale/derpmap.json); ionscale reads sources only at start-up.",
    "json": "This is the wire form clients fetch (e.g. TAILCAT_DERPMAP_URL).",
}


# --- the HTTP resource --------------------------------------------------------------------------


class DerpMapResource(Resource):
    """GET: this relay's DERP map, wire JSON. Built per request, so a replaced certificate shows."""

    isLeaf = True

    def __init__(self, settings: Settings, cert: Callable[[], CertifiedKey | None] | None = None):
        super().__init__()
        self.settings = settings
        self.cert = cert

    def render_GET(self, request) -> bytes:
        try:
            the_map = build_derp_map(self.settings, cert=self.cert() if self.cert else None)
        except DerpMapError as e:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return (str(e) + "\n").encode()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-cache")
        return json.dumps(the_map).encode()

    def render_HEAD(self, request) -> bytes:
        # GET's status and headers (its length included), no body.
        body = self.render_GET(request)
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""


def derpmap_resource(settings: Settings, cert: Callable[[], CertifiedKey | None] | None = None) -> Resource:
    """A leaf resource serving :func:`build_derp_map` as ``application/json``, to mount at settings.derpmap_path.

    *cert*, if given, returns the certificate being served (the server passes its
    CertificateSource's ``current``); otherwise the pinned certificate is read from -certdir on
    each request.
    """
    return DerpMapResource(settings, cert)


# --- the command --------------------------------------------------------------------------------

USAGE = f"""\
Usage: derpbox derpmap [--format {'|'.join(FORMATS)}] [--omit-default-regions] [--node FILE]... [derper flags...]

Print this relay's DERP map, built from the same flags, DERP_* variables and config
file as the server (-hostname, -a, -stun, -stun-port, -http-port, -certdir, -region-id,
-region-code, -region-name, -public-ipv4, -public-ipv6, -public-port, -public-stun-port,
-public-http-port). For an IP -hostname with -certmode manual the CertName pin is read
from the certificate the server created in -certdir; with -acme-ip-certs the certificate
is CA-signed and the node has no pin.

  --format F               tailscale (policy file derpMap, default), headscale (derp.yaml),
                           ionscale (derp.sources JSON), json (wire form)
  --omit-default-regions   use only this relay, not Tailscale's DERP regions
  --node FILE              add the region's other nodes (meshed with this one): FILE is their
                           `derpbox derpmap --format json` (or one node object); repeatable
  --new-ip-cert            for an IP -hostname: create the self-signed certificate in -certdir
                           if it has none, as the server would (to rotate it: an empty -certdir,
                           then move the files over the old ones when the map has the new pin)
"""


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "t", "true", "yes", "on"):
        return True
    if lowered in ("0", "f", "false", "no", "off"):
        return False
    raise ConfigError(f"--omit-default-regions: {text!r} is not a boolean")


def split_args(argv: list[str]) -> tuple[dict, list[str]]:
    """Separate derpmap's own options from the derper flags (returned in order)."""
    options = {"format": "tailscale", "omit_default_regions": False, "help": False, "nodes": [],
               "new_ip_cert": False}
    rest: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            rest += args
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-"):
            rest.append(arg)
        elif name == "format":
            if not eq:
                if not args:
                    raise ConfigError("--format needs a value: " + ", ".join(FORMATS))
                value = args.pop(0)
            if value not in FORMATS:
                raise ConfigError(f"--format {value!r}: use one of {', '.join(FORMATS)}")
            options["format"] = value
        elif name == "node":
            if not eq:
                if not args:
                    raise ConfigError("--node needs a file: the other node's `derpbox derpmap --format json`")
                value = args.pop(0)
            options["nodes"].append(value)
        elif name == "new-ip-cert" and not eq:
            options["new_ip_cert"] = True
        elif name == "omit-default-regions":
            options["omit_default_regions"] = _bool(value) if eq else True
        elif name in ("h", "help") and not eq:
            options["help"] = True
        else:
            rest.append(arg)
    return options, rest


def derpmap_main(argv: list[str], environ: Mapping[str, str], stdout=None, stderr=None) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        options, flags = split_args(argv)
        if options["help"]:
            stdout.write(USAGE)
            return 0
        settings = load_settings(flags, environ)
        if options["new_ip_cert"]:
            if not settings.hostname_is_ip:
                raise ConfigError(f"--new-ip-cert: -hostname {settings.hostname!r} is not an IP address")
            ensure_ip_self_signed(settings.certdir, settings.hostname)
        others = [node for path in options["nodes"] for node in read_nodes(path)]
        text = render(settings, options["format"], options["omit_default_regions"], other_nodes=others)
    except UsageRequested:
        stdout.write(USAGE)
        return 0
    except ConfigError as e:
        stderr.write(f"derpbox derpmap: {e}\n")
        return 2
    except DerpMapError as e:
        stderr.write(f"derpbox derpmap: {e}\n")
        return 1
    stdout.write(text)
    for note in [*settings.warnings, *notes(settings)]:
        stderr.write(f"derpbox derpmap: note: {note}\n")
    stderr.write(f"derpbox derpmap: {_HINTS[options['format']]}\n")
    return 0
