"""The supervisor: the process the container starts when ``-workers`` is more than one.

It opens the node's listening sockets once, starts N workers that inherit them (each a
complete relay with the node's key and certificates, meshed with the others over
unix sockets with an internal mesh key), restarts a worker that dies (with backoff),
passes SIGHUP on, and on SIGTERM tells every worker to stop (each sends Restarting
to its clients) and exits 0 once they are gone, or after a bound. It never serves
traffic itself, so a bug in a worker cannot take the node down.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from ..bind_errors import ListenError, listen_error
from ..keys import KeyFileError, load_or_create_key
from ..tls.certs import ensure_ip_self_signed
from .context import ENV, WorkerContext
from .sockets import InheritedSocket, tcp_listener, udp_sockets

log = Logger()

RESTART_MIN = 1.0
RESTART_MAX = 30.0
# A worker that ran this long before dying starts the backoff afresh.
STABLE_AFTER = 60.0
# SIGTERM to exit: the workers' own drain (5 s) plus their start-up margin.
STOP_TIMEOUT = 10.0


class WorkerProcess(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int):
        self.supervisor = supervisor
        self.index = index
        self.started_at = supervisor.reactor.seconds()
        self.ended = defer.Deferred()

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)
        self.supervisor.worker_ended(self, reason.value)


class Supervisor:
    def __init__(self, settings, argv: list[str], environ, reactor, count: int):
        self.settings = settings
        self.argv = argv
        self.environ = dict(environ)
        self.reactor = reactor
        self.count = count
        self.restarts = 0
        self.stopping = False
        self.workers: dict[int, WorkerProcess] = {}
        self._backoff = {i: RESTART_MIN for i in range(count)}
        self._pending: dict[int, object] = {}
        self._prepare_files()
        self._sockets: list[list] = []
        for index in range(count):
            self._sockets.append(self._open_sockets(index))
        self.mesh_dir = tempfile.mkdtemp(prefix="derpbox-workers-")
        self.mesh_key = os.urandom(32)

    def _prepare_files(self) -> None:
        """What every worker loads must exist before they start, or each would make its own:
        the node key, and an IP-only node's self-signed certificate (its pin)."""
        s = self.settings
        if s.key_path:
            load_or_create_key(s.key_path)
        if s.use_tls and s.certmode == "manual" and s.hostname_is_ip:
            ensure_ip_self_signed(s.certdir, s.hostname)

    def _open_sockets(self, index: int) -> list:
        """(socket, name) for worker ``index``: its own socket on each of the node's ports.

        The first worker's sockets fix the ports (a port of 0 picks one); the others bind
        the same ones. Only worker 0 serves the metrics listener."""
        s = self.settings
        first = self._sockets[0] if index else None
        port = (lambda name, wanted: _bound_port(first, name) if first else wanted)
        opened = []
        try:
            opened.append((_open(tcp_listener, "DERP", s.listen_host, port("main", s.listen_port)), "main"))
            if s.use_tls and s.http_port >= 0:
                opened.append((_open(tcp_listener, "HTTP (port 80)", s.listen_host, port("port80", s.http_port)),
                               "port80"))
            if s.stun:
                opened += [(sock, f"stun{i}") for i, sock in
                           enumerate(_open(udp_sockets, "STUN", s.listen_host, port("stun0", s.stun_port)))]
            if s.metrics_listen is not None and index == 0:
                opened.append((_open(tcp_listener, "metrics", *s.metrics_listen), "metrics"))
        except ListenError:
            for sock, _ in opened:
                sock.close()
            for sockets in self._sockets:
                for sock, _ in sockets:
                    sock.close()
            raise
        return opened

    def inherited(self, index: int) -> tuple[InheritedSocket, ...]:
        return tuple(InheritedSocket(name, 3 + i, sock.family, sock.type)
                     for i, (sock, name) in enumerate(self._sockets[index]))

    def start(self) -> None:
        main = self._sockets[0][0][0].getsockname()
        ports = ", ".join(f"{name} {sock.getsockname()[1]}" for sock, name in self._sockets[0])
        log.info("supervisor: {n} workers on {host}:{port} ({ports}); their internal mesh sockets in {dir}",
                 n=self.count, host=main[0], port=main[1], ports=ports, dir=self.mesh_dir)
        for i in range(self.count):
            self._spawn(i)

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        context = WorkerContext(index, self.count, self.inherited(index), self.mesh_dir, self.mesh_key, os.getpid())
        env = dict(self.environ, **{ENV: context.encode()})
        child_fds = {0: "w", 1: 1, 2: 2}
        child_fds.update({3 + i: sock.fileno() for i, (sock, _) in enumerate(self._sockets[index])})
        proto = WorkerProcess(self, index)
        self.reactor.spawnProcess(proto, sys.executable, [sys.executable, "-m", "derpbox", *self.argv], env=env,
                                  childFDs=child_fds)
        self.workers[index] = proto
        log.info("supervisor: worker {i} started (pid {pid})", i=index, pid=proto.transport.pid)

    def worker_ended(self, proto: WorkerProcess, reason) -> None:
        index = proto.index
        if self.workers.get(index) is proto:
            del self.workers[index]
        if self.stopping:
            return
        ran = self.reactor.seconds() - proto.started_at
        if ran >= STABLE_AFTER:
            self._backoff[index] = RESTART_MIN
        delay = self._backoff[index]
        self._backoff[index] = min(delay * 2, RESTART_MAX)
        self.restarts += 1
        log.error("supervisor: worker {i} exited ({reason}) after {ran:.1f} s; restarting it in {delay:g} s "
                  "({n} restarts so far)", i=index, reason=reason, ran=ran, delay=delay, n=self.restarts)
        self._pending[index] = self.reactor.callLater(delay, self._spawn, index)

    def signal_workers(self, signame: str) -> None:
        for proto in list(self.workers.values()):
            try:
                proto.transport.signalProcess(signame)
            except OSError:
                pass

    def reload(self) -> None:
        log.info("supervisor: SIGHUP, passed on to every worker")
        self.signal_workers("HUP")

    @defer.inlineCallbacks
    def stop(self):
        """SIGTERM to every worker and wait (bounded) for them; SIGKILL what is left."""
        self.stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        ended = [proto.ended for proto in self.workers.values()]
        self.signal_workers("TERM")
        timeout = self.reactor.callLater(STOP_TIMEOUT, self.signal_workers, "KILL")
        yield defer.DeferredList(ended)
        if timeout.active():
            timeout.cancel()
        for sockets in self._sockets:
            for sock, _ in sockets:
                sock.close()
        shutil.rmtree(self.mesh_dir, ignore_errors=True)
        log.info("supervisor: every worker stopped")


def _open(opener, what: str, host: str, port: int):
    """``opener(host, port)``, its OSError as the one line naming the listener."""
    try:
        return opener(host, port)
    except OSError as e:
        raise listen_error(what, host, port, "udp" if opener is udp_sockets else "tcp", e) from None


def _bound_port(sockets: list, name: str) -> int:
    return next(sock.getsockname()[1] for sock, n in sockets if n == name)


def run(settings, argv: list[str], environ, count: int) -> int:
    """Supervise ``count`` workers until SIGTERM or SIGINT; the process's exit code."""
    # Here, not at the top: importing the reactor installs it, and only serving runs one.
    from twisted.internet import reactor

    try:
        supervisor = Supervisor(settings, argv, environ, reactor, count)
    except ListenError as e:
        log.critical("cannot start: {error}", error=str(e))
        return 1
    except (KeyFileError, OSError) as e:
        log.critical("cannot start: {error}", error=str(e))
        return 2
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(supervisor.reload))
    reactor.callWhenRunning(supervisor.start)
    reactor.addSystemEventTrigger("before", "shutdown", supervisor.stop)
    reactor.run()
    return 0
