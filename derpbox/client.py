"""A blocking DERP client, as Tailscale's Go client behaves (spec 8.1-8.3).

Used by the tests, the benchmark and the healthcheck/check commands. It speaks
DERP over plain TCP or TLS, with the fast-start path when the server's TLS 1.3
chain carries the meta-certificate, or over WebSocket.
"""

from __future__ import annotations

import base64
import errno
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cryptography.x509.oid import NameOID
from nacl.public import PrivateKey
from OpenSSL import SSL

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

META_CERT_PREFIX = "derpkey"


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


def meta_cert_key(chain) -> bytes | None:
    """The DERP key in a chain's meta-certificate, as the Go client finds it."""
    for cert in chain:
        cert = cert.to_cryptography()
        with warnings.catch_warnings():
            # The meta-certificate's CN is 71 characters, over X.509's usual bound.
            warnings.simplefilter("ignore", UserWarning)
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(names[0].value) if names else ""
        if cn.startswith(META_CERT_PREFIX) and cert.serial_number < 256:
            try:
                key = bytes.fromhex(cn[len(META_CERT_PREFIX) :])
            except ValueError:
                continue
            if len(key) == KEY_LEN:
                return key
    return None


class _TLSSocket:
    """Blocking pyOpenSSL connection with the socket-like calls the client uses."""

    def __init__(self, sock: socket.socket, server_name: str | None, cafile: str | None, timeout: float):
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        if cafile:
            ctx.load_verify_locations(cafile)
            ctx.set_verify(SSL.VERIFY_PEER, lambda *a: a[-1])
        self.conn = SSL.Connection(ctx, sock)
        if server_name:
            self.conn.set_tlsext_host_name(server_name.encode())
        self.conn.set_connect_state()
        sock.settimeout(None)
        sock.setblocking(True)
        self.sock = sock
        self._timeout = timeout
        self.conn.do_handshake()

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
        sock = socket.create_connection((host, port), timeout=timeout, source_address=source)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if preamble:
            # E.g. a PROXY protocol header, which precedes TLS.
            sock.sendall(preamble)
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
            sni = server_name if server_name is not None else _sni_for(host)
            stream = _TLSSocket(sock, sni, cafile, timeout)
            tls_version = stream.conn.get_protocol_version_name()
            chain = stream.conn.get_peer_cert_chain() or []
            # The Go client trusts the meta-certificate only on TLS 1.3 (spec 8.3).
            if tls_version == "TLSv1.3":
                meta_key = meta_cert_key(chain)
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
            key = base64.b64encode(os.urandom(16)).decode()
            stream.sendall(ws.client_handshake_request(host_header, path=path, key=key))
            head_bytes = client._read_head()
            ws.check_client_handshake_response(head_bytes, key)
            status = 101
        else:
            lines = [f"GET {path} HTTP/1.1", f"Host: {host_header}", "User-Agent: derpbox-client",
                     "Connection: Upgrade", "Upgrade: DERP"]
            if use_fast:
                lines.append("Derp-Fast-Start: 1")
            lines += [f"{k}: {v}" for k, v in headers.items()]
            request = ("\r\n".join(lines) + "\r\n\r\n").encode()
            if use_fast:
                # As Go does: request head and ClientInfo in one write, no wait for 101.
                stream.sendall(request + client_info_frame(private_key, meta_key, info))
                status = None
            else:
                stream.sendall(request)
                head = client._read_head()
                status = _status_of(head)
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
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.stream.recv(4096)
            if not chunk:
                raise DERPClientError(f"connection closed during HTTP response: {buf[:200]!r}")
            buf += chunk
            if len(buf) > 65536:
                raise DERPClientError("HTTP response head too large")
        end = buf.index(b"\r\n\r\n") + 4
        rest = buf[end:]
        if rest:
            self._ingest(rest)
        return buf[:end]

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


def _sni_for(host: str) -> str | None:
    # Go sends no SNI for IP literals.
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return None
    except OSError:
        return host


def _status_of(head: bytes) -> int:
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise DERPClientError(f"malformed HTTP status line: {head[:80]!r}") from None

