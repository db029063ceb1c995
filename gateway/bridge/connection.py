"""The kernel websocket /api/kernels/ID/channels: one client socket bridged to a ClientSession.

States: handshake (auth and kernel checked before the upgrade) -> open (attached to its
session; frames flow both ways) -> closed (detached; the session keeps collecting output for
a reconnect with the same session_id).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tornado import web, websocket

from ..auth import authenticate
from ..config import Config
from ..errors import GatewayError
from ..kernels.kernel import ManagedKernel
from ..kernels.registry import KernelRegistry
from . import codec
from .session import ClientSession

log = logging.getLogger(__name__)

# A client that stops reading while its kernel prints is cut off past this, rather than
# letting the gateway's memory grow without bound; it reconnects and gets the replay.
MAX_PENDING_BYTES = 512 * 1024 * 1024


class KernelWebSocket(websocket.WebSocketHandler):
    registry: KernelRegistry
    config: Config

    def initialize(self, **collaborators: Any) -> None:
        for name, value in collaborators.items():
            setattr(self, name, value)
        self.kernel: ManagedKernel | None = None
        self.session: ClientSession | None = None
        self.v1 = False
        self.binary_ok = True
        self._pending = 0

    # -- handshake -----------------------------------------------------------------------

    async def get(self, kernel_id: str) -> None:  # type: ignore[override]
        try:
            authenticate(self.request, self.config.token)
            self.kernel = self.registry.get(kernel_id)
        except GatewayError as e:
            self.set_status(e.status, e.reason)
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.finish({"reason": e.reason, "message": e.message})
            return
        # jupyter_server's gateway client decodes every frame as UTF-8 (connections.py);
        # send it buffers as base64 in text frames instead of binary frames.
        self.binary_ok = not self.request.headers.get("User-Agent", "").startswith("Tornado/")
        await super().get(kernel_id)

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

    def open(self, kernel_id: str) -> None:  # type: ignore[override]
        assert self.kernel is not None
        self.set_nodelay(True)
        session_id = self.get_query_argument("session_id", "")
        self.session = self.kernel.session_for(session_id)
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
            log.warning("kernel %s: dropped a bad frame from a client: %s",
                        self.kernel.id if self.kernel else "?", e)
            return
        await self.session.send_to_kernel(channel, parts)

    def send(self, channel: bytes, parts: Sequence[codec.Part]) -> None:
        """Sink.send: one kernel message to this client, in its protocol."""
        if self.v1:
            frame, binary = codec.v1_from_parts(channel, parts), True
        else:
            frame, binary = codec.legacy_from_parts(channel, parts, binary_ok=self.binary_ok)
        try:
            fut = self._write(frame, binary)
        except websocket.WebSocketClosedError:
            return
        size = len(frame)
        self._pending += size
        fut.add_done_callback(lambda f: self._written(f, size))
        if self._pending > MAX_PENDING_BYTES:
            log.warning("kernel %s: a client is not reading; closing its socket",
                        self.kernel.id if self.kernel else "?")
            self.close_with(1013, "client too slow")

    def _write(self, frame: bytes, binary: bool) -> Any:
        """write_message, without deflate for a frame above --ws-compress-max: a 50 MB output
        costs more CPU to compress than it saves on a LAN. RFC 7692 lets each message choose
        (RSV1 per message) and the shared window stays in step, as neither side sees it.
        Tornado has no per-message switch, so its compressor is set aside for this write."""
        proto = self.ws_connection
        compressor = getattr(proto, "_compressor", None)
        if compressor is None or len(frame) <= self.config.ws_compress_max:
            return self.write_message(frame, binary=binary)
        proto._compressor = None  # type: ignore[union-attr]
        try:
            return self.write_message(frame, binary=binary)
        finally:
            proto._compressor = compressor  # type: ignore[union-attr]

    def _written(self, fut: Any, size: int) -> None:
        self._pending -= size
        if not fut.cancelled():
            fut.exception()  # a closed socket: nothing to do, and nothing to log

    def close_with(self, code: int, reason: str) -> None:
        """Sink.close_with."""
        if self.session is not None:
            self.session.detach(self)
        if self.ws_connection is not None:
            self.close(code, reason)

    def on_close(self) -> None:
        if self.session is not None and self.kernel is not None:
            self.session.detach(self)
            self.kernel.release(self.session)
            self.session = None


routes: list[tuple[str, type[web.RequestHandler]]] = [
    (r"api/kernels/(?P<kernel_id>[\w-]+)/channels/?", KernelWebSocket),
]
