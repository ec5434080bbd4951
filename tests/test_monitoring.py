"""monitoring/: the alert rules pass promtool's check and their unit tests, and every query
of the Grafana dashboard returns data from a real Prometheus that scraped a loaded derpbox."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from nacl.public import PrivateKey
from twisted.internet.threads import deferToThread

from derpbox.client import DERPClient
from derpbox.protocol import stun

from .support import unused_port

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"


@pytest.mark.skipif(not os.path.exists(PROMTOOL), reason="promtool not installed (apt-get install prometheus)")
@pytest.mark.parametrize("command", [["check", "rules", "derpbox-alerts.yml"], ["test", "rules", "derpbox-alerts.test.yml"]])
def test_alert_rules(command):
    proc = subprocess.run([PROMTOOL, *command], cwd=MONITORING, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    doc = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [(panel["title"], target["expr"]) for panel in doc["panels"] for target in panel["targets"]]


def test_the_dashboard_is_well_formed():
    doc = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids)) and doc["uid"] == "derpbox"
    assert {v["name"] for v in doc["templating"]["list"]} == {"datasource", "instance"}
    for title, expr in dashboard_queries():
        assert '{instance=~"$instance"' in expr, title  # every panel follows the relay picker


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        answer = json.load(resp)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="prometheus not installed (apt-get install prometheus)")
@pytest_twisted.inlineCallbacks
def test_every_dashboard_query_returns_data(start_server, tmp_path):
    keys = [PrivateKey.generate() for _ in range(3)]
    allowlist = tmp_path / "allow.json"
    allowlist.write_text(json.dumps(["nodekey:" + bytes(k.public_key).hex() for k in keys]))
    # A mesh peer that is not there: the mesh panel shows it down (data, not an empty panel).
    server = yield start_server("-metrics-addr", "127.0.0.1:0", "-verify-allowlist-file", str(allowlist),
                                "-mesh-key", "ab" * 32, "-mesh-with", f"127.0.0.1:{unused_port()}/127.0.0.1")
    web = unused_port()
    prom = tmp_path / "prom"
    (prom / "data").mkdir(parents=True)
    (prom / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n  - job_name: derpbox\n    metrics_path: /metrics\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.service.metrics_port}']}}]\n")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={prom / 'prometheus.yml'}",
                             f"--storage.tsdb.path={prom / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=subprocess.DEVNULL, stderr=open(prom / "stderr.log", "wb"))

    def load_and_query() -> dict[str, list]:
        a, b = (DERPClient.connect(server.url, k) for k in keys[:2])
        stun_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        pending = set(dashboard_queries())
        results = {}
        try:
            deadline = time.monotonic() + 40
            while pending and time.monotonic() < deadline:
                # Traffic between scrapes, so every rate() has something to show.
                for _ in range(20):
                    a.send_packet(b.public_key, b"through the dashboard")
                    b.recv_packet()
                a.send_packet(bytes(keys[2].public_key), b"to nobody here")  # a drop
                stun_socket.sendto(stun.build_binding_request(os.urandom(12)), ("127.0.0.1", server.service.stun_port))
                for title, expr in list(pending):
                    try:
                        found = query(web, expr.replace('"$instance"', '".*"').replace("$__rate_interval", "10s"))
                    except OSError:
                        continue  # Prometheus is still starting
                    if found:
                        results.setdefault(title, found)
                        pending.discard((title, expr))
                time.sleep(0.5)
        finally:
            a.close()
            b.close()
            stun_socket.close()
        assert not pending, f"no data for: {sorted(pending)}"
        return results

    try:
        results = yield deferToThread(load_and_query)
    finally:
        proc.terminate()
        yield deferToThread(proc.wait, 10)
    # The figures are the relay's: two clients here, and its certificate's days left.
    assert float(results["Connections"][0]["value"][1]) == 2
    assert 0 < float(results["Certificate days left"][0]["value"][1]) < 3700
