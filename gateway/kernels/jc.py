"""Every use the gateway's core makes of jupyter_client (and pyzmq) beyond their public API,
in one place, each with the reason. Checked with jupyter_client 8.10.0 and pyzmq 27.3.0 (what
the development environment installs; pyproject.toml allows jupyter_client>=8.6, pyzmq>=25):
re-check this module when either moves.

- `connect(..., immediate=True)`: pyzmq's `Context.sockopts`, the options a context gives
  every socket it creates. jupyter_client creates and connects a socket in one call, and ZMQ
  reads IMMEDIATE at connect time, so the option is set on the context around the call and
  removed again (there is no `Context.unsetsockopt`).
- `connect_control()`, `close_control()`: `AsyncKernelManager._connect_control_socket` and
  `._close_control_socket`. jupyter_client opens its control socket in start_kernel() and
  keeps it; the gateway closes it once the kernel is ready (a thousand idle kernels would
  hold a thousand sockets for nothing) and opens it again before what goes through it:
  interrupt (interrupt_mode "message"), restart and shutdown (their shutdown_request),
  also for a kernel a previous gateway process started, which this manager never did.
- `mark_started()`: `AsyncKernelManager._launch_args` and `._attempted_start`, which
  start_kernel() sets: what restart_kernel() relaunches with, and that a start was made
  (without it, a restart reuses a settled `ready` future and fails with InvalidStateError).
- `provisioner_class()`: `KernelProvisionerFactory.provisioners`, its entry points by name
  (public attribute, undocumented); the factory itself only instantiates provisioners.
- `exit_code()`: `LocalProvisioner.process`, the Popen it launched (not part of the
  provisioner API; other provisioners have no such process).

Backends keep their own (backends/local.py: `LocalPortCache`, `LocalProvisioner._scrub_kwargs`).
"""

from __future__ import annotations

from typing import Any, cast

import zmq
import zmq.asyncio
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning.factory import KernelProvisionerFactory
from jupyter_client.provisioning.local_provisioner import LocalProvisioner


def connect(
    km: AsyncKernelManager, channel: str, identity: bytes | None = None, *, immediate: bool = False
) -> zmq.asyncio.Socket:
    """A socket to one of the kernel's channels. `immediate`: its pipe exists only once the
    ZMTP handshake with the kernel completed, so POLLOUT on it means "connected"."""
    connect_channel = getattr(km, f"connect_{channel}")
    if not immediate:
        return cast(zmq.asyncio.Socket, connect_channel(identity=identity))
    ctx = km.context
    ctx.setsockopt(zmq.IMMEDIATE, 1)
    try:
        return cast(zmq.asyncio.Socket, connect_channel(identity=identity))
    finally:
        ctx.sockopts.pop(zmq.IMMEDIATE, None)


def connect_control(km: AsyncKernelManager) -> None:
    """Open the manager's control socket (if closed), as start_kernel() would have."""
    km._connect_control_socket()


def close_control(km: AsyncKernelManager) -> None:
    """Close the manager's control socket until it is needed again."""
    km._close_control_socket()


def mark_started(km: AsyncKernelManager, launch_args: dict[str, Any]) -> None:
    """Make a manager that did not start its kernel able to restart it with `launch_args`."""
    km._launch_args = launch_args
    km._attempted_start = True


def provisioner_class(name: str) -> Any:
    """The class a kernelspec's provisioner_name stands for, or None."""
    if not name:
        return None
    factory = KernelProvisionerFactory.instance()
    ep = factory.provisioners.get(name)
    try:
        return ep.load() if ep is not None else None
    except Exception:
        return None


def exit_code(provisioner: object) -> Any:
    """The exit code of a kernel process this gateway launched locally, else "unknown"."""
    process = provisioner.process if isinstance(provisioner, LocalProvisioner) else None
    return getattr(process, "returncode", "unknown")
