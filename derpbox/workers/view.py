"""One node, one view: the worker that answers a scrape or a check asks the others.

Each worker serves its own figures on its internal unix socket (``?scope=worker``);
the answering worker fetches them from every other worker and adds them to its own, so
``/debug/varz``, ``/debug/vars``, the metrics listener and ``/debug/check`` describe the
node. A worker that does not answer (restarting) is named, not waited for.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from ..metrics import WORKER_LINKS, Family, Metrics, sample_key
from .context import WorkerContext

WORKER_SCOPE = b"worker"
# A live worker answers in milliseconds; a stopped one must not hold a healthcheck (1 s) up.
FETCH_TIMEOUT = 0.5
# Families that are not sums over the workers: how the node's figure is made. Every worker
# dials the node's mesh peers itself, so each learns the same remote keys.
# Each fetches the same Tailscale API device list too: the node has the oldest list, not the sum.
_COMBINE = {"process_start_unix_time": min, "uptime_sec": max, "version": max, "derp_clients_remote": max,
            "derpbox_tailscale_api_keys": max, "derpbox_tailscale_api_last_success_unix_time": min}


@implementer(IAgentEndpointFactory)
class _WorkerSockets:
    """http://worker<i>/... goes to worker i's unix socket."""

    def __init__(self, reactor, worker: WorkerContext):
        self.reactor = reactor
        self.worker = worker

    def endpointForURI(self, uri):
        index = int(uri.host.decode().removeprefix("worker"))
        return UNIXClientEndpoint(self.reactor, self.worker.mesh_path(index), timeout=FETCH_TIMEOUT)


class NodeView:
    def __init__(self, reactor, worker: WorkerContext):
        self.worker = worker
        self._agent = Agent.usingEndpointFactory(reactor, _WorkerSockets(reactor, worker))
        self._reactor = reactor

    def _others(self):
        return [i for i in range(self.worker.count) if i != self.worker.index]

    def _get(self, index: int, path: str) -> defer.Deferred:
        """(status, body) of GET path?scope=worker on worker ``index``; (None, why) if it cannot answer."""
        d = self._agent.request(b"GET", f"http://worker{index}{path}?scope={WORKER_SCOPE.decode()}".encode())
        d.addCallback(lambda response: readBody(response).addCallback(lambda body: (response.code, body)))
        d.addTimeout(FETCH_TIMEOUT, self._reactor)
        return d.addErrback(lambda failure: (None, failure.getErrorMessage()))

    @defer.inlineCallbacks
    def families(self, metrics: Metrics):
        """The node's families: this worker's, plus every other worker's added in."""
        own = metrics.families()
        answers = yield defer.gatherResults([self._get(i, "/debug/vars") for i in self._others()])
        others = {i: json.loads(body) for i, (status, body) in zip(self._others(), answers) if status == 200}
        merged = [_merge(fam, list(others.values())) for fam in own]
        by_name = {fam.name: fam for fam in merged}
        total = by_name["derp_clients_total"]
        total.samples[0] = ((), _value(merged, "derp_clients_local") + _value(merged, "derp_clients_remote"), "")
        up = Family("derpbox_workers_up", "gauge", "Workers of this node that answered this scrape, by worker.")
        per_worker = Family("derpbox_worker_current_connections", "gauge",
                            "Connections on each worker, its links to the other workers included.")
        links = Family(WORKER_LINKS, "gauge", "Links from each worker to the node's other workers that are up "
                       "(all of them once clients on different workers can reach each other).")
        views = {self.worker.index: {name: _value(own, name) for name in ("derp_current_connections", WORKER_LINKS)},
                 **others}
        for i in range(self.worker.count):
            up.add(1 if i in views else 0, worker=str(i))
            if i in views:
                per_worker.add(views[i]["derp_current_connections"], worker=str(i))
                links.add(views[i].get(WORKER_LINKS, 0), worker=str(i))
        # Per worker, not summed: a sum would hide the one worker that is not linked up yet.
        return [fam for fam in merged if fam.name != WORKER_LINKS] + [up, per_worker, links]

    @defer.inlineCallbacks
    def problems(self, own: list[str]):
        """This worker's consistency problems and every other worker's, each named."""
        answers = yield defer.gatherResults([self._get(i, "/debug/check") for i in self._others()])
        out = [f"worker {self.worker.index}: {p}" for p in own]
        for i, (status, body) in zip(self._others(), answers):
            text = body.decode(errors="replace").strip() if isinstance(body, bytes) else str(body)
            if status is None:
                out.append(f"worker {i}: did not answer ({text})")
            elif status != 200:
                out.append(f"worker {i}: {text}")
        return out


def _value(families: list[Family], name: str):
    return next(fam.samples[0][1] for fam in families if fam.name == name)


def _merge(fam: Family, others: list[dict]) -> Family:
    combine = _COMBINE.get(fam.name)
    merged = Family(fam.name, fam.type, fam.help)
    for labels, value, suffix in fam.samples:
        values = [value]
        for view in others:
            theirs = view.get(fam.name)
            if isinstance(theirs, dict):
                theirs = theirs.get(sample_key(labels, suffix))
            if isinstance(theirs, (int, float)):
                values.append(theirs)
        total = combine(values) if combine else sum(values)
        merged.samples.append((labels, total, suffix))
    return merged
