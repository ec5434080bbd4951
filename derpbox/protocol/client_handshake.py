"""The client's side of connecting to a DERP server, over bytes (spec 2.1, 1.4, 8.3).

``ClientHandshake`` is what derpbox's asynchronous mesh client speaks: ``start()``
gives the bytes to send first, ``feed(data)`` takes what arrived and returns what
to send next. Once ``ready`` is true, ``server_key`` and ``server_info`` are known
and ``frames`` holds any frames that came after ServerInfo in the same read; the
stream continues with a ``FrameReader(SERVER_FRAME_BOUNDS)``.

With fast start (``meta_key`` from the TLS 1.3 meta-certificate) the request and
ClientInfo go out in one write and no HTTP response comes back; otherwise the
server answers 101 and ClientInfo follows ServerKey, as the Go client does.
"""

from __future__ import annotations

from nacl.public import PrivateKey

from .frames import SERVER_FRAME_BOUNDS, FrameError, FrameReader, FrameType, frame_name
from .handshake import HandshakeError, client_info_frame, open_server_info, parse_server_key
from .upgrade import MAX_HEAD, response_status, upgrade_request

_HEAD, _SERVER_KEY, _SERVER_INFO, _READY = "head", "server key", "server info", "ready"


class ClientHandshake:
    def __init__(
        self,
        private_key: PrivateKey,
        info: dict,
        host_header: str,
        *,
        path: str = "/derp",
        user_agent: str,
        meta_key: bytes | None = None,
    ):
        self._private_key = private_key
        self._info = info
        self._host_header = host_header
        self._path = path
        self._user_agent = user_agent
        self.meta_key = meta_key
        self.fast_start = meta_key is not None
        self._state = _SERVER_KEY if self.fast_start else _HEAD
        self._head = b""
        self._reader = FrameReader(SERVER_FRAME_BOUNDS)
        self.server_key: bytes | None = None
        self.server_info: dict | None = None
        # Frames that arrived after ServerInfo (or before it, other than ServerKey).
        self.frames: list[tuple[int, bytes]] = []

    @property
    def ready(self) -> bool:
        return self._state == _READY

    def start(self) -> bytes:
        request = upgrade_request(self._host_header, self._path, user_agent=self._user_agent,
                                  fast_start=self.fast_start)
        if self.fast_start:
            return request + client_info_frame(self._private_key, self.meta_key, self._info)
        return request

    def feed(self, data: bytes) -> bytes:
        """Take received bytes; return bytes to send (possibly none). HandshakeError on a bad server."""
        if self._state == _HEAD:
            data = self._feed_head(data)
            if not data:
                return b""
        try:
            frames = self._reader.feed(data)
        except FrameError as e:
            raise HandshakeError(f"bad frame from the server: {e}") from None
        out = b""
        for ftype, payload in frames:
            if self._state == _SERVER_KEY:
                out += self._on_server_key(ftype, payload)
            elif self._state == _SERVER_INFO and ftype == FrameType.SERVER_INFO:
                self.server_info = open_server_info(self._private_key, self.server_key, payload)
                self._state = _READY
            else:
                self.frames.append((ftype, bytes(payload)))
        return out

    def _feed_head(self, data: bytes) -> bytes:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                raise HandshakeError(f"HTTP response head over {MAX_HEAD} bytes")
            return b""
        head, rest = self._head[: end + 4], self._head[end + 4 :]
        self._head = b""
        try:
            status, reason = response_status(head)
        except ValueError as e:
            raise HandshakeError(str(e)) from None
        if status != 101:
            raise HandshakeError(f"server answered HTTP {status} {reason} to the DERP upgrade")
        self._state = _SERVER_KEY
        return rest

    def _on_server_key(self, ftype: int, payload) -> bytes:
        if ftype != FrameType.SERVER_KEY:
            raise HandshakeError(f"first frame is {frame_name(ftype)}, expected SERVER_KEY")
        self.server_key = parse_server_key(payload)
        self._state = _SERVER_INFO
        if self.fast_start:
            if self.server_key != self.meta_key:
                raise HandshakeError("ServerKey differs from the meta-certificate's key")
            return b""
        return client_info_frame(self._private_key, self.server_key, self._info)
