"""The kernel websocket /api/kernels/ID/channels: one client socket bridged to a ClientSession
(kernels/session.py), for which it is the `Sink`.

States: handshake (auth and kernel checked before the upgrade) -> open (attached to its
session; frames flow both ways) -> closed (detached; the session keeps collecting output for
a reconnect with the same session_id).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from typing import Any

from tornado import httputil, web, websocket
from tornado.iostream import StreamClosedError

from .. import logs, metrics, wire
from ..auth import authenticate
from ..config import Config
from ..errors import BadRequest, GatewayError
from ..kernels.kernel import ManagedKernel
from ..kernels.registry import KernelRegistry
from ..kernels.session import ClientSession
from ..users import Tokens, User, hidden
from ..wire import Part
from . import codec

log = logging.getLogger(__name__)

# A client that stops reading while its kernel prints is cut off past this, rather than
# letting the gateway's memory grow without bound; it reconnects and gets the replay.
MAX_PENDING_BYTES = 512 * 1024 * 1024

_CHANNEL_NAMES = {c.encode(): c for c in ("shell", "iopub", "stdin", "control")}


class KernelWebSocket(websocket.WebSocketHandler):
    registry: KernelRegistry
    config: Config
    tokens: Tokens

    def initialize(self, **collaborators: Any) -> None:
        for name, value in collaborators.items():
            setattr(self, name, value)
        self.kernel: ManagedKernel | None = None
        self.session: ClientSession | None = None
        self.user = User("")  # no one, until get() authenticates the request
        self.v1 = False
        self.binary_ok = True
        self._pending = 0

    # -- handshake -----------------------------------------------------------------------

    async def get(self, kernel_id: str) -> None:
        # the socket's whole life runs in this task: its frames' lines and its access line
        logs.concerning(self.registry.kernels.get(kernel_id) or kernel_id)
        try:
            self.user = authenticate(self.request, self.tokens, not self.config.token)
            self.kernel = self.registry.get(kernel_id)
            hidden(self.kernel.owner, self.user, f"no kernel with id {kernel_id}")
            session_id = self.get_query_argument("session_id", "")
            self.kernel.fanout.check_room(self.kernel.session_key(session_id, self.user.name))
            _check_upgrade(self.request.headers)
        except GatewayError as e:
            self.set_status(e.status, e.reason)
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.finish({"reason": e.reason, "message": e.message})
            return
        # jupyter_server's gateway client decodes every frame as UTF-8 (connections.py);
        # send it buffers as base64 in text frames instead of binary frames.
        self.binary_ok = not self.request.headers.get("User-Agent", "").startswith("Tornado/")
        await super().get(kernel_id)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors before the upgrade (a method other than GET: 405) as JSON, as the API's."""
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish({"reason": self._reason, "message": self._reason})

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        if codec.V1_PROTOCOL in subprotocols:
            self.v1 = True
            return codec.V1_PROTOCOL
        return None

    def check_origin(self, origin: str) -> bool:
        allowed = self.config.allow_origin
        return allowed == "*" or origin == allowed or super().check_origin(origin)

    def get_compression_options(self) -> dict[str, Any] | None:
        if self.config.ws_compress_max <= 0:
            return None  # permessage-deflate not offered back
        return {"compression_level": 1}  # cheap; output text compresses well even so

    # -- open ----------------------------------------------------------------------------

    def open(self, kernel_id: str) -> None:
        assert self.kernel is not None
        self.set_nodelay(True)
        session_id = self.get_query_argument("session_id", "")
        self.session = self.kernel.session_for(session_id, self.user.name)
        self.session.attach(self)

    async def on_message(self, message: str | bytes) -> None:
        if self.session is None:
            return
        try:
            if isinstance(message, str):
                channel, parts = codec.parts_from_legacy_text(message)
            elif self.v1:
                channel, parts = codec.parts_from_v1(message)
            else:
                channel, parts = codec.parts_from_legacy_binary(message)
            if channel not in codec.CLIENT_CHANNELS:
                raise codec.BadFrame(f"cannot send on channel {channel!r}")
        except codec.BadFrame as e:
            log.warning(
                "kernel %s: dropped a bad frame from a client: %s",
                self.kernel.id if self.kernel else "?",
                e,
            )
            return
        metrics.count(channel, "in", len(message))
        await self.session.send_to_kernel(channel, parts)

    def send(self, channel: bytes, parts: Sequence[Part]) -> None:
        """Sink.send: one kernel message to this client, in its protocol."""
        if self.v1:
            pieces, binary = codec.v1_pieces(channel, parts), True
        else:
            pieces, binary = codec.legacy_pieces(channel, parts, binary_ok=self.binary_ok)
        size = sum(len(p) for p in pieces)
        metrics.count(_CHANNEL_NAMES.get(channel) or channel.decode(errors="replace"), "out", size)
        try:
            fut = self._write(pieces, size, binary)
        except (websocket.WebSocketClosedError, StreamClosedError):
            return
        if fut.done():  # all in the kernel's socket buffer already: nothing to account for
            if not fut.cancelled():
                fut.exception()  # a closed socket: nothing to do, and nothing to log
            return
        self._pending += size
        self.registry.budget.pending(self, size)  # may cut this very socket off
        fut.add_done_callback(lambda f: self._written(f, size))
        if self._pending > MAX_PENDING_BYTES:
            log.warning(
                "kernel %s: a client is not reading; closing its socket",
                self.kernel.id if self.kernel else "?",
            )
            self.close_with(1013, "client too slow")

    def _write(self, pieces: list[Part], size: int, binary: bool) -> Any:
        """One message as one websocket frame. Small ones on a deflate connection go through
        tornado, which compresses them. Everything else is written here as an uncompressed
        frame: tornado assembles frames with `header + data`, a full copy, while its IOStream
        keeps large writes as views, so a 50 MB output reaches the socket without being copied
        by the gateway. Small pieces are joined, the frame header included: each write is a
        send() of its own, and with TCP_NODELAY a segment of its own (a small legacy message
        was eight). Above --ws-compress-max nothing is deflated (it costs more CPU than it
        saves on a LAN); RFC 7692 lets each message choose (RSV1), and the shared window stays
        in step as neither side sees that message."""
        proto = self.ws_connection
        if proto is None or proto.is_closing():
            raise websocket.WebSocketClosedError()
        if getattr(proto, "_compressor", None) is not None and size <= self.config.ws_compress_max:
            return self.write_message(b"".join(pieces), binary=binary)
        opcode = 0x82 if binary else 0x81  # FIN, RSV1-3 clear, binary or text (RFC 6455 5.2)
        if size < 126:
            header = struct.pack("!BB", opcode, size)
        elif size <= 0xFFFF:
            header = struct.pack("!BBH", opcode, 126, size)
        else:
            header = struct.pack("!BBQ", opcode, 127, size)
        stream = proto.stream
        if stream is None:
            raise websocket.WebSocketClosedError()
        run: list[Part] = [header]
        written: Any = None
        for piece in pieces:
            if len(piece) < wire.LARGE:
                run.append(piece)
                continue
            if run:
                stream.write(b"".join(run))
                run = []
            written = stream.write(piece)
        return stream.write(b"".join(run)) if run else written

    def _written(self, fut: Any, size: int) -> None:
        self._pending -= size
        self.registry.budget.pending(self, -size)
        if not fut.cancelled():
            fut.exception()  # a closed socket: nothing to do, and nothing to log

    def close_with(self, code: int, reason: str) -> None:
        """Sink.close_with."""
        if self.session is not None:
            self.session.detach(self)
        if self.ws_connection is not None:
            self.close(code, reason)

    def cut_off(self) -> None:
        """Called by the gateway's MemoryBudget: its unsent output is what the gateway must
        free. Closed at once, not after a close frame that would wait behind that output;
        the client reconnects (with its session_id: to what replay is left)."""
        self.close_with(1013, "the gateway's memory budget is reached; reconnect")
        proto = self.ws_connection
        if proto is not None and proto.stream is not None:
            proto.stream.close()

    def on_close(self) -> None:
        self.registry.budget.forget(self)
        if self.session is not None and self.kernel is not None:
            self.session.detach(self)
            self.kernel.release(self.session)
            self.session = None


def _check_upgrade(headers: httputil.HTTPHeaders) -> None:
    """What tornado checks before the upgrade, refused as JSON (tornado answers plain text)."""
    connection = {v.strip().lower() for v in headers.get("Connection", "").split(",")}
    if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in connection:
        raise BadRequest(
            "this is a kernel's websocket: connect with a websocket client "
            "(Upgrade: websocket, Connection: Upgrade)"
        )


routes: list[tuple[str, type[web.RequestHandler]]] = [
    (r"api/kernels/(?P<kernel_id>[\w-]+)/channels/?", KernelWebSocket),
]
