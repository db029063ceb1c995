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

from collections.abc import Container
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Dict, Float, Unicode


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
        "KERNEL_LAUNCH_TIMEOUT, else --kernel-launch-timeout); 0: unknown",
    )


class GatewayHooks:
    """The gateway's hooks. Mixed into a provisioner class before its jupyter_client base."""

    parent: Any

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
        """Seconds this start may take: the gateway's, else the launch env's
        KERNEL_LAUNCH_TIMEOUT (a plain JupyterLab passes it there), else `default`."""
        parent = self.parent
        if isinstance(parent, GatewayKernelManager) and parent.launch_timeout > 0:
            return float(parent.launch_timeout)
        try:
            return float(env.get("KERNEL_LAUNCH_TIMEOUT") or default)
        except ValueError:
            return default


class GatewayProvisioner(GatewayHooks, KernelProvisionerBase):
    """A jupyter_client provisioner with the gateway's hooks: the base of every backend that
    is not built on LocalProvisioner."""


_DEFAULTS = GatewayHooks()


def hooks(provisioner: object) -> GatewayHooks:
    """The gateway's hooks of `provisioner`; the defaults for one that has none."""
    return provisioner if isinstance(provisioner, GatewayHooks) else _DEFAULTS
