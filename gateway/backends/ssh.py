"""Kernels on another machine over SSH (asyncssh), their five ZMQ channels tunnelled back.

Registered as `rkg-ssh` (and `ssh-provisioner`, its old name); a kernelspec chooses it with

    "metadata": {"kernel_provisioner": {"provisioner_name": "rkg-ssh", "config": {
        "host": "gpu1", "port": 22, "username": "me", "identity_file": "~/.ssh/id_ed25519",
        "known_hosts": "~/.ssh/known_hosts", "jump_hosts": ["me@bastion:22"],
        "python": "/opt/conda/bin/python", "kernel_cmd": [..., "{connection_file}"],
        "workdir": "~/work", "pre_command": "module load cuda", "env": {"A": "1"},
        "port_range": "40000-40999", "sync": true, "sync_excludes": [".git", "*.tmp"],
        "sync_max_file_mb": 100, "sync_max_total_mb": 2048, "sync_interval": 5}}}

A launch: read the host's TCP tables and ephemeral port range (/proc, one short command: no
Python needed there), choose the kernel's five ports from `port_range` (default: a range below
the ephemeral one; ports.py says why no other process can take them before the kernel binds
them), and upload the connection file with those ports over SFTP (mode 0600). Then start the
kernel detached from the SSH channel (its own session and process group, so it survives a
dropped connection) and wait, still on the host, until its five ports listen. Any kernel works
(IRkernel, IJulia, xeus-python, ipykernel): it binds the ports it is given and writes nothing
back. A kernel that exits with "Address already in use" is launched again on fresh ports.
Then one local forward per channel over the host's shared connection (sshpool.py); the
connection info points at the local ends. A reconnect re-forwards on the same local ports, so
the gateway's ZMQ sockets simply reconnect.

With `sync`, KERNEL_WORKING_DIR is mirrored to the host before each launch and the kernel starts
in the mirror; sync.py keeps both sides in step while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
from typing import TYPE_CHECKING, Any, ClassVar

from jupyter_client.connect import KernelConnectionInfo
from traitlets import Bool, Float, Integer, List, Unicode

from ..errors import BackendUnavailable, KernelError, KernelStartError, KernelTimeout
from . import ports as kports
from . import sshpool
from . import sync as fsync
from .common import CHANNELS, RemoteProvisioner
from .sshpool import ALIVE_FN, Hop, SSHHost, Target, ssh_errors

if TYPE_CHECKING:
    import asyncssh

log = logging.getLogger(__name__)

POLL_STEP = 0.05  # seconds between the launch command's looks at the kernel's ports
ATTEMPTS = 3  # launches of one start when the kernel meets "Address already in use"
# only under a plain JupyterLab that sets no timeout at all; the gateway always gives one
PLAIN_LAUNCH_TIMEOUT = 600.0
# the host's ephemeral range and TCP tables, for choosing the kernel's ports
TABLES_CMD = (
    "cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null; echo ==; "
    "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; true"
)


def shell_path(path: str) -> str:
    """A path for the remote shell, quoted, with a leading ~ meaning the remote $HOME."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def launch_script(
    *,
    cmd: list[str],
    ports: list[int],
    log_file: str,
    env: dict[str, str],
    workdir: str,
    kernel_workdir: str,
    pre_command: str,
    steps: int,
) -> str:
    """POSIX sh run over SSH: start the kernel detached, print `PID n`, then wait until its
    `ports` listen and print `READY` (or `EXITED` / `TIMEOUT`). A host without
    /proc/net/tcp is READY at once (the gateway's kernel_info handshake still waits)."""
    cd = []
    if kernel_workdir:
        cd.append(f"if [ -d {shell_path(kernel_workdir)} ]; then cd {shell_path(kernel_workdir)}")
        cd.append(f"elif [ -n {shlex.quote(workdir)} ]; then cd {shell_path(workdir)} || exit 3")
        cd.append("fi")
    elif workdir:
        cd.append(f"cd {shell_path(workdir)} || {{ echo 'NOWORKDIR'; exit 0; }}")
    lines = ["umask 077", *cd]
    if pre_command:
        lines.append(
            f"{{ {pre_command}\n}} </dev/null >>{shell_path(log_file)} 2>&1 "
            "|| { echo PREFAILED; exit 0; }"
        )
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    argv = " ".join(shlex.quote(a) for a in cmd)
    hexes = " ".join(f"{p:04X}" for p in ports)
    lines += [
        ALIVE_FN,
        "listening() {",
        "  [ -r /proc/net/tcp ] || return 0",
        f"  for p in {hexes}; do",
        '    grep -Eq "^ *[0-9]+: [0-9A-F]+:$p [0-9A-F]+:[0-9A-F]+ 0A " '
        "/proc/net/tcp /proc/net/tcp6 2>/dev/null || return 1",
        "  done",
        "}",
        # the subshell exits at once, so the kernel is not our child (no zombie to reap) and
        # not a process group leader, so setsid gives it its own session without forking
        f"pid=$( (setsid {argv} </dev/null >>{shell_path(log_file)} 2>&1 & echo $!) )",
        'echo "PID $pid"',
        "i=0",
        f"while [ $i -lt {steps} ]; do",
        "  if listening; then echo READY; exit 0; fi",
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


def no_host_launched(failed: list[tuple[str, KernelError]]) -> KernelError:
    """The error of a start that every host failed, each host's reason in it: a 503 when
    none could be reached, else a start error."""
    reasons = "; ".join(f"{host}: {e.message}" for host, e in failed)
    message = f"the kernel could not start on any of its {len(failed)} hosts: {reasons}"
    if all(isinstance(e, BackendUnavailable) for _, e in failed):
        return BackendUnavailable(message)
    return KernelStartError(message)


class SSHProvisioner(RemoteProvisioner):
    """Registered as `rkg-ssh`: a kernel started over SSH, detached from the connection."""

    backend = "ssh"

    host = Unicode("", config=True, help="[user@]host[:port] of the remote machine")
    hosts = List(
        Unicode(),
        config=True,
        help="[user@]host[:port] of each machine to try, in order (failover); default: host",
    )
    port = Integer(22, config=True)
    username = Unicode("", config=True)
    identity_file = Unicode("", config=True, help="private key; default: ssh-agent, ~/.ssh")
    known_hosts = Unicode("~/.ssh/known_hosts", config=True)
    password_command = Unicode(
        "", config=True, help="run here; its output is the host's password or one-time code"
    )
    password_file = Unicode("", config=True, help="a 0600 file holding the host's password")
    jump_hosts = List(Unicode(), config=True, help="[user@]host[:port] hops, like ssh -J")
    workdir = Unicode("", config=True)
    pre_command = Unicode("", config=True, help="shell run first: module load, conda activate")
    runtime_dir = Unicode(
        ".local/share/jupyter/runtime",
        config=True,
        help="remote directory of connection files (relative: to $HOME)",
    )
    connect_timeout = Float(5.0, config=True, help="seconds one host (hop) has to answer")
    keepalive_interval = Float(5.0, config=True)
    reconnect_timeout = Float(30.0, config=True, help="give a dropped host up after this")
    poll_interval = Float(1.0, config=True, help="seconds between liveness probes")
    sync = Bool(
        False,
        config=True,
        help="mirror KERNEL_WORKING_DIR to <workdir>/rkg-sync/... on the host, start the "
        "kernel there, and keep both in sync while it runs (sync.py)",
    )
    sync_excludes = List(
        Unicode(),
        default_value=list(fsync.DEFAULT_EXCLUDES),
        config=True,
        help="names (or relative paths, with '/') never synced; fnmatch patterns",
    )
    sync_max_file_mb = Float(fsync.MAX_FILE_MB[0], config=True, help="larger files stay put")
    sync_max_total_mb = Float(
        fsync.MAX_TOTAL_MB[0], config=True, help="a larger folder is not synced"
    )
    sync_interval = Float(
        fsync.INTERVAL[0], config=True, help="seconds between passes while the kernel runs"
    )

    restored: ClassVar[dict[str, str]] = {
        "pid": "pid",
        "pgid": "pgid",
        "remote_ports": "remote_ports",
        "local_ports": "local_ports",
        "remote_connection_file": "remote_file",
        "host": "host",  # the one of `hosts` the kernel runs on: re-attach goes there
        "sync_local": "sync_local",  # the synced pair, when `sync`: re-attach resumes it
        "sync_remote": "sync_remote",
    }
    noted = ("port", "username", "jump_hosts")

    pid: int | None = None
    pgid: int | None = None
    remote_ports: dict[str, int]
    remote_file = ""
    sync_local = ""
    sync_remote = ""
    _ssh: SSHHost | None = None
    _mirror: fsync.Mirror | None = None
    _urgent = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.remote_ports = {}

    # -- configuration -------------------------------------------------------------------

    def target(self) -> Target:
        if not self.host:
            raise KernelStartError(
                f"kernelspec {self.kernel_spec.display_name!r} uses the "
                "rkg-ssh provisioner but its config names no host"
            )
        hop = Hop.parse(self.host, self.port, self.username or None)
        jumps = tuple(Hop.parse(j, 22, hop.username) for j in self.jump_hosts)
        return Target(
            hop,
            jumps,
            self.identity_file or None,
            self.known_hosts,
            self.connect_timeout,
            self.keepalive_interval,
            reconnect_timeout=self.reconnect_timeout,
            password_command=self.password_command,
            password_file=self.password_file,
        )

    @property
    def has_process(self) -> bool:
        return self.pid is not None

    @classmethod
    async def reachable(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        """Each host (of `hosts`, else `host`) and its jump hosts (`user@host:port`),
        answering or not: the shared connection when it is up, else one made for the check
        and closed."""
        hosts = list(config.get("hosts") or []) or [config.get("host")]
        if not all(hosts):
            return [("ssh", "the kernelspec names no host")]
        checks = [sshpool.reachable(cls.from_config({**config, "host": h}).target()) for h in hosts]
        return [(str(hop), why) for hops in await asyncio.gather(*checks) for hop, why in hops]

    # -- launch --------------------------------------------------------------------------

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by the kernel manager (start and restart). `cmd` is the spec's local argv,
        unused: the remote command comes from kernel_cmd / python. A start tries `hosts` in
        order and stays on the first that answers and launches; a restart stays on the
        kernel's host unless its connection is lost for good."""
        self._exit, self._tail, self._urgent = None, "", False
        env = kwargs.get("env") or {}
        if self._ssh is not None and self._ssh.lost:
            log.warning(
                "kernel %s: %s; restarting it on the first host that answers",
                self.kernel_id,
                self._ssh.lost,
            )
            sshpool.release(self._ssh)
            self._ssh = None
        if self._ssh is not None:
            await self._launch_on_host(env)
            return self.connection_info
        candidates = list(self.hosts) or [self.host]
        failed: list[tuple[str, KernelError]] = []
        for host in candidates:
            self.host = host
            try:
                await self._launch_on_host(env)
                return self.connection_info
            except KernelError as e:
                if len(candidates) == 1:
                    raise
                failed.append((host, e))
                log.warning("kernel %s: host %s failed: %s", self.kernel_id, host, e.message)
        raise no_host_launched(failed)

    async def _launch_on_host(self, env: dict[str, str]) -> None:
        """Connect to `host` unless connected, and launch the kernel there; on failure
        nothing of it is left there and the lease is given back."""
        if self._ssh is None:
            target = self.target()
            if not sshpool.live(target):
                self.stage(f"connecting to {sshpool.route(target)}")
            self._ssh = await sshpool.acquire(target)
        try:
            with ssh_errors(self._ssh.target, f"starting the kernel on {self._ssh.name}"):
                await self._sync_first(env)
                await self._launch(env)
            await self._forward()
            if self._mirror is not None:
                self._mirror.start()
        except BaseException as e:
            # nothing left behind, whoever calls next (a failed restart gets no cleanup call)
            await asyncio.shield(self._end_sync(final=False))
            await asyncio.shield(self._abort(restart=False))
            if isinstance(e, KernelError) or not isinstance(e, Exception):
                raise
            raise KernelStartError(
                f"starting the kernel on {self._ssh_name}: {type(e).__name__}: {e}"
            ) from e

    def location(self) -> str:
        """GatewayHooks.location: `user@host:port` of the SSH host."""
        return self._ssh_name

    @property
    def _ssh_name(self) -> str:
        return self._ssh.name if self._ssh else self.host

    async def _launch(self, env: dict[str, str]) -> None:
        import asyncssh

        assert self._ssh is not None
        self.stage(f"uploading the connection file to {self._ssh_name}")
        sftp = await self._ssh.sftp()
        # made 0700 (an existing one is left as it is: connection files are 0600 anyway)
        private = asyncssh.SFTPAttrs(permissions=0o700)
        await sftp.makedirs(self.runtime_dir, private, exist_ok=True)
        self.remote_file = await sftp.realpath(f"{self.runtime_dir}/kernel-{self.kernel_id}.json")
        timeout = self.gateway_timeout(env, PLAIN_LAUNCH_TIMEOUT)
        cmd = self._command(self.remote_file)
        for attempt in range(1, ATTEMPTS + 1):
            await self._choose_ports()
            await self._upload(sftp)
            first = await self._start(env, cmd, timeout)
            if first == "READY":
                return
            if first == "TIMEOUT":
                raise KernelTimeout(
                    f"the kernel on {self._ssh_name} did not listen on its ports within "
                    f"{timeout:g} s ({self.timeout_source()})"
                )
            tail = await self._read_tail()
            if first == "PREFAILED":
                raise KernelStartError(
                    f"the pre_command {self.pre_command!r} failed on {self._ssh_name}: {tail}"
                )
            if first == "NOWORKDIR":
                raise KernelStartError(f"cannot cd to {self.workdir!r} on {self._ssh_name}")
            if attempt == ATTEMPTS or not kports.address_in_use(tail):
                raise KernelStartError(explain_exit(tail, cmd, self._ssh_name))
            log.warning(
                "kernel %s on %s: a port was taken (%s); launching it again on other ports",
                self.kernel_id,
                self._ssh_name,
                sorted(self.remote_ports.values()),
            )
            self._release_ports()

    async def _choose_ports(self) -> None:
        """Five free ports on the host from port_range (module docstring of ports.py),
        reserved for this kernel until it ends."""
        assert self._ssh is not None
        try:
            span = kports.parse_range(self.port_range)
        except ValueError as e:
            raise KernelStartError(f"kernelspec {self.kernel_spec.display_name!r}: {e}") from e
        result = await self._ssh.exec(
            TABLES_CMD, what=f"reading the open ports of {self._ssh_name}", limit=15
        )
        ephemeral, _, tables = str(result.stdout or "").partition("==")
        host = self._ssh_name
        avoid = kports.used_ports(tables) | kports.RESERVED.of(host)
        try:
            span = span or kports.default_range(kports.parse_ephemeral(ephemeral))
            chosen = kports.choose(len(CHANNELS), span, avoid)
        except ValueError as e:
            raise KernelStartError(f"no ports for the kernel on {host}: {e}") from e
        kports.RESERVED.take(host, chosen)
        self.remote_ports = dict(zip(CHANNELS, chosen, strict=True))

    def _release_ports(self) -> None:
        kports.RESERVED.give_back(self._ssh_name, list(self.remote_ports.values()))

    async def _start(self, env: dict[str, str], cmd: list[str], seconds: float) -> str:
        """Run the launch script; its verdict (READY, EXITED, TIMEOUT, ...)."""
        assert self._ssh is not None
        workdir, kernel_workdir = self.workdir, env.get("KERNEL_WORKING_DIR", "")
        if self.sync_remote:  # the mirror of KERNEL_WORKING_DIR, there since the first pass
            workdir, kernel_workdir = self.sync_remote, ""
        script = launch_script(
            cmd=cmd,
            ports=list(self.remote_ports.values()),
            log_file=self._log_file,
            env=self._env(env),
            workdir=workdir,
            kernel_workdir=kernel_workdir,
            pre_command=self.pre_command,
            steps=int(seconds / POLL_STEP) + 1,
        )
        conn = await self._ssh.connection()
        # the script runs the pre_command, then starts the kernel and prints its pid
        self.stage(f"launching the kernel on {self._ssh_name}")
        async with self._ssh.sessions:
            proc = await conn.create_process(script)
            try:
                first = (await proc.stdout.readline()).strip()
                if first.startswith("PID "):
                    self.pid = self.pgid = int(first.split()[1])
                    self.stage(f"waiting for the kernel's ports on {self._ssh_name}")
                    first = (await proc.stdout.readline()).strip()
            finally:
                # not `async with proc`: its exit waits for the script, which a cancelled
                # start (attempt timeout, delete) would leave polling until the kernel is
                # killed, and that happens after this returns (_abort)
                proc.close()
        return str(first)

    @property
    def _log_file(self) -> str:
        return self.remote_file[: -len(".json")] + ".log"

    async def _upload(self, sftp: asyncssh.SFTPClient) -> None:
        """The connection file with the chosen ports, mode 0600 from its creation."""
        import asyncssh

        info = self._connection_file(self.remote_ports, "127.0.0.1")
        info["kernel_name"] = self.kernel_spec.name if hasattr(self.kernel_spec, "name") else ""
        attrs = asyncssh.SFTPAttrs(permissions=0o600)
        async with sftp.open(self.remote_file, "w", attrs) as f:
            await f.write(json.dumps(info, indent=2))
        await sftp.chmod(self.remote_file, 0o600)  # in case it existed (restart)

    async def _read_tail(self, size: int = 4096) -> str:
        assert self._ssh is not None
        self._tail = (
            await self._ssh.run(f"tail -c {size} {shell_path(self._log_file)}", limit=10)
        ).strip()
        return "\n".join(self._tail.splitlines()[-15:])

    async def _forward(self) -> None:
        """One local listener per channel, on the same local ports as before when there
        were any (so connected ZMQ sockets reconnect by themselves); the host's liveness
        probe covers the kernel from now on."""
        assert self._ssh is not None
        self.stage(f"forwarding the kernel's ports from {self._ssh_name}")
        ports = await self.forwards.open(self._ssh, "127.0.0.1", self.remote_ports, pid=self.pid)
        self._connect_to("127.0.0.1", ports)

    # -- files in sync ------------------------------------------------------------------

    def _sync_options(self) -> fsync.Options:
        try:
            return fsync.options(
                self.sync_excludes,
                self.sync_max_file_mb,
                self.sync_max_total_mb,
                self.sync_interval,
            )
        except fsync.OutOfRange as e:
            name, wrong = e.args
            raise KernelStartError(
                f"kernelspec {self.kernel_spec.display_name!r}: its {name} {wrong}"
            ) from None

    async def _sync_first(self, env: dict[str, str]) -> None:
        """With `sync`, before each launch: one pass between KERNEL_WORKING_DIR (checked by
        the gateway: a directory under --working-dir-root) and its mirror on the host, where
        the kernel then starts. No KERNEL_WORKING_DIR here, no sync."""
        if not self.sync:
            return
        assert self._ssh is not None
        if self._mirror is None:
            local = self.client_env(env).get("KERNEL_WORKING_DIR", "")
            if not local or not await asyncio.to_thread(os.path.isdir, local):
                log.info(
                    "kernel %s: no KERNEL_WORKING_DIR on this machine, so no files to sync",
                    self.kernel_id,
                )
                self.sync_local = self.sync_remote = ""
                return
            options = self._sync_options()
            sftp = await self._ssh.sftp()
            folder = fsync.remote_folder(local, self.workdir)
            await sftp.makedirs(folder, exist_ok=True)
            self.sync_local, self.sync_remote = local, await sftp.realpath(folder)
            self._mirror = fsync.acquire(self._ssh, local, self.sync_remote, options)
        self.stage(f"syncing {self.sync_local} to {self._ssh_name}")
        await self._mirror.sync(first=True, report=self.stage)

    async def _end_sync(self, *, final: bool) -> None:
        mirror, self._mirror = self._mirror, None
        if mirror is not None:
            await fsync.release(mirror, final=final)

    # -- while it runs -------------------------------------------------------------------

    async def _attach(self) -> SSHHost | None:
        """After load_provisioner_info: take a lease, forward the recorded ports and resume
        the kernel's sync."""
        if self._ssh is None and self.pid is not None:
            self._ssh = await sshpool.acquire(self.target())
            await self._forward()
            if self.sync and self.sync_local and self._mirror is None:
                mirror = fsync.acquire(
                    self._ssh, self.sync_local, self.sync_remote, self._sync_options()
                )
                self._mirror = mirror
                mirror.start()
        return self._ssh

    async def probe(self, max_age: float) -> int | None:
        """Probes are batched per host; during a reconnect the kernel counts as running."""
        assert self.pid is not None
        try:
            ssh = await self._attach()
        except KernelError as e:
            self._tail, self._exit = e.message, -1
            return -1
        assert ssh is not None
        if ssh.lost:
            self._tail, self._exit = ssh.lost, -1
            return -1
        alive = await ssh.alive(self.pid, 0 if self._urgent else max_age)
        if alive is False:
            self._exit = -1
            await self._read_tail()
            return -1
        return None

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

    # -- stop ----------------------------------------------------------------------------

    async def cleanup(self, restart: bool = False) -> None:
        """Called by the kernel manager once the kernel stopped: nothing of it is left on the
        host (its process group is killed, its files removed unless restarting); the lease
        on the connection ends unless restarting. With `sync`, the kernel's last files come
        back first (a restart keeps syncing, from its next launch)."""
        if restart and self._mirror is not None:
            with contextlib.suppress(Exception):
                await self._mirror.sync()
        elif not restart:
            await self._end_sync(final=True)
        await self._abort(restart=restart)

    async def _abort(self, *, restart: bool) -> None:
        ssh = self._ssh
        self.forwards.close()
        self._release_ports()
        if ssh is not None:
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

    # -- re-attach -----------------------------------------------------------------------

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Called when a restarted gateway re-attaches; the connection opens on first use,
        forwarding from the local ports of the recorded connection info."""
        await super().load_provisioner_info(provisioner_info)
        self.local_ports = self._recorded_ports() or self.local_ports
