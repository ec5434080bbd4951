"""The service tree: wires Settings to the relay, listeners, TLS and STUN."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading

from nacl.public import PrivateKey
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, Logger
from zope.interface import implementer

from .admission import Admission
from .admission.tailscale_api import TailscaleAPIOptions
from .bind_errors import listen_error
from .bootstrap_dns import REFRESH_INTERVAL as BOOTSTRAP_DNS_INTERVAL
from .bootstrap_dns import BootstrapDNS
from .config import ConfigError, ServeSettings, Settings, load_serve_settings
from .derpmap import build_node, derpmap_resource
from .heap import HeapService
from .keys import load_or_create_key, node_public_text
from .mesh.peers import MeshService
from .mesh.spec import MeshPeerSpec
from .metrics import Metrics
from .oslimits import listen_backlog
from .relay.receive_limit import RateConfigError, RateConfigFile
from .relay.relay import Relay
from .relay.summary import INTERVAL as SUMMARY_INTERVAL
from .relay.summary import TrafficSummary
from .stun_server import STUNService, STUNStats
from .tls.acme import AcmeCertificateSource, AcmeFollower, default_directory
from .tls.certs import CertificateError, CertifiedKey, ManualCertificateSource
from .tls.context import ServerTLS
from .tls.expiry import CHECK_INTERVAL as EXPIRY_CHECK_INTERVAL
from .tls.expiry import ExpiryWatch
from .tls.stats import TLSStats
from .tls.transport import server_tls_factory
from .web.accept_limit import AcceptBucket, AcceptLimitedFactory
from .web.tcp_stats import SAMPLE_INTERVAL as RTT_SAMPLE_INTERVAL
from .web.tcp_stats import RTTSampler, RTTStats
from .web.connection import FrontFactory
from .web.debug import DebugResource, MetricsListenerResource
from .web.endpoints import QuietSite, build_main_site
from .web.port80 import build_port80_site
from .web.proxied import ProxyProtocolFactory
from .web.transports import relay_transports
from .workers.context import WorkerContext
from .workers.view import NodeView

log = Logger()

# How long a shutdown waits for clients to receive Restarting and the close.
DRAIN_TIMEOUT = 5.0


def _endpoint(reactor, host: str, port: int):
    """One listening endpoint; an empty host means every address, IPv4 and IPv6."""
    backlog = listen_backlog()
    if ":" in host or host == "":
        # A "::" socket on Linux also accepts IPv4 unless IPV6_V6ONLY is set.
        return TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=host or "::")
    return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=host)


@implementer(IStreamServerEndpoint)
class AdoptedPortEndpoint:
    """Listening on a socket the supervisor opened and this worker inherited (derpbox.workers)."""

    def __init__(self, reactor, fd: int, family: int):
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory) -> defer.Deferred:
        return defer.maybeDeferred(self.reactor.adoptStreamPort, self.fd, self.family, factory)


class ListenerService(Service):
    """Listens on an endpoint while running; ``port`` is the listening port. ``ready`` fires
    once listening, or fails with a ListenError naming the listener, address and cause."""

    def __init__(self, endpoint, factory, what: str, address: tuple[str, int] = ("", 0)):
        self.endpoint = endpoint
        self.factory = factory
        self.what = what
        self.address = address
        self.port = None
        self.ready: defer.Deferred | None = None

    def startService(self):
        super().startService()
        self.ready = self.endpoint.listen(self.factory)
        self.ready.addCallbacks(self._listening, self._failed)

    def _failed(self, failure):
        failure.trap(OSError, CannotListenError)
        raise listen_error(self.what, *self.address, "tcp", failure.value)

    def _listening(self, port):
        self.port = port
        relay_transports(port)
        addr = port.getHost()
        host = getattr(addr, "host", None)
        where = f"{host}:{addr.port}" if host is not None else os.fsdecode(addr.name)  # a unix socket's path
        log.info("{what} listening on {where}", what=self.what, where=where)
        return port

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def load_server_key(settings: Settings) -> PrivateKey:
    if settings.key_path is None:
        return PrivateKey.generate()
    key = load_or_create_key(settings.key_path)
    mode = os.stat(settings.key_path).st_mode & 0o777
    if mode & 0o077:
        # derpbox creates it 0600; a copied or restored file may not be.
        log.warn("node key file {path} is readable by other users (mode {mode:04o}): the node key is a secret; "
                 "chmod 600 {path}", path=settings.key_path, mode=mode)
    return key


def build_admission(settings: Settings, reactor, worker: WorkerContext | None = None) -> Admission | None:
    """Client verification, when any check is configured (issue: only your tailnet)."""
    if not (settings.verify_clients or settings.verify_client_urls or settings.verify_allowlist_file
            or settings.verify_tailscale_api):
        return None
    try:
        return Admission(
            reactor=reactor,
            verify_clients=settings.verify_clients,
            socket_path=settings.socket,
            urls=settings.verify_client_urls,
            fail_open=settings.verify_client_url_fail_open,
            allowlist_file=settings.verify_allowlist_file,
            tailscale_api=tailscale_api_options(settings) if settings.verify_tailscale_api else None,
            cache_ttl=settings.verify_cache_ttl,
            cache_dir=os.path.join(worker.mesh_dir, "admission-cache") if worker is not None else None,
        )
    except ValueError as e:
        # The allowlist and API credential files are read at start: a bad one stops start-up like a bad setting.
        raise ConfigError(str(e)) from None


def tailscale_api_options(settings: Settings) -> TailscaleAPIOptions:
    return TailscaleAPIOptions(
        tailnet=settings.verify_tailscale_api_tailnet,
        token=settings.verify_tailscale_api_token,
        token_file=settings.verify_tailscale_api_token_file,
        oauth_client_id=settings.verify_tailscale_api_oauth_client_id,
        oauth_secret_file=settings.verify_tailscale_api_oauth_secret_file,
        interval=settings.verify_tailscale_api_interval,
        fail_open=settings.verify_tailscale_api_fail_open,
        url=settings.verify_tailscale_api_url,
    )


def build_cert_source(settings: Settings, reactor, worker: WorkerContext | None = None):
    """The certificate source for -certmode: files (manual) or an ACME CA (letsencrypt, gcp).

    With workers, worker 0 alone orders and renews; the others follow its files."""
    if settings.certmode in ("letsencrypt", "gcp"):
        shared = os.path.join(worker.mesh_dir, "acme-challenges") if worker is not None else None
        if worker is not None and worker.index != 0:
            return AcmeFollower(reactor, hostname=settings.hostname, certdir=settings.certdir, shared_challenges=shared)
        try:
            return AcmeCertificateSource(
                reactor,
                hostname=settings.hostname,
                certdir=settings.certdir,
                directory_url=settings.acme_directory or default_directory(settings.certmode),
                email=settings.acme_email,
                ca_file=settings.acme_ca_file or None,
                eab_kid=settings.acme_eab_kid,
                eab_key=settings.acme_eab_key,
                challenge=settings.acme_challenge,
                http01_available=settings.http_port >= 0,
                shared_challenges=shared,
            )
        except ValueError as e:
            raise ConfigError(f"-certmode={settings.certmode}: {e}") from None
    try:
        return ManualCertificateSource(settings.certdir, settings.hostname)
    except CertificateError as e:
        raise ConfigError(str(e)) from None


class _SighupReload:
    """One SIGHUP handler for the process, reloading every registered source (manual
    certificates, mesh peers): each has ``reload()`` and a ``reload_label``.

    Installed when the first source registers, the previous handler restored
    when the last one leaves, so several services in one process (the tests)
    share it. Only the main thread may install signal handlers; elsewhere
    SIGHUP is left alone.
    """

    def __init__(self) -> None:
        self.sources: list = []
        self._previous = None
        self._installed = False
        self._reactor = None

    def register(self, source, reactor) -> None:
        if source in self.sources:
            return
        self.sources.append(source)
        self._reactor = reactor
        if not self._installed and threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGHUP, self._on_signal)
            except (ValueError, OSError, AttributeError):
                return
            self._installed = True

    def unregister(self, source) -> None:
        if source in self.sources:
            self.sources.remove(source)
        if not self.sources and self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        # In a signal handler: hand the work to the reactor.
        self._reactor.callFromThread(self._reload_all)

    def _reload_all(self) -> None:
        labels = sorted({source.reload_label for source in self.sources})
        log.info("SIGHUP received: reloading {what}", what=" and ".join(labels))
        for source in list(self.sources):
            source.reload()


SIGHUP_RELOAD = _SighupReload()


class DerpboxService(MultiService):
    """The whole relay: main listener (TLS or plain), port 80, metrics, STUN."""

    def __init__(self, settings: Settings, reactor, environ=os.environ, worker: WorkerContext | None = None,
                 dns_resolver=None):
        """``dns_resolver`` (a Twisted Names IResolver) resolves the bootstrap DNS names;
        None means the system's."""
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        # Set in a worker process: listeners come from the supervisor, the other workers are meshed.
        self.worker = worker
        self.node_view = NodeView(reactor, worker) if worker is not None else None
        serve = load_serve_settings(settings, environ)
        self.admission = build_admission(settings, reactor, worker)
        private_key = load_server_key(settings)
        self.relay = Relay(
            private_key,
            reactor,
            queue_depth=settings.send_queue_depth,
            write_timeout=settings.tcp_write_timeout,
            mesh_key=serve.mesh_key,
            admission=self.admission,
            worker_mesh_key=worker.mesh_key if worker is not None else None,
        )
        self.rate_config = self._rate_config()
        self._every(SUMMARY_INTERVAL, TrafficSummary(self.relay.stats, reactor).report)
        self.cert_source = build_cert_source(settings, reactor, worker) if settings.use_tls else None
        if self.cert_source is not None:
            watch = ExpiryWatch(self.cert_source, reactor,
                                self_signed_ip=settings.hostname_is_ip and settings.certmode == "manual")
            self._every(EXPIRY_CHECK_INTERVAL, watch.check)
        self.mesh = self._mesh_service(private_key, serve.mesh_key)
        self.stun_stats = STUNStats()
        # Each worker resolves for itself: it is a whole relay.
        self.bootstrap_dns = BootstrapDNS(settings.bootstrap_dns_names, settings.unpublished_bootstrap_dns_names,
                                          resolver=dns_resolver)
        if self.bootstrap_dns.configured:
            self._every(BOOTSTRAP_DNS_INTERVAL, self.bootstrap_dns.refresh_in_background)
        self.tls_stats = TLSStats() if settings.use_tls else None
        self.rtt_stats = RTTStats() if settings.rtt_stats else None
        self.rtt_sampler = RTTSampler(self.relay, self.rtt_stats) if self.rtt_stats is not None else None
        if self.rtt_sampler is not None:
            self._every(RTT_SAMPLE_INTERVAL, self.rtt_sampler.sample_all)
        self.metrics = Metrics(
            self.relay,
            self.stun_stats,
            self.admission.stats if self.admission is not None else None,
            self.tls_stats,
            cert_source=self.cert_source,
            mesh_stats=self.mesh.stats if self.mesh is not None else None,
            bootstrap_dns_stats=self.bootstrap_dns.stats,
            rtt_stats=self.rtt_stats,
            # Read at scrape time: the workers' mesh is made further down.
            worker_links=(lambda: sum(self.worker_mesh.stats.up.values())) if worker is not None else None,
        )
        self.site = self._main_site(environ)
        self.front = FrontFactory(
            self.relay,
            self.site,
            reactor,
            derp_enabled=settings.derp,
            tcp_keepalive=settings.tcp_keepalive_time,
            tcp_user_timeout=settings.tcp_user_timeout,
            tls_stats=self.tls_stats,
        )
        self.tls = self._server_tls()
        if isinstance(self.cert_source, (AcmeCertificateSource, AcmeFollower)):
            # Obtains and renews in the background; STUN, port 80 and the relay's
            # other work never wait for it.
            self.cert_source.setServiceParent(self)
        self.main = self._main_listener()
        self.port80 = self._port80_listener(environ)
        self.metrics_listener = self._metrics_listener()
        self.stun = self._stun_service()
        self.worker_mesh = self._worker_mesh()
        HeapService().setServiceParent(self)
        self._log_start(serve)

    # -- __init__'s builders

    def _rate_config(self) -> RateConfigFile | None:
        if not self.settings.rate_config:
            return None
        try:
            return RateConfigFile(self.settings.rate_config, self.relay)
        except RateConfigError as e:
            # derper refuses to start on a rate config it cannot read, too.
            raise ConfigError(str(e)) from None

    def _every(self, interval: float, call) -> None:
        """``call`` every ``interval`` seconds while the service runs (and once at start)."""
        timer = TimerService(interval, call)
        timer.clock = self.reactor
        timer.setServiceParent(self)

    def _worker_mesh(self) -> MeshService | None:
        """A worker listens for the other workers on its unix socket and dials each of them."""
        worker = self.worker
        if worker is None:
            return None
        path = worker.mesh_path(worker.index)
        # The socket of this worker's predecessor, if it died: this index is ours now.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = ListenerService(UNIXServerEndpoint(self.reactor, path, mode=0o600), self.front,
                                   f"worker {worker.index} internal mesh")
        listener.setServiceParent(self)
        peers = tuple(MeshPeerSpec(f"worker{j}", "localhost", 0, "localhost", unix_path=worker.mesh_path(j),
                                    precedes=j < worker.index)
                      for j in range(worker.count) if j != worker.index)
        # Its own client key: the workers' links must not look like the node's own connections.
        mesh = MeshService(self.relay, PrivateKey.generate(), worker.mesh_key, self.reactor, specs=peers)
        mesh.setServiceParent(self)
        return mesh

    def _mesh_service(self, private_key: PrivateKey, mesh_key: bytes | None) -> MeshService | None:
        settings = self.settings
        if mesh_key is None or not (settings.mesh_peers or settings.mesh_peers_file):
            return None
        mesh = MeshService(self.relay, private_key, mesh_key, self.reactor, specs=settings.mesh_peers,
                           peers_file=settings.mesh_peers_file, ca_file=settings.mesh_ca_file)
        mesh.setServiceParent(self)
        return mesh

    def consistency_problems(self) -> list[str]:
        """The relay's and the mesh's invariants, for /debug/check."""
        problems = self.relay.check_consistency()
        for mesh in (self.mesh, self.worker_mesh):
            if mesh is not None:
                problems += mesh.problems()
        return problems

    def mesh_status(self) -> list[dict]:
        """Every mesh link of this process, the other workers' included, for /debug/mesh."""
        return [status for mesh in (self.mesh, self.worker_mesh) if mesh is not None for status in mesh.status()]

    def _main_site(self, environ) -> QuietSite:
        settings = self.settings
        debug = DebugResource(
            self.metrics,
            hostname=settings.hostname,
            mesh_key_configured=self.relay.mesh_key is not None,
            environ=environ,
            consistency=self.consistency_problems,
            mesh_status=self.mesh_status,
            node_view=self.node_view,
            clock=self.reactor,
        )
        extra = {}
        if settings.derpmap_path:
            live_cert = self.cert_source.current if self.cert_source is not None else None
            extra[settings.derpmap_path] = derpmap_resource(settings, live_cert)
        return build_main_site(
            derp_enabled=settings.derp, home=settings.home, hostname=settings.hostname, debug=debug, extra=extra,
            bootstrap_dns=self.bootstrap_dns,
        )

    def _server_tls(self) -> ServerTLS | None:
        if self.cert_source is None:
            return None
        settings = self.settings
        return ServerTLS(
            self.cert_source,
            settings.hostname,
            self.relay.public_key,
            strict_sni=not settings.hostname_is_ip,
            groups=settings.tls_groups,
        )

    def _main_listener(self) -> ListenerService:
        settings = self.settings
        if self.tls is not None:
            factory, what = server_tls_factory(self.tls, self.front, self.reactor), "DERP (TLS)"
        else:
            factory, what = self.front, "DERP (plain HTTP)"
        if settings.proxy_networks:
            what += f", PROXY protocol {settings.proxy_protocol}"
        return self._listen(settings.listen_host, settings.listen_port, self._accept_limited(self._proxied(factory)),
                            what, "main")

    def _accept_limited(self, factory):
        """-accept-connection-limit/-burst, on the TLS listener only, as derper."""
        settings = self.settings
        if not settings.accept_limited:
            return factory
        if self.tls is None:
            log.warn("-accept-connection-limit/-accept-connection-burst apply to the TLS listener only (as derper); "
                     "this one serves plain HTTP")
            return factory
        limit, burst = settings.accept_connection_limit, settings.accept_connection_burst
        if self.worker is not None:
            # Each worker accepts its share of the connections (the kernel spreads them):
            # its share of the limit keeps the node's total what the operator set.
            limit, burst = limit / self.worker.count, math.ceil(burst / self.worker.count)
        log.info("accepting at most {limit:g} TLS connections a second, burst {burst}{share}", limit=limit,
                 burst=burst, share=f" (this worker's share of {self.worker.count})" if self.worker else "")
        return AcceptLimitedFactory(factory, AcceptBucket(limit, burst, self.reactor.seconds()), self.tls_stats,
                                    self.reactor)

    def _port80_listener(self, environ) -> ListenerService | None:
        if self.tls is None or self.settings.http_port < 0:
            return None
        site = build_port80_site(
            main_resource=self.site.resource,
            environ=environ,
            challenge_responder=getattr(self.cert_source, "http01_response", None),
            https_port=lambda: self.settings.public_port or self.derp_port,
        )
        return self._listen(
            self.settings.listen_host,
            self.settings.http_port,
            self._proxied(site),
            "HTTP (captive-portal check, redirect)",
            "port80",
        )

    def _metrics_listener(self) -> ListenerService | None:
        settings = self.settings
        if settings.metrics_listen is None:
            return None
        resource = MetricsListenerResource(self.metrics, settings.metrics_allow_networks, healthy=lambda: self.running,
                                           node_view=self.node_view)
        host, port = settings.metrics_listen
        if self.worker is not None and self.worker.index != 0:
            # One worker serves the metrics listener (a scrape must not land on a random worker).
            return None
        return self._listen(host, port, QuietSite(resource), "metrics (/metrics, /healthz)", "metrics")

    def _stun_service(self) -> STUNService | None:
        settings = self.settings
        if not settings.stun:
            return None
        adopted = [(s.fd, s.family) for s in self.worker.sockets_named("stun")] if self.worker else None
        stun = STUNService(settings.listen_host, settings.stun_port, self.stun_stats, self.reactor, adopted=adopted)
        stun.setServiceParent(self)
        return stun

    def _listen(self, host: str, port: int, factory, what: str, name: str) -> ListenerService:
        if self.worker is not None:
            sock = self.worker.socket(name)
            endpoint = AdoptedPortEndpoint(self.reactor, sock.fd, sock.family)
        else:
            endpoint = _endpoint(self.reactor, host, port)
        listener = ListenerService(endpoint, factory, what, (host, port))
        listener.setServiceParent(self)
        return listener

    def _proxied(self, factory):
        """The factory as the listener should use it: under a PROXY-protocol parser when on."""
        settings = self.settings
        if not settings.proxy_networks:
            return factory
        return ProxyProtocolFactory(factory, settings.proxy_protocol, settings.proxy_networks, clock=self.reactor)

    def _log_start(self, serve: ServeSettings) -> None:
        settings = self.settings
        log.info("server key {key}", key=node_public_text(self.relay.public_key))
        for warning in (*settings.warnings, *serve.warnings):
            log.warn("{warning}", warning=warning)
        if not self.tls and not settings.dev:
            log.warn(
                "serving plain HTTP on port {port}: derper's rule gives TLS only on port 443 "
                "or with -certmode=manual; Tailscale clients expect TLS",
                port=settings.listen_port,
            )

    def _announce_ip_node(self, port):
        """Log the DERP map node for an IP certificate, once listening and again when the pin changes."""
        self._log_ip_node(self.cert_source.current())
        if isinstance(self.cert_source, ManualCertificateSource):
            # A replaced self-signed certificate changes the sha256-raw pin: say so. An ACME
            # certificate (-acme-ip-certs) has no pin, so its renewals change nothing in the map.
            self.cert_source.add_listener(lambda cert: self._log_ip_node(cert, changed=True))
        return port

    def _log_ip_node(self, cert: CertifiedKey, changed: bool = False) -> None:
        settings = self.settings
        # A listen port of 0 is picked by the system: name the port bound, as the map needs one.
        bound = dataclasses.replace(
            settings,
            public_port=settings.public_port or self.derp_port,
            public_stun_port=settings.public_stun_port or self.stun_port or 0,
        )
        node = build_node(bound, cert)
        if changed:
            text = "IP certificate replaced, its sha256-raw pin changed; update this node in your DERP map: {node}"
        elif "CertName" in node:
            text = ("self-signed IP certificate in use, clients need its sha256-raw pin; "
                    "add this node to your DERP map: {node}")
        else:
            text = ("CA-signed IP certificate ({origin}): clients verify it normally with the IP as the name, "
                    "no CertName pin; add this node to your DERP map: {node}")
        log.emit(
            LogLevel.warn if changed else LogLevel.info,
            text,
            origin="ACME, -acme-ip-certs" if settings.acme_ip_certs else f"from {settings.certdir}",
            node=json.dumps(node),
            derp_map_node=node,
        )

    def startService(self):
        super().startService()
        if self.admission is not None:
            self.admission.start()
            self.admission.probe()
        if isinstance(self.cert_source, ManualCertificateSource):
            # Manual mode always watches its files (derper needs a restart); SIGHUP reloads at once.
            self.cert_source.start_watching(self.reactor)
            SIGHUP_RELOAD.register(self.cert_source, self.reactor)
        if self.mesh is not None:
            SIGHUP_RELOAD.register(self.mesh, self.reactor)
        if self.rate_config is not None:
            SIGHUP_RELOAD.register(self.rate_config, self.reactor)
        if self.tls is not None and self.settings.hostname_is_ip:
            # Once listening: a listen port of 0 is known only then.
            self.main.ready.addCallback(self._announce_ip_node)

    @defer.inlineCallbacks
    def stopService(self):
        # Stop accepting first, then tell every client (Restarting) and wait, bounded,
        # for the goodbyes to be written: the reactor's own shutdown drops unsent data.
        yield self.main.stopService()
        told = self.relay.restart()
        if told:
            log.info("telling {n} clients the server is restarting", n=told)
        open_connections = self.front.open_connections
        deadline = self.reactor.seconds() + (DRAIN_TIMEOUT if told else 0)
        while open_connections and self.reactor.seconds() < deadline:
            yield deferLater(self.reactor, 0.05, lambda: None)
        for conn in list(open_connections):
            conn.transport.abortConnection()
        if self.admission is not None:
            self.admission.stop()
        if isinstance(self.cert_source, ManualCertificateSource):
            SIGHUP_RELOAD.unregister(self.cert_source)
            self.cert_source.stop_watching()
        if self.mesh is not None:
            SIGHUP_RELOAD.unregister(self.mesh)
        if self.rate_config is not None:
            SIGHUP_RELOAD.unregister(self.rate_config)
        yield super().stopService()

    def listening(self) -> defer.Deferred:
        """Fires with the service once every listener is up, or fails with the first
        ListenError (the line to log before exiting)."""
        waits = [s.ready for s in (self.main, self.port80, self.metrics_listener, self.stun) if s is not None]
        d = defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: self)
        return d.addErrback(lambda failure: failure.value.subFailure if failure.check(defer.FirstError) else failure)

    @property
    def derp_port(self) -> int:
        return self.main.port.getHost().port

    @property
    def http_port(self) -> int | None:
        return self.port80.port.getHost().port if self.port80 and self.port80.port else None

    @property
    def metrics_port(self) -> int | None:
        listener = self.metrics_listener
        return listener.port.getHost().port if listener and listener.port else None

    @property
    def stun_port(self) -> int | None:
        return self.stun.ports[0].getHost().port if self.stun and self.stun.ports else None
