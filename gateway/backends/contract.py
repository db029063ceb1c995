"""What the gateway asks of a backend beyond jupyter_client's provisioner API, and what it
gives one. Every backend is a jupyter_client kernel provisioner; these are its extra hooks,
each with a default, so a kernelspec may also name a provisioner that knows nothing of them.

    GatewayHooks                     the hooks, as a mixin with defaults
    ├── GatewayProvisioner           on KernelProvisionerBase (common.RemoteProvisioner)
    └── local.DurableLocalProvisioner   on jupyter_client's LocalProvisioner
    GatewayKernelManager             the parent the gateway gives a provisioner: its gateway id
    hooks(provisioner)               the hooks of any provisioner (defaults for a foreign one)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container
from typing import Any, ClassVar

from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Dict, Float, List, Unicode

log = logging.getLogger(__name__)


class GatewayKernelManager(AsyncKernelManager):
    """The kernel manager the gateway makes for each kernel, the `parent` of its provisioner:
    it hands the backend what the client asked for, explicitly (jupyter_client's launch
    `env` is this process's whole environment, from which a remote backend cannot tell the
    client's variables apart)."""

    gateway_id = Unicode(
        "",
        help="this gateway's id: container backends label what they "
        "create with it, so that the gateway finds its orphans after a crash",
    )
    client_env = Dict(
        value_trait=Unicode(),
        help="what the client set for its kernel: "
        "KERNEL_* and the allow-listed names, and KERNEL_ID",
    )
    launch_timeout = Float(
        0.0,
        help="seconds the gateway gives this start (the client's "
        "KERNEL_LAUNCH_TIMEOUT, else the kernelspec's launch_timeout, else "
        "--kernel-launch-timeout); 0: unknown",
    )
    launch_timeout_source = Unicode(
        "KERNEL_LAUNCH_TIMEOUT", help="which of those it is, for a timeout's message"
    )
    stages: Any = List(
        help="the current launch's stages so far, as (seconds since it began, words); "
        "the last is where the launch stands (GatewayHooks.stage)",
    )
    _stages_began = Float(0.0)

    def begin_stages(self) -> None:
        """A launch (start or restart) begins: its story starts afresh."""
        self.stages = []
        self._stages_began = time.monotonic()

    def report_stage(self, words: str) -> None:
        if not self._stages_began:
            self.begin_stages()
        self.stages = [*self.stages, (round(time.monotonic() - self._stages_began, 3), words)]
        log.debug("kernel %s: %s", self.kernel_id, words)

    @property
    def stage(self) -> str:
        return str(self.stages[-1][1]) if self.stages else ""

    def story(self) -> str:
        """The stages with when each began: for the log line of a failed start."""
        return "; ".join(f"{words} (at {at:.1f} s)" for at, words in self.stages)


class GatewayHooks:
    """The gateway's hooks. Mixed into a provisioner class before its jupyter_client base."""

    parent: Any
    # what the status page and the metrics call this backend ("ssh", "docker", ...)
    backend: ClassVar[str] = ""

    def stage(self, words: str) -> None:
        """Called by the backend as its launch moves on ("connecting to gpu-box", "SLURM job
        12 PENDING (Resources)"): clients see the last in GET /api/kernels/ID while the
        kernel starts, and a failed start's log line tells them all. Short, in words, no
        secrets (the client reads them)."""
        parent = self.parent
        if isinstance(parent, GatewayKernelManager):
            parent.report_stage(words)

    def location(self) -> str:
        """Where this kernel runs, for people: a host name, an engine, a scheduler; '' for
        this machine or unknown. Read only after launch (or a restore)."""
        return ""

    @classmethod
    def as_gateway_user(cls, config: dict[str, Any]) -> bool:
        """Whether a kernelspec with this provisioner config runs its kernels as the gateway's
        own system user on a machine that holds the gateway's files (users.check_may_start
        keeps such specs to admins unless the spec authorizes a user by name)."""
        return False

    @classmethod
    async def reachable(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        """Called by the status page (cached, bounded in time) per distinct kernelspec
        config naming this provisioner: what the spec depends on, as (label, error) pairs,
        error '' when that host or engine answers. Must not start anything. Empty: nothing
        to check."""
        return []

    def exit_fd(self) -> int | None:
        """Called by the gateway after each launch (and re-attach): a file descriptor that
        becomes readable when the kernel's process ends (a pidfd), which the gateway then
        watches instead of polling; the gateway closes it. None: the gateway polls."""
        return None

    def launch_note(self) -> str:
        """Called by the gateway when a start did not finish within the launch timeout:
        where the start stood (a job still queued, a task pending on no suitable node), for
        the timeout message. Empty: nothing to add."""
        return ""

    def log_tail(self) -> str:
        """Called by the gateway when the kernel was found dead during start-up: its last
        output, for the error message. Empty: none known."""
        return ""

    @classmethod
    async def reap(
        cls, config: dict[str, Any], owned: Container[str], gateway_id: str
    ) -> list[str]:
        """Called by the gateway once at start, per distinct kernelspec config naming this
        provisioner: remove what an earlier run of this gateway (`gateway_id`) created and
        no kernel in `owned` (kernel ids) owns. Returns what it removed, for the log."""
        return []

    @property
    def gateway_id(self) -> str:
        """The id of the gateway that runs this kernel, '' under another kernel manager."""
        parent = self.parent
        return str(parent.gateway_id) if isinstance(parent, GatewayKernelManager) else ""

    def client_env(self, env: dict[str, str]) -> dict[str, str]:
        """What the client set for the kernel. Under another kernel manager (a plain
        JupyterLab), the KERNEL_* variables of the launch's `env`."""
        parent = self.parent
        if isinstance(parent, GatewayKernelManager):
            return dict(parent.client_env)
        return {k: v for k, v in env.items() if k.startswith("KERNEL_")}

    def gateway_timeout(self, env: dict[str, str], default: float) -> float:
        """Seconds this start may take: the gateway's (which is the client's, else the
        kernelspec's, else the gateway's own: kernels/env.py), else the launch env's
        KERNEL_LAUNCH_TIMEOUT (a plain JupyterLab passes it there), else the kernelspec's
        `launch_timeout`, else `default`. The same for every backend."""
        parent = self.parent
        if isinstance(parent, GatewayKernelManager) and parent.launch_timeout > 0:
            return float(parent.launch_timeout)
        own = float(getattr(self, "launch_timeout", 0) or 0)
        try:
            return float(env.get("KERNEL_LAUNCH_TIMEOUT") or own or default)
        except ValueError:
            return own or default

    def timeout_source(self) -> str:
        """What set gateway_timeout(), for a message: KERNEL_LAUNCH_TIMEOUT, the kernelspec's
        launch_timeout, or --kernel-launch-timeout."""
        parent = self.parent
        if isinstance(parent, GatewayKernelManager) and parent.launch_timeout > 0:
            return str(parent.launch_timeout_source)
        return "KERNEL_LAUNCH_TIMEOUT"


class GatewayProvisioner(GatewayHooks, KernelProvisionerBase):
    """A jupyter_client provisioner with the gateway's hooks: the base of every backend that
    is not built on LocalProvisioner."""


_DEFAULTS = GatewayHooks()


def hooks(provisioner: object) -> GatewayHooks:
    """The gateway's hooks of `provisioner`; the defaults for one that has none."""
    return provisioner if isinstance(provisioner, GatewayHooks) else _DEFAULTS


def backend_name(provisioner: object) -> str:
    """A short, bounded label for a provisioner (metrics, status page): its `backend`, else
    its class name."""
    if provisioner is None:
        return "none"
    own = getattr(type(provisioner), "backend", "")
    return own if isinstance(own, str) and own else type(provisioner).__name__
