"""What the remote backends (ssh.py, docker.py and swarm.py, batch.py) share: one shallow base
and the SSH port forwards.

    RemoteProvisioner    the life cycle around a kernel that is not this machine's child:
                         pre_launch, poll/wait, kill/terminate, the log tail, the command,
                         the connection file, what is recorded for re-attaching
    PortForwards         the kernel's five ports forwarded from 127.0.0.1 over a shared SSH
                         connection (sshpool.py), on the same local ports after a reconnect

A backend writes `probe` (is it still running?) and `send_signal`, and lists what it records
in `restored` / `noted`; everything else here is the same for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import signal
from typing import TYPE_CHECKING, Any, ClassVar, Self

from traitlets import Dict, Float, List, Unicode

from ..errors import KernelStartError
from .contract import GatewayProvisioner

if TYPE_CHECKING:
    import asyncssh

    from .sshpool import SSHHost

log = logging.getLogger(__name__)

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
DEFAULT_CMD = ["{python}", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
# never sent to a remote kernel: they describe the gateway's machine and process
_LOCAL_ONLY = frozenset({"JPY_PARENT_PID", "PATH", "HOME", "PWD", "SHELL", "USER", "LOGNAME"})


def remote_env(
    client: dict[str, str], spec: dict[str, str], config: dict[str, str]
) -> dict[str, str]:
    """What reaches a remote kernel, later entries winning: what the client set (KERNEL_*,
    allow-listed names), the kernelspec's env, the provisioner config's env. Nothing of
    this machine's own environment; names that are not identifiers are dropped (they
    cannot be exported by a shell)."""
    out = {**client, **spec, **config}
    return {k: v for k, v in out.items() if k.isidentifier() and k not in _LOCAL_ONLY}


class PortForwards:
    """Local listeners, one per channel, to `dest`:`remote[channel]` on the far side of a
    shared SSH connection. It watches that connection (sshpool.Watcher): after a reconnect
    the listeners are made again on the same local ports, so the gateway's ZMQ sockets
    simply reconnect; if one was taken meanwhile, `moved` says so."""

    def __init__(self) -> None:
        self.pid: int | None = None  # the kernel's, when the host's liveness probe covers it
        self.dest = "127.0.0.1"
        self.remote: dict[str, int] = {}
        self.local: dict[str, int] = {}
        self.moved = ""
        self._host: SSHHost | None = None
        self._listeners: list[Any] = []

    @property
    def is_open(self) -> bool:
        return self._host is not None

    async def open(
        self,
        host: SSHHost,
        dest: str,
        remote: dict[str, int],
        local: dict[str, int] | None = None,
        pid: int | None = None,
    ) -> dict[str, int]:
        """Forward to `remote` ports at `dest` (as the far host sees it), on the `local`
        ports when given (a re-attach), else on free ones. Returns the local ports."""
        from .sshpool import ssh_errors

        self.close()
        self.dest, self.remote, self.pid, self.moved = dest, dict(remote), pid, ""
        if local is not None:
            self.local = dict(local)
        with ssh_errors(host.target, f"forwarding the kernel's ports through {host.name}"):
            await self._forward(await host.connection())
        host.watch(self)
        self._host = host
        return dict(self.local)

    async def reforward(self, conn: asyncssh.SSHClientConnection) -> None:
        """Called by the shared connection after it reconnected."""
        before = dict(self.local)
        await self._forward(conn)
        if self.local != before:
            self.moved = (
                f"the SSH connection to {self._host.name if self._host else '?'} was "
                "re-established but the kernel's local ports were taken meanwhile"
            )

    async def _forward(self, conn: asyncssh.SSHClientConnection) -> None:
        self._close_listeners()
        for ch, port in self.remote.items():
            want = self.local.get(ch, 0)
            try:
                listener = await conn.forward_local_port("127.0.0.1", want, self.dest, port)
            except OSError:
                if not want:
                    raise
                log.warning("local port %d was taken; forwarding %s from a new one", want, ch)
                listener = await conn.forward_local_port("127.0.0.1", 0, self.dest, port)
            self._listeners.append(listener)
            self.local[ch] = listener.get_port()

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners = []

    def close(self) -> None:
        """Stop forwarding and watching; `local` is kept for a later open (a restart)."""
        self._close_listeners()
        if self._host is not None:
            self._host.unwatch(self)
            self._host = None


class RemoteProvisioner(GatewayProvisioner):
    """A kernel the gateway reaches over the network. Called by jupyter_client's
    KernelManager: pre_launch and launch_kernel to start, poll/wait/send_signal/kill/terminate
    while it runs, cleanup after it stopped (restart=True between the two launches of a
    restart); get/load_provisioner_info to record it and to re-attach after a gateway restart."""

    python = Unicode(
        "python3",
        config=True,
        help="the python that runs the kernel, where it runs ({python} in kernel_cmd)",
    )
    kernel_cmd = List(Unicode(), config=True, help="kernel command with {connection_file}")
    port_range = Unicode(
        "",
        config=True,
        help="LO-HI: the kernel's ports where it runs (a firewall's open range); default: "
        "below the host's ephemeral range (SSH, batch), ports the engine picks (Docker)",
    )
    env = Dict(config=True, help="more environment for the kernel")
    poll_interval = Float(1.0, config=True, help="seconds a liveness answer is reused")
    launch_timeout = Float(
        0.0,
        config=True,
        help="seconds a start may take unless the client sets KERNEL_LAUNCH_TIMEOUT "
        "(0: the gateway's --kernel-launch-timeout); the gateway reads it (kernels/env.py)",
    )

    #: {key in the recorded provisioner info: attribute}, saved by get_provisioner_info and
    #: set again by load_provisioner_info: what re-attaching to the kernel needs
    restored: ClassVar[dict[str, str]] = {}
    #: attributes saved too, for a reader of the state store; on re-attach they come from
    #: the kernelspec again
    noted: ClassVar[tuple[str, ...]] = ()
    wait_step = 0.1  # seconds between looks while the kernel manager waits for an exit

    _exit: int | None = None  # known once the kernel ended: its exit code, or -1
    _tail = ""  # its last output, read when it was found dead

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.forwards = PortForwards()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Self:
        """An instance with a kernelspec's provisioner config and nothing else (no kernel,
        no parent), for the class-level hooks (reachable) to read the config as a launch
        would, defaults included. Keys that are not the backend's options are ignored."""
        names = set(cls.class_trait_names(config=True))
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def local_ports(self) -> dict[str, int]:
        """What the gateway connects to when the kernel is reached through forwards."""
        return self.forwards.local

    @local_ports.setter
    def local_ports(self, ports: dict[str, int]) -> None:
        self.forwards.local = dict(ports)

    # -- launch --------------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Called by the kernel manager before launch_kernel: the connection info with its
        key, and no ports (the kernel binds them where it runs)."""
        km = self.parent
        kwargs.pop("extra_arguments", None)
        self.connection_info = km.get_connection_info() if km is not None else {}
        return await super().pre_launch(cmd=list(self.kernel_spec.argv), **kwargs)

    def _command(self, conn_file: str) -> list[str]:
        """kernel_cmd (or ipykernel's) with the connection file and python filled in."""
        if self.kernel_cmd and not any("{connection_file}" in a for a in self.kernel_cmd):
            raise KernelStartError(
                f"kernelspec {self.kernel_spec.display_name!r}: its kernel_cmd "
                f"{shlex.join(self.kernel_cmd)!r} has no {{connection_file}}, so the kernel "
                "could not be told its ports and key"
            )
        return [
            a.replace("{connection_file}", conn_file).replace("{python}", self.python)
            for a in list(self.kernel_cmd) or DEFAULT_CMD
        ]

    def _env(self, env: dict[str, str]) -> dict[str, str]:
        """The kernel's environment. `env` is the launch's (this process's environment with
        the kernelspec's env substituted in by jupyter_client): only the kernelspec's names
        are taken from it; the client's come from the kernel manager."""
        spec = {k: env[k] for k in (self.kernel_spec.env or {}) if k in env}
        return remote_env(self.client_env(env), spec, {str(k): str(v) for k, v in self.env.items()})

    def _connection_file(self, ports: dict[str, int], ip: str) -> dict[str, Any]:
        """The connection info as the kernel is to read it, with these ports and address."""
        info: dict[str, Any] = dict(self.connection_info)
        info.update(
            {f"{ch}_port": ports.get(ch, 0) for ch in CHANNELS},
            ip=ip,
            transport="tcp",
            key=self._key(),
        )
        return info

    def _key(self) -> str:
        key = self.connection_info.get("key", b"")
        return key.decode() if isinstance(key, bytes) else str(key)

    def _connect_to(self, ip: str, ports: dict[str, int]) -> None:
        """Point the connection info (what the gateway's sockets use) at ip:ports."""
        info: dict[str, Any] = dict(self.connection_info)
        info.update({f"{ch}_port": p for ch, p in ports.items()}, ip=ip, transport="tcp")
        self.connection_info = info  # type: ignore[assignment]

    # -- while it runs -------------------------------------------------------------------

    async def probe(self, max_age: float) -> int | None:
        """Called by poll() and wait() while the kernel is not known to have ended: None if
        it runs (or cannot be told now), else its exit code (-1: unknown), also kept in
        `_exit` with its output in `_tail`. A state read less than `max_age` s ago may
        answer (0: read it now)."""
        raise NotImplementedError

    async def poll(self) -> int | None:
        """Called by the kernel manager's is_alive() (the gateway: every 0.5 s per kernel);
        backends answer from state shared by their kernels, read at most every
        poll_interval."""
        return await self._check(self.poll_interval)

    async def wait(self) -> int | None:
        """Called during shutdown; the caller bounds it with a timeout."""
        while (status := await self._check(0)) is None:  # noqa: ASYNC110
            await asyncio.sleep(self.wait_step)
        return status

    async def _check(self, max_age: float) -> int | None:
        if not self.has_process:
            return 0
        if self._exit is None and self.forwards.moved:
            self._exit, self._tail = -1, self.forwards.moved
        if self._exit is not None:
            return self._exit
        return await self.probe(max_age)

    async def kill(self, restart: bool = False) -> None:
        """Called by the kernel manager to stop the kernel at once."""
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        """Called by the kernel manager for a graceful stop that the kernel did not make."""
        await self.send_signal(signal.SIGTERM)

    def log_tail(self) -> str:
        return self._tail

    # -- re-attach -----------------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Called when the gateway records the kernel: what a restarted gateway needs."""
        info: dict[str, Any] = await super().get_provisioner_info()
        for key, attr in self.restored.items():
            info[key] = _plain(getattr(self, attr))
        for attr in self.noted:
            info[attr] = _plain(getattr(self, attr))
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Called when a restarted gateway re-attaches to a kernel it recorded; the backend
        reconnects on first use."""
        await super().load_provisioner_info(provisioner_info)
        for key, attr in self.restored.items():
            if key in provisioner_info:
                setattr(self, attr, _plain(provisioner_info[key]))

    def _recorded_ports(self) -> dict[str, int]:
        """The ports of the recorded connection info (where the gateway connected)."""
        with contextlib.suppress(KeyError, TypeError, ValueError):
            recorded: dict[str, Any] = dict(self.connection_info)
            return {ch: int(recorded[f"{ch}_port"]) for ch in CHANNELS}
        return {}


def _plain(value: Any) -> Any:
    """A copy that is JSON: the recorded info must not share a trait's dict or list."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list | tuple):
        return list(value)
    return value
