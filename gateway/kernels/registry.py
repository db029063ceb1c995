"""All kernels of this gateway: start (through the kernelspec's provisioner), find, list,
cull, and stop them all at shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

import zmq.asyncio
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir

from ..config import Config
from ..errors import NotFound
from . import env as kenv
from .kernel import ManagedKernel

log = logging.getLogger(__name__)


class KernelRegistry:
    def __init__(self, config: Config, specs: KernelSpecManager) -> None:
        self.config = config
        self.specs = specs
        self.kernels: dict[str, ManagedKernel] = {}
        self._context = zmq.asyncio.Context()
        self._runtime_dir = jupyter_runtime_dir()
        os.makedirs(self._runtime_dir, exist_ok=True)

    def get(self, kernel_id: str) -> ManagedKernel:
        kernel = self.kernels.get(kernel_id)
        if kernel is None or kernel.state == "stopping":
            raise NotFound(f"no kernel with id {kernel_id}")
        return kernel

    def list(self) -> list[ManagedKernel]:
        return [k for k in self.kernels.values() if k.state != "stopping"]

    def spec_exists(self, name: str) -> None:
        try:
            self.specs.get_kernel_spec(name)
        except NoSuchKernel:
            raise NotFound(f"no kernelspec named {name!r}") from None

    async def start(self, name: str | None, env: Any = None) -> ManagedKernel:
        name = name or self.config.default_kernel_name
        self.spec_exists(name)
        extra = kenv.client_env(env, self.config.env_allowlist)
        timeout = kenv.launch_timeout(extra, self.config.kernel_launch_timeout)
        kernel_id = str(uuid.uuid4())
        km = AsyncKernelManager(
            kernel_name=name, kernel_spec_manager=self.specs, context=self._context,
            connection_file=os.path.join(self._runtime_dir, f"kernel-{kernel_id}.json"),
        )
        km.kernel_id = kernel_id
        kernel = ManagedKernel(km, name=name, replay_seconds=self.config.replay_seconds,
                               replay_max_bytes=self.config.replay_max_bytes,
                               autorestart=self.config.autorestart,
                               restart_limit=self.config.restart_limit, on_gone=self._forget)
        self.kernels[kernel_id] = kernel
        launch_env = {**os.environ, **extra, "KERNEL_ID": kernel_id}
        kwargs: dict[str, Any] = {"env": launch_env}
        cwd = kenv.working_dir(extra)
        if cwd:
            kwargs["cwd"] = cwd
        try:
            await kernel.start(launch_timeout=timeout, **kwargs)
        except BaseException:
            self.kernels.pop(kernel_id, None)
            raise
        log.info("kernel %s (%s) started", kernel_id, name)
        return kernel

    def _forget(self, kernel: ManagedKernel) -> None:
        self.kernels.pop(kernel.id, None)
        log.info("kernel %s (%s) stopped", kernel.id, kernel.name)

    async def shutdown(self, kernel_id: str) -> None:
        await self.get(kernel_id).shutdown()

    async def shutdown_all(self, grace: float) -> None:
        tasks = [k.shutdown() for k in list(self.kernels.values())]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for kernel in list(self.kernels.values()):  # still there: kill outright
            log.warning("kernel %s did not stop in %gs; killing it", kernel.id, grace)
            try:
                await kernel.km.shutdown_kernel(now=True)
            except Exception:
                log.exception("killing kernel %s", kernel.id)
        for task in pending:
            task.cancel()

    async def cull_forever(self) -> None:
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.cull_interval)
            now = time.time()
            for kernel in self.list():
                idle = now - kernel.last_activity
                if idle < cfg.cull_idle_timeout:
                    continue
                if kernel.connections and not cfg.cull_connected:
                    continue
                if kernel.execution_state == "busy" and not cfg.cull_busy:
                    continue
                log.info("culling kernel %s, idle for %.0f s", kernel.id, idle)
                kernel.shutdown()

    def close(self) -> None:
        self._context.term()
