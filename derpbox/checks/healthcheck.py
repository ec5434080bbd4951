"""``derpbox healthcheck``: the local instance, checked with the server's own settings,
within about a second (Docker's HEALTHCHECK)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from functools import partial
from urllib.parse import urlsplit

from .. import netaddr
from ..admission.tailscaled import DEFAULT_SOCKETS, socket_paths
from ..config import ConfigError, UsageRequested, load_settings
from ..keys import health_key, load_or_create_key
from ..protocol.proxy import local_preamble
from .certificates import leaf_of, validity
from .probes import host_header, http_request, relay_test, stun_roundtrip, tls_handshake
from .results import FAIL, OK, WARN, CheckFailed, Result, describe_error
from .runner import Check, run_checks, skipped

# A well-formed node key nobody has, for asking an admission URL whether it answers at all.
PROBE_NODE_KEY = "nodekey:" + "00" * 32
_CHALLENGE = "ts_healthcheck"


def healthcheck(settings, timeout: float = 1.0) -> list[Result]:
    local = LocalInstance(settings, timeout)
    results = [line for r in run_checks(local.checks(), deadline=max(1.5, timeout + 0.5)) for line in _one_line_each(r)]
    if local.key_problem and not local.verifying and settings.key_path:
        results.append(Result("key", WARN, local.key_problem))
    return results


def healthcheck_main(argv: list[str], environ=os.environ, out=None) -> int:
    """``derpbox healthcheck [derper flags]``: the same settings as the server, checked locally."""
    out = out or sys.stdout
    try:
        settings = load_settings(argv, environ)
    except UsageRequested as u:
        out.write("usage: derpbox healthcheck [the server's flags]\n"
                  "Checks the local derpbox started with these flags/DERP_* variables.\n\n" + u.usage)
        return 0
    except ConfigError as e:
        out.write(f"FAIL config: {e}\n")
        return 2
    results = healthcheck(settings)
    for r in results:
        out.write(r.line() + "\n")
    out.flush()
    return 1 if any(r.status == FAIL for r in results) else 0


class LocalInstance:
    """The checks of the derpbox that runs with ``settings`` on this machine."""

    def __init__(self, settings, timeout: float):
        self.settings = settings
        self.timeout = timeout
        self.host = _local_host(settings.listen_host)
        self.port = settings.listen_port
        self.tls = settings.use_tls
        self.sni = None if settings.hostname_is_ip or not settings.hostname else settings.hostname
        self.host_header = host_header(settings.hostname if self.sni else self.host, self.port, 443 if self.tls else 80)
        self.mesh_key, self.key_problem = _health_key(settings.key_path)
        self.verifying = bool(settings.verify_clients or settings.verify_client_urls
                              or getattr(settings, "verify_allowlist_file", "") or settings.verify_tailscale_api)
        self.preamble = _proxy_preamble(settings, self.host)

    def checks(self) -> list[Check]:
        s = self.settings
        checks: list[Check] = []
        if self.tls:
            checks.append(("tls", self.check_tls))
        checks.append(("probe", self.check_probe))
        checks.append(("relay", self.check_relay) if s.derp else skipped("relay", "DERP disabled (-derp=false)"))
        checks.append(("stun", self.check_stun) if s.stun else skipped("stun", "STUN disabled (-stun=false)"))
        if self.tls and s.http_port >= 0:
            checks.append(("http", self.check_port80))
        if s.verify_clients:
            checks.append(("admission tailscaled", self.check_tailscaled))
        if s.verify_tailscale_api:
            checks.append(("admission tailscale-api", self.check_tailscale_api))
        checks += [(f"admission {_redact(url)}", partial(self.check_admission_url, url))
                   for url in s.verify_client_urls]
        if s.mesh_with or s.mesh_peers_file:
            checks.append(("mesh", self.check_mesh))
        if s.workers != 1:
            checks.append(("workers", self.check_workers))
        return checks

    def check_tls(self) -> Result:
        info = tls_handshake(self.host, self.port, self.sni, self.timeout, self.preamble)
        leaf = leaf_of(info.chain)
        if leaf is None:
            raise CheckFailed(f"{info.version}, but no certificate presented")
        status, text = validity(leaf)
        return Result("tls", status, f"{info.version}, {text}", data={"version": info.version})

    def check_probe(self) -> Result:
        r = http_request(self.host, self.port, "/derp/probe", tls=self.tls, sni=self.sni,
                         host_header=self.host_header, timeout=self.timeout, preamble=self.preamble)
        if r.status != 200:
            raise CheckFailed(f"GET /derp/probe answered {r.status}")
        return Result("probe", OK, "GET /derp/probe 200")

    def check_relay(self) -> Result:
        if self.verifying and self.mesh_key is None:
            raise CheckFailed(f"{self.key_problem}; client verification is on, so the test clients cannot be admitted")
        url = f"{'https' if self.tls else 'http'}://{host_header(self.host, self.port, -1)}/derp"
        facts = relay_test(url, sni=self.sni, timeout=self.timeout, mesh_key=self.mesh_key, preamble=self.preamble)
        return Result("relay", OK, f"packet relayed between two fresh keys in {facts['rtt'] * 1000:.1f} ms"
                      + (" (fast start)" if facts["fast_start"] else ""))

    def check_stun(self) -> Result:
        port = self.settings.stun_port
        stun_host = self.host if self.settings.listen_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        ip, p, rtt = stun_roundtrip(stun_host, port, min(self.timeout, 0.5))
        return Result("stun", OK, f"{host_header(stun_host, port, -1)} answered in "
                      f"{rtt * 1000:.1f} ms (mapped {ip}:{p})")

    def check_port80(self) -> Result:
        port = self.settings.http_port
        r = http_request(self.host, port, "/generate_204", tls=False, sni=None,
                         host_header=host_header(self.host, port, 80), timeout=self.timeout,
                         headers={"X-Tailscale-Challenge": _CHALLENGE}, preamble=self.preamble)
        if r.status != 204 or r.headers.get("x-tailscale-response") != f"response {_CHALLENGE}":
            raise CheckFailed(f"GET /generate_204 on port {port} answered {r.status} without the challenge response")
        return Result("http", OK, f"port {port} /generate_204 answered 204 with the challenge")

    def check_tailscaled(self) -> Result:
        configured = socket_paths(self.settings.socket)
        paths = list(configured) or [p for p in DEFAULT_SOCKETS if os.path.exists(p)][:1]
        if not paths:
            raise CheckFailed(f"no tailscaled socket at any of {', '.join(DEFAULT_SOCKETS)}")
        # Every configured tailnet: a client of one that is down cannot be admitted.
        for path in paths:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                try:
                    s.connect(path)
                except OSError as e:
                    raise CheckFailed(f"cannot connect to {path}: {e.strerror or e}") from None
        return Result("admission tailscaled", OK, f"{', '.join(paths)} accept{'s' if len(paths) == 1 else ''} "
                      "connections")

    def check_mesh(self) -> Result:
        """The server's own view of its mesh peers (/debug/mesh, open to loopback)."""
        r = http_request(self.host, self.port, "/debug/mesh", tls=self.tls, sni=self.sni,
                         host_header=self.host_header, timeout=self.timeout, preamble=self.preamble)
        if r.status != 200:
            raise CheckFailed(f"GET /debug/mesh answered {r.status}")
        peers = json.loads(r.body)["peers"]
        return Result("mesh", OK, f"{len(peers)} peers", data={"peers": peers})

    def _debug_vars(self) -> dict:
        """The server's own figures (/debug/vars, open to loopback); with workers, the node's."""
        r = http_request(self.host, self.port, "/debug/vars", tls=self.tls, sni=self.sni,
                         host_header=self.host_header, timeout=self.timeout, preamble=self.preamble)
        if r.status != 200:
            raise CheckFailed(f"GET /debug/vars answered {r.status}")
        return json.loads(r.body)

    def check_tailscale_api(self) -> Result:
        """The server's device list from the Tailscale API.

        A stale list (the API failing) only warns: the relay still decides right for every
        device the list had, and a restart, which is what an unhealthy container gets, would
        drop that list and leave the relay with none until the API is back. No list at all
        fails (fail-open off: every client is rejected, and nothing is lost by a restart).
        """
        node = self._debug_vars()
        last = node.get("derpbox_tailscale_api_last_success_unix_time")
        if last is None:
            raise CheckFailed("the running server has no Tailscale API check (started with other settings?)")
        keys = node.get("derpbox_tailscale_api_keys", 0)
        name = "admission tailscale-api"
        if not last:
            if self.settings.verify_tailscale_api_fail_open:
                return Result(name, WARN, "no device list fetched yet; fail-open admits every client meanwhile")
            raise CheckFailed("no device list fetched yet: every client is rejected until one is")
        age = max(0.0, time.time() - last)
        if node.get("derpbox_tailscale_api_stale", 1):
            return Result(name, WARN, f"the API is failing; the last list ({keys:g} node keys, {age:.0f} s old) "
                          "stays in force")
        return Result(name, OK, f"{keys:g} node keys of authorized devices, fetched {age:.0f} s ago")

    def check_workers(self) -> Result:
        """Each worker, as the node sees them: the worker answering asks the others."""
        node = self._debug_vars()
        up = node.get("derpbox_workers_up")
        if not isinstance(up, dict):
            raise CheckFailed("the server runs as one process (no workers)")
        conns = node.get("derpbox_worker_current_connections", {})
        links = node.get("derpbox_worker_links_up", {})
        workers = [{"worker": key.removeprefix("worker="), "up": bool(value), "connections": conns.get(key),
                    "links": links.get(key), "others": len(up) - 1}
                   for key, value in up.items()]
        return Result("workers", OK, f"{len(workers)} workers", data={"workers": workers})

    def check_admission_url(self, url: str) -> Result:
        body = json.dumps({"NodePublic": PROBE_NODE_KEY, "Source": "127.0.0.1"}).encode()
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            why = describe_error(reason) if isinstance(reason, BaseException) else reason
            raise CheckFailed(f"unreachable: {why}") from None
        return Result(f"admission {_redact(url)}", OK, f"reachable (HTTP {status})")


def _worker_line(w: dict) -> Result:
    name = f"worker {w['worker']}"
    if not w["up"]:
        return Result(name, FAIL, "not answering (restarting, or stuck)")
    if w["links"] is not None and w["links"] < w["others"]:
        # It serves its own clients, but theirs and the other workers' cannot reach each other yet.
        return Result(name, FAIL, f"up, but linked to {w['links']:g} of the {w['others']} other workers")
    return Result(name, OK, f"up, {w['connections']} connections")


def _one_line_each(result: Result) -> list[Result]:
    """A check's result as printed: the mesh and workers checks give a line per peer or worker."""
    if result.name == "workers" and "workers" in result.data:
        return [_worker_line(w) for w in result.data["workers"]]
    if result.name != "mesh" or "peers" not in result.data:
        return [result]
    lines = []
    for peer in result.data["peers"]:
        name = f"mesh {peer['peer']}"
        if peer["state"] == "up":
            lines.append(Result(name, OK, f"connected to {peer['server_key'][:16]}, {peer['keys']} keys learned"))
        elif peer["state"] == "self":
            lines.append(Result(name, OK, "this node (self-connect), not dialled"))
        else:
            # A peer that is down is worth a look, but restarting this node would not bring it back.
            why = peer["last_error"] or "not connected yet"
            lines.append(Result(name, WARN, f"{peer['state']}: {why} ({peer['failures']} failures)"))
    return lines or [Result("mesh", WARN, "no mesh peers configured in the running server")]


def _local_host(listen_host: str) -> str:
    if listen_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if listen_host == "::":
        return "::1"
    return listen_host


def _health_key(key_path: str) -> tuple[bytes | None, str | None]:
    """(the health key that admits the test clients, or why there is none)."""
    if not key_path:
        return None, None
    if not os.path.exists(key_path):
        return None, f"server key {key_path} does not exist"
    try:
        return health_key(load_or_create_key(key_path)), None
    except (OSError, ValueError) as e:
        return None, f"cannot read the server key {key_path}: {e}"


def _proxy_preamble(settings, host: str) -> bytes:
    """With -proxy-protocol v1/v2 a trusted proxy must send a header: when this checker
    connects from a trusted address, it says LOCAL (keep my own address)."""
    if settings.proxy_protocol not in ("v1", "v2"):
        return b""
    if netaddr.in_networks(netaddr.parse_ip(host), netaddr.parse_networks(settings.trusted_proxies)):
        return local_preamble(settings.proxy_protocol)
    return b""


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password or parts.query:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return f"{parts.scheme}://{netloc}{parts.path}" + ("?…" if parts.query else "")
    return url
