"""All kernels of this gateway: start them (through the kernelspec's provisioner), or hand
over a warm pool's kernel (pool.py), record them in the state store before the start is
acknowledged, find, list, cull, re-attach to the ones a previous gateway process left
running, and stop or leave them at shutdown."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any, cast

import zmq.asyncio
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.provisioning.factory import KernelProvisionerFactory
from jupyter_core.paths import jupyter_runtime_dir

from .. import logs, metrics, users
from ..backends.contract import GatewayHooks, GatewayKernelManager
from ..config import Config
from ..errors import (
    BadRequest,
    Conflict,
    GatewayError,
    KernelStartError,
    KernelTimeout,
    LimitReached,
    NotFound,
    Unavailable,
)
from ..state import KernelRecord, StateStore, private_dir
from ..users import ADMIN_USER, User
from . import env as kenv
from . import failover, jc
from . import pool as kpool
from .budget import MemoryBudget
from .kernel import ManagedKernel

log = logging.getLogger(__name__)

DEFAULT_PROVISIONER = "rkg-local"
MAX_ZMQ_SOCKETS = 65536


class KernelRegistry:
    def __init__(
        self,
        config: Config,
        specs: KernelSpecManager,
        store: StateStore,
        pool_sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.config = config
        allowed = config.allowed_kernelspecs
        if allowed and config.default_kernel_name not in allowed:
            raise BadRequest(
                f"--default-kernel {config.default_kernel_name!r} is not among "
                f"--allowed-kernelspecs ({', '.join(allowed)}): make one of them --default-kernel"
            )
        self.specs = specs
        self.store = store
        self.kernels: dict[str, ManagedKernel] = {}
        self.budget = MemoryBudget(config.memory_budget)  # replay and unsent output, in all
        self._users: dict[str, str] = {}  # kernel id -> KERNEL_USERNAME, for the per-user limit
        self._starting: dict[str, asyncio.Task[None]] = {}  # by kernel id
        self._deleted_while_starting: set[str] = set()
        self.failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        self._context = zmq.asyncio.Context()
        # libzmq's default allows 1,023 sockets per context: about 1,000 idle kernels (one
        # iopub socket each), fewer with clients (three more per session). Set before the
        # first socket; the file descriptors are the limit that remains (serve() raises it).
        self._context.set(zmq.MAX_SOCKETS, MAX_ZMQ_SOCKETS)
        # Options for every kernel socket, set by the context before it connects: ZMQ takes
        # them at connect time, and jupyter_client connects as it creates the socket.
        # A socket made while its kernel is still starting, or after a restart on the same
        # ports, retries every 10-50 ms instead of 100 ms; and no socket drops what the
        # kernel sends at a high-water mark (iopub's would at 1000 messages).
        self._context.setsockopt(zmq.RECONNECT_IVL, 10)
        self._context.setsockopt(zmq.RECONNECT_IVL_MAX, 50)
        self._context.setsockopt(zmq.RCVHWM, 0)
        self.gateway_id = store.gateway_id()
        self._runtime_dir = jupyter_runtime_dir()
        private_dir(self._runtime_dir)  # connection files and kernel logs: keys, output
        # kernelspecs that name no provisioner get the one that survives gateway restarts
        KernelProvisionerFactory.instance().default_provisioner_name = DEFAULT_PROVISIONER
        # pooled kernels: in none of the above until handed over (pool.py); serve() starts it
        self.pool = kpool.Pool(self, pool_sizes or {})

    def get(self, kernel_id: str) -> ManagedKernel:
        kernel = self.kernels.get(kernel_id)
        if kernel is None or kernel.state == "stopping":
            raise NotFound(f"no kernel with id {kernel_id}")
        return kernel

    def list(self) -> list[ManagedKernel]:
        return [k for k in self.kernels.values() if k.state != "stopping"]

    def spec_exists(self, name: str) -> KernelSpec:
        """The kernelspec, if there is one by that name and --allowed-kernelspecs offers it."""
        allowed = self.config.allowed_kernelspecs
        try:
            if allowed and name not in allowed:
                raise NoSuchKernel(name)
            return self.specs.get_kernel_spec(name)
        except NoSuchKernel:
            raise NotFound(f"no kernelspec named {name!r}") from None

    def _check_limits(self, user: str) -> None:
        """Synchronous, and the new kernel is registered before the next await: two
        concurrent starts can never both take the last place."""
        cfg = self.config
        if cfg.max_kernels and len(self.kernels) >= cfg.max_kernels:
            raise LimitReached(
                f"this gateway runs at most {cfg.max_kernels} kernels; shut one down first"
            )
        if cfg.max_kernels_per_user:
            mine = sum(1 for u in self._users.values() if u == user)
            if mine >= cfg.max_kernels_per_user:
                raise LimitReached(
                    f"user {user or 'anonymous'!r} may run at most "
                    f"{cfg.max_kernels_per_user} kernels; shut one down first"
                )

    def _manager(
        self, kernel_id: str, name: str, client_env: dict[str, str], launch_timeout: float
    ) -> GatewayKernelManager:
        km = GatewayKernelManager(
            kernel_name=name,
            kernel_spec_manager=self.specs,
            context=self._context,
            connection_file=os.path.join(self._runtime_dir, f"kernel-{kernel_id}.json"),
            gateway_id=self.gateway_id,  # container backends label what they create with it
            client_env={**client_env, "KERNEL_ID": kernel_id},
            launch_timeout=launch_timeout,
        )
        km.kernel_id = kernel_id
        if km.kernel_spec is not None:  # loaded once here, and kept by the manager
            users.strip_access_keys(km.kernel_spec.metadata)
        return km

    def _managed(self, km: GatewayKernelManager, name: str, user: str, owner: str) -> ManagedKernel:
        """A kernel of `owner`'s for KERNEL_USERNAME `user`, registered: listed, and counted
        against the limits."""
        kernel = self._kernel(km, name)
        kernel.user, kernel.owner = user, owner
        self.kernels[km.kernel_id] = kernel
        self._users[km.kernel_id] = user
        return kernel

    def _kernel(self, km: GatewayKernelManager, name: str) -> ManagedKernel:
        cfg = self.config
        return ManagedKernel(
            km,
            name=name,
            replay_seconds=cfg.replay_seconds,
            replay_max_bytes=cfg.replay_max_bytes,
            budget=self.budget,
            max_sessions=cfg.max_sessions_per_kernel,
            autorestart=cfg.autorestart,
            restart_limit=cfg.restart_limit,
            on_gone=self._forget,
            on_launched=self._record,
        )

    async def start(
        self, name: str | None, env: Any = None, requester: User = ADMIN_USER
    ) -> ManagedKernel:
        """A kernel of kernelspec `name` (else the default) for `requester`, who owns it: a
        non-admin's KERNEL_USERNAME is their name, and the spec must authorize it (users.py)."""
        name = name or self.config.default_kernel_name
        spec = self.spec_exists(name)
        req = kenv.LaunchRequest.from_client(
            users.claimed_env(requester, env),
            self.config.env_allowlist,
            self.config.kernel_launch_timeout,
            self.config.working_dir_root,
            kenv.spec_launch_timeout(spec.metadata),
            requester.name,
            requester.admin,
        )
        user = req.env.get("KERNEL_USERNAME", "")
        cfg = self.config
        chain = failover.of(spec.metadata)
        # a failover spec runs nothing itself: each member is checked as if asked for
        for checked in [name, *(chain.specs if chain else ())]:
            try:
                meta = self.spec_exists(checked).metadata
            except NotFound:
                continue  # a missing member is its reason in a failed start
            runs_as_us = failover.of(meta) is None and self._as_gateway_user(meta)
            users.check_may_start(
                user or requester.name,
                checked,
                meta,
                cfg.authorized_users,
                cfg.unauthorized_users,
                as_gateway_user=requester if runs_as_us else None,
            )
        self._check_limits(user)
        pooled = self.pool.take(name) if kpool.serves(req.env) else None
        if pooled is not None:
            return await self._hand_over(pooled, req, user, requester.name)
        kernel_id = str(uuid.uuid4())
        km = self._manager(kernel_id, name, dict(req.env), req.timeout)
        km.launch_timeout_source = req.timeout_source
        kernel = self._managed(km, name, user, requester.name)
        logs.concerning(kernel)  # this request's lines, and its start task's (a failed one's too)
        kernel.launch = {"env": dict(req.env), "cwd": req.cwd}
        task = asyncio.ensure_future(self._start_or_undo(kernel, req.timeout))
        self._starting[kernel_id] = task
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            if kernel_id in self._deleted_while_starting:
                raise Conflict(
                    f"kernel {kernel_id} was deleted while it was starting; its start was undone"
                ) from None
            # cancel_starts() cancelled the start, not our caller: a bare CancelledError
            # would reach Tornado, which answers it with an anonymous 500
            raise Unavailable(
                "the gateway is shutting down, so this kernel start was undone; "
                "start the kernel again once the gateway is back"
            ) from None
        finally:
            self._starting.pop(kernel_id, None)
            self._deleted_while_starting.discard(kernel_id)
        log.info("kernel %s (%s) started", kernel_id, name)
        return kernel

    async def _hand_over(
        self, kernel: ManagedKernel, req: kenv.LaunchRequest, user: str, owner: str
    ) -> ManagedKernel:
        """A pooled kernel becomes the requester's: registered before the next await (see
        _check_limits), owned by `user`, started (for its model and the culler) now, and a
        restart relaunches it with the request's env, as if it had been started for it.
        Recorded as the requester's before the start is acknowledged."""
        began = time.monotonic()
        kernel.user, kernel.owner = user, owner
        kernel.launch = {"env": dict(req.env), "cwd": req.cwd}
        kernel.created = time.time()
        kernel.touch()
        self.kernels[kernel.id] = kernel
        self._users[kernel.id] = user
        logs.concerning(kernel)
        km = kernel.km
        if isinstance(km, GatewayKernelManager):  # what the backend reads at a relaunch
            km.client_env = {**req.env, "KERNEL_ID": kernel.id}
            km.launch_timeout = req.timeout
            km.launch_timeout_source = req.timeout_source
        jc.mark_started(km, self._launch_kwargs(kernel))
        try:
            await self._record(kernel)
        except BaseException:
            self.kernels.pop(kernel.id, None)
            self._users.pop(kernel.id, None)
            await kernel.shutdown()
            await self.store.delete_kernel(kernel.id)
            raise
        metrics.started(kernel.backend, "ok", time.monotonic() - began)
        log.info("kernel %s (%s) handed over from its warm pool", kernel.id, kernel.name)
        return kernel

    # -- the warm pools' kernels (pool.Spares) -----------------------------------------

    def new_spare(self, name: str) -> ManagedKernel:
        kernel_id = str(uuid.uuid4())
        km = self._manager(kernel_id, name, {}, self.config.kernel_launch_timeout)
        return self._kernel(km, name)

    async def launch_spare(self, kernel: ManagedKernel) -> None:
        """Not counted in the start metrics: those are requests' (a hand-over is one)."""
        began = time.monotonic()
        with logs.about(kernel):  # and the tasks it makes: its monitor's lines
            try:
                km, timeout = kernel.km, self.config.kernel_launch_timeout
                spec = km.kernel_spec if isinstance(km, GatewayKernelManager) else None
                own = kenv.spec_launch_timeout(spec.metadata) if spec is not None else None
                if own and isinstance(km, GatewayKernelManager):  # as start() would give it
                    timeout = km.launch_timeout = own
                    km.launch_timeout_source = kenv.SOURCES[1]
                await self._start_with_retry(kernel, timeout)
            except BaseException as e:
                if not isinstance(e, asyncio.CancelledError):  # a shutdown: nothing wrong
                    self._start_failed(kernel, e, time.monotonic() - began, counted=False)
                await self.store.delete_kernel(kernel.id)
                raise
            log.info("kernel %s (%s) started for its warm pool", kernel.id, kernel.name)

    async def stop_spare(self, kernel: ManagedKernel) -> None:
        await kernel.shutdown()
        await self.store.delete_kernel(kernel.id)

    def starts_in_flight(self) -> tuple[asyncio.Task[None], ...]:
        return tuple(self._starting.values())

    async def _start_or_undo(self, kernel: ManagedKernel, launch_timeout: float) -> None:
        """The undoing is part of the task cancel_starts() waits for: once it returns, every
        cancelled start's caller only has to answer, which it does before the shutdown
        goes on to close the connections."""
        began = time.monotonic()
        try:
            await self._start_with_retry(kernel, launch_timeout)
        except BaseException as e:
            self.kernels.pop(kernel.id, None)
            self._users.pop(kernel.id, None)
            self._start_failed(kernel, e, time.monotonic() - began)
            await self.store.delete_kernel(kernel.id)
            raise
        metrics.started(kernel.backend, "ok", time.monotonic() - began)

    def _start_failed(
        self, kernel: ManagedKernel, e: BaseException, seconds: float, *, counted: bool = True
    ) -> None:
        """A start that did not end in a running kernel: counted (unless not `counted`),
        logged with its stages, and kept (the last few) for the status page."""
        if isinstance(e, asyncio.CancelledError):
            outcome, reason = "cancelled", "cancelled (deleted while starting, or shutdown)"
        else:
            outcome = "timeout" if isinstance(e, KernelTimeout) else "error"
            reason = e.message if isinstance(e, GatewayError) else f"{type(e).__name__}: {e}"
        if counted:
            metrics.started(kernel.backend, outcome, seconds)
        story = kernel.story()
        log.warning(
            "kernel %s (%s) did not start (%s after %.1f s): %s%s",
            kernel.id,
            kernel.name,
            outcome,
            seconds,
            reason,
            f" [stages: {story}]" if story else "",
        )
        self.failures.append(
            {
                "id": kernel.id,
                "name": kernel.name,
                "backend": kernel.backend,
                "host": kernel.location,
                "user": kernel.user,
                "outcome": outcome,
                "reason": reason,
                "stages": story,
                "seconds": round(seconds, 3),
                "at": time.time(),
            }
        )

    async def _start_with_retry(self, kernel: ManagedKernel, launch_timeout: float) -> None:
        """A failover kernelspec's kernel starts as the first of its members that starts
        (failover.py): each attempt gets a manager of that member's."""
        spec = kernel.km.kernel_spec
        chain = failover.of(spec.metadata if spec is not None else None)
        if chain is None:
            await self._start_once(kernel, launch_timeout)
            return
        failed: list[tuple[str, GatewayError]] = []
        for member in chain.specs:
            try:
                if failover.of(self.spec_exists(member).metadata) is not None:
                    raise BadRequest("a failover kernelspec cannot list another one")
                kernel.km = self._member_manager(kernel, member)
                await self._start_once(kernel, chain.attempt(launch_timeout))
                return
            except GatewayError as e:
                failed.append((member, e))
                log.warning(
                    "kernel %s (%s) did not start as %s: %s",
                    kernel.id,
                    kernel.name,
                    member,
                    e.message,
                )
                kernel.state = "starting"
        raise failover.none_started(kernel.name, failed)

    def _member_manager(self, kernel: ManagedKernel, member: str) -> GatewayKernelManager:
        """A manager for kernelspec `member` with what the kernel's first manager was given."""
        km = kernel.km
        env = dict(km.client_env) if isinstance(km, GatewayKernelManager) else {}
        env.pop("KERNEL_ID", None)
        timeout = km.launch_timeout if isinstance(km, GatewayKernelManager) else 0.0
        return self._manager(kernel.id, member, env, timeout)

    async def _start_once(self, kernel: ManagedKernel, launch_timeout: float) -> None:
        """jupyter_client picks the ports here and the kernel binds them later; under churn
        another socket can take one in between. A kernel that died of exactly that is
        launched again on fresh ports (jupyter_client picks new ones after a cleanup)."""
        for attempt in range(3):
            try:
                await kernel.start(launch_timeout=launch_timeout, **self._launch_kwargs(kernel))
                return
            except KernelStartError as e:
                if "Address already in use" not in e.message or attempt == 2:
                    raise
                log.warning("kernel %s lost a port race; launching it again", kernel.id)
                kernel.state = "starting"

    @staticmethod
    def _launch_kwargs(kernel: ManagedKernel) -> dict[str, Any]:
        # serve() has taken RKG_* and the --secret-env names out of os.environ (drop_secrets)
        kwargs: dict[str, Any] = {
            "env": {**os.environ, **kernel.launch["env"], "KERNEL_ID": kernel.id}
        }
        if kernel.launch.get("cwd"):
            kwargs["cwd"] = kernel.launch["cwd"]
        return kwargs

    async def _record(self, kernel: ManagedKernel) -> None:
        """After every launch (start and restart): what a later gateway needs to re-attach."""
        prov = kernel.km.provisioner
        info = await prov.get_provisioner_info() if prov is not None else {}
        launch = dict(kernel.launch)
        if kernel.km.kernel_name != kernel.name:  # a failover spec's: the member it runs as
            launch["spec"] = kernel.km.kernel_name
        await self.store.put_kernel(
            KernelRecord(
                kernel.id,
                kernel.name,
                self._users.get(kernel.id, ""),
                dict(kernel.km.get_connection_info()),
                info,
                launch,
                kernel.created,
                pooled=kernel.id in self.pool.members,
                owner=kernel.owner,
            )
        )

    def _forget(self, kernel: ManagedKernel) -> None:
        self.kernels.pop(kernel.id, None)
        self._users.pop(kernel.id, None)
        self.pool.forget(kernel)
        log.info("kernel %s (%s) stopped", kernel.id, kernel.name)

    async def shutdown(self, kernel_id: str) -> None:
        """DELETE. A kernel still starting has its start cancelled and undone (a queued batch
        job is cancelled at once rather than waited for); its POST answers 409."""
        kernel = self.get(kernel_id)
        start = self._starting.get(kernel_id)
        if start is not None:
            self._deleted_while_starting.add(kernel_id)
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            if start.cancelled() or start.exception() is not None:
                return  # undone: nothing of it is left
            # it had just finished starting: its POST answers 201, and it is stopped here
        await kernel.shutdown()
        await self.store.delete_kernel(kernel_id)

    # -- across gateway restarts -------------------------------------------------------

    async def restore(self) -> None:
        """Re-attach to every recorded kernel that still runs; forget and clean up the rest."""
        records = self.store.kernels()
        results = await asyncio.gather(
            *[self._restore_one(r) for r in records], return_exceptions=True
        )
        for rec, result in zip(records, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("kernel %s (%s) could not be re-attached: %s", rec.id, rec.name, result)
                self.kernels.pop(rec.id, None)
                self._users.pop(rec.id, None)
                await self.store.delete_kernel(rec.id)
        if records:
            log.info(
                "re-attached %d of %d recorded kernel(s), %d of them to warm pools",
                sum(not isinstance(r, BaseException) for r in results),
                len(records),
                self.pool.ready(),
            )

    @staticmethod
    def _as_gateway_user(metadata: Mapping[str, Any]) -> bool:
        """Whether the spec's kernels run as this gateway's system user: its provisioner says
        so (GatewayHooks.as_gateway_user); jupyter_client's local provisioner and one the
        gateway does not know are taken to."""
        meta = metadata.get("kernel_provisioner") or {}
        cls = jc.provisioner_class(str(meta.get("provisioner_name", DEFAULT_PROVISIONER)))
        if isinstance(cls, type) and issubclass(cls, GatewayHooks):
            return cls.as_gateway_user(dict(meta.get("config") or {}))
        return True

    def spec_provisioners(self) -> tuple[tuple[str, type[GatewayHooks], dict[str, Any]], ...]:
        """(kernelspec name, provisioner class, its config) of every kernelspec whose
        provisioner has the gateway's hooks; a native spec (no provisioner named) counts
        as the default provisioner's."""
        found = []
        for name in sorted(self.specs.find_kernel_specs()):
            try:
                meta = self.specs.get_kernel_spec(name).metadata.get("kernel_provisioner", {})
            except Exception as e:  # a broken kernelspec is reported again when it is used
                log.debug("kernelspec %s: %s", name, e)
                continue
            cls = jc.provisioner_class(str(meta.get("provisioner_name", DEFAULT_PROVISIONER)))
            if isinstance(cls, type) and issubclass(cls, GatewayHooks):
                found.append((name, cls, dict(meta.get("config") or {})))
        return tuple(found)

    async def reap_orphans(self) -> None:
        """After restore, while serving: backends that can list what they created
        (containers, services) remove what this gateway labelled and no kernel of it owns.
        Once per distinct provisioner config, so an engine named by several kernelspecs is
        swept once. `owned` is the live registry: a kernel is in it before its launch."""
        owned = collections.ChainMap(self.kernels, self.pool.members).keys()
        seen: set[str] = set()
        for name, cls, config in self.spec_provisioners():
            key = f"{cls.__name__} {config.get('docker_host', '')}"
            if key in seen:
                continue
            seen.add(key)
            try:
                gone = await cls.reap(config, owned, self.gateway_id)
            except Exception as e:
                log.warning("looking for orphans of kernelspec %s: %s", name, e)
                continue
            if gone:
                log.warning(
                    "removed %d orphaned kernel(s) of this gateway: %s", len(gone), ", ".join(gone)
                )

    async def _restore_one(self, rec: KernelRecord) -> None:
        # a restart relaunches with what the client first asked for
        km = self._manager(
            rec.id,
            str(rec.launch.get("spec") or rec.name),  # a failover spec's member (failover.py)
            dict(rec.launch.get("env") or {}),
            self.config.kernel_launch_timeout,
        )
        info = cast(KernelConnectionInfo, rec.connection_info)
        km.load_connection_info(info)
        prov = KernelProvisionerFactory.instance(parent=km).create_provisioner_instance(
            rec.id, km.kernel_spec, parent=km
        )
        prov.connection_info = info
        await prov.load_provisioner_info(rec.provisioner_info)
        km.provisioner = prov
        # a pooled kernel is no one's: in the pool once it answers, not among the kernels
        kernel = (
            self._kernel(km, rec.name)
            if rec.pooled
            else self._managed(km, rec.name, rec.username, rec.owner)
        )
        logs.concerning(kernel)  # and so its monitor's and pump's lines
        kernel.launch, kernel.created = rec.launch, rec.created
        # a previous gateway process called start_kernel(), so this manager must be told what
        # restart_kernel() relaunches with, and that a start was made (jc.py says why)
        jc.mark_started(km, self._launch_kwargs(kernel))
        if not await km.is_alive():
            await kernel.discard()
            raise RuntimeError("its process is gone")
        await kernel.reattach(launch_timeout=min(self.config.kernel_launch_timeout, 30))
        if rec.pooled and not self.pool.adopt(kernel):
            log.info("kernel %s (%s) is beyond its warm pool's size; stopping it", rec.id, rec.name)
            await self.stop_spare(kernel)

    # -- shutdown ----------------------------------------------------------------------

    async def cancel_starts(self) -> None:
        """Shutdown, first step: a start no client will hear about is undone."""
        starts = list(self._starting.values())
        for task in starts:
            task.cancel()
        await asyncio.gather(*starts, return_exceptions=True)

    async def shutdown_all(self, grace: float) -> None:
        await self.pool.close()  # a pooled start in flight is undone, the pooled stopped below
        await self.cancel_starts()
        tasks = [k.shutdown() for k in self._all()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for kernel in self._all():  # still there: kill outright
            log.warning("kernel %s did not stop in %gs; killing it", kernel.id, grace)
            try:
                await kernel.km.shutdown_kernel(now=True)
            except Exception:
                log.exception("killing kernel %s", kernel.id)
        for task in pending:
            task.cancel()
        for kernel_id in [r.id for r in self.store.kernels()]:
            await self.store.delete_kernel(kernel_id)

    async def leave_all(self) -> None:
        """--keep-kernels: disconnect from every kernel and leave it running and recorded.
        Starts in flight are first let finish, bounded: such a kernel is recorded already and
        the next gateway re-attaches to it, so its client should get it, not an error."""
        await self.pool.close()  # a pooled start in flight is undone; the pooled are left
        if self._starting:
            await asyncio.wait(list(self._starting.values()), timeout=self.config.shutdown_timeout)
        await self.cancel_starts()
        for kernel in self._all():
            kernel.detach()
        self.kernels.clear()
        self.pool.members.clear()

    def _all(self) -> tuple[ManagedKernel, ...]:
        """Every kernel this gateway holds: its clients' and its warm pools'."""
        return (*self.kernels.values(), *self.pool.members.values())

    async def cull_forever(self) -> None:
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.cull_interval)
            now = time.time()
            for kernel in self.list():
                if kernel.state != "running":
                    continue  # a start (a job queued for long) or a restart is not idleness
                idle = now - kernel.last_activity
                if idle < cfg.cull_idle_timeout:
                    continue
                if kernel.connections and not cfg.cull_connected:
                    continue
                if kernel.execution_state == "busy" and not cfg.cull_busy:
                    continue
                with logs.about(kernel):
                    log.info("culling kernel %s, idle for %.0f s", kernel.id, idle)
                try:
                    await self.shutdown(kernel.id)
                except NotFound:  # deleted meanwhile
                    pass

    def close(self) -> None:
        # destroy, not term: term() waits forever for sockets jupyter_client still holds
        # (the control socket of a kernel left running by --keep-kernels)
        self._context.destroy(linger=0)
