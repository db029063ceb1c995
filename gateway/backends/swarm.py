"""Kernels as Docker Swarm services, one service per kernel, placed by Swarm on any node.

Registered as `rkg-swarm` (and `swarm-provisioner`, its old name); the kernelspec config is
the Docker backend's (docker.py) plus `constraints` (placement, e.g. "node.labels.gpu==true");
`docker_host` must be a manager.
Each service has one task and restart condition none: a kernel that dies is restarted by the
gateway (which tells its clients), never silently by Swarm. Two ways to reach it, since the
routing mesh and virtual IPs need IPVS, which not every host has:

- reach "published": the five ports published in host mode on the node the task landed on,
  ports the node picks and binds itself; the gateway connects to that node's address;
- reach "network": endpoint mode dnsrr on an attachable overlay `network` that the gateway
  (in a container) is attached to too; the gateway connects to the task's address there.

Interrupts are signals to the task's container, through the engine the gateway talks to (a
task on another node is reached with an interrupt_request on the control channel instead:
set "interrupt_mode": "message" in the kernelspec for a multi-node swarm).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, ClassVar, cast

from jupyter_client.connect import KernelConnectionInfo
from traitlets import List, Unicode

from ..errors import EngineError, KernelError, KernelStartError
from . import dockerengine
from .docker import CONTAINER_PORTS, DockerProvisioner, container_name
from .dockerengine import LABEL_KERNEL, Engine

log = logging.getLogger(__name__)

FAILED = ("failed", "rejected", "shutdown", "complete", "orphaned", "remove")


def mounts(binds: list[str]) -> list[dict[str, Any]]:
    """The operator's `volumes` (docker run -v binds) as Swarm bind mounts. Nothing a client
    sends is ever parsed here: its working directory comes as a structured mount."""
    out = []
    for bind in binds:
        src, _, rest = bind.partition(":")
        dst, _, mode = rest.partition(":")
        if not src or not dst:
            raise KernelStartError(f"volume {bind!r} is not src:dst[:ro]")
        out.append({"Type": "bind", "Source": src, "Target": dst, "ReadOnly": mode == "ro"})
    return out


def task_template(
    container: dict[str, Any], gpus: str, constraints: list[str], network: str
) -> dict[str, Any]:
    """The Docker backend's container config as a Swarm TaskTemplate."""
    host = container["HostConfig"]
    spec: dict[str, Any] = {
        "Image": container["Image"],
        "Command": container["Cmd"],
        "Env": dict(e.split("=", 1) for e in container["Env"]),
        "Labels": container["Labels"],
        "User": container["User"],
        "Init": True,
        "Mounts": [*mounts(host.get("Binds", [])), *host.get("Mounts", [])],
    }
    if container.get("WorkingDir"):
        spec["Dir"] = container["WorkingDir"]
    if container.get("Hostname"):
        spec["Hostname"] = container["Hostname"]
    limits = {
        k2: host[k1]
        for k1, k2 in (("NanoCpus", "NanoCPUs"), ("Memory", "MemoryBytes"), ("PidsLimit", "Pids"))
        if host.get(k1)
    }
    resources: dict[str, Any] = {"Limits": limits}
    if gpus:
        if not gpus.isdigit():
            raise KernelStartError(
                f"gpus {gpus!r}: Swarm allocates GPUs by count (e.g. 1), as "
                "generic resources the nodes advertise"
            )
        resources["Reservations"] = {
            "GenericResources": [
                {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": int(gpus)}}
            ]
        }
    template: dict[str, Any] = {
        "ContainerSpec": spec,
        "Resources": resources,
        "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
        "Placement": {"Constraints": list(constraints)},
    }
    if network:
        template["Networks"] = [{"Target": network}]
    return template


async def _delete_service(engine: Engine, ref: str, what: str) -> None:
    await dockerengine.ignore_missing(
        engine.call(f"removing {what}", lambda c: c.services.delete(ref))
    )


def endpoint_spec(reach: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"Mode": "dnsrr"}  # no virtual IP: it needs IPVS
    if reach == "published":
        spec["Ports"] = [
            {"Protocol": "tcp", "TargetPort": p, "PublishMode": "host"}
            for p in CONTAINER_PORTS.values()
        ]
    return spec


class SwarmProvisioner(DockerProvisioner):
    """Registered as `rkg-swarm`. The Docker provisioner's life cycle, with a service where
    it has a container."""

    backend = "swarm"

    constraints = List(Unicode(), config=True, help="placement constraints")

    restored: ClassVar[dict[str, str]] = {**DockerProvisioner.restored, "service_id": "service_id"}

    service_id: str | None = None
    _status = ""

    @property
    def has_process(self) -> bool:
        return self.service_id is not None

    # -- launch --------------------------------------------------------------------------

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by the kernel manager (start and restart): create the service, wait for
        its task to run (the caller bounds the wait), learn where its ports are."""
        self._exit, self._tail, self._status = None, "", "creating the service"
        env = kwargs.get("env") or {}
        container = self.container_config(env)
        template = task_template(container, self.gpus, list(self.constraints), self.network)
        self.container_name = container_name(env.get("KERNEL_USERNAME", ""), self.kernel_id)
        try:
            self._stage_connecting()
            self.stage(f"creating a service from {self.image}")
            await self._check_image()
            # a restart's earlier service may linger (cleanup is best effort): its name is ours
            await _delete_service(self.engine, self.container_name, "an earlier service")
            creating = asyncio.ensure_future(
                self.engine.call(
                    f"creating service {self.container_name}",
                    lambda c: c.services.create(
                        template,
                        name=self.container_name,
                        labels=container["Labels"],
                        endpoint_spec=endpoint_spec(self.reach),
                    ),
                )
            )
            await dockerengine.creation(creating, lambda r: setattr(self, "service_id", r["ID"]))
            task = await self._running_task()
            await self._locate_task(task)
            await self._tunnel(launched=True)
        except BaseException:
            await asyncio.shield(self._remove())
            raise
        return self.connection_info

    async def _check_image(self) -> None:
        """Swarm would try a registry for a missing image; say what to do instead."""
        try:
            await self.engine.call("looking up the image", lambda c: c.images.inspect(self.image))
        except EngineError as e:
            if e.code != 404:
                raise
            raise KernelStartError(
                f"image {self.image!r} is not on the Swarm manager at {self.engine.name}: "
                "build or load it on every node that may run kernels (or push it to a registry "
                "they can reach); the gateway does not pull images"
            ) from e

    async def _running_task(self) -> dict[str, Any]:
        said = ""
        while True:
            self.engine.forget_states()
            task = (await self.engine.task_states(0)).get(cast(str, self.service_id))
            if task is not None:
                status = task.get("Status", {})
                state = status.get("State", "")
                self._status = f"task {state}" + (f": {status['Err']}" if status.get("Err") else "")
                # "pending: no suitable node (...)", "preparing", ...: told when it changes
                detail = str(status.get("Err") or status.get("Message") or "")
                words = f"Swarm task {state}" + (f": {detail}" if detail != state else "")
                if words != said:
                    said = words
                    self.stage(words)
                if state == "running":
                    return task
                if state in FAILED:
                    self._exit = int(status.get("ContainerStatus", {}).get("ExitCode", -1))
                    await self._read_tail()
                    raise KernelStartError(
                        f"the kernel's Swarm task {self._status}"
                        + (f"; its last output:\n{self._tail}" if self._tail else "")
                    )
            await asyncio.sleep(0.1)

    def launch_note(self) -> str:
        """Where a start that timed out stood (pending on no suitable node, ...)."""
        return f"Swarm service {self.container_name}: {self._status}" if self._status else ""

    async def _locate_task(self, task: dict[str, Any]) -> None:
        conn: dict[str, Any] = dict(self.connection_info)
        if self.reach == "published":
            ports = await self._published_ports(task)
            missing = [p for p in CONTAINER_PORTS.values() if not ports.get(p)]
            if missing:
                raise KernelStartError(
                    f"Swarm did not publish ports {missing} of service {self.container_name}"
                )
            conn.update(
                {f"{ch}_port": ports[p] for ch, p in CONTAINER_PORTS.items()},
                ip=await self._node_address(task["NodeID"]),
            )
        else:
            ip = ""
            for att in task.get("NetworksAttachments", []):
                net = att.get("Network", {}).get("Spec", {}).get("Name")
                if net == self.network and att.get("Addresses"):
                    ip = att["Addresses"][0].split("/")[0]
            if not ip:
                raise KernelStartError(
                    f"the task of service {self.container_name} has no "
                    f"address on network {self.network!r}"
                )
            conn.update({f"{ch}_port": p for ch, p in CONTAINER_PORTS.items()}, ip=ip)
        conn["transport"] = "tcp"
        self.connection_info = cast(KernelConnectionInfo, conn)

    async def _published_ports(self, task: dict[str, Any]) -> dict[int, int]:
        """Target port -> the port published for it on IPv4. A dual-stack node publishes
        each port twice, on 0.0.0.0 and on ::, and the two are picked apart: under many
        concurrent starts they differ, and the task lists both with no address to tell
        them by (one taken at random connected the gateway to some other port, and the
        kernel never answered). The task's container, on the engine we talk to, says
        which is which; a task on another node has its first listed."""
        ports: dict[int, int] = {}
        for p in task["Status"].get("PortStatus", {}).get("Ports", []):
            ports.setdefault(p["TargetPort"], p["PublishedPort"])
        cid = task["Status"].get("ContainerStatus", {}).get("ContainerID")
        if not cid:
            return ports
        try:
            info = await self.engine.call(
                f"inspecting the task of service {self.container_name}",
                lambda c: c.containers.container(cid).show(),
            )
        except EngineError as e:
            if e.code != 404:
                raise
            return ports  # on another node
        bound = info.get("NetworkSettings", {}).get("Ports") or {}
        for target in CONTAINER_PORTS.values():
            v4 = [b for b in bound.get(f"{target}/tcp") or [] if ":" not in b.get("HostIp", "")]
            if v4:
                ports[target] = int(v4[0]["HostPort"])
        return ports

    async def _node_address(self, node_id: str) -> str:
        node = await self.engine.call(
            "inspecting the node", lambda c: c.nodes.inspect(node_id=node_id)
        )
        addr = str(node.get("Status", {}).get("Addr", ""))
        return "127.0.0.1" if addr in ("", "0.0.0.0") else addr

    async def _read_tail(self) -> str:
        sid = self.service_id
        if sid is None:
            return self._tail
        try:
            text = await self.engine.call(
                "reading the kernel's log",
                lambda c: c.services.logs(sid, stdout=True, stderr=True, tail="40"),
            )
            self._tail = dockerengine.log_text(text)
        except KernelError as e:
            log.debug("service logs of %s: %s", self.container_name, e.message)
        return self._tail

    @classmethod
    async def reachable(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        """The engine (docker_host, else the default): it answers and is a Swarm manager."""
        label = f"swarm manager {dockerengine.endpoint(str(config.get('docker_host', '')))}"
        return [(label, await cls._engine_answers(config))]

    @classmethod
    async def _ask(cls, engine: Engine) -> str:
        info = await engine.call("asking for its swarm state", lambda c: c.system.info())
        swarm = info.get("Swarm") or {}
        if swarm.get("ControlAvailable"):
            return ""
        state = swarm.get("LocalNodeState") or "unknown"
        return f"not a Swarm manager (its swarm state: {state})"

    # -- while it runs -------------------------------------------------------------------

    async def probe(self, max_age: float) -> int | None:
        """One task listing per engine answers every kernel's probe."""
        assert self.service_id is not None
        try:
            tasks = await self.engine.task_states(max_age)
        except KernelError as e:
            log.warning("kernel %s: %s", self.kernel_id, e.message)
            return None
        task = tasks.get(self.service_id)
        state = (task or {}).get("Status", {}).get("State")
        if task is None or state not in FAILED:
            return None  # running (or a listing from before it started)
        self._exit = int(task["Status"].get("ContainerStatus", {}).get("ExitCode", -1))
        await self._read_tail()
        return self._exit

    async def send_signal(self, signum: int) -> None:
        """To the task's container, when the engine we talk to runs it."""
        if self.service_id is None:
            return
        task = (await self.engine.task_states(0)).get(self.service_id) or {}
        cid = task.get("Status", {}).get("ContainerStatus", {}).get("ContainerID")
        if not cid:
            return
        if (
            not await self._signal(cid, signum, f"service {self.container_name}")
            and signum == signal.SIGINT
        ):
            raise KernelError(
                f"the kernel of service {self.container_name} runs on another node; use "
                '"interrupt_mode": "message" in its kernelspec to interrupt it'
            )

    # -- stop ----------------------------------------------------------------------------

    async def _remove(self) -> None:
        sid, self.service_id = self.service_id, None
        if sid is not None:
            await _delete_service(self.engine, sid, f"service {self.container_name}")
            self.engine.forget_states()

    # -- re-attach and orphans -----------------------------------------------------------

    @classmethod
    async def _labelled(cls, engine: Engine, labels: list[str]) -> list[tuple[str, str, str]]:
        """(kernel id, id, name) of every service carrying all `labels`."""
        rows = await engine.call(
            "listing services", lambda c: c.services.list(filters={"label": labels})
        )
        return [
            (row["Spec"].get("Labels", {}).get(LABEL_KERNEL, ""), row["ID"], row["Spec"]["Name"])
            for row in rows
        ]

    @classmethod
    async def _remove_orphan(cls, engine: Engine, ref: str) -> None:
        await _delete_service(engine, ref, "an orphaned service")
