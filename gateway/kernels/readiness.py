"""Readiness: is a (re)started kernel running, and does our iopub subscription reach it?

`Handshake.wait` sends kernel_info_request on shell until an iopub status answering one of
them arrives (the kernel's fan-out hands every status to `Handshake.answered`). That proves
the kernel runs and that our iopub subscription is live, so no early output is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio

from .. import wire


class Handshake:
    """The kernel_info requests of one kernel in flight, by msg_id."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[None]] = {}

    @property
    def waiting(self) -> bool:
        """Whether a status's parent is worth decoding (only during a wait)."""
        return bool(self._waiting)

    def answered(self, parent_msg_id: Any) -> None:
        """Called by the fan-out for each iopub status while `waiting`."""
        fut = self._waiting.get(parent_msg_id)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(
        self,
        *,
        connect_shell: Callable[[], zmq.asyncio.Socket],
        key: bytes,
        iopub_live: Callable[[], asyncio.Future[None] | None],
        check_alive: Callable[[], Awaitable[None]],
    ) -> None:
        """Return once the kernel answered; `check_alive` raises if it died meanwhile.

        `connect_shell()` connects with IMMEDIATE (ZMQ reads it at connect time), so requests
        go only over a completed connection: a kernel not listening yet, still starting or
        waiting in a batch queue, finds none piled up: each queued request costs a starting
        kernel a reply and two statuses, which with 20 kernels starting at once on 2 cores
        cost more than the gateway itself. A request goes when the connection completes
        (the socket turns writable), again as soon as our iopub subscription proves live
        (`iopub_live()` done: a status published before it was is lost; ipykernel 7 says so
        at once with iopub_welcome, older kernels with their first status), before that at
        growing intervals, and after that only every 2 s."""
        loop = asyncio.get_running_loop()
        shell = connect_shell()
        answered: asyncio.Future[None] = loop.create_future()
        sent: list[str] = []
        resend = 0.05  # seconds after a request before another
        last_sent = -1.0
        live_when_sent = False
        alive_checked = loop.time()
        try:
            while not answered.done():
                now = loop.time()
                if now - alive_checked >= 0.1:
                    alive_checked = now
                    await check_alive()
                live_fut = iopub_live()
                live = live_fut is not None and live_fut.done()
                # sent while our subscription was live, its status cannot be missed: only
                # a lost connection could lose it, so the next try is much later
                wait = max(resend, 2.0) if live_when_sent else resend
                if last_sent < 0 or now - last_sent >= wait or (live and not live_when_sent):
                    if not await shell.poll(timeout=100, flags=zmq.POLLOUT):  # type: ignore[call-arg]
                        continue  # not connected yet
                    msg_id = uuid.uuid4().hex
                    with contextlib.suppress(zmq.Again):
                        await shell.send_multipart(
                            kernel_info_request(key, msg_id), flags=zmq.NOBLOCK
                        )
                        self._waiting[msg_id] = answered  # any of them will do
                        sent.append(msg_id)
                        if last_sent >= 0:
                            resend = min(resend * 2, 1.0)
                        last_sent, live_when_sent = loop.time(), live
                waits: set[asyncio.Future[Any]] = {answered}
                live_fut = iopub_live()
                if live_fut is not None and not live_when_sent:
                    waits.add(live_fut)
                await asyncio.wait(
                    waits, timeout=min(resend, 0.1), return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            for msg_id in sent:
                self._waiting.pop(msg_id, None)
            shell.close(linger=0)


def kernel_info_request(key: bytes, msg_id: str) -> list[bytes]:
    header = {
        "msg_id": msg_id,
        "msg_type": "kernel_info_request",
        "session": msg_id,
        "username": "gateway",
        "date": wire.iso(time.time()),
        "version": "5.3",
    }
    return wire.zmq_from_parts(key, [json.dumps(header).encode(), b"{}", b"{}", b"{}"])
