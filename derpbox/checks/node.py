"""The checks of one DERP map node, as a Tailscale client meets it: TCP per address
family, TLS with the CertName rules, the meta-certificate and fast start, the /derp
upgrade, a relayed packet, /derp/latency-check, STUN over IPv4/IPv6, the
captive-portal check and (on request) an idle connection."""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass
from functools import partial

from OpenSSL import SSL

from .. import netaddr
from ..client import DERPClientError, server_name_for
from ..protocol.stun import DEFAULT_STUN_PORT
from ..tls.metacert import meta_certificate_key
from .certificates import cert_names, check_cert_name_rules, leaf_of, sha256_hex
from .probes import (
    HTTPResponse,
    TLSInfo,
    host_header,
    http_request,
    idle_connection,
    relay_test,
    stun_roundtrip,
    tls_handshake,
    upgrade_probe,
)
from .results import FAIL, OK, SKIP, WARN, CheckFailed, Result, describe_error
from .runner import Check, run_checks, skipped
from .targets import map_field

KEEPALIVE_SECONDS = 60
# Connecting failed because this machine has no route there (no IPv6, typically), not because of the node.
_NO_ROUTE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL)
# The checks that need a TCP connection, in the order they are reported.
_OVER_TCP = ("tls", "meta-cert", "upgrade", "relay", "fast-start", "latency-check")


@dataclass
class CheckOptions:
    timeout: float = 3.0
    cafile: str | None = None
    idle_test: float = 0.0
    http_port: int = 80


def check_node(node: dict, opts: CheckOptions) -> list[Result]:
    return NodeCheck(node, opts).run()


class NodeCheck:
    """One node's checks; each ``check_*`` method is one check, run by ``run``."""

    def __init__(self, node: dict, opts: CheckOptions):
        self.node = node
        self.opts = opts
        self.timeout = opts.timeout
        self.host_name = str(map_field(node, "HostName", ""))
        self.cert_name = str(map_field(node, "CertName", "") or "")
        self.port = int(map_field(node, "DERPPort", 0) or 443)
        self.stun_port = int(map_field(node, "STUNPort", 0) or 0) or DEFAULT_STUN_PORT
        self.stun_only = bool(map_field(node, "STUNOnly", False))
        self.can_port80 = bool(map_field(node, "CanPort80", False))
        self.addresses = {fam: node_address(node, fam) for fam in (4, 6)}
        self.sni = server_name_for(self.host_name)
        self.host_header = host_header(self.host_name, self.port, 443)

    def run(self) -> list[Result]:
        if self.stun_only:
            return run_checks(self.stun_checks(), deadline=self.timeout + 1)
        # TCP: every address family the node has, then the rest over the first that works.
        results = run_checks(self.tcp_checks(), deadline=min(self.timeout, 1.5) + 0.5)
        dial = next((r.data["address"] for r in results if r.status == OK and "address" in r.data), None)
        if dial is None:
            results += [Result(name, SKIP, "no TCP connection") for name in _OVER_TCP]
            results += run_checks(self.stun_checks(), deadline=self.timeout + 1)
            return results
        info, tls_result = self.check_tls(dial)
        meta_key = meta_certificate_key(info.chain) if info else None
        results += [tls_result, meta_cert_result(info, meta_key)]
        # The rest concurrently: upgrade probe, relay (+fast start), latency-check, STUN, captive portal.
        done = run_checks(self.derp_checks(dial, info) + self.stun_checks() + [self.captive_portal_check()],
                          deadline=2 * self.timeout + 1)
        for r in done:
            results.append(r)
            if r.name == "relay":
                results.append(fast_start_result(info, meta_key, r))
        if self.opts.idle_test > 0:
            relay_ok = any(r.name == "relay" and r.status == OK for r in done)
            results.append(self.check_idle(dial) if relay_ok else Result("idle", SKIP, "relay does not work"))
        return results

    # -- which checks run ------------------------------------------------------------------

    def tcp_checks(self) -> list[Check]:
        checks = []
        for fam, (addr, why) in self.addresses.items():
            name = f"tcp{fam}"
            checks.append(skipped(name, why) if addr is None else (name, partial(self.check_tcp, name, addr, fam)))
        return checks

    def stun_checks(self) -> list[Check]:
        checks = []
        for fam, (addr, why) in self.addresses.items():
            name = f"stun{fam}"
            if self.stun_port < 0:
                checks.append(skipped(name, "STUNPort is -1 (disabled)"))
            elif addr is None:
                checks.append(skipped(name, why))
            else:
                checks.append((name, partial(self.check_stun, name, addr, fam)))
        return checks

    def derp_checks(self, dial: str, info: TLSInfo | None) -> list[Check]:
        if info is None:
            return [skipped(name, "no TLS") for name in ("upgrade", "relay", "latency-check")]
        return [("upgrade", partial(self.check_upgrade, dial)), ("relay", partial(self.check_relay, dial)),
                ("latency-check", partial(self.check_latency, dial))]

    def captive_portal_check(self) -> Check:
        v4 = self.addresses[4][0]
        if not self.can_port80:
            return skipped("captive-portal", "CanPort80 is false")
        if v4 is None or netaddr.ip_version(str(map_field(self.node, "IPv4", "") or "")) != 4:
            return skipped("captive-portal", "CanPort80 needs a literal IPv4 in the node")
        return "captive-portal", partial(self.check_captive_portal, v4)

    # -- the checks ------------------------------------------------------------------------

    def check_tcp(self, name: str, addr: str, fam: int) -> Result:
        start = time.monotonic()
        try:
            socket.create_connection((addr, self.port), timeout=min(self.timeout, 1.5)).close()
        except OSError as e:
            status = WARN if fam == 6 and e.errno in _NO_ROUTE else FAIL
            raise CheckFailed(f"{host_header(addr, self.port, -1)}: {describe_error(e)}", status=status) from None
        ms = (time.monotonic() - start) * 1000
        return Result(name, OK, f"connected to {host_header(addr, self.port, -1)} in {ms:.1f} ms",
                      data={"address": addr, "rtt_ms": round(ms, 2)})

    def check_tls(self, dial: str) -> tuple[TLSInfo | None, Result]:
        """The handshake (None if it failed) and the TLS check's result, with the CertName rules."""
        try:
            info = tls_handshake(dial, self.port, self.sni, self.timeout)
        except (SSL.Error, OSError, TimeoutError) as e:
            return None, Result("tls", FAIL, f"handshake failed: {describe_error(e)}",
                                _tls_failure_diagnosis(e, self.port))
        status, detail, diag = check_cert_name_rules(info.chain, self.host_name, self.cert_name, self.sni,
                                                     self.opts.cafile)
        leaf = leaf_of(info.chain)
        return info, Result("tls", status, f"{info.version}, {detail}", diag,
                            {"version": info.version, "cert_names": cert_names(leaf) if leaf else [],
                             "sha256": sha256_hex(leaf) if leaf else None})

    def check_upgrade(self, dial: str) -> Result:
        r = upgrade_probe(dial, self.port, tls=True, sni=self.sni, host_header=self.host_header, timeout=self.timeout)
        if r.status != 101:
            raise CheckFailed(f"/derp answered HTTP {r.status} {r.reason}".rstrip(), *_proxy_diagnosis(r),
                              data={"http_status": r.status})
        return Result("upgrade", OK, "/derp answered 101 Switching Protocols", data={"http_status": 101})

    def check_relay(self, dial: str) -> Result:
        url = f"https://{host_header(dial, self.port, -1)}/derp"
        try:
            facts = relay_test(url, sni=self.sni, timeout=self.timeout)
        except DERPClientError as e:
            if "answered HTTP" in str(e):
                raise CheckFailed(str(e), "see the upgrade check") from None
            raise
        data = {"rtt_ms": round(facts["rtt"] * 1000, 2), "server_key": facts["server_key"].hex(),
                "fast_start": facts["fast_start"]}
        return Result("relay", OK, f"packet relayed between two fresh keys, RTT {data['rtt_ms']:.1f} ms "
                      f"(server key {facts['server_key'].hex()[:16]}…)", data=data)

    def check_latency(self, dial: str) -> Result:
        start = time.monotonic()
        r = http_request(dial, self.port, "/derp/latency-check", tls=True, sni=self.sni,
                         host_header=self.host_header, timeout=self.timeout)
        ms = (time.monotonic() - start) * 1000
        if r.status > 299:
            raise CheckFailed(f"GET /derp/latency-check answered {r.status} (clients count > 299 as failure)")
        return Result("latency-check", OK, f"GET /derp/latency-check {r.status} in {ms:.1f} ms",
                      data={"rtt_ms": round(ms, 2)})

    def check_stun(self, name: str, addr: str, fam: int) -> Result:
        try:
            ip, p, rtt = stun_roundtrip(addr, self.stun_port, min(self.timeout, 3.0))
        except (CheckFailed, TimeoutError, OSError) as e:
            msg = str(e) if isinstance(e, CheckFailed | TimeoutError) else describe_error(e)
            if fam == 6 and isinstance(e, OSError) and e.errno in _NO_ROUTE:
                raise CheckFailed(f"{msg} (this machine has no IPv6 route)", status=WARN) from None
            raise CheckFailed(msg, f"STUN unreachable: allow UDP {self.stun_port} in the firewall/security "
                              f"group and map it to derpbox (-stun-port); check that -stun is on") from None
        return Result(name, OK, f"{host_header(addr, self.stun_port, -1)} answered in {rtt * 1000:.1f} ms "
                      f"(your address {ip}:{p})", data={"rtt_ms": round(rtt * 1000, 2)})

    def check_captive_portal(self, v4: str) -> Result:
        challenge = f"ts_{v4}"
        port = self.opts.http_port
        try:
            r = http_request(v4, port, "/generate_204", tls=False, sni=None, host_header=host_header(v4, port, 80),
                             timeout=min(self.timeout, 3.0), headers={"X-Tailscale-Challenge": challenge})
        except OSError as e:
            raise CheckFailed(f"http://{host_header(v4, port, 80)}/generate_204: {describe_error(e)}",
                              f"port {port} is closed or filtered but the DERP map says CanPort80: open TCP {port} "
                              "to derpbox (-http-port) or set CanPort80 false (clients would see a captive "
                              "portal)") from None
        if r.status != 204 or r.headers.get("x-tailscale-response") != f"response {challenge}":
            missing = "without" if "x-tailscale-response" not in r.headers else "with a wrong"
            raise CheckFailed(f"/generate_204 answered {r.status} {missing} challenge response",
                              f"something else answers on port {port}; clients will report a captive portal")
        return Result("captive-portal", OK, "/generate_204 answered 204 with the challenge response")

    def check_idle(self, dial: str) -> Result:
        seconds = self.opts.idle_test
        closed, held = idle_connection(dial, self.port, self.sni, seconds, self.timeout)
        if closed:
            return Result("idle", FAIL, f"idle connection was cut after {held:.0f} s (asked to hold {seconds:g} s)", [
                f"an idle timeout of about {held:.0f} s is shorter than the {KEEPALIVE_SECONDS}-65 s DERP keepalive: "
                "raise the proxy/load balancer/firewall idle timeout to at least 70 s"])
        return Result("idle", OK, f"idle connection survived {seconds:g} s")


def node_address(node: dict, fam: int) -> tuple[str | None, str]:
    """(address to use, why not) for IPv4 (4) or IPv6 (6), as the Go client picks it."""
    key = f"IPv{fam}"
    value = str(map_field(node, key, "") or "")
    host = str(map_field(node, "HostName", ""))
    if value:
        return (value, "") if netaddr.ip_version(value) == fam else (None, f"{key} is {value!r} (disabled)")
    host_version = netaddr.ip_version(host)
    if host_version == fam:
        return host, ""
    if host_version:
        return None, f"HostName is an IPv{host_version} address"
    found = _resolve(host, socket.AF_INET if fam == 4 else socket.AF_INET6)
    return (found, "") if found else (None, f"no {'A' if fam == 4 else 'AAAA'} record for {host}")


def _resolve(host: str, family) -> str | None:
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except OSError:
        return None
    return infos[0][4][0] if infos else None


def meta_cert_result(info: TLSInfo | None, meta_key: bytes | None) -> Result:
    if info is None:
        return Result("meta-cert", SKIP, "no TLS")
    if meta_key:
        return Result("meta-cert", OK, f"present (key {meta_key.hex()[:16]}…)", data={"key": meta_key.hex()})
    if info.version == "TLSv1.3":
        return Result("meta-cert", WARN, "no derpkey meta-certificate in the chain: clients cannot use "
                      "fast start (a TLS-terminating proxy in front, or not a derper-compatible server)")
    return Result("meta-cert", SKIP, f"only used on TLS 1.3 (negotiated {info.version})")


def fast_start_result(info: TLSInfo | None, meta_key: bytes | None, relay: Result) -> Result:
    if relay.status != OK:
        return Result("fast-start", SKIP, "relay failed")
    key = bytes.fromhex(relay.data["server_key"])
    if meta_key is not None and meta_key != key:
        return Result("fast-start", FAIL, "meta-certificate key differs from the ServerKey", [
            "the meta-certificate must carry the DERP key: several servers behind one address?"])
    if info and info.version == "TLSv1.3" and meta_key is not None:
        if relay.data.get("fast_start"):
            return Result("fast-start", OK, "used (TLS 1.3, meta-certificate key equals the ServerKey)")
        return Result("fast-start", FAIL, "meta-certificate present but fast start was not used")
    return Result("fast-start", SKIP, "not available (needs TLS 1.3 and the meta-certificate)")


def _tls_failure_diagnosis(e: BaseException, port: int) -> list[str]:
    text = describe_error(e)
    diag = []
    if isinstance(e, SSL.Error) and ("wrong version number" in text or "packet length too long" in text
                                     or "record layer failure" in text):
        diag.append(f"port {port} does not speak TLS (plain HTTP?): Tailscale clients need TLS; with derper flags "
                    "TLS is on only for port 443 or -certmode manual")
    if isinstance(e, TimeoutError | socket.timeout):
        diag.append(f"port {port} accepted TCP but never answered the TLS handshake: a plain-HTTP server "
                    "(derpbox -dev / -tls off, or -a on a port other than 443 without -certmode manual)?")
    return diag


def _proxy_diagnosis(resp: HTTPResponse) -> list[str]:
    html = "html" in resp.headers.get("content-type", "") or b"<html" in resp.body.lower()
    what = f"HTTP {resp.status}" + (" with an HTML page" if html else "")
    server = resp.headers.get("server")
    diag = [f"/derp answered {what} instead of 101 Switching Protocols"
            + (f" (Server: {server})" if server else "")
            + ": something in front of derpbox does not pass the Upgrade; use TCP/SNI passthrough"]
    if resp.status == 426:
        diag.append("426 is derpbox/derper's answer to a request whose Upgrade header was removed on the way")
    return diag
