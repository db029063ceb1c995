"""Kernels as batch jobs: SLURM (sbatch), and SGE/PBS (qsub) and LSF (bsub) by template.

Registered as `rkg-batch` (and `slurm-provisioner`, its old name; the scheduler is a config
value, so one provisioner serves all four); a kernelspec chooses it with

    "metadata": {"kernel_provisioner": {"provisioner_name": "rkg-batch", "config": {
        "scheduler": "slurm", "partition": "gpu", "cpus": 4, "memory": "16G", "gpus": 1,
        "walltime": "08:00:00", "account": "proj42", "submit_args": ["--qos=interactive"],
        "python": "/opt/conda/bin/python", "pre_command": "module load cuda",
        "workdir": "~/work", "runtime_dir": "/shared/home/me/.rkg/runtime",
        "login": "me@login1", "jump_hosts": ["me@bastion"]}}}

A launch writes a connection file with every port 0 into runtime_dir (a filesystem the
compute nodes share with the gateway) and submits a job script that, on its node, chooses five
free ports from `port_range` (default: below the node's ephemeral range; ports.py says why no
other process can take them before the kernel binds them), writes them into that file and execs
the kernel on it: any kernel (IRkernel, xeus-python, ipykernel), since it only binds the ports
it is given. The gateway reads the ports back from the file. A kernel that exits with "Address
already in use" is started again (a new job) by the gateway's retry. The node comes from the
scheduler's status; the gateway connects to it directly, or, with `login` set, runs every
command on that login node over the SSH backend's shared connection and forwards the five ports
through it (batchlogin.py: LocalSite / LoginSite).

While the job waits in the queue the kernel is `starting`; the scheduler's state and reason are
kept for the launch-timeout message, and a job still queued when the start is given up (the
gateway's KERNEL_LAUNCH_TIMEOUT, or a failed or cancelled start) is cancelled. Job states are
read for all kernels of a scheduler with one status command at a time (StatusCache).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from jupyter_client.connect import KernelConnectionInfo
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import Dict, Float, Integer, List, Unicode

from ..errors import KernelError, KernelStartError, KernelTimeout, SchedulerError
from . import ports as kports
from . import sshpool
from .batchlogin import LocalSite, LoginSite
from .common import CHANNELS, RemoteProvisioner
from .schedulers import FINISHED, PENDING, SCHEDULERS, JobRequest, JobState, Scheduler

log = logging.getLogger(__name__)

FILE_STEP = 0.1  # seconds between looks at the connection file during a start


class StatusCache:
    """Job states of one scheduler, read for every watched job with one command and reused for
    `max_age` seconds; concurrent askers share the command in flight."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.watched: set[str] = set()
        self.states: dict[str, JobState] = {}
        self.read_at = 0.0
        self._inflight: asyncio.Future[None] | None = None

    async def get(self, job_id: str, max_age: float, site: Site) -> JobState | None:
        """The job's state; None once the scheduler no longer lists it (it has ended)."""
        if job_id not in self.watched:
            self.watched.add(job_id)
            max_age = 0
        if time.monotonic() - self.read_at > max_age:
            if self._inflight is None or self._inflight.done():
                self._inflight = asyncio.ensure_future(self._read(site))
            await asyncio.shield(self._inflight)
        return self.states.get(job_id)

    def forget(self, job_id: str) -> None:
        self.watched.discard(job_id)
        self.states.pop(job_id, None)

    async def _read(self, site: Site) -> None:
        ids = sorted(self.watched)
        code, out, err = await site.run(self.scheduler.status(ids))
        # squeue exits 1 with "Invalid job id" when none of the jobs is known any more
        if (
            code
            and "nvalid job id" not in err
            and "not found" not in err + out
            and "Unknown Job" not in err
        ):
            raise SchedulerError(
                f"{shlex.join(self.scheduler.status(ids)[:1])} failed: {err.strip() or out.strip()}"
            )
        self.states = self.scheduler.parse_status(out)
        self.read_at = time.monotonic()


Site = LocalSite | LoginSite
_caches: dict[tuple[str, str], StatusCache] = {}


def status_cache(scheduler: Scheduler, site: Site) -> StatusCache:
    """One per scheduler and place (this machine, or a login node)."""
    key = (scheduler.name, site.key)
    if key not in _caches:
        _caches[key] = StatusCache(scheduler)
    return _caches[key]


def job_script(
    *, cmd: list[str], env: dict[str, str], workdir: str, pre_command: str, ports: str = ""
) -> str:
    """The POSIX sh job script: cd, the pre-command, `ports` (sh that writes the kernel's
    ports into its connection file, ports.choose_script), then exec the kernel (so that the
    job ends when the kernel does and a signal to the job reaches the kernel itself)."""
    lines = ["#!/bin/sh", "umask 077"]
    if workdir:
        where = (
            '"$HOME"' + shlex.quote(workdir[1:])
            if workdir.startswith("~")
            else shlex.quote(workdir)
        )
        lines.append(f"cd {where} || {{ echo 'rkg: cannot cd to {workdir}' >&2; exit 3; }}")
    if pre_command:
        lines.append(
            f"{{ {pre_command}\n}} </dev/null || "
            "{ echo 'rkg: the pre_command failed' >&2; exit 4; }"
        )
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    if ports:
        lines.append(ports)
    lines.append("exec " + " ".join(shlex.quote(a) for a in cmd) + " </dev/null")
    return "\n".join(lines) + "\n"


class BatchProvisioner(RemoteProvisioner):
    """Registered as `rkg-batch`: a kernel as a batch job (one job per launch)."""

    backend = "batch"

    scheduler = Unicode("slurm", config=True, help="slurm, sge, pbs or lsf")
    partition = Unicode("", config=True, help="SLURM partition, or the SGE/PBS/LSF queue")
    cpus = Integer(0, config=True, help="CPUs for the kernel (0: the scheduler's default)")
    memory = Unicode("", config=True, help="memory for the job: 4G, 512M")
    gpus = Integer(0, config=True)
    walltime = Unicode("", config=True, help="HH:MM:SS")
    account = Unicode("", config=True)
    submit_args = List(Unicode(), config=True, help="more arguments for sbatch/qsub/bsub")
    pre_command = Unicode("", config=True, help="shell run first: module load, conda activate")
    workdir = Unicode("", config=True, help="the kernel's working directory on the node")
    ip = Unicode(
        "0.0.0.0",
        config=True,
        help="what the kernel binds on its node; the gateway connects to the node",
    )
    runtime_dir = Unicode(
        "",
        config=True,
        help="directory for connection files and job "
        "output, shared with the compute nodes (default: Jupyter's runtime)",
    )
    login = Unicode(
        "",
        config=True,
        help="[user@]host[:port] of a login node to submit from "
        "over SSH (default: submit on the gateway's machine)",
    )
    login_port = Integer(22, config=True)
    jump_hosts = List(Unicode(), config=True, help="[user@]host[:port] hops to the login node")
    identity_file = Unicode("", config=True, help="private key; default: ssh-agent, ~/.ssh")
    known_hosts = Unicode("~/.ssh/known_hosts", config=True)
    connect_timeout = Float(10.0, config=True)
    scheduler_env = Dict(
        config=True,
        help="environment of the scheduler's commands (not of "
        'the kernel), e.g. {"SLURM_CONF": "/etc/slurm/other.conf"}',
    )
    poll_interval = Float(2.0, config=True, help="seconds a job state is reused by poll()")
    launch_timeout = Float(
        0,
        config=True,
        help="give a start up after this unless the client sets KERNEL_LAUNCH_TIMEOUT "
        "(0: the gateway's launch timeout, else 600 s)",
    )

    restored: ClassVar[dict[str, str]] = {
        "scheduler": "scheduler",
        "job_id": "job_id",
        "node": "node",
        "ports": "ports",
        "local_ports": "local_ports",
        "connection_file": "conn_file",
    }
    noted = ("login",)
    wait_step = 0.2  # a scheduler is asked at most this often while the job ends

    job_id: str | None = None
    node = ""
    ports: dict[str, int]  # on the node; local_ports: where the gateway connects
    conn_file = ""
    _last: JobState | None = None
    _note = ""
    _said = ""  # the last stage told about the job (told again only when it changes)
    _site: Site | None = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ports = {}

    async def _open_site(self) -> Site:
        if self._site is None:
            if not self.login:
                self._site = LocalSite(self._scheduler_env)
            else:
                target = self._login_target()
                if not sshpool.live(target):
                    self.stage(f"connecting to the login node {sshpool.route(target)}")
                self._site = await LoginSite.open(target, self._scheduler_env)
        return self._site

    def _login_target(self) -> sshpool.Target:
        hop = sshpool.Hop.parse(self.login, self.login_port, None)
        jumps = tuple(sshpool.Hop.parse(j, 22, hop.username) for j in self.jump_hosts)
        return sshpool.Target(
            hop, jumps, self.identity_file or None, self.known_hosts, self.connect_timeout
        )

    @property
    def _scheduler_env(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.scheduler_env.items()}

    def _close_site(self, linger: float = sshpool.LINGER) -> None:
        self.forwards.close()
        if self._site is not None:
            self._site.close(linger)
            self._site = None

    @classmethod
    def as_gateway_user(cls, config: dict[str, Any]) -> bool:
        """Submitted from this machine: the job runs as the gateway's user (on a node that
        may share its file system); from a login node, as that node's user."""
        return not config.get("login")

    @classmethod
    async def reachable(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        """The scheduler, asked a cheap question where the kernels' jobs are submitted: on
        this machine ("slurm (local)") or on the login node ("slurm via me@login1:22")."""
        prov = cls.from_config(config)
        sched = SCHEDULERS.get(prov.scheduler)
        if sched is None:
            return [(prov.scheduler, f"unknown scheduler (one of {', '.join(SCHEDULERS)})")]
        if not prov.login:
            label = f"{sched.name} (local)"
            shared = False
        else:
            label = f"{sched.name} via {prov._login_target().hop}"
            shared = sshpool.live(prov._login_target())
        argv = sched.ping()
        try:
            async with asyncio.timeout(sshpool.PROBE_TIMEOUT):
                code, out, err = await (await prov._open_site()).run(argv)
            why = "" if not code else f"{argv[0]} failed: {(err or out).strip() or code}"
        except TimeoutError:
            why = f"{argv[0]} gave no answer within {sshpool.PROBE_TIMEOUT:g} s"
        except KernelError as e:
            why = e.message
        finally:  # a connection made for the check alone is not kept
            prov._close_site(sshpool.LINGER if shared else 0)
        return [(label, why)]

    # -- configuration -------------------------------------------------------------------

    @property
    def sched(self) -> Scheduler:
        try:
            return SCHEDULERS[self.scheduler]
        except KeyError:
            raise KernelStartError(
                f"kernelspec {self.kernel_spec.display_name!r}: unknown "
                f"scheduler {self.scheduler!r} (one of "
                f"{', '.join(SCHEDULERS)})"
            ) from None

    @property
    def job_label(self) -> str:
        return f"{self.sched.label} {self.job_id}"

    @property
    def log_file(self) -> str:
        return self.conn_file[: -len(".json")] + ".log" if self.conn_file else ""

    @property
    def has_process(self) -> bool:
        return self.job_id is not None

    def _script_cds(self) -> bool:
        """Whether the job script changes directory itself: PBS has no option for it, and
        `~` is the home directory where the job runs, which only its shell knows."""
        return bool(self.workdir) and (self.scheduler == "pbs" or self.workdir.startswith("~"))

    def _request(self, cwd: str) -> JobRequest:
        # KERNEL_WORKING_DIR (cwd) is a path on the gateway's machine: not for a login node
        workdir = "" if self._script_cds() else self.workdir or ("" if self.login else cwd)
        return JobRequest(
            name=f"rkg-{self.kernel_id}",
            output=self.log_file,
            workdir=workdir,
            queue=self.partition,
            cpus=self.cpus,
            memory=self.memory,
            gpus=self.gpus,
            walltime=self.walltime,
            account=self.account,
            extra_args=tuple(self.submit_args),
        )

    def location(self) -> str:
        """GatewayHooks.location: the job's node once known, and the login node it is
        reached through."""
        via = f" via {self.login}" if self.login else ""
        return f"{self.node}{via}" if self.node else via.strip()

    def launch_note(self) -> str:
        """Where the last start stood: not submitted, queued (and why), running."""
        return self._note

    # -- launch --------------------------------------------------------------------------

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by the kernel manager (start and restart): submit, wait in the queue, read
        the ports. `cmd` is the spec's argv, informative only. On any failure, cancellation
        included, the job is cancelled."""
        sched = self.sched
        env = kwargs.get("env") or {}
        self._exit, self._tail, self._last, self._said = None, "", None, ""
        self._note = f"the {sched.label.split()[0]} job was not submitted yet"
        started = time.monotonic()
        try:
            await self._open_site()
            await self._submit(env, str(kwargs.get("cwd") or ""))
            await self._wait_running(self._deadline(env, started))
        except BaseException as e:
            await asyncio.shield(self._cancel_job(forget_files=True))
            if isinstance(e, KernelError) or not isinstance(e, Exception):
                raise
            raise KernelStartError(
                f"starting the kernel as a batch job: {type(e).__name__}: {e}"
            ) from e
        log.info(
            "%s of kernel %s runs on %s (ready %.1f s after submission)",
            self.job_label,
            self.kernel_id,
            self.node,
            time.monotonic() - started,
        )
        return self.connection_info

    def _deadline(self, env: dict[str, str], started: float) -> float:
        return started + self.gateway_timeout(env, 600)

    async def _submit(self, env: dict[str, str], cwd: str) -> None:
        assert self._site is not None
        default_runtime = ".local/share/jupyter/runtime" if self.login else jupyter_runtime_dir()
        via = f" via {self._site.name}" if isinstance(self._site, LoginSite) else ""
        if via:
            self.stage(f"uploading the connection file to {self._site.name}")
        runtime = await self._site.realpath(self.runtime_dir or default_runtime)
        self.conn_file = f"{runtime}/batch-kernel-{self.kernel_id}.json"
        await self._site.write_private(self.conn_file, self._conn_text())
        try:
            span = kports.parse_range(self.port_range)
        except ValueError as e:
            raise KernelStartError(f"kernelspec {self.kernel_spec.display_name!r}: {e}") from e
        script = job_script(
            cmd=self._command(self.conn_file),
            env=self._env(env),
            workdir=self.workdir if self._script_cds() else "",
            pre_command=self.pre_command,
            ports=kports.choose_script(self.conn_file, span, CHANNELS),
        )
        argv = self.sched.submit(self._request(cwd))
        self.stage(f"submitting the job to {self.sched.label.removesuffix(' job')}{via}")
        code, out, err = await self._site.run(argv, stdin=script)
        if code:
            raise KernelStartError(
                f"{argv[0]} refused the kernel's job: "
                f"{err.strip() or out.strip() or f'exit code {code}'}"
            )
        try:
            self.job_id = self.sched.parse_submit(out)
        except SchedulerError as e:
            raise KernelStartError(e.message) from e
        self._note = f"{self.job_label} was submitted"
        log.info("kernel %s submitted as %s", self.kernel_id, self.job_label)

    def _conn_text(self) -> str:
        """The connection file the job starts with: every port 0, until the job script
        writes the ports it chose on the node."""
        return json.dumps(self._connection_file({}, self.ip), indent=2)

    async def _read_ports(self) -> dict[str, int] | None:
        assert self._site is not None
        text = await self._site.read(self.conn_file)
        try:
            info = json.loads(text or "")
            ports = {ch: int(info[f"{ch}_port"]) for ch in CHANNELS}
        except (ValueError, KeyError, TypeError):
            return None  # not there yet, or caught half written
        return ports if all(ports.values()) else None

    async def _wait_running(self, deadline: float) -> None:
        """Until the job script wrote the ports into the connection file; the job's state
        is read every poll step (growing from 0.25 s to poll_interval) to notice a job that
        ended."""
        assert self.job_id is not None
        site = self._site
        assert site is not None
        cache = status_cache(self.sched, site)
        step, next_status = 0.25, 0.0
        while True:
            ports = await self._read_ports()
            if ports:
                break
            now = time.monotonic()
            if now >= next_status:
                try:
                    state = await cache.get(self.job_id, 0, site)
                    if state is not None and state.phase != FINISHED:
                        self._tell(state)
                except KernelError as e:  # a scheduler too busy to answer: ask again later
                    log.warning("cannot read the state of %s: %s", self.job_label, e)
                    state = self._last or JobState(self.job_id, PENDING, "UNKNOWN")
                self._last = state
                if state is None or state.phase == FINISHED:
                    await self._read_tail()
                    word = state.describe() if state else "ended"
                    raise KernelStartError(
                        f"{self.job_label} {word} before the kernel bound its ports"
                        + (f"; its output:\n{self._tail}" if self._tail else "")
                    )
                where = f" on {state.node}" if state.node and state.phase != PENDING else ""
                queued = "still queued" if state.phase == PENDING else "running"
                self._note = f"{self.job_label} was {queued}{where}: {state.describe()}"
                next_status = now + step
                step = min(step * 2, self.poll_interval)
            if now >= deadline:
                raise KernelTimeout(
                    f"{self._note}, past the launch timeout; the job has been cancelled"
                )
            await asyncio.sleep(FILE_STEP)
        self.ports = ports
        state = await cache.get(self.job_id, 0, site)
        if state is not None:  # the loop may have last seen it queued
            self._last = state
        self.node = state.node if state and state.node else socket.gethostname().split(".")[0]
        self.local_ports = {}  # a new job: new forwards, if any
        if isinstance(site, LoginSite):
            self.stage(f"forwarding the kernel's ports through {site.name}")
        host, self.local_ports = await site.connect(self.node, self.ip, ports, self.forwards)
        self._connect_to(host, self.local_ports)

    def _tell(self, state: JobState) -> None:
        """The job's state as a stage, when it changed: queued (and why), or running on its
        node while the kernel starts there."""
        words = f"{self.job_label} {state.describe()}"
        if state.phase != PENDING:
            on = f" on {state.node}" if state.node else ""
            words += f"{on}; waiting for the kernel's ports"
        if words != self._said:
            self._said = words
            self.stage(words)

    async def _read_tail(self, size: int = 4096) -> str:
        text = ""
        if self.log_file and self._site is not None:
            text = await self._site.read(self.log_file, tail=size) or ""
        self._tail = "\n".join(text.strip().splitlines()[-15:])
        return self._tail

    # -- while it runs -------------------------------------------------------------------

    async def probe(self, max_age: float) -> int | None:
        """Answered from the job states shared by the scheduler's kernels. A scheduler that
        does not answer leaves the kernel counted as running."""
        assert self.job_id is not None
        try:
            site = await self._attach()
            state = await status_cache(self.sched, site).get(self.job_id, max_age, site)
        except KernelError as e:
            log.warning("cannot read the state of %s: %s", self.job_label, e)
            return None
        self._last = state or self._last  # also what /metrics counts the job as
        if state is not None and state.phase != FINISHED:
            return None
        self._exit = 0 if state is not None and state.state in ("COMPLETED", "DONE") else -1
        await self._read_tail()
        return self._exit

    async def send_signal(self, signum: int) -> None:
        """To the kernel inside its job (interrupt: SIGINT); SIGKILL cancels the job."""
        if self.job_id is None:
            return
        if signum == signal.SIGKILL:
            await self._cancel_job(forget_files=False)
            return
        name = signal.Signals(signum).name.removeprefix("SIG")
        try:
            argv = self.sched.signal(self.job_id, name)
        except SchedulerError as e:
            log.warning("%s: %s", self.job_label, e)
            return
        site = await self._attach()
        code, out, err = await site.run(argv)
        if code:
            log.warning("%s failed for %s: %s", argv[0], self.job_label, (err or out).strip())

    async def terminate(self, restart: bool = False) -> None:
        """A job is cancelled, never asked: kill sends SIGKILL, which cancels it too."""
        await self._cancel_job(forget_files=False)

    # -- stop ----------------------------------------------------------------------------

    async def cleanup(self, restart: bool = False) -> None:
        """Called by the kernel manager once the kernel stopped: the job is cancelled if the
        scheduler still has it, its files are removed unless restarting."""
        await self._cancel_job(forget_files=not restart)

    async def _cancel_job(self, *, forget_files: bool) -> None:
        job_id, self.job_id = self.job_id, None
        if job_id is not None:
            self._exit = self._exit if self._exit is not None else -1
            try:
                site = await self._attach()
            except KernelError as e:  # a login node that cannot be reached
                log.warning("cannot cancel %s %s: %s", self.sched.label, job_id, e)
                self._close_site()
                return
            state = status_cache(self.sched, site).states.get(job_id)
            if state is None or state.phase != FINISHED:
                argv = self.sched.cancel(job_id)
                try:
                    code, out, err = await site.run(argv)
                except KernelError as e:
                    code, out, err = -1, "", str(e)
                done = "the job has been cancelled"
                if code and "already completed" not in err and "nvalid job id" not in err:
                    log.warning("%s %s: %s", argv[0], job_id, (err or out).strip())
                    done = f"cancelling the job failed: {(err or out).strip()}"
                else:
                    log.info(
                        "%s %s cancelled (kernel %s)", self.sched.label, job_id, self.kernel_id
                    )
                if self._last is not None and self._last.phase == PENDING:
                    self._note = (
                        f"{self.sched.label} {job_id} was still queued: "
                        f"{self._last.describe()}; {done}"
                    )
                else:
                    self._note = f"{self._note}; {done}"
            status_cache(self.sched, site).forget(job_id)
        if forget_files and self.conn_file and self._site is not None:
            await self._site.remove([self.conn_file, self.log_file])
        if forget_files:
            self._close_site()

    async def _attach(self) -> Site:
        """The site; after load_provisioner_info, also the forwards to the recorded node."""
        if self._site is not None:
            return self._site
        site = await self._open_site()
        if isinstance(site, LoginSite) and self.job_id is not None and self.ports:
            await site.connect(self.node, self.ip, self.ports, self.forwards)  # recorded ports
        return site

    # -- re-attach -----------------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Called when the gateway records the kernel; poll() of a restarted gateway asks
        the scheduler about the recorded job."""
        info = await super().get_provisioner_info()
        info["key"] = self._key()
        return info


def metric_families(registry: Any) -> Iterator[Any]:
    """For /metrics: the jobs of this gateway's batch kernels, by scheduler and the state the
    scheduler last reported (a kernel whose job state is not known yet counts as SUBMITTING)."""
    from prometheus_client.core import GaugeMetricFamily

    jobs = GaugeMetricFamily(
        "rkg_batch_jobs",
        "Batch jobs of this gateway's kernels, by scheduler and scheduler state.",
        labels=["scheduler", "state"],
    )
    by: dict[tuple[str, str], int] = {}
    for kernel in list(registry.kernels.values()):
        prov = kernel.km.provisioner
        if isinstance(prov, BatchProvisioner) and prov.job_id:
            key = (prov.scheduler, prov._last.state if prov._last else "SUBMITTING")
            by[key] = by.get(key, 0) + 1
    for key, n in sorted(by.items()):
        jobs.add_metric(list(key), n)
    yield jobs
