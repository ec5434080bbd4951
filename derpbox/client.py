"""A blocking DERP client, as Tailscale's Go client behaves (spec 8.1-8.3).

Used by the tests, the benchmark and the healthcheck/check commands. It speaks
DERP over plain TCP or TLS, with the fast-start path when the server's TLS 1.3
chain carries the meta-certificate, or over WebSocket. The steps of connecting
(TCP, TLS, the upgrade request, the response head) are public functions, so the
checks probe a server with the same bytes the client sends.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from nacl.public import PrivateKey
from OpenSSL import SSL

from . import netaddr
from .protocol import websocket as ws
from .protocol.frames import (
    KEY_LEN,
    SERVER_FRAME_BOUNDS,
    FrameReader,
    FrameType,
    encode_frame,
    note_preferred_frame,
    ping_frame,
    pong_frame,
    send_packet_frame,
)
from .protocol.handshake import (
    client_info_frame,
    open_server_info,
    parse_server_key,
)
from .protocol.upgrade import response_status
from .protocol.upgrade import upgrade_request as protocol_upgrade_request
from .tls.metacert import meta_certificate_key

USER_AGENT = "derpbox-client"
MAX_RESPONSE_HEAD = 65536


class DERPClientError(Exception):
    pass


@dataclass
class Frame:
    type: int
    payload: bytes


@dataclass
class Connected:
    """What the connection learned while connecting."""

    server_key: bytes
    server_info: dict
    fast_start: bool
    tls_version: str | None = None
    peer_chain: list = field(default_factory=list)
    http_status: int | None = None


# -- the steps of connecting, shared with derpbox.checks ------------------------------------


def open_tcp(host: str, port: int, timeout: float, *, preamble: bytes = b"",
             source: tuple[str, int] | None = None) -> socket.socket:
    """A TCP connection with Nagle off; ``preamble`` (e.g. a PROXY protocol header) goes first, before TLS."""
    sock = socket.create_connection((host, port), timeout=timeout, source_address=source)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if preamble:
            sock.sendall(preamble)
    except BaseException:
        sock.close()
        raise
    return sock


def server_name_for(host: str) -> str | None:
    """The SNI to send when dialing ``host``: Go sends none for an IP literal."""
    return None if netaddr.is_ip(host) else host


class TLSStream:
    """Blocking pyOpenSSL connection with the socket-like calls the client uses."""

    def __init__(self, conn: SSL.Connection, sock: socket.socket):
        self.conn = conn
        self.sock = sock

    @property
    def version(self) -> str:
        return self.conn.get_protocol_version_name()

    @property
    def peer_chain(self) -> list:
        """The server's certificates (pyOpenSSL X509) as presented, meta-certificate included."""
        return self.conn.get_peer_cert_chain() or []

    def sendall(self, data: bytes) -> None:
        self.conn.sendall(data)

    def recv(self, n: int) -> bytes:
        try:
            return self.conn.recv(n)
        except SSL.ZeroReturnError:
            return b""
        except SSL.WantReadError:
            raise TimeoutError("no data before the timeout") from None
        except SSL.SysCallError as e:
            # SO_RCVTIMEO expiring shows up as EAGAIN from the read call.
            if e.args and e.args[0] in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise TimeoutError("no data before the timeout") from None
            if e.args and e.args[0] in (-1, 0):
                return b""
            raise ConnectionError(str(e)) from None

    def settimeout(self, t):
        # pyOpenSSL blocking sockets cannot carry a Python timeout (WantRead errors);
        # the client uses SO_RCVTIMEO through the raw socket instead.
        secs = 0 if t is None else t
        tv = int(secs).to_bytes(8, "little") + int((secs % 1) * 1e6).to_bytes(8, "little")
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)

    def close(self) -> None:
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass
        self.sock.close()


def start_tls(sock: socket.socket, server_name: str | None, timeout: float, cafile: str | None = None) -> TLSStream:
    """TLS 1.2 or later over ``sock``, the handshake finished within ``timeout``; reads then
    time out after ``timeout``. Any certificate is accepted unless ``cafile`` names the CAs
    to verify against (the checks verify chains themselves, with better messages)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    if cafile:
        ctx.load_verify_locations(cafile)
        ctx.set_verify(SSL.VERIFY_PEER, lambda *a: a[-1])
    conn = SSL.Connection(ctx, sock)
    if server_name:
        conn.set_tlsext_host_name(server_name.encode())
    conn.set_connect_state()
    # A non-blocking handshake, so that a peer that never answers cannot outlast the timeout.
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.do_handshake()
            break
        except SSL.WantReadError:
            event = select.POLLIN
        except SSL.WantWriteError:
            event = select.POLLOUT
        left = deadline - time.monotonic()
        # poll, not select: a process holding over 1,024 descriptors (a load generator)
        # would get descriptors select cannot take.
        poller = select.poll()
        poller.register(sock, event)
        if left <= 0 or not poller.poll(left * 1000):
            raise TimeoutError(f"TLS handshake not finished within {timeout:g} s")
    sock.setblocking(True)
    stream = TLSStream(conn, sock)
    stream.settimeout(timeout)
    return stream


def upgrade_request(host_header: str, path: str = "/derp", *, user_agent: str = USER_AGENT,
                    fast_start: bool = False, headers: dict[str, str] | None = None) -> bytes:
    """The DERP upgrade request (derpbox.protocol.upgrade), with this client's User-Agent by default."""
    return protocol_upgrade_request(host_header, path, user_agent=user_agent, fast_start=fast_start, headers=headers)


def read_response_head(stream) -> tuple[bytes, bytes]:
    """An HTTP response head (up to and including its blank line), and the bytes read past it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_RESPONSE_HEAD:
            raise DERPClientError("HTTP response head too large")
        chunk = stream.recv(4096)
        if not chunk:
            if not buf:
                raise ConnectionError("connection closed without an HTTP response")
            raise ConnectionError(f"connection closed during HTTP response: {buf[:200]!r}")
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def parse_response_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    """(status, reason, headers by lowercase name) of a response head."""
    try:
        status, reason = response_status(head)
    except ValueError as e:
        raise DERPClientError(str(e)) from None
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    return status, reason, headers


class DERPClient:
    def __init__(self, stream, private_key: PrivateKey, websocket: bool = False):
        self.stream = stream
        self.private_key = private_key
        self.public_key = bytes(private_key.public_key)
        self.reader = FrameReader(SERVER_FRAME_BOUNDS)
        self._frames: list[tuple[int, bytes]] = []
        self._ws = ws.WebSocketDecoder(client=True) if websocket else None
        self.connected: Connected | None = None

    # -- connecting -------------------------------------------------------

    @classmethod
    def connect(
        cls,
        url: str,
        private_key: PrivateKey | None = None,
        *,
        timeout: float = 10.0,
        server_name: str | None = None,
        cafile: str | None = None,
        fast_start: bool = True,
        websocket: bool = False,
        mesh_key: bytes | None = None,
        can_ack_pings: bool = True,
        is_prober: bool = False,
        headers: dict[str, str] | None = None,
        source: tuple[str, int] | None = None,
        preamble: bytes = b"",
    ) -> DERPClient:
        """Dial ``url`` (``https://host:port/derp`` or ``http://...``) and handshake.

        ``preamble`` is sent right after the TCP connect, before TLS (a PROXY header)."""
        parts = urlsplit(url)
        tls = parts.scheme in ("https", "wss")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if tls else 80)
        sock = open_tcp(host, port, timeout, preamble=preamble, source=source)
        private_key = private_key or PrivateKey.generate()
        try:
            return cls._handshake(
                sock, tls, host, port, parts.path or "/derp", private_key, timeout, server_name,
                cafile, fast_start, websocket, mesh_key, can_ack_pings, is_prober, headers or {},
            )
        except BaseException:
            sock.close()
            raise

    @classmethod
    def _handshake(cls, sock, tls, host, port, path, private_key, timeout, server_name, cafile,
                   fast_start, websocket, mesh_key, can_ack_pings, is_prober, headers):
        tls_version = None
        chain = []
        meta_key = None
        stream = sock
        if tls:
            sni = server_name if server_name is not None else server_name_for(host)
            stream = start_tls(sock, sni, timeout, cafile)
            tls_version = stream.version
            chain = stream.peer_chain
            # The Go client trusts the meta-certificate only on TLS 1.3 (spec 8.3).
            if tls_version == "TLSv1.3":
                meta_key = meta_certificate_key([c.to_cryptography() for c in chain])
        stream.settimeout(timeout)
        client = cls(stream, private_key, websocket=websocket)
        host_header = host if port in (80, 443) else f"{host}:{port}"
        info = {"version": 2, "CanAckPings": can_ack_pings}
        if is_prober:
            info["IsProber"] = True
        if mesh_key is not None:
            info["meshKey"] = mesh_key.hex()
        use_fast = bool(fast_start and meta_key and not websocket)
        if websocket:
            key = ws.new_client_key()
            stream.sendall(ws.client_handshake_request(host_header, path=path, key=key))
            head_bytes = client._read_head()
            ws.check_client_handshake_response(head_bytes, key)
            status = 101
        else:
            request = upgrade_request(host_header, path, fast_start=use_fast, headers=headers)
            if use_fast:
                # As Go does: request head and ClientInfo in one write, no wait for 101.
                stream.sendall(request + client_info_frame(private_key, meta_key, info))
                status = None
            else:
                stream.sendall(request)
                head = client._read_head()
                status = parse_response_head(head)[0]
                if status != 101:
                    raise DERPClientError(f"server answered HTTP {status} to the DERP upgrade")
        frame = client._next_frame()
        if frame.type != FrameType.SERVER_KEY:
            raise DERPClientError(f"first frame is {frame.type:#x}, expected ServerKey")
        server_key = parse_server_key(frame.payload)
        if use_fast and server_key != meta_key:
            raise DERPClientError("ServerKey differs from the meta-certificate key")
        if not use_fast:
            client.write(client_info_frame(private_key, server_key, info))
        while True:
            frame = client._next_frame()
            if frame.type == FrameType.SERVER_INFO:
                break
            client._frames.append((frame.type, frame.payload))
        server_info = open_server_info(private_key, server_key, frame.payload)
        client.connected = Connected(server_key, server_info, use_fast, tls_version, chain, status)
        return client

    def _read_head(self) -> bytes:
        """Read an HTTP response head; bytes after it stay buffered as stream data."""
        head, rest = read_response_head(self.stream)
        if rest:
            self._ingest(rest)
        return head

    # -- I/O --------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._ws is not None:
            data = ws.encode_masked_binary(data)
        self.stream.sendall(data)

    def _ingest(self, data: bytes) -> None:
        if self._ws is not None:
            chunks = []
            for ev in self._ws.feed(data):
                if isinstance(ev, ws.BinaryData):
                    chunks.append(ev.data)
                elif isinstance(ev, ws.Close):
                    raise ConnectionError(f"WebSocket closed by server: {ev.code} {ev.reason}")
            data = b"".join(chunks)
        self._frames.extend((t, bytes(p)) for t, p in self.reader.feed(data))

    def _next_frame(self) -> Frame:
        while not self._frames:
            try:
                data = self.stream.recv(65536)
            except (socket.timeout, BlockingIOError, SSL.WantReadError):
                raise TimeoutError("no frame before the timeout") from None
            if not data:
                raise ConnectionError("connection closed by server")
            self._ingest(data)
        t, p = self._frames.pop(0)
        return Frame(t, p)

    def recv(self, timeout: float | None = None) -> Frame:
        if timeout is not None:
            self.stream.settimeout(timeout)
        return self._next_frame()

    def recv_until(self, ftype: int, timeout: float = 5.0) -> Frame:
        """The next frame of ``ftype``, discarding others (e.g. keepalives)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no frame of type {ftype:#x} within {timeout} s")
            frame = self.recv(left)
            if frame.type == ftype:
                return frame

    def recv_packet(self, timeout: float = 5.0) -> tuple[bytes, bytes]:
        frame = self.recv_until(FrameType.RECV_PACKET, timeout)
        return frame.payload[:KEY_LEN], frame.payload[KEY_LEN:]

    def send_packet(self, dst: bytes, data: bytes) -> None:
        self.write(send_packet_frame(dst, data))

    def ping(self, data: bytes = b"pingpong") -> None:
        self.write(ping_frame(data))

    def pong(self, data: bytes) -> None:
        self.write(pong_frame(data))

    def note_preferred(self, preferred: bool) -> None:
        self.write(note_preferred_frame(preferred))

    def send_frame(self, ftype: int, payload: bytes = b"") -> None:
        self.write(encode_frame(ftype, payload))

    def is_closed_by_server(self, timeout: float = 3.0) -> bool:
        """True when the server closes the stream (frames received meanwhile are dropped)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.recv(max(0.01, deadline - time.monotonic()))
        except TimeoutError:  # an OSError too, so it must come first
            return False
        except (ConnectionError, OSError, SSL.Error):
            return True
        return False

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass
