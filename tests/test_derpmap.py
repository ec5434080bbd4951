"""derpbox derpmap: this relay's DERP map in Tailscale, Headscale, ionscale and wire form."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import pytest
import pytest_twisted
import yaml
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from derpbox.config import load_settings
from derpbox.derpmap import (
    NODE_KEYS,
    REGION_KEYS,
    DerpMapError,
    build_derp_map,
    build_node,
    derpmap_main,
    derpmap_resource,
    render,
    split_args,
)
from derpbox.tls.certs import cert_paths, ensure_ip_self_signed, load_certified_key

from .conftest import make_cert
from .tailcat import Tailcat, needs_tailcat, ping

DNS = ["-hostname", "derp.example.com", "-c", "/nonexistent/derper.key", "-certdir", "/nonexistent/certs"]


def settings(*flags: str, environ: dict | None = None):
    return load_settings(list(flags), environ or {})


def only_node(the_map: dict) -> dict:
    (region,) = the_map["Regions"].values()
    (node,) = region["Nodes"]
    return node


def ip_settings(tmp_path, ip: str = "203.0.113.7", *flags: str):
    certdir = tmp_path / "certs"
    s = settings("-hostname", ip, "-certmode", "manual", "-certdir", str(certdir), "-c", "/x/k", *flags)
    return s, certdir


# --- the wire map -------------------------------------------------------------------------------


def test_dns_host_defaults():
    the_map = build_derp_map(settings(*DNS))
    assert list(the_map) == ["Regions"]  # no omitDefaultRegions unless asked
    region = the_map["Regions"]["900"]
    assert region["RegionID"] == 900
    assert region["RegionCode"] == "derp"
    assert region["RegionName"] == "derpbox derp.example.com"
    # Port 443, STUN 3478, port 80 on: derper's defaults are left out, CanPort80 set; DNS name: no pin, no IPs.
    assert region["Nodes"] == [{"Name": "900a", "RegionID": 900, "HostName": "derp.example.com", "CanPort80": True}]


def test_region_settings_and_node_region_id_agree():
    the_map = build_derp_map(settings(*DNS, "-region-id", "917", "-region-code", "fra", "-region-name", "Frankfurt"))
    assert list(the_map["Regions"]) == ["917"]
    region = the_map["Regions"]["917"]
    assert (region["RegionID"], region["RegionCode"], region["RegionName"]) == (917, "fra", "Frankfurt")
    node = only_node(the_map)
    assert node["RegionID"] == 917 and node["Name"] == "917a"


def test_region_from_environment():
    the_map = build_derp_map(settings(*DNS, environ={"DERP_REGION_ID": "950", "DERP_PUBLIC_PORT": "8443"}))
    assert only_node(the_map)["RegionID"] == 950
    assert only_node(the_map)["DERPPort"] == 8443


def test_non_default_ports_are_the_public_ones():
    s = settings(*DNS, "-a", ":8443", "-certmode", "manual", "-certdir", "/tmp/none", "-stun-port", "3479",
                 "-http-port", "8080")
    node = only_node(build_derp_map(s))
    assert node["DERPPort"] == 8443
    assert node["STUNPort"] == 3479
    assert "CanPort80" not in node  # port-80 listener on 8080
    # Behind a port mapping the public ports count, and defaults are again omitted.
    s = settings(*DNS, "-a", ":8443", "-certmode", "manual", "-certdir", "/tmp/none", "-stun-port", "3479",
                 "-http-port", "8080", "-public-port", "443", "-public-stun-port", "3478", "-public-http-port", "80")
    node = only_node(build_derp_map(s))
    assert "DERPPort" not in node and "STUNPort" not in node
    assert node["CanPort80"] is True


def test_port80_off_means_no_canport80():
    assert "CanPort80" not in only_node(build_derp_map(settings(*DNS, "-http-port", "-1")))
    assert "CanPort80" not in only_node(build_derp_map(settings(*DNS, "-public-http-port", "8081")))


def test_stun_off_is_minus_one():
    node = only_node(build_derp_map(settings(*DNS, "-stun=false")))
    assert node["STUNPort"] == -1


def test_ephemeral_port_needs_public_port():
    with pytest.raises(DerpMapError, match="-public-port"):
        build_derp_map(settings(*DNS, "-a", ":0"))
    with pytest.raises(DerpMapError, match="-public-stun-port"):
        build_derp_map(settings(*DNS, "-stun-port", "0"))
    node = only_node(build_derp_map(settings(*DNS, "-a", ":0", "-public-port", "4443")))
    assert node["DERPPort"] == 4443


def test_default_hostname_is_refused():
    with pytest.raises(DerpMapError, match="-hostname"):
        build_derp_map(settings("-c", "/x/k", "-certdir", "/x/certs"))


def test_public_addresses():
    node = only_node(build_derp_map(settings(*DNS, "-public-ipv4", "198.51.100.4", "-public-ipv6", "2001:db8::4")))
    assert node["IPv4"] == "198.51.100.4" and node["IPv6"] == "2001:db8::4"
    node = only_node(build_derp_map(settings(*DNS, "-public-ipv6", "none")))
    assert node["IPv6"] == "none" and "IPv4" not in node


def test_ip_host_pins_the_certificate(tmp_path):
    s, certdir = ip_settings(tmp_path)
    cert = ensure_ip_self_signed(certdir, "203.0.113.7")
    node = only_node(build_derp_map(s))
    der = (certdir / "203.0.113.7.crt").read_bytes()
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(der)
    assert node["CertName"] == "sha256-raw:" + hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
    assert node["CertName"] == "sha256-raw:" + cert.sha256_hex
    assert node["HostName"] == "203.0.113.7" and node["IPv4"] == "203.0.113.7"
    assert "IPv6" not in node
    assert build_derp_map(s)["Regions"]["900"]["RegionCode"] == "ip-203-0-113-7"


def test_ip_host_public_ipv4_none_wins(tmp_path):
    s, certdir = ip_settings(tmp_path, "203.0.113.7", "-public-ipv4", "none")
    ensure_ip_self_signed(certdir, "203.0.113.7")
    assert only_node(build_derp_map(s))["IPv4"] == "none"


def test_ipv6_host(tmp_path):
    s, certdir = ip_settings(tmp_path, "2001:db8::7", "-public-ipv4", "none")
    cert = ensure_ip_self_signed(certdir, "2001:db8::7")
    node = only_node(build_derp_map(s))
    assert node["IPv6"] == "2001:db8::7" and node["IPv4"] == "none"
    assert node["HostName"] == "2001:db8::7"
    assert node["CertName"] == "sha256-raw:" + cert.sha256_hex


def test_ip_host_without_certificate_says_it_is_created_on_first_start(tmp_path):
    s, certdir = ip_settings(tmp_path)
    with pytest.raises(DerpMapError, match="first start") as e:
        build_derp_map(s)
    assert str(certdir / "203.0.113.7.crt") in str(e.value)
    out, err = io.StringIO(), io.StringIO()
    rc = derpmap_main(["-hostname", "203.0.113.7", "-certmode", "manual", "-certdir", str(certdir), "-c", "/x/k"],
                      {}, out, err)
    assert rc == 1 and out.getvalue() == ""
    assert "first start" in err.getvalue()


def test_new_ip_cert_makes_the_next_certificate_and_prints_its_pin(tmp_path):
    """The rotation's first step: a new certificate in an empty directory, and its pin."""
    flags = ["-hostname", "203.0.113.7", "-certmode", "manual", "-c", "/x/k", "--format", "json"]

    def run(certdir):
        out, err = io.StringIO(), io.StringIO()
        rc = derpmap_main(["--new-ip-cert", "-certdir", str(certdir), *flags], {}, out, err)
        assert rc == 0, err.getvalue()
        return json.loads(out.getvalue())["Regions"]["900"]["Nodes"][0]["CertName"]

    current, following = run(tmp_path / "certs"), run(tmp_path / "certs.next")
    pins = {d: "sha256-raw:" + load_certified_key(*cert_paths(tmp_path / d, "203.0.113.7"), "203.0.113.7").sha256_hex
            for d in ("certs", "certs.next")}
    assert (current, following) == (pins["certs"], pins["certs.next"]) and current != following
    assert run(tmp_path / "certs.next") == following  # an existing certificate is kept
    out, err = io.StringIO(), io.StringIO()
    assert derpmap_main(["--new-ip-cert", "-hostname", "derp.example.com", "-c", "/x/k", "-certdir", str(tmp_path)],
                        {}, out, err) == 2
    assert "is not an IP address" in err.getvalue()


def test_ca_issued_ip_certificate_is_not_pinned(tmp_path):
    # A leaf + CA chain cannot be pinned (clients accept exactly one certificate under sha256-raw).
    make_cert(tmp_path / "certs", "203.0.113.7")
    s, _ = ip_settings(tmp_path)
    node = only_node(build_derp_map(s))
    assert "CertName" not in node and node["IPv4"] == "203.0.113.7"


def test_acme_ip_certificate_is_not_pinned_and_the_command_says_why(tmp_path):
    """-acme-ip-certs: the CA-signed certificate needs no pin and none is read from -certdir,
    even before the server has obtained it."""
    certdir = tmp_path / "empty"
    out, err = io.StringIO(), io.StringIO()
    rc = derpmap_main(["--format", "json", "-hostname", "203.0.113.7", "-acme-ip-certs", "-c", "/x/k",
                       "-certdir", str(certdir)], {}, out, err)
    assert rc == 0, err.getvalue()
    node = json.loads(out.getvalue())["Regions"]["900"]["Nodes"][0]
    assert node == {"Name": "900a", "RegionID": 900, "HostName": "203.0.113.7", "IPv4": "203.0.113.7",
                    "CanPort80": True}
    assert ("note: the certificate for 203.0.113.7 is CA-signed (ACME, -acme-ip-certs): clients verify it "
            "normally with the IP as the name, so the node needs no CertName sha256-raw pin") in err.getvalue()
    assert not certdir.exists()


def test_node_pins_the_certificate_it_is_given(tmp_path):
    """The server passes the certificate it serves rather than reading -certdir (replaces
    test_tls's test_derp_map_node_json, the start-up line's former builder)."""
    cert = ensure_ip_self_signed(tmp_path / "served", "127.0.0.1")
    s, certdir = ip_settings(tmp_path, "127.0.0.1")
    assert build_node(s, cert) == {
        "Name": "900a",
        "RegionID": 900,
        "HostName": "127.0.0.1",
        "CertName": "sha256-raw:" + cert.sha256_hex,
        "IPv4": "127.0.0.1",
        "CanPort80": True,
    }
    assert not certdir.exists()
    s, _ = ip_settings(tmp_path, "2001:db8::1", "-a", ":8443", "-stun-port", "3479")
    node = build_node(s, ensure_ip_self_signed(tmp_path / "served", "2001:db8::1"))
    assert node["IPv6"] == "2001:db8::1" and "IPv4" not in node
    assert (node["DERPPort"], node["STUNPort"]) == (8443, 3479)
    # Clients reject a pinned chain with more than one real certificate.
    _, crt, key = make_cert(tmp_path / "ca-issued", "127.0.0.1")
    chain = load_certified_key(crt, key, "127.0.0.1")
    assert "CertName" not in build_node(ip_settings(tmp_path, "127.0.0.1")[0], chain)


# --- formats ------------------------------------------------------------------------------------


def test_tailscale_policy_snippet_casing():
    s = settings(*DNS)
    snippet = json.loads(render(s, "tailscale", omit_default_regions=True))
    assert list(snippet) == ["derpMap"]
    assert snippet["derpMap"]["OmitDefaultRegions"] is True
    assert "omitDefaultRegions" not in snippet["derpMap"]
    assert snippet["derpMap"]["Regions"] == build_derp_map(s)["Regions"]
    assert json.loads(render(s, "tailscale"))["derpMap"]["OmitDefaultRegions"] is False


def test_wire_json_casing_and_ionscale():
    s = settings(*DNS, "-a", ":8443", "-tls", "on", "-certdir", "/tmp/none")
    wire = json.loads(render(s, "json", omit_default_regions=True))
    assert wire == build_derp_map(s, True)
    assert wire["omitDefaultRegions"] is True and "OmitDefaultRegions" not in wire
    assert json.loads(render(s, "ionscale")) == build_derp_map(s)
    assert "omitDefaultRegions" not in json.loads(render(s, "json"))


_WIRE = {k.lower(): k for k in (*REGION_KEYS, *NODE_KEYS, "Regions", "omitDefaultRegions", "HomeParams")}


def _unlower(value):
    """Headscale's yaml keys back to wire names (region-ID keys become decimal strings, as in JSON)."""
    if isinstance(value, dict):
        return {(str(k) if isinstance(k, int) else _WIRE[k]): _unlower(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unlower(v) for v in value]
    return value


@pytest.mark.parametrize("flags, omit", [
    ((*DNS,), False),
    ((*DNS, "-region-id", "901", "-region-name", "Zürich \"main\"", "-public-ipv6", "2001:db8::1",
      "-public-ipv4", "198.51.100.1"), True),
    ((*DNS, "-a", ":8443", "-tls", "on", "-certdir", "/tmp/none", "-stun=false", "-http-port", "-1"), False),
])
def test_headscale_yaml_round_trips(flags, omit):
    s = settings(*flags)
    text = render(s, "headscale", omit)
    assert "derp:" in text and "paths:" in text  # the config hint
    parsed = yaml.safe_load(text)
    assert all(k == k.lower() for k in _keys(parsed) if isinstance(k, str))
    assert isinstance(next(iter(parsed["regions"])), int)  # regions: {900: ...}
    assert _unlower(parsed) == build_derp_map(s, omit)


def test_headscale_yaml_round_trips_ip_pin(tmp_path):
    s, certdir = ip_settings(tmp_path, "2001:db8::7", "-public-ipv4", "none")
    ensure_ip_self_signed(certdir, "2001:db8::7")
    parsed = yaml.safe_load(render(s, "headscale"))
    node = parsed["regions"][900]["nodes"][0]
    assert node["certname"].startswith("sha256-raw:") and node["ipv6"] == "2001:db8::7"
    assert _unlower(parsed) == build_derp_map(s)


def _keys(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _keys(v)


def test_unknown_format():
    with pytest.raises(ValueError):
        render(settings(*DNS), "yaml")


# --- the command --------------------------------------------------------------------------------


def test_split_args_keeps_derper_flags_in_order():
    options, rest = split_args(["-hostname", "h.example", "--format", "headscale", "-a=:8443",
                                "--omit-default-regions", "-http-port", "-1"])
    assert options == {"format": "headscale", "omit_default_regions": True, "help": False, "nodes": [],
                       "new_ip_cert": False}
    assert rest == ["-hostname", "h.example", "-a=:8443", "-http-port", "-1"]
    options, rest = split_args(["-format=ionscale", "-omit-default-regions=false"])
    assert options["format"] == "ionscale" and options["omit_default_regions"] is False and rest == []


@pytest.mark.parametrize("fmt", ["tailscale", "headscale", "ionscale", "json"])
def test_main_prints_each_format(fmt):
    out, err = io.StringIO(), io.StringIO()
    rc = derpmap_main(["--format", fmt, *DNS, "-a", ":8443", "-tls", "on", "-certdir", "/tmp/none"], {}, out, err)
    assert rc == 0, err.getvalue()
    assert out.getvalue() == render(settings(*DNS, "-a", ":8443", "-tls", "on", "-certdir", "/tmp/none"), fmt)


def test_main_errors():
    err = io.StringIO()
    assert derpmap_main(["--format", "xml", *DNS], {}, io.StringIO(), err) == 2
    assert "xml" in err.getvalue()
    err = io.StringIO()
    assert derpmap_main([*DNS, "-no-such-flag"], {}, io.StringIO(), err) == 2
    err = io.StringIO()
    assert derpmap_main(["-c", "/x/k", "-certdir", "/x/certs"], {}, io.StringIO(), err) == 1
    assert "-hostname" in err.getvalue()
    out = io.StringIO()
    assert derpmap_main(["--help"], {}, out, io.StringIO()) == 0 and "--format" in out.getvalue()


def test_a_region_of_several_nodes(tmp_path):
    """Each node prints its own node (--format json); one of them adds the others (--node)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, certs_a = ip_settings(tmp_path / "a", "203.0.113.7")
    b, certs_b = ip_settings(tmp_path / "b", "203.0.113.8")
    pin_a = ensure_ip_self_signed(certs_a, "203.0.113.7").sha256_hex
    pin_b = ensure_ip_self_signed(certs_b, "203.0.113.8").sha256_hex
    node_b = tmp_path / "b.json"
    node_b.write_text(render(b, "json"))
    out, err = io.StringIO(), io.StringIO()
    flags = ["-hostname", "203.0.113.7", "-certmode", "manual", "-certdir", str(certs_a), "-c", "/x/k"]
    assert derpmap_main(["--format", "json", "--node", str(node_b), *flags], {}, out, err) == 0, err.getvalue()
    region = json.loads(out.getvalue())["Regions"]["900"]
    assert [(n["Name"], n["HostName"], n["CertName"]) for n in region["Nodes"]] == [
        ("900a", "203.0.113.7", "sha256-raw:" + pin_a), ("900b", "203.0.113.8", "sha256-raw:" + pin_b)]
    # A single node object works too, and Headscale's YAML carries every node.
    one = tmp_path / "one.json"
    one.write_text(json.dumps(only_node(build_derp_map(b))))
    out = io.StringIO()
    assert derpmap_main(["--format", "headscale", f"--node={one}", *flags], {}, out, io.StringIO()) == 0
    nodes = yaml.safe_load(out.getvalue())["regions"][900]["nodes"]
    assert [n["name"] for n in nodes] == ["900a", "900b"] and nodes[1]["hostname"] == "203.0.113.8"
    # What is not a map or a node is refused with the file named.
    bad = tmp_path / "bad.json"
    bad.write_text('{"Regions": {}}')
    err = io.StringIO()
    assert derpmap_main(["--node", str(bad), *flags], {}, io.StringIO(), err) == 1
    assert str(bad) in err.getvalue() and "neither a DERP map" in err.getvalue()


def test_main_warns_about_region_outside_custom_range():
    err = io.StringIO()
    assert derpmap_main([*DNS, "-region-id", "1"], {}, io.StringIO(), err) == 0
    assert "900-999" in err.getvalue()


# --- the resource -------------------------------------------------------------------------------


def _get(resource) -> tuple[DummyRequest, bytes]:
    request = DummyRequest([b""])
    body = resource.render(request)
    return request, body


def test_resource_serves_wire_json():
    s = settings(*DNS, "-public-ipv4", "198.51.100.1")
    request, body = _get(derpmap_resource(s))
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert json.loads(body) == build_derp_map(s)


def test_resource_head_sends_headers_only():
    s = settings(*DNS)
    request = DummyRequest([b""])
    request.method = b"HEAD"
    assert derpmap_resource(s).render(request) == b""
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    length = len(json.dumps(build_derp_map(s)).encode())
    assert request.responseHeaders.getRawHeaders(b"content-length") == [str(length).encode()]


def test_resource_pins_the_live_certificate(tmp_path):
    s, certdir = ip_settings(tmp_path)
    cert = ensure_ip_self_signed(tmp_path / "served", "203.0.113.7")
    request, body = _get(derpmap_resource(s, lambda: cert))
    assert only_node(json.loads(body))["CertName"] == "sha256-raw:" + cert.sha256_hex
    assert not certdir.exists()


def test_resource_reports_unbuildable_map():
    request, body = _get(derpmap_resource(settings(*DNS, "-a", ":0")))
    assert request.responseCode == 503 and b"-public-port" in body


# --- real Tailscale clients ---------------------------------------------------------------------


def _public(server):
    """The running server's settings, with the bound ephemeral ports as the public ones."""
    return dataclasses.replace(server.service.settings, public_port=server.port,
                               public_stun_port=server.service.stun_port)


@needs_tailcat
@pytest_twisted.inlineCallbacks
def test_tailcat_uses_generated_map(start_server, serve_map, tmp_path):
    server = yield start_server("-region-code", "gen")
    the_map = json.loads(render(_public(server), "json"))
    node = only_node(the_map)
    assert "InsecureForTests" not in node and node["CertName"].startswith("sha256-raw:")
    tc = Tailcat(tmp_path / "tc", serve_map(the_map))
    out = yield deferToThread(ping, tc)
    assert "via DERP(gen)" in out, out
    assert server.stats.accepts >= 2


@needs_tailcat
@pytest_twisted.inlineCallbacks
def test_tailcat_fetches_map_from_resource(start_server, tmp_path):
    server = yield start_server()
    root = Resource()
    root.putChild(b"derpmap.json", derpmap_resource(_public(server)))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/derpmap.json"
        tc = Tailcat(tmp_path / "tc", url)
        out = yield deferToThread(ping, tc)
        assert "via DERP(ip-127-0-0-1)" in out, out
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_service_serves_its_map_at_derpmap_path(start_server):
    """-derpmap-path mounts the wire-form map on the main listener."""
    import ssl
    import urllib.request

    # Fixed public ports: the fixture listens on ephemeral ones, which a map cannot name.
    server = yield start_server("-derpmap-path", "/derpmap.json", "-public-port", "8443", "-public-stun-port", "3479")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def fetch():
        with urllib.request.urlopen(f"https://127.0.0.1:{server.port}/derpmap.json", context=ctx, timeout=5) as r:
            return r.headers["Content-Type"], json.loads(r.read())

    ctype, the_map = yield deferToThread(fetch)
    assert ctype.startswith("application/json")
    (region,) = the_map["Regions"].values()
    (node,) = region["Nodes"]
    assert (node["HostName"], node["DERPPort"], node["STUNPort"]) == ("127.0.0.1", 8443, 3479)
    # The pin is of the certificate being served, not of whatever -certdir holds now.
    served = server.service.cert_source.current()
    assert node["CertName"] == "sha256-raw:" + served.sha256_hex
    for path in (server.tmp / "certs").iterdir():
        path.unlink()
    _, the_map = yield deferToThread(fetch)
    assert only_node(the_map)["CertName"] == "sha256-raw:" + served.sha256_hex


@pytest_twisted.inlineCallbacks
def test_start_up_line_is_the_derpmap_node(start_server, log_events):
    """The IP-certificate node the server logs is the map's node, with the ports it bound."""
    server = yield start_server()
    (node,) = [e["derp_map_node"] for e in log_events if "derp_map_node" in e]
    assert node == only_node(build_derp_map(_public(server)))
    assert node["DERPPort"] == server.port and node["CertName"].startswith("sha256-raw:")
