"""Warm pools: kernels of a kernelspec started before anyone asks, so that a start request
the pool can serve is given one at once instead of waiting for a launch.

    sizes(given, specs)   each kernelspec's pool size: `--pool SPEC=N`, else its kernelspec's
                          `metadata.rkg.pool`; an unknown kernelspec is a BadRequest
    serves(env)           whether a pooled kernel can serve a start with this client env
    Pool                  the pooled kernels, and one filler task per kernelspec with a size
    Spares                what a Pool needs of the registry, which implements it

A pooled kernel is an ordinary ManagedKernel, launched through its kernelspec's provisioner
(so any backend) with no client's env and recorded in the state store as pooled. It is held
here, not among the registry's kernels: no listing, session, culler or limit sees it. The
registry takes one for a start request that `serves` allows and hands it over to the
requester; the filler of that kernelspec then starts a replacement in the background.

Filling: a filler starts one kernel at a time, and at most `parallel` pooled starts run in
all. Before each it lets the requests go first, so that a refill does not compete with them
for the CPU: it waits until `refill_after` seconds have passed since the last hand-over (the
new owner's first messages), and while client starts are in flight (up to `yield_for`
seconds). A pooled start that fails is logged and the next one is tried after a delay
doubling from BACKOFF_FIRST to BACKOFF_MAX seconds, reset by a start that succeeds. Every
`check_every` seconds a filler also looks for pooled kernels that died for good (their
restarts failed) and replaces them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from contextlib import suppress
from typing import Any, Protocol

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .. import wire
from ..config import pool_size
from ..errors import BadRequest
from .kernel import ManagedKernel

log = logging.getLogger(__name__)

BACKOFF_FIRST = 2.0
BACKOFF_MAX = 300.0

# What a client may send and still be given a pooled kernel: KERNEL_USERNAME is applied at
# hand-over (owner, per-user limit, what a restart relaunches with); KERNEL_LAUNCH_TIMEOUT
# bounds a launch, and the pooled kernel has launched; KERNEL_ID is ignored on any start
# (the gateway names its kernels). Anything else shapes the launch itself (KERNEL_WORKING_DIR,
# KERNEL_UID and KERNEL_GID, allow-listed variables), so it gets a fresh start.
HANDED_OVER = frozenset({"KERNEL_USERNAME", "KERNEL_LAUNCH_TIMEOUT", "KERNEL_ID"})


def serves(env: Mapping[str, str]) -> bool:
    """Whether a pooled kernel can serve a start whose client env (LaunchRequest.env) is
    `env`: only when nothing in it would have changed how the kernel was launched."""
    return env.keys() <= HANDED_OVER


def sizes(given: Iterable[tuple[str, int]], specs: KernelSpecManager) -> dict[str, int]:
    """Called by serve() before anything starts: {kernelspec: pool size} for every kernelspec
    with one, `given` (--pool) winning over a kernelspec's `metadata.rkg.pool`. A --pool of a
    kernelspec that does not exist, or a metadata.rkg.pool that is not a size, is a
    BadRequest: the gateway does not start."""
    found: dict[str, int] = {}
    for name in sorted(specs.find_kernel_specs()):
        try:
            rkg = specs.get_kernel_spec(name).metadata.get("rkg") or {}
        except Exception as e:  # a broken kernelspec is reported again when it is used
            log.debug("kernelspec %s: %s", name, e)
            continue
        if isinstance(rkg, dict) and "pool" in rkg:
            try:
                found[name] = pool_size(rkg["pool"])
            except ValueError as e:
                raise BadRequest(f"kernelspec {name!r}: metadata.rkg.pool {e}") from None
    for name, size in given:
        try:
            specs.get_kernel_spec(name)
        except NoSuchKernel:
            raise BadRequest(
                f"--pool {name}={size}: there is no kernelspec named {name!r} "
                "(rkg spec list shows them; --kernelspec-dir adds a directory)"
            ) from None
        found[name] = size
    return {name: size for name, size in found.items() if size > 0}


class Spares(Protocol):
    """What a Pool needs of the registry (KernelRegistry implements it)."""

    def new_spare(self, name: str) -> ManagedKernel:
        """A kernel of kernelspec `name` with no client's env, not launched yet, in no
        listing: the pool holds it as a member before its launch begins."""
        ...

    async def launch_spare(self, kernel: ManagedKernel) -> None:
        """Launch it and record it as pooled; on any failure (cancellation included)
        nothing of it is left, and the error is raised."""
        ...

    async def stop_spare(self, kernel: ManagedKernel) -> None:
        """Stop a pooled kernel for good and forget its record."""
        ...

    def starts_in_flight(self) -> tuple[asyncio.Task[None], ...]:
        """The client starts under way now (to wait for, never to cancel)."""
        ...


class Pool:
    """The pooled kernels of every kernelspec with a size. Made by the registry; serve()
    calls `start()` once the recorded kernels are restored, and the registry's shutdown
    calls `close()` before it stops or leaves the kernels that are still `members`."""

    def __init__(
        self,
        spares: Spares,
        sizes: Mapping[str, int],
        *,
        parallel: int = 2,
        refill_after: float = 1.0,
        yield_for: float = 5.0,
        check_every: float = 5.0,
    ) -> None:
        self.spares = spares
        self.sizes = dict(sizes)
        self.refill_after = refill_after
        self.yield_for = yield_for
        self.check_every = check_every
        # every pooled kernel by id, launching or ready: a backend's orphan sweep must see a
        # container or job as owned from before its launch
        self.members: dict[str, ManagedKernel] = {}
        self._ready: dict[str, list[ManagedKernel]] = {name: [] for name in self.sizes}
        self._launching: dict[str, int] = dict.fromkeys(self.sizes, 0)
        self._wake: dict[str, asyncio.Event] = {name: asyncio.Event() for name in self.sizes}
        self._trouble: dict[str, dict[str, Any]] = {}  # kernelspec -> the failing starts
        self._slots = asyncio.Semaphore(parallel)
        self._fillers: list[asyncio.Task[None]] = []
        self._handed_over = -float("inf")  # time.monotonic() of the last take

    # -- the registry's side -------------------------------------------------------------

    def take(self, name: str) -> ManagedKernel | None:
        """A ready pooled kernel of kernelspec `name`, no longer the pool's, or None.
        Synchronous, so two concurrent starts never get the same kernel; the oldest is
        taken. Its filler is woken to start a replacement."""
        ready = self._ready.get(name)
        if not ready:
            return None
        for kernel in ready:
            if kernel.state == "running":  # not one restarting after it died, nor dead
                ready.remove(kernel)
                del self.members[kernel.id]
                self._handed_over = time.monotonic()
                self._wake[name].set()
                return kernel
        return None

    def adopt(self, kernel: ManagedKernel) -> bool:
        """A pooled kernel an earlier gateway process left running, re-attached: it joins its
        kernelspec's pool, unless that pool is full or gone (False: the caller stops it)."""
        ready = self._ready.get(kernel.name)
        if ready is None or len(ready) >= self.sizes[kernel.name]:
            return False
        ready.append(kernel)
        self.members[kernel.id] = kernel
        return True

    def forget(self, kernel: ManagedKernel) -> None:
        """A pooled kernel stopped (the registry's on_gone): no longer held."""
        if self.members.pop(kernel.id, None) is not None:
            with suppress(ValueError, KeyError):
                self._ready[kernel.name].remove(kernel)

    def ready(self) -> int:
        return sum(len(r) for r in self._ready.values())

    def status(self) -> list[dict[str, Any]]:
        """For /api/status: each pool's size, how many kernels are ready and launching (and
        where the launch stands), and while its starts fail, how many in a row, the last error
        and when the next try is."""
        return [
            {
                "spec": name,
                "size": size,
                "ready": len(self._ready[name]),
                "launching": self._launching[name],
                "stage": next(
                    (
                        k.stage
                        for k in self.members.values()
                        if k.name == name and k.state == "starting"
                    ),
                    "",
                ),
                "failing": self._trouble.get(name),
            }
            for name, size in sorted(self.sizes.items())
        ]

    # -- filling ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin filling every pool, in the background."""
        if self.sizes:
            log.info("warm pools: %s", ", ".join(f"{n}={s}" for n, s in sorted(self.sizes.items())))
        self._fillers = [
            asyncio.create_task(self._fill(name), name=f"pool {name}") for name in self.sizes
        ]

    async def close(self) -> None:
        """Stop filling: a pooled start in flight is undone. The kernels that are ready stay
        `members`, for the registry to stop or leave."""
        for task in self._fillers:
            task.cancel()
        await asyncio.gather(*self._fillers, return_exceptions=True)
        self._fillers = []

    async def _fill(self, name: str) -> None:
        failures = 0
        while True:
            await self._replace_dead(name)
            if len(self._ready[name]) + self._launching[name] >= self.sizes[name]:
                self._wake[name].clear()
                with suppress(TimeoutError):
                    async with asyncio.timeout(self.check_every):
                        await self._wake[name].wait()
                continue
            try:
                async with self._slots:
                    await self._yield_to_clients()
                    await self._launch(name)
            except Exception as e:
                failures += 1
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
                self._trouble[name] = {
                    "starts": failures,
                    "error": str(e),
                    "next_try": wire.iso(time.time() + delay),
                }
                log.warning(
                    "pool %s: a pooled start failed (%d in a row); the next try is in %g s",
                    name,
                    failures,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            self._trouble.pop(name, None)

    async def _launch(self, name: str) -> None:
        kernel = self.spares.new_spare(name)
        self.members[kernel.id] = kernel
        self._launching[name] += 1
        try:
            await self.spares.launch_spare(kernel)
        except BaseException:
            self.members.pop(kernel.id, None)
            raise
        finally:
            self._launching[name] -= 1
        self._ready[name].append(kernel)

    async def _yield_to_clients(self) -> None:
        """Let the last hand-over's client, then the client starts in flight go first."""
        await asyncio.sleep(self._handed_over + self.refill_after - time.monotonic())
        deadline = time.monotonic() + self.yield_for
        while starts := self.spares.starts_in_flight():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.wait(starts, timeout=left)

    async def _replace_dead(self, name: str) -> None:
        """Pooled kernels that died and could not be restarted leave the pool (and so are
        replaced); one restarting stays, and is not taken meanwhile."""
        dead = [k for k in self._ready[name] if k.state == "dead"]
        for kernel in dead:
            self.forget(kernel)
        for kernel in dead:
            log.warning("pool %s: pooled kernel %s died; replacing it", name, kernel.id)
            try:
                await self.spares.stop_spare(kernel)
            except Exception as e:
                log.warning("pool %s: cleaning up after kernel %s: %s", name, kernel.id, e)
