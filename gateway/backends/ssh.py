"""Kernels on another machine over SSH (asyncssh), their five ZMQ channels tunnelled back.

Registered as `ssh-provisioner`; a kernelspec chooses it with

    "metadata": {"kernel_provisioner": {"provisioner_name": "ssh-provisioner", "config": {
        "host": "gpu1", "port": 22, "username": "me", "identity_file": "~/.ssh/id_ed25519",
        "known_hosts": "~/.ssh/known_hosts", "jump_hosts": ["me@bastion:22"],
        "python": "/opt/conda/bin/python", "kernel_cmd": [..., "{connection_file}"],
        "workdir": "~/work", "pre_command": "module load cuda", "env": {"A": "1"}}}}

A launch: upload the connection file over SFTP (mode 0600) with every port 0; start the kernel
detached from the SSH channel (its own session and process group, so it survives a dropped
connection); ipykernel binds free ports and rewrites the file, and the launch command, still on
the host, sends that file back. No port is chosen before the kernel binds it, so no race. Then
one local forward per channel over the host's shared connection (sshpool.py); the connection
info points at the local ends. A reconnect re-forwards on the same local ports, so the
gateway's ZMQ sockets simply reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
from typing import TYPE_CHECKING, Any, cast

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Dict, Float, Integer, List, Unicode

from ..errors import KernelError, KernelStartError, KernelTimeout
from . import sshpool
from .sshpool import ALIVE_FN, Hop, SSHHost, Target

if TYPE_CHECKING:
    import asyncssh

log = logging.getLogger(__name__)

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
DEFAULT_CMD = ["{python}", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
POLL_STEP = 0.05  # seconds between the launch command's looks at the connection file
# never sent to the remote kernel: they describe this machine, not that one
_LOCAL_ONLY = frozenset({"JPY_PARENT_PID", "PATH", "HOME", "PWD", "SHELL", "USER", "LOGNAME"})


def shell_path(path: str) -> str:
    """A path for the remote shell, quoted, with a leading ~ meaning the remote $HOME."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def remote_env(env: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """What reaches the remote kernel: KERNEL_* and what the kernelspec or the client set
    (entries that differ from this process's own environment), plus the config's env."""
    out = {k: v for k, v in env.items()
           if k not in _LOCAL_ONLY and (k.startswith("KERNEL_") or os.environ.get(k) != v)}
    out.update(extra)
    return {k: v for k, v in out.items() if k.isidentifier()}


def launch_script(*, cmd: list[str], conn_file: str, log_file: str, env: dict[str, str],
                  workdir: str, kernel_workdir: str, pre_command: str, steps: int) -> str:
    """POSIX sh run over SSH: start the kernel detached, print `PID n`, then wait for the
    rewritten connection file and print `READY` and the file (or `EXITED` / `TIMEOUT`)."""
    cd = []
    if kernel_workdir:
        cd.append(f"if [ -d {shell_path(kernel_workdir)} ]; then cd {shell_path(kernel_workdir)}")
        cd.append(f"elif [ -n {shlex.quote(workdir)} ]; then cd {shell_path(workdir)} || exit 3")
        cd.append("fi")
    elif workdir:
        cd.append(f"cd {shell_path(workdir)} || {{ echo 'NOWORKDIR'; exit 0; }}")
    lines = ["umask 077", *cd]
    if pre_command:
        lines.append(f"{{ {pre_command}\n}} </dev/null >>{shell_path(log_file)} 2>&1 "
                     "|| { echo PREFAILED; exit 0; }")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    argv = " ".join(shlex.quote(a) for a in cmd)
    cf = shell_path(conn_file)
    lines += [
        ALIVE_FN,
        # the subshell exits at once, so the kernel is not our child (no zombie to reap) and
        # not a process group leader, so setsid gives it its own session without forking
        f"pid=$( (setsid {argv} </dev/null >>{shell_path(log_file)} 2>&1 & echo $!) )",
        'echo "PID $pid"',
        "i=0",
        f"while [ $i -lt {steps} ]; do",
        f"  if grep -Eq '\"shell_port\": *[1-9]' {cf}; then echo READY; cat {cf}; exit 0; fi",
        '  alive "$pid" || { echo EXITED; exit 0; }',
        f"  sleep {POLL_STEP}; i=$((i+1))",
        "done",
        "echo TIMEOUT",
    ]
    return "\n".join(lines) + "\n"


def explain_exit(tail: str, cmd: list[str], host: str) -> str:
    """Why a kernel command exited at once, in words the user can act on."""
    prog = cmd[0] if cmd else "?"
    if "No module named" in tail and "ipykernel" in tail:
        what = f"ipykernel is not installed for {prog} on {host} (pip install ipykernel there)"
    elif "not found" in tail or "No such file" in tail:
        what = f"{prog} was not found on {host} (set python / kernel_cmd in the kernelspec)"
    else:
        what = f"the kernel command exited at once on {host}"
    return what + (f"; its output:\n{tail}" if tail else "")


class SSHProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Registered as `ssh-provisioner`. Called by jupyter_client's KernelManager: pre_launch
    and launch_kernel to start, poll/wait/send_signal/kill/terminate while it runs, cleanup
    after it stopped (restart=True between the two launches of a restart)."""

    host = Unicode("", config=True, help="[user@]host[:port] of the remote machine")
    port = Integer(22, config=True)
    username = Unicode("", config=True)
    identity_file = Unicode("", config=True, help="private key; default: ssh-agent, ~/.ssh")
    known_hosts = Unicode("~/.ssh/known_hosts", config=True)
    jump_hosts = List(Unicode(), config=True, help="[user@]host[:port] hops, like ssh -J")
    python = Unicode("python3", config=True)
    kernel_cmd = List(Unicode(), config=True, help="remote command with {connection_file}")
    workdir = Unicode("", config=True)
    pre_command = Unicode("", config=True, help="shell run first: module load, conda activate")
    env = Dict(config=True)
    runtime_dir = Unicode(".local/share/jupyter/runtime", config=True,
                          help="remote directory of connection files (relative: to $HOME)")
    connect_timeout = Float(10.0, config=True)
    keepalive_interval = Float(5.0, config=True)
    reconnect_timeout = Float(30.0, config=True, help="give a dropped host up after this")
    poll_interval = Float(1.0, config=True, help="seconds between liveness probes")

    pid: int | None = None
    pgid: int | None = None
    remote_ports: dict[str, int]
    local_ports: dict[str, int]
    remote_file = ""
    _ssh: SSHHost | None = None
    _attached = False
    _exit: int | None = None
    _tail = ""
    _urgent = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.remote_ports, self.local_ports = {}, {}
        self._listeners: list[Any] = []

    # -- configuration -------------------------------------------------------------------

    def target(self) -> Target:
        if not self.host:
            raise KernelStartError(f"kernelspec {self.kernel_spec.display_name!r} uses the "
                                   "ssh-provisioner but its config names no host")
        hop = Hop.parse(self.host, self.port, self.username or None)
        jumps = tuple(Hop.parse(j, 22, hop.username) for j in self.jump_hosts)
        return Target(hop, jumps, self.identity_file or None, self.known_hosts,
                      self.connect_timeout, self.keepalive_interval,
                      reconnect_timeout=self.reconnect_timeout)

    def _command(self, conn_file: str) -> list[str]:
        cmd = list(self.kernel_cmd) or DEFAULT_CMD
        return [a.replace("{connection_file}", conn_file).replace("{python}", self.python)
                for a in cmd]

    @property
    def has_process(self) -> bool:
        return self.pid is not None

    # -- launch --------------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Called by the kernel manager before launch_kernel: connection info without ports
        (the remote kernel picks them)."""
        km = self.parent
        kwargs.pop("extra_arguments", None)
        self.connection_info = km.get_connection_info() if km is not None else {}
        return await super().pre_launch(cmd=list(self.kernel_spec.argv), **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by the kernel manager (start and restart). `cmd` is the spec's local argv,
        unused: the remote command comes from kernel_cmd / python."""
        self._exit, self._tail, self._urgent = None, "", False
        if self._ssh is None:
            self._ssh = await sshpool.acquire(self.target())
        try:
            await self._launch(kwargs.get("env") or {})
            await self._forward(await self._ssh.connection())
        except BaseException as e:
            # nothing left behind, whoever calls next (a failed restart gets no cleanup call)
            await asyncio.shield(self._abort(restart=False))
            if isinstance(e, KernelError) or not isinstance(e, Exception):
                raise
            raise KernelStartError(f"starting the kernel on {self._ssh_name}: "
                                   f"{type(e).__name__}: {e}") from e
        self._attached = True
        self._ssh.watch(self)
        return self.connection_info

    @property
    def _ssh_name(self) -> str:
        return self._ssh.name if self._ssh else self.host

    async def _launch(self, env: dict[str, str]) -> None:
        assert self._ssh is not None
        sftp = await self._ssh.sftp()
        await sftp.makedirs(self.runtime_dir, exist_ok=True)
        self.remote_file = await sftp.realpath(f"{self.runtime_dir}/kernel-{self.kernel_id}.json")
        await self._upload(sftp)
        timeout = float(env.get("KERNEL_LAUNCH_TIMEOUT") or 60)
        cmd = self._command(self.remote_file)
        script = launch_script(
            cmd=cmd, conn_file=self.remote_file, log_file=self._log_file,
            env=remote_env(env, {k: str(v) for k, v in self.env.items()}),
            workdir=self.workdir, kernel_workdir=env.get("KERNEL_WORKING_DIR", ""),
            pre_command=self.pre_command, steps=int(timeout / POLL_STEP) + 1)
        conn = await self._ssh.connection()
        async with self._ssh.sessions, await conn.create_process(script) as proc:
            first = (await proc.stdout.readline()).strip()
            if first.startswith("PID "):
                self.pid = self.pgid = int(first.split()[1])
                first = (await proc.stdout.readline()).strip()
            rest = await proc.stdout.read()
        if first == "READY":
            ports = await self._ports(rest, sftp)
            self.remote_ports = {ch: int(ports[f"{ch}_port"]) for ch in CHANNELS}
            return
        if first == "TIMEOUT":
            raise KernelTimeout(f"the kernel on {self._ssh_name} did not bind its ports within "
                                f"{timeout:g} s (KERNEL_LAUNCH_TIMEOUT)")
        tail = await self._read_tail()
        if first == "PREFAILED":
            raise KernelStartError(f"the pre_command {self.pre_command!r} failed on "
                                   f"{self._ssh_name}: {tail}")
        if first == "NOWORKDIR":
            raise KernelStartError(f"cannot cd to {self.workdir!r} on {self._ssh_name}")
        raise KernelStartError(explain_exit(tail, cmd, self._ssh_name))

    async def _ports(self, text: str, sftp: asyncssh.SFTPClient) -> dict[str, Any]:
        """The rewritten connection file; read again if we caught it half written."""
        for _ in range(20):
            with contextlib.suppress(ValueError):
                info: dict[str, Any] = json.loads(text)
                if all(info.get(f"{ch}_port") for ch in CHANNELS):
                    return info
            await asyncio.sleep(POLL_STEP)
            async with sftp.open(self.remote_file) as f:
                text = await f.read()
        raise KernelStartError(f"the kernel on {self._ssh_name} wrote an unreadable "
                               f"connection file {self.remote_file}")

    @property
    def _log_file(self) -> str:
        return self.remote_file[:-len(".json")] + ".log"

    async def _upload(self, sftp: asyncssh.SFTPClient) -> None:
        """The connection file, mode 0600 from its creation, every port 0."""
        import asyncssh

        info = dict(self.connection_info)
        info.update({f"{ch}_port": 0 for ch in CHANNELS}, ip="127.0.0.1", transport="tcp")
        key = info.get("key", b"")
        info["key"] = key.decode() if isinstance(key, bytes) else key
        info["kernel_name"] = self.kernel_spec.name if hasattr(self.kernel_spec, "name") else ""
        attrs = asyncssh.SFTPAttrs(permissions=0o600)
        async with sftp.open(self.remote_file, "w", attrs) as f:
            await f.write(json.dumps(info, indent=2))
        await sftp.chmod(self.remote_file, 0o600)  # in case it existed (restart)

    async def _read_tail(self, size: int = 4096) -> str:
        assert self._ssh is not None
        self._tail = (await self._ssh.run(f"tail -c {size} {shell_path(self._log_file)}",
                                          limit=10)).strip()
        return "\n".join(self._tail.splitlines()[-15:])

    async def _forward(self, conn: asyncssh.SSHClientConnection) -> None:
        """One local listener per channel, on the same local ports as before when there
        were any (so connected ZMQ sockets reconnect by themselves)."""
        self._close_listeners()
        for ch in CHANNELS:
            want = self.local_ports.get(ch, 0)
            try:
                listener = await conn.forward_local_port("127.0.0.1", want, "127.0.0.1",
                                                         self.remote_ports[ch])
            except OSError:
                if not want:
                    raise
                log.warning("local port %d of kernel %s was taken; using a new one", want,
                            self.kernel_id)
                listener = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1",
                                                         self.remote_ports[ch])
            self._listeners.append(listener)
            self.local_ports[ch] = listener.get_port()
        info: dict[str, Any] = dict(self.connection_info)
        info.update({f"{ch}_port": p for ch, p in self.local_ports.items()},
                    ip="127.0.0.1", transport="tcp")
        self.connection_info = cast(KernelConnectionInfo, info)

    async def reforward(self, conn: asyncssh.SSHClientConnection) -> None:
        """Called by the shared connection after it reconnected."""
        before = dict(self.local_ports)
        await self._forward(conn)
        if self.local_ports != before:
            self._exit = -1
            self._tail = (f"the SSH connection to {self._ssh_name} was re-established but the "
                          "kernel's local ports were taken meanwhile")

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners = []

    # -- while it runs -------------------------------------------------------------------

    async def _attach(self) -> SSHHost | None:
        """After load_provisioner_info: take a lease and forward the recorded ports."""
        if self._ssh is None and self.pid is not None:
            self._ssh = await sshpool.acquire(self.target())
            await self._forward(await self._ssh.connection())
            self._attached = True
            self._ssh.watch(self)
        return self._ssh

    async def poll(self) -> int | None:
        """Called by the kernel manager's is_alive() (the gateway: every 0.5 s per kernel).
        Probes are batched per host and reused for poll_interval; during a reconnect the
        kernel counts as running."""
        if self.pid is None:
            return 0
        if self._exit is not None:
            return self._exit
        try:
            ssh = await self._attach()
        except KernelError as e:
            self._tail = e.message
            self._exit = -1
            return -1
        assert ssh is not None
        if ssh.lost:
            self._tail, self._exit = ssh.lost, -1
            return -1
        alive = await ssh.alive(self.pid, 0 if self._urgent else self.poll_interval)
        if alive is False:
            self._exit = -1
            await self._read_tail()
            return -1
        return None

    async def wait(self) -> int | None:
        """Called during shutdown; the caller bounds it with a timeout."""
        self._urgent = True
        while (status := await self.poll()) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        return status

    async def send_signal(self, signum: int) -> None:
        """To the kernel's whole process group on the host (interrupt: SIGINT)."""
        if self.pgid is None:
            return
        ssh = await self._attach()
        if ssh is None or ssh.lost:
            return
        self._urgent = True
        name = signal.Signals(signum).name.removeprefix("SIG")
        await ssh.run(f"kill -s {name} -- -{self.pgid} 2>/dev/null || kill -s {name} {self.pid}")

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    def log_tail(self) -> str:
        """The kernel's last output (read when it was found dead), for error messages."""
        return self._tail

    # -- stop ----------------------------------------------------------------------------

    async def cleanup(self, restart: bool = False) -> None:
        """Called by the kernel manager once the kernel stopped: nothing of it is left on the
        host (its process group is killed, its files removed unless restarting); the lease
        on the connection ends unless restarting."""
        await self._abort(restart=restart)

    async def _abort(self, *, restart: bool) -> None:
        ssh = self._ssh
        self._close_listeners()
        if ssh is not None:
            ssh.unwatch(self)
            steps = []
            if self.pgid is not None:
                steps.append(f"kill -s KILL -- -{self.pgid} 2>/dev/null")
            if self.remote_file and not restart:
                steps.append(f"rm -f {shell_path(self.remote_file)} {shell_path(self._log_file)}")
            if steps and not ssh.lost:
                await ssh.run("; ".join(steps) + "; true", limit=10)
            if not restart:
                sshpool.release(ssh)
                self._ssh = None
        self.pid = self.pgid = None
        if not restart:
            self._attached = False

    # -- re-attach -----------------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Called when the gateway records the kernel: what a restarted gateway needs."""
        info: dict[str, Any] = await super().get_provisioner_info()
        info.update(host=self.host, port=self.port, username=self.username,
                    jump_hosts=list(self.jump_hosts), pid=self.pid, pgid=self.pgid,
                    remote_ports=self.remote_ports, local_ports=self.local_ports,
                    remote_connection_file=self.remote_file)
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Called when a restarted gateway re-attaches; the connection opens on first use."""
        await super().load_provisioner_info(provisioner_info)
        self.pid = provisioner_info.get("pid")
        self.pgid = provisioner_info.get("pgid")
        self.remote_ports = dict(provisioner_info.get("remote_ports") or {})
        self.local_ports = dict(provisioner_info.get("local_ports") or {})
        self.remote_file = provisioner_info.get("remote_connection_file", "")
        with contextlib.suppress(Exception):
            recorded: dict[str, Any] = dict(self.connection_info)
            self.local_ports = {ch: int(recorded[f"{ch}_port"]) for ch in CHANNELS}
