"""One kernel socket driven by the event loop directly: messages in to a handler, messages out
in order. Used for every socket that relays (a session's shell, control and stdin, a kernel's
iopub) instead of awaiting pyzmq's asyncio recv: that costs a Future, an Enum conversion and
two scheduled callbacks per received message, a third of the gateway's CPU under load.

A Pump watches the socket's ZMQ_FD with one loop reader and, when it fires, receives every
message waiting (NOBLOCK) and hands each to `handle` at once. ZMQ_FD is edge-triggered: it
signals that the socket has commands to process (a message arrived, the pipe became
writable), and only processing them re-arms it: a recv that finds nothing (EAGAIN), or a
read of ZMQ_EVENTS. So the pump receives until EAGAIN before it returns, and reads EVENTS
after each send (a send processes the socket's commands too, and can so swallow the signal
of a message that arrived meanwhile).

The socket is the asyncio one jupyter_client made; the pump works on a plain-socket shadow of
it and never calls its asyncio methods, which would register a second reader on the same fd.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import cast

import zmq

from .. import wire
from ..errors import BadFrame

log = logging.getLogger(__name__)

# pyzmq's constants are enum members: `events & zmq.POLLIN` runs enum.Flag.__and__ in Python,
# a visible share of the relay's CPU. The hot path uses their plain values.
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
_NOBLOCK, _MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)

# Messages received per wake-up before yielding to the loop: a kernel printing fast must not
# starve the other sockets and the websockets.
BURST = 64


class Pump:
    """Made by a ClientSession (shell, control, stdin) or a Fanout (iopub) for the socket it
    connected; `handle` gets each message's parts (wire.py), in the event loop's thread.
    Closing the pump closes the socket."""

    def __init__(
        self,
        sock: zmq.Socket,  # type: ignore[type-arg]
        kernel_id: str,
        channel: str,
        handle: Callable[[list[wire.Part]], None],
    ) -> None:
        self._owner = sock
        self._sock: zmq.Socket = zmq.Socket.shadow(sock.underlying)  # type: ignore[type-arg]
        self._kernel_id = kernel_id
        self._channel = channel
        self._handle = handle
        self._out: deque[tuple[list[bytes], asyncio.Future[None]]] = deque()
        self._writable: list[asyncio.Future[None]] = []
        self._closed = False
        self._fd = self._sock.FD
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._ready)
        self._loop.call_soon(self._ready)  # what arrived before the reader: no edge for it

    def close(self) -> None:
        """Stop watching, cancel what waits to be sent, and close the socket (linger 0)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        for _, fut in self._out:
            fut.cancel()
        self._out.clear()
        for fut in self._writable:
            fut.cancel()
        self._writable.clear()
        self._owner.close(linger=0)

    # -- out -----------------------------------------------------------------------------

    def send(self, frames: list[bytes]) -> asyncio.Future[None] | None:
        """Send one message after those queued before it: None if it went out now, else a
        future done once it has (cancelled if the socket closes first). A DEALER queues up
        to its high-water mark and refuses (EAGAIN) only past it or, with IMMEDIATE, while
        not connected."""
        if self._closed:
            return None
        if not self._out:
            try:
                self._send(frames)
            except zmq.Again:
                pass
            else:
                self._check()
                return None
        fut = self._loop.create_future()
        self._out.append((frames, fut))
        self._loop.call_soon(self._ready)  # EVENTS must be read for ZMQ_FD to signal again
        return fut

    def writable(self) -> bool:
        """POLLOUT now: with IMMEDIATE, the connection to the kernel is complete."""
        return not self._closed and bool(self._events() & _POLLOUT)

    def until_writable(self) -> asyncio.Future[None]:
        """Done at the next POLLOUT; cancelled if the socket closes first."""
        fut = self._loop.create_future()
        if self._closed:
            fut.cancel()
            return fut
        self._writable = [f for f in self._writable if not f.done()]  # timed-out waits
        self._writable.append(fut)
        self._loop.call_soon(self._ready)
        return fut

    # -- the fd --------------------------------------------------------------------------

    def _events(self) -> int:
        return cast(int, self._sock.get(_EVENTS))

    def _send(self, frames: list[bytes]) -> None:
        """send_multipart without its enum arithmetic. ZMQ takes a multipart message whole
        or not at all: once the first frame is accepted, the rest are too."""
        sock = self._sock
        for frame in frames[:-1]:
            sock.send(frame, _MORE)
        sock.send(frames[-1], _NOBLOCK)

    def _recv(self) -> list[zmq.Frame]:
        """recv_multipart(copy=False) without a getsockopt(RCVMORE) per frame: the frame says
        whether more follow, and they are all there once the first is."""
        frame = self._sock.recv(_NOBLOCK, copy=False)
        frames = [frame]
        while frame.more:
            frame = self._sock.recv(_NOBLOCK, copy=False)
            frames.append(frame)
        return frames

    def _check(self) -> None:
        if not self._closed and self._events() & _POLLIN:
            self._loop.call_soon(self._ready)

    def _ready(self) -> None:
        """ZMQ_FD fired (or a look is due). Receiving until EAGAIN leaves the socket as
        reading EVENTS would: commands processed, so the next message signals the fd again."""
        if self._closed:
            return
        try:
            if (self._out or self._writable) and self._events() & _POLLOUT:
                self._flush()
            for _ in range(BURST):
                frames = self._recv()
                self._deliver(frames)
                if self._closed:  # the handler closed us (a restart, a shutdown)
                    return
        except zmq.Again:
            return
        except zmq.ZMQError as e:  # closed under us (the context, at shutdown)
            log.debug("%s pump of %s stopped: %s", self._channel, self._kernel_id, e)
            self.close()
            return
        self._loop.call_soon(self._ready)  # more may be waiting: after the others' turn

    def _deliver(self, frames: list[zmq.Frame]) -> None:
        try:
            parts = wire.parts_from_zmq(wire.frames_as_parts(frames))
        except BadFrame as e:
            log.warning("kernel %s sent a bad %s message: %s", self._kernel_id, self._channel, e)
            return
        try:
            self._handle(parts)
        except Exception:  # one message's failure must not stop the socket's relay
            log.exception("kernel %s: relaying a %s message", self._kernel_id, self._channel)

    def _flush(self) -> None:
        for fut in self._writable:
            if not fut.done():
                fut.set_result(None)
        self._writable.clear()
        while self._out:
            frames, fut = self._out[0]
            try:
                self._send(frames)
            except zmq.Again:
                return
            self._out.popleft()
            if not fut.done():
                fut.set_result(None)
