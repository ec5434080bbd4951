"""The service tree: wires Settings to the relay, listeners, TLS and STUN."""

from __future__ import annotations

import json
import os
import signal
import threading

from nacl.public import PrivateKey
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import LogLevel, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from .config import ConfigError, Settings, split_listen_addr
from .derpmap import derpmap_resource
from .heap import HeapService
from .config import DEV_MESH_KEY_ENV
from .keys import MeshKeyError, load_mesh_key, load_or_create_key, node_public_text, parse_mesh_key
from .netaddr import parse_networks
from .admission import Admission
from .relay.relay import Relay
from .stun_server import STUNService, STUNStats
from .tls.acme import AcmeCertificateSource, default_directory
from .tls.certs import (
    CertificateError,
    ManualCertificateSource,
    derp_map_node_json,
)
from .tls.context import ServerTLS
from .metrics import Metrics, TLSStats
from .web.connection import FrontFactory
from .web.debug import DebugResource, MetricsListenerResource
from .web.endpoints import QuietSite, build_main_site
from .web.port80 import build_port80_site
from .web.proxied import ProxyProtocolFactory

log = Logger()

QUEUE_DEPTH_ENV = "TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH"
# How long a shutdown waits for clients to receive Restarting and the close.
DRAIN_TIMEOUT = 5.0


def _endpoint(reactor, host: str, port: int):
    """One listening endpoint; an empty host means every address, IPv4 and IPv6."""
    if ":" in host or host == "":
        # A "::" socket on Linux also accepts IPv4 unless IPV6_V6ONLY is set.
        return TCP6ServerEndpoint(reactor, port, interface=host or "::")
    return TCP4ServerEndpoint(reactor, port, interface=host)


class ListenerService(Service):
    """Listens on an endpoint while running; ``port`` is the listening port."""

    def __init__(self, endpoint, factory, what: str):
        self.endpoint = endpoint
        self.factory = factory
        self.what = what
        self.port = None
        self.ready: defer.Deferred | None = None

    def startService(self):
        super().startService()
        self.ready = self.endpoint.listen(self.factory)
        self.ready.addCallback(self._listening)

    def _listening(self, port):
        self.port = port
        addr = port.getHost()
        log.info("{what} listening on {host}:{port}", what=self.what, host=addr.host, port=addr.port)
        return port

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def queue_depth_from_env(environ) -> int:
    text = environ.get(QUEUE_DEPTH_ENV, "")
    if not text:
        return 32
    try:
        depth = int(text)
    except ValueError:
        depth = 0
    if depth < 1:
        raise ConfigError(f"{QUEUE_DEPTH_ENV}={text!r} is invalid: expected a positive integer (default 32)")
    return depth


def load_server_key(settings: Settings) -> PrivateKey:
    if settings.key_path is None:
        return PrivateKey.generate()
    return load_or_create_key(settings.key_path)


def load_mesh_key_for(settings: Settings, environ) -> bytes | None:
    """The mesh key: from TAILSCALE_DERPER_MESH_KEY in -dev (as derper), else the PSK file."""
    if settings.mesh_with:
        raise ConfigError("-mesh-with: meshing with other derpbox/derper nodes is not supported yet")
    if settings.secrets_url:
        raise ConfigError("-secrets-url: fetching the mesh key from a setec server is not supported; use -mesh-psk-file")
    try:
        if settings.dev:
            text = environ.get(DEV_MESH_KEY_ENV, "")
            return parse_mesh_key(text, DEV_MESH_KEY_ENV) if text else None
        if settings.mesh_psk_file:
            return load_mesh_key(settings.mesh_psk_file)
    except MeshKeyError as e:
        raise ConfigError(str(e)) from None
    return None


def build_admission(settings: Settings, reactor) -> Admission | None:
    """Client verification, when any check is configured (issue: only your tailnet)."""
    if not (settings.verify_clients or settings.verify_client_urls or settings.verify_allowlist_file):
        return None
    try:
        return Admission(
            reactor=reactor,
            verify_clients=settings.verify_clients,
            socket_path=settings.socket,
            urls=settings.verify_client_urls,
            fail_open=settings.verify_client_url_fail_open,
            allowlist_file=settings.verify_allowlist_file,
            cache_ttl=settings.verify_cache_ttl,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_cert_source(settings: Settings, reactor=None):
    """The certificate source for -certmode: files (manual) or an ACME CA (letsencrypt, gcp)."""
    if settings.certmode in ("letsencrypt", "gcp"):
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
            )
        except ValueError as e:
            raise ConfigError(f"-certmode={settings.certmode}: {e}") from None
    try:
        return ManualCertificateSource(settings.certdir, settings.hostname)
    except CertificateError as e:
        raise ConfigError(str(e)) from None


def build_tls(settings: Settings, public_key: bytes, source=None) -> ServerTLS:
    """Certificates for the TLS listener, from *source* or a new one for the settings."""
    if source is None:
        source = build_cert_source(settings)
    if settings.hostname_is_ip:
        _announce_ip_node(settings, source.current())
        # A replaced self-signed certificate changes the sha256-raw pin: say so.
        source.add_listener(lambda ck: _announce_ip_node(settings, ck, changed=True))
    return ServerTLS(
        source, settings.hostname, public_key, strict_sni=not settings.hostname_is_ip, groups=settings.tls_groups
    )


def proxy_networks(settings: Settings) -> tuple:
    """Trusted proxy networks when -proxy-protocol is on, () when off.

    An empty -trusted-proxies is refused rather than read as "anyone" (anyone
    could then name any client address: spoofed admission Source, logs, limits)
    or as "loopback" (a same-host proxy is the common case, but a silent default
    would also trust every local process). Say which addresses send PROXY headers.
    """
    if settings.proxy_protocol == "off":
        if settings.trusted_proxies:
            log.warn("-trusted-proxies is set but -proxy-protocol is off: PROXY headers are not accepted")
        return ()
    if not settings.trusted_proxies:
        raise ConfigError(
            f"-proxy-protocol={settings.proxy_protocol} needs -trusted-proxies (DERP_TRUSTED_PROXIES): "
            "the IPs or CIDRs of the proxies that send PROXY headers, e.g. 127.0.0.1 for a proxy on this host; "
            "without it anyone could claim any client address"
        )
    try:
        return parse_networks(settings.trusted_proxies)
    except ValueError as e:
        raise ConfigError(f"-trusted-proxies: {e}") from None


class _SighupReload:
    """One SIGHUP handler for the process, reloading every registered manual source.

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
        log.info("SIGHUP received: reloading TLS certificates")
        for source in list(self.sources):
            source.reload()


SIGHUP_RELOAD = _SighupReload()


def _announce_ip_node(settings: Settings, cert, changed: bool = False) -> None:
    node = derp_map_node_json(settings.hostname, cert, settings.listen_port, settings.stun_port)
    log.emit(
        LogLevel.warn if changed else LogLevel.info,
        "IP certificate in use; add this node to your DERP map: {node}"
        if not changed
        else "IP certificate replaced, its sha256-raw pin changed; update this node in your DERP map: {node}",
        node=json.dumps(node),
        derp_map_node=node,
    )


class DerpboxService(MultiService):
    """The whole relay: main listener (TLS or plain), port 80, STUN."""

    def __init__(self, settings: Settings, reactor, environ=os.environ):
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.proxy_networks = proxy_networks(settings)
        private_key = load_server_key(settings)
        self.relay = Relay(
            private_key,
            reactor,
            queue_depth=queue_depth_from_env(environ),
            write_timeout=settings.tcp_write_timeout,
            mesh_key=load_mesh_key_for(settings, environ),
        )
        self.admission = build_admission(settings, reactor)
        self.relay.admission = self.admission
        self.stun_stats = STUNStats()
        self.tls_stats = TLSStats() if settings.use_tls else None
        self.metrics = Metrics(
            self.relay,
            self.stun_stats,
            self.admission.stats if self.admission is not None else None,
            self.tls_stats,
        )
        self.debug = DebugResource(
            self.metrics,
            hostname=settings.hostname,
            mesh_key_configured=self.relay.mesh_key is not None,
            environ=environ,
        )
        extra = {}
        if settings.derpmap_path:
            extra[settings.derpmap_path] = derpmap_resource(settings)
        self.site = build_main_site(
            derp_enabled=settings.derp, home=settings.home, hostname=settings.hostname, debug=self.debug, extra=extra
        )
        self.front = front = FrontFactory(
            self.relay,
            self.site,
            reactor,
            derp_enabled=settings.derp,
            tcp_keepalive=settings.tcp_keepalive_time,
            tcp_user_timeout=settings.tcp_user_timeout,
            tls_stats=self.tls_stats,
        )
        self.tls = None
        self.cert_source = None
        factory = front
        if settings.use_tls:
            self.cert_source = build_cert_source(settings, reactor)
            self.metrics.cert_source = self.cert_source
            self.tls = build_tls(settings, self.relay.public_key, self.cert_source)
            factory = TLSMemoryBIOFactory(self.tls, False, front)
            if isinstance(self.cert_source, AcmeCertificateSource):
                # Obtains and renews in the background; STUN, port 80 and the relay's
                # other work never wait for it.
                self.cert_source.setServiceParent(self)
        what = "DERP (TLS)" if self.tls else "DERP (plain HTTP)"
        factory = self._proxied(factory)
        if self.proxy_networks:
            what += f", PROXY protocol {settings.proxy_protocol}"
        self.main = ListenerService(_endpoint(reactor, settings.listen_host, settings.listen_port), factory, what)
        self.main.setServiceParent(self)
        self.port80 = None
        if self.tls and settings.http_port >= 0:
            self.port80 = ListenerService(
                _endpoint(reactor, settings.listen_host, settings.http_port),
                self._proxied(
                    build_port80_site(
                        main_resource=self.site.resource,
                        environ=environ,
                        challenge_responder=getattr(self.cert_source, "http01_response", None),
                    )
                ),
                "HTTP (captive-portal check, redirect)",
            )
            self.port80.setServiceParent(self)
        self.metrics_listener = None
        if settings.metrics_addr:
            host, port = split_listen_addr(settings.metrics_addr)
            try:
                allow = parse_networks(settings.metrics_allow)
            except ValueError as e:
                raise ConfigError(f"-metrics-allow: {e}") from None
            resource = MetricsListenerResource(self.metrics, allow, healthy=lambda: self.running)
            self.metrics_listener = ListenerService(
                _endpoint(reactor, host, port), QuietSite(resource), "metrics (/metrics, /healthz)"
            )
            self.metrics_listener.setServiceParent(self)
        self.stun = None
        if settings.stun:
            self.stun = STUNService(settings.listen_host, settings.stun_port, self.stun_stats, reactor)
            self.stun.setServiceParent(self)
        HeapService().setServiceParent(self)
        log.info("server key {key}", key=node_public_text(self.relay.public_key))
        for warning in settings.warnings:
            log.warn("{warning}", warning=warning)
        if not self.tls and not settings.dev:
            log.warn(
                "serving plain HTTP on port {port}: derper's rule gives TLS only on port 443 "
                "or with -certmode=manual; Tailscale clients expect TLS",
                port=settings.listen_port,
            )

    def _proxied(self, factory):
        """The factory as the listener should use it: under a PROXY-protocol parser when on."""
        if not self.proxy_networks:
            return factory
        return ProxyProtocolFactory(factory, self.settings.proxy_protocol, self.proxy_networks, clock=self.reactor)

    def startService(self):
        super().startService()
        if self.admission is not None:
            self.admission.start()
            self.admission.probe()
        if isinstance(self.cert_source, ManualCertificateSource):
            # Manual mode always watches its files (derper needs a restart); SIGHUP reloads at once.
            self.cert_source.start_watching(self.reactor)
            SIGHUP_RELOAD.register(self.cert_source, self.reactor)

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
        yield super().stopService()

    def listening(self) -> defer.Deferred:
        """Fires with the service once every TCP listener is up."""
        waits = [s.ready for s in (self.main, self.port80, self.metrics_listener) if s is not None]
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: self)

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
