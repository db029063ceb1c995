"""What the layers share about asyncio cancellation.

    outlast(fut, grace)     wait for an undo to finish although the waiter is cancelled again

A start is cancelled more than once as a matter of course: its launch timeout fires, then its
kernel is deleted or the gateway stops. Each cancellation reaches whatever the undoing of the
first one awaits, and an undo cut short leaves behind what it was removing (a Swarm service,
a container the engine is still creating).
"""

from __future__ import annotations

import asyncio
from typing import Any


async def outlast(fut: asyncio.Future[Any], grace: float, *, cancelled: bool = False) -> None:
    """Wait until `fut` is done, however often the caller is cancelled meanwhile; a
    cancellation that came is raised once the wait is over. `grace` s after the first one
    (`cancelled`: it came before this call) `fut` is cancelled and waited for no more, so a
    stuck undo holds up a delete or a gateway shutdown only that long."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace if cancelled else None
    while not fut.done():
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            fut.cancel()
            break
        try:
            await asyncio.wait({fut}, timeout=left)
        except asyncio.CancelledError:
            cancelled = True
            if deadline is None:
                deadline = loop.time() + grace
    if cancelled:
        raise asyncio.CancelledError
