"""Kernels in Docker containers, one container per kernel, through aiodocker.

Registered as `rkg-docker` (and `docker-provisioner`, its old name); a kernelspec chooses it
with

    "metadata": {"kernel_provisioner": {"provisioner_name": "rkg-docker", "config": {
        "image": "my/kernel:1", "docker_host": "unix:///var/run/docker.sock",
        "network": "", "reach": "published", "volumes": ["/data:/data:ro"],
        "mirror_working_dir": false, "working_dir_mode": "ro", "workdir": "", "env": {"A": "1"},
        "uid": 1000, "gid": 100, "uid_range": "1000-65533", "gid_range": "1000-65533",
        "prohibited_uids": [0], "prohibited_gids": [0],
        "cpus": 2, "memory": "4g", "pids_limit": 512, "gpus": "all",
        "labels": {"team": "ml"}, "python": "python3", "kernel_cmd": []}}}

A launch: the connection info goes in as an environment variable that a tiny boot step (run
by the image's python) writes to a private file before exec'ing the kernel; the ports are fixed
inside the container's own network namespace, so nothing else can take them, and the engine
publishes them on 127.0.0.1 with host ports it picks and binds itself, so there is no race
between choosing and binding a port (reach "published"). With reach "network" the gateway
connects to the container's address on `network` instead (a gateway in a container on the
same network).

What a client chooses is checked before anything is created: KERNEL_UID / KERNEL_GID must be
whole numbers in `uid_range` / `gid_range` (or the spec's own `uid` / `gid`) and not in
`prohibited_uids` / `prohibited_gids` (else a 403); KERNEL_WORKING_DIR reaches a backend only
once the gateway has checked it (kernels/env.py), and is mounted as a structured bind, read-only
unless `working_dir_mode` is "rw". Containers are named after KERNEL_USERNAME and the kernel
id and labelled app=remote-kernel-gateway, component=kernel, kernel_id=<id>; a gateway start
removes the ones no kernel of its own owns (reap_orphans).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
from collections.abc import Container
from typing import Any, ClassVar, cast

from jupyter_client.connect import KernelConnectionInfo
from traitlets import Bool, Dict, Float, Integer, List, Unicode

from ..errors import EngineError, Forbidden, KernelError, KernelStartError
from . import dockerengine
from .common import CHANNELS, RemoteProvisioner
from .dockerengine import APP, LABEL_APP, LABEL_GATEWAY, LABEL_KERNEL, Engine

log = logging.getLogger(__name__)

# inside the container's own network namespace: nothing else binds there
CONTAINER_PORTS = dict(zip(CHANNELS, range(52700, 52705), strict=True))
# Writes the connection file (mode 0600) from the environment, then becomes the kernel.
BOOT = (
    "import os,sys\n"
    "p=os.environ.pop('RKG_CONNECTION_FILE');i=os.environ.pop('RKG_CONNECTION_INFO')\n"
    "f=os.open(p,os.O_WRONLY|os.O_CREAT|os.O_TRUNC,0o600);os.write(f,i.encode());os.close(f)\n"
    "os.execvp(sys.argv[1],sys.argv[1:])\n"
)
_DIGITS = re.compile(r"[0-9]+")
DEFAULT_ID_RANGE = "1000-65533"  # no system account (below 1000), nor nobody (65534)
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]+")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512m', '4g', '1.5GiB', '1048576' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise KernelStartError(f"memory {text!r} is not a size like 512m or 4g")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def device_requests(gpus: str) -> list[dict[str, Any]]:
    """docker run --gpus syntax: 'all', a count, or 'device=0,1'."""
    gpus = gpus.strip()
    if not gpus:
        return []
    req: dict[str, Any] = {"Driver": "", "Capabilities": [["gpu"]]}
    if gpus == "all":
        req["Count"] = -1
    elif gpus.isdigit():
        req["Count"] = int(gpus)
    elif gpus.startswith("device="):
        req["DeviceIDs"] = [d for d in gpus[len("device=") :].split(",") if d]
    else:
        raise KernelStartError(f"gpus {gpus!r}: use 'all', a count, or 'device=0,1'")
    return [req]


def id_ranges(text: str) -> list[tuple[int, int]]:
    """'1000-65533', '1000-1999,5000', '' (none) -> [(1000, 65533)], ...; ValueError if not."""
    out = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not part.strip():
            continue
        high = high if dash else low
        if not _DIGITS.fullmatch(low.strip()) or not _DIGITS.fullmatch(high.strip()):
            raise ValueError(f"{text!r} is not a range like 1000-65533")
        if int(low) > int(high):
            raise ValueError(f"{text!r} has a range that ends before it begins")
        out.append((int(low), int(high)))
    return out


def chosen_id(what: str, raw: str, own: int, ranges: str, prohibited: list[int], spec: str) -> int:
    """The uid or gid (`what`) a kernel runs with: the client's `raw` KERNEL_UID/KERNEL_GID
    when it is a whole number in `ranges` (or the spec's `own`), else `own`; never one of
    `prohibited`. A refusal is a Forbidden naming the value and what is allowed."""
    name = f"KERNEL_{what.upper()}"
    try:
        allowed = id_ranges(ranges)
    except ValueError as e:
        raise KernelStartError(f"kernelspec {spec!r}: {what}_range {e}") from None
    shown = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in allowed) or "none"
    value = own
    if raw:
        if not _DIGITS.fullmatch(raw):
            raise Forbidden(
                f"{name} {raw[:40]!r} is not a {what}: {what}s are whole numbers ({shown})"
            )
        value = int(raw) if len(raw) <= 10 else 2**32  # beyond any id (and int()'s digit limit)
    if value in prohibited:
        raise Forbidden(
            f"kernels may not run as {what} {value} here (prohibited_{what}s of kernelspec "
            f"{spec!r})"
        )
    if value != own and not any(a <= value <= b for a, b in allowed):
        raise Forbidden(
            f"{name} {raw[:20]} is outside the {what}s kernelspec {spec!r} allows: {shown} "
            f"(its {what}_range), or {own}"
        )
    return value


def container_name(username: str, kernel_id: str) -> str:
    user = _NAME_BAD.sub("-", username).strip("-._")[:40]
    return f"{user}-{kernel_id}" if user else f"kernel-{kernel_id}"


class DockerProvisioner(RemoteProvisioner):
    """Registered as `rkg-docker`: a kernel in a container of its own."""

    backend = "docker"

    def location(self) -> str:
        """GatewayHooks.location: the engine (a password in its URL left out)."""
        return dockerengine.endpoint(self.docker_host)

    image = Unicode("", config=True, help="the kernel image; it must be on the engine already")
    docker_host = Unicode("", config=True, help="engine URL; default: DOCKER_HOST, the socket")
    network = Unicode("", config=True, help="network to attach to; default: the bridge")
    reach = Unicode(
        "published",
        config=True,
        help="'published': ports on 127.0.0.1; 'network': the container's address",
    )
    volumes = List(Unicode(), config=True, help="binds, as docker run -v: src:dst[:ro]")
    mirror_working_dir = Bool(
        False, config=True, help="bind KERNEL_WORKING_DIR at the same path and start there"
    )
    working_dir_mode = Unicode(
        "ro", config=True, help="'ro': the mirrored working directory is read-only; 'rw' not"
    )
    workdir = Unicode("", config=True, help="working directory inside the container")
    uid = Integer(1000, config=True, help="default user; KERNEL_UID overrides")
    gid = Integer(100, config=True, help="default group; KERNEL_GID overrides")
    uid_range = Unicode(DEFAULT_ID_RANGE, config=True, help="KERNEL_UID a client may choose")
    gid_range = Unicode(DEFAULT_ID_RANGE, config=True, help="KERNEL_GID a client may choose")
    prohibited_uids = List(Integer(), [0], config=True, help="refused users (root by default)")
    prohibited_gids = List(Integer(), [0], config=True, help="refused groups (root by default)")
    cpus = Float(0.0, config=True, help="CPU limit (docker run --cpus)")
    memory = Unicode("", config=True, help="memory limit, e.g. 4g")
    pids_limit = Integer(0, config=True)
    gpus = Unicode("", config=True, help="docker run --gpus: 'all', a count, 'device=0,1'")
    labels = Dict(config=True, help="extra container labels")
    hostname = Unicode("", config=True, help="the container's hostname; default: its id")
    poll_interval = Float(0.5, config=True, help="seconds a liveness listing is reused")
    reap_orphans = Bool(
        True, config=True, help="at gateway start, remove our containers no kernel owns"
    )
    ssh_identity_file = Unicode("", config=True, help="for an ssh:// docker_host")
    ssh_known_hosts = Unicode("~/.ssh/known_hosts", config=True, help="for an ssh:// docker_host")
    ssh_jump_hosts = List(Unicode(), config=True, help="for an ssh:// docker_host, like ssh -J")

    restored: ClassVar[dict[str, str]] = {
        "docker_host": "docker_host",
        "container_id": "container_id",
        "container_name": "container_name",
        "remote_addr": "remote_addr",
        "remote_ports": "remote_ports",
    }

    container_id: str | None = None
    container_name = ""
    # an ssh:// engine: the kernel's address and ports there, tunnelled to local ports
    remote_addr = ""
    remote_ports: dict[str, int]
    _engine: Engine | None = None

    # -- configuration -------------------------------------------------------------------

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.remote_ports = {}

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self.acquire_engine(
                self.docker_host,
                self.ssh_identity_file,
                self.ssh_known_hosts,
                list(self.ssh_jump_hosts),
            )
        return self._engine

    @staticmethod
    def acquire_engine(
        url: str,
        identity_file: str = "",
        known_hosts: str = "~/.ssh/known_hosts",
        jump_hosts: list[str] | None = None,
    ) -> Engine:
        return dockerengine.acquire(
            url,
            identity_file=identity_file,
            known_hosts=known_hosts,
            jump_hosts=tuple(jump_hosts or ()),
        )

    @property
    def has_process(self) -> bool:
        return self.container_id is not None

    def _user(self, env: dict[str, str]) -> str:
        spec = self.kernel_spec.display_name
        uid = chosen_id(
            "uid", env.get("KERNEL_UID", ""), self.uid, self.uid_range, self.prohibited_uids, spec
        )
        gid = chosen_id(
            "gid", env.get("KERNEL_GID", ""), self.gid, self.gid_range, self.prohibited_gids, spec
        )
        return f"{uid}:{gid}"

    def _working_dir_mount(self, env: dict[str, str]) -> list[dict[str, Any]]:
        """The client's working directory, bound at the same path: a structured mount (never
        a "src:dst" string built from client input), read-only unless the spec says "rw".
        The path was checked by the gateway (kernels/env.py) or, under another kernel
        manager, is the launch's own."""
        wd = env.get("KERNEL_WORKING_DIR", "")
        if not self.mirror_working_dir or not wd:
            return []
        if self.working_dir_mode not in ("ro", "rw"):
            raise KernelStartError(f"working_dir_mode {self.working_dir_mode!r}: use 'ro' or 'rw'")
        readonly = self.working_dir_mode != "rw"
        return [{"Type": "bind", "Source": wd, "Target": wd, "ReadOnly": readonly}]

    def _command(self, conn_file: str) -> list[str]:
        """The kernel command behind the boot step (run by the image's python)."""
        return [self.python, "-c", BOOT, *super()._command(conn_file)]

    def container_config(self, env: dict[str, str]) -> dict[str, Any]:
        """The Engine API's POST /containers/create body for this kernel."""
        if not self.image:
            raise KernelStartError(
                f"kernelspec {self.kernel_spec.display_name!r} uses the "
                "rkg-docker provisioner but its config names no image"
            )
        if self.reach not in ("published", "network"):
            raise KernelStartError(f"reach {self.reach!r}: use 'published' or 'network'")
        conn_file = f"/tmp/rkg-kernel-{self.kernel_id}.json"  # noqa: S108 - in the container
        kenv = self._env(env)
        # the container's own network namespace: bind everything there
        info = json.dumps(self._connection_file(CONTAINER_PORTS, "0.0.0.0"))
        kenv.update(
            RKG_CONNECTION_FILE=conn_file, RKG_CONNECTION_INFO=info, KERNEL_ID=self.kernel_id
        )
        mounts = self._working_dir_mount(env)
        workdir = mounts[0]["Target"] if mounts else self.workdir
        host: dict[str, Any] = {
            "Init": True,
            "Binds": list(self.volumes),  # the operator's
            "Mounts": mounts,
            "AutoRemove": False,
        }
        if self.network:
            host["NetworkMode"] = self.network
        if self.reach == "published":
            host["PortBindings"] = {
                f"{p}/tcp": [{"HostIp": "127.0.0.1", "HostPort": self.port_range}]
                for p in CONTAINER_PORTS.values()
            }
        if self.cpus:
            host["NanoCpus"] = int(self.cpus * 1e9)
        if self.memory:
            host["Memory"] = parse_size(self.memory)
        if self.pids_limit:
            host["PidsLimit"] = self.pids_limit
        if self.gpus:
            host["DeviceRequests"] = device_requests(self.gpus)
        labels = {str(k): str(v) for k, v in self.labels.items()}
        labels.update(dockerengine.our_labels(self.kernel_id, self.gateway_id))
        return {
            "Image": self.image,
            "Cmd": self._command(conn_file),
            "Entrypoint": [],
            "Env": [f"{k}={v}" for k, v in sorted(kenv.items())],
            "Labels": labels,
            "User": self._user(env),
            "WorkingDir": workdir,
            "Hostname": self.hostname,
            "ExposedPorts": {f"{p}/tcp": {} for p in CONTAINER_PORTS.values()},
            "HostConfig": host,
        }

    # -- launch --------------------------------------------------------------------------

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by the kernel manager (start and restart): create and start the container,
        learn where its ports are. `cmd` (the spec's argv) is unused: kernel_cmd runs."""
        self._exit, self._tail = None, ""
        env = kwargs.get("env") or {}
        config = self.container_config(env)
        self.container_name = container_name(env.get("KERNEL_USERNAME", ""), self.kernel_id)
        try:
            self._stage_connecting()
            await self._create(config)
            await self._locate()
            await self._tunnel(launched=True)
        except BaseException:
            await asyncio.shield(self._remove())
            raise
        return self.connection_info

    def _stage_connecting(self) -> None:
        if self.engine.connecting:  # an ssh:// engine: an SSH connection first
            where = dockerengine.endpoint(self.engine.url)
            self.stage(f"connecting to the Docker engine at {where}")

    async def _create(self, config: dict[str, Any]) -> None:
        self.stage(f"creating a container from {self.image}")
        # a restart's earlier container may linger (cleanup is best effort): its name is ours
        await self._remove_named(self.container_name)
        creating = asyncio.ensure_future(
            self.engine.call(
                f"creating container {self.container_name}",
                lambda c: c.containers.create(config, name=self.container_name),
            )
        )
        try:
            container = await dockerengine.creation(
                creating, lambda c: setattr(self, "container_id", c.id)
            )
        except EngineError as e:
            if e.code == 404:
                raise KernelStartError(
                    f"image {self.image!r} is not on the Docker engine at {self.engine.name}: "
                    f"build it there or pull it (docker pull {self.image}); the gateway does "
                    "not pull images"
                ) from e
            raise
        self.container_id = container.id
        self.stage("starting the container")
        try:
            await self.engine.call(
                f"starting container {self.container_name}",
                lambda c: c.containers.container(container.id).start(),
            )
        except EngineError as e:
            if "gpu" in e.message.lower() or "device driver" in e.message:
                raise KernelStartError(
                    f"the kernelspec asks for GPUs ({self.gpus}) but the "
                    f"Docker engine cannot provide them: {e.message}"
                ) from e
            raise

    async def _inspect(self) -> dict[str, Any]:
        cid = self.container_id
        assert cid is not None
        return cast(
            dict[str, Any],
            await self.engine.call(
                f"inspecting container {self.container_name}",
                lambda c: c.containers.container(cid).show(),
            ),
        )

    async def _locate(self) -> None:
        """Point the connection info at the container: its published 127.0.0.1 ports or its
        address on the network."""
        info = await self._inspect()
        state = info.get("State", {})
        if not state.get("Running"):
            self._exit = int(state.get("ExitCode", -1))
            await self._read_tail()
            raise KernelStartError(
                f"container {self.container_name} exited during start "
                f"(exit code {self._exit})"
                + (f"; its last output:\n{self._tail}" if self._tail else "")
            )
        net = info.get("NetworkSettings", {})
        conn: dict[str, Any] = dict(self.connection_info)
        if self.reach == "published":
            ports = net.get("Ports") or {}
            for ch, p in CONTAINER_PORTS.items():
                bound = [b for b in ports.get(f"{p}/tcp") or [] if b.get("HostIp") == "127.0.0.1"]
                if not bound:
                    raise KernelStartError(
                        f"the engine did not publish port {p} of container "
                        f"{self.container_name} on 127.0.0.1"
                    )
                conn[f"{ch}_port"] = int(bound[0]["HostPort"])
            conn["ip"] = "127.0.0.1"
        else:
            nets = net.get("Networks") or {}
            attached: dict[str, Any] = nets.get(self.network) or next(iter(nets.values()), {})
            if not attached.get("IPAddress"):
                raise KernelStartError(
                    f"container {self.container_name} has no address on "
                    f"network {self.network or 'bridge'!r}"
                )
            conn.update(
                {f"{ch}_port": p for ch, p in CONTAINER_PORTS.items()}, ip=attached["IPAddress"]
            )
        conn["transport"] = "tcp"
        self.connection_info = cast(KernelConnectionInfo, conn)

    # -- an engine over SSH: its 127.0.0.1 (or the container network) is over there ---------

    async def _tunnel(self, *, launched: bool = False) -> None:
        """With an ssh:// engine, forward local ports over the host's shared connection to
        where the kernel listens there (`launched`: as the connection info says, else as
        recorded); the connection info points at the local ends."""
        await self.engine.open()
        ssh = self.engine.ssh
        if ssh is None:
            return
        if launched:
            info: dict[str, Any] = dict(self.connection_info)
            self.remote_addr = str(info["ip"])
            self.remote_ports = {ch: int(info[f"{ch}_port"]) for ch in CHANNELS}
            self.stage(f"forwarding the kernel's ports from {ssh.name}")
        ports = await self.forwards.open(ssh, self.remote_addr, self.remote_ports)
        self._connect_to("127.0.0.1", ports)

    async def _read_tail(self) -> str:
        cid = self.container_id
        if cid is None:
            return self._tail
        with contextlib.suppress(KernelError):
            lines = await self.engine.call(
                "reading the kernel's log",
                lambda c: c.containers.container(cid).log(stdout=True, stderr=True, tail=40),
            )
            self._tail = dockerengine.log_text(lines)
        return self._tail

    # -- while it runs -------------------------------------------------------------------

    async def probe(self, max_age: float) -> int | None:
        """One container listing per engine answers every kernel's probe."""
        assert self.container_id is not None
        try:
            if self.remote_ports and not self.forwards.is_open:  # re-attached: tunnels first
                await self._tunnel()
            states = await self.engine.states(max_age)
        except KernelError as e:
            log.warning("kernel %s: %s", self.kernel_id, e.message)
            return None  # the engine is unreachable, not the kernel known dead
        if states.get(self.container_id) == "running":
            return None
        # not running in the shared listing, which may predate this container: ask it
        code = await self._exit_code()
        if code is None:
            return None
        self._exit = code
        await self._read_tail()
        return self._exit

    async def _exit_code(self) -> int | None:
        """None while the container runs; its exit code, or -1 when it is gone."""
        try:
            info = await self._inspect()
        except EngineError as e:
            return -1 if e.code == 404 else None
        except KernelError:
            return None  # unreachable engine: not known dead
        state = info.get("State", {})
        return None if state.get("Running") else int(state.get("ExitCode", -1))

    async def send_signal(self, signum: int) -> None:
        """To the container's init, which passes it to the kernel (interrupt: SIGINT)."""
        if self.container_id is not None:
            await self._signal(self.container_id, signum, f"container {self.container_name}")

    async def _signal(self, cid: str, signum: int, what: str) -> bool:
        """Signal container `cid`; False when this engine has no such container."""
        name = signal.Signals(signum).name
        found = True
        try:
            await self.engine.call(
                f"signalling {what}", lambda c: c.containers.container(cid).kill(signal=name)
            )
        except EngineError as e:
            if e.code not in (404, 409):  # 409: not running, nothing to signal
                raise
            found = e.code != 404
        self.engine.forget_states()
        return found

    # -- stop ----------------------------------------------------------------------------

    async def cleanup(self, restart: bool = False) -> None:
        """Called by the kernel manager once the kernel stopped: the container is removed
        (a restart creates a new one); the engine lease ends unless restarting."""
        await self._remove()
        self.forwards.close()
        self.remote_ports, self.local_ports = {}, {}
        if not restart and self._engine is not None:
            engine, self._engine = self._engine, None
            await dockerengine.release(engine)

    async def _remove(self) -> None:
        cid, self.container_id = self.container_id, None
        if cid is not None:
            await self.engine.remove(cid, f"container {self.container_name}")
            self.engine.forget_states()

    async def _remove_named(self, name: str) -> None:
        await self.engine.remove(name, f"container {name}")

    # -- re-attach and orphans -----------------------------------------------------------

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Called when a restarted gateway re-attaches (the connection info comes from its
        record: ports, key); an ssh:// engine's tunnels reopen on the recorded local ports."""
        await super().load_provisioner_info(provisioner_info)
        self.local_ports = self._recorded_ports() or self.local_ports

    @classmethod
    async def reachable(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        """The engine (docker_host, else the default), asked for its version."""
        label = f"docker engine {dockerengine.endpoint(str(config.get('docker_host', '')))}"
        return [(label, await cls._engine_answers(config))]

    @classmethod
    async def _engine_answers(cls, config: dict[str, Any]) -> str:
        prov = cls.from_config(config)
        engine = cls.acquire_engine(
            prov.docker_host,
            prov.ssh_identity_file,
            prov.ssh_known_hosts,
            list(prov.ssh_jump_hosts),
        )
        try:
            return await dockerengine.answers(engine, cls._ask)
        finally:
            await dockerengine.release(engine)

    @classmethod
    async def _ask(cls, engine: Engine) -> str:
        """A cheap question to the engine: '' when its answer is what kernels need."""
        await engine.call("asking for its version", lambda c: c.version())
        return ""

    @classmethod
    async def reap(
        cls, config: dict[str, Any], owned: Container[str], gateway_id: str
    ) -> list[str]:
        """Called by the gateway at start, once per engine its kernelspecs name: remove what
        this gateway labelled that none of its kernels owns. Returns the names removed."""
        if not config.get("reap_orphans", True):
            return []
        engine = cls.acquire_engine(
            str(config.get("docker_host", "")),
            str(config.get("ssh_identity_file", "")),
            str(config.get("ssh_known_hosts", "~/.ssh/known_hosts")),
            list(config.get("ssh_jump_hosts") or []),
        )
        labels = [f"{LABEL_APP}={APP}", f"{LABEL_GATEWAY}={gateway_id}"]
        try:
            gone = []
            for kernel_id, ref, name in await cls._labelled(engine, labels):
                if kernel_id not in owned:
                    await cls._remove_orphan(engine, ref)
                    gone.append(name)
            return gone
        finally:
            await dockerengine.release(engine)

    @classmethod
    async def _labelled(cls, engine: Engine, labels: list[str]) -> list[tuple[str, str, str]]:
        """(kernel id, id, name) of every container carrying all `labels`."""
        rows = await engine.call(
            "listing containers",
            lambda c: c.containers.list(all=True, filters=json.dumps({"label": labels})),
        )
        return [
            (row["Labels"].get(LABEL_KERNEL, ""), row["Id"], row["Names"][0].lstrip("/"))
            for row in rows
        ]

    @classmethod
    async def _remove_orphan(cls, engine: Engine, ref: str) -> None:
        await engine.remove(ref, "an orphaned container")
