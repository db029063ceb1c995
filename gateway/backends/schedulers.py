"""Batch schedulers as command templates and output parsers, no I/O: what to run to submit a
job script (read from stdin), ask for job states, signal and cancel, see that the scheduler
answers (ping), and how to read the answers.

    Scheduler          submit   status                         signal                cancel
    ├── Slurm          sbatch   squeue --states=all            scancel --signal --full  scancel
    ├── GridEngine     qsub     qstat (all jobs of the user)   (none: interrupt by message) qdel
    ├── PBS            qsub     qstat -f -F json -x            qsig -s               qdel
    └── LSF            bsub     bjobs -o ... -noheader         bkill -s              bkill
    ping: sinfo (SLURM), qstat (Grid Engine), qstat -B (PBS), lsid (LSF)

Every job is in one of three phases: `pending` (queued, held, being set up), `running`, or
`finished` (including a job the scheduler no longer lists). The batch provisioner (batch.py)
runs these commands; the templates are unit-tested on recorded-format outputs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..errors import SchedulerError

PENDING, RUNNING, FINISHED = "pending", "running", "finished"


@dataclass(frozen=True)
class JobRequest:
    """What a kernel asks of the scheduler (empty / 0: the site's default)."""

    name: str
    output: str  # file for the job's stdout and stderr
    workdir: str = ""
    queue: str = ""  # SLURM partition, SGE/PBS/LSF queue
    cpus: int = 0
    memory: str = ""  # "4G", "512M"
    gpus: int = 0
    walltime: str = ""  # "HH:MM:SS"
    account: str = ""
    extra_args: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class JobState:
    job_id: str
    phase: str  # PENDING, RUNNING or FINISHED
    state: str  # the scheduler's own word: PENDING, qw, Q, PEND...
    reason: str = ""  # why it waits (SLURM reason, PBS comment, LSF pending reason)
    node: str = ""  # where it runs (the first node)

    def describe(self) -> str:
        return f"{self.state} ({self.reason})" if self.reason else self.state


def _memory(value: str, *, suffix: str = "") -> str:
    """ "4G" -> "4G" (or "4gb" style with suffix="b" lower-cased, as PBS wants)."""
    value = value.strip()
    return (value.lower() + suffix) if suffix and value[-1:].isalpha() else value


def _hhmm(walltime: str) -> str:
    """LSF's -W takes [HH:]MM: "01:30:00" -> "1:30"."""
    parts = [int(p) for p in walltime.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts[-3:]
    minutes += 1 if seconds else 0
    return f"{hours}:{minutes:02d}"


class Scheduler:
    name = ""
    label = ""  # for messages: "SLURM job 12"
    can_signal = True

    def submit(self, job: JobRequest) -> list[str]:
        raise NotImplementedError

    def parse_submit(self, out: str) -> str:
        raise NotImplementedError

    def status(self, job_ids: list[str]) -> list[str]:
        raise NotImplementedError

    def parse_status(self, out: str) -> dict[str, JobState]:
        """States of the jobs listed; a job asked for but not listed has finished."""
        raise NotImplementedError

    def signal(self, job_id: str, signame: str) -> list[str]:
        raise NotImplementedError

    def cancel(self, job_id: str) -> list[str]:
        raise NotImplementedError

    def ping(self) -> list[str]:
        """A cheap command that succeeds when the scheduler answers (the status page)."""
        raise NotImplementedError


class Slurm(Scheduler):
    name, label = "slurm", "SLURM job"
    _PENDING = frozenset(
        {
            "PENDING",
            "CONFIGURING",
            "REQUEUED",
            "REQUEUE_HOLD",
            "REQUEUE_FED",
            "RESV_DEL_HOLD",
            "RESIZING",
            "SPECIAL_EXIT",
        }
    )
    _RUNNING = frozenset({"RUNNING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"})

    def submit(self, job: JobRequest) -> list[str]:
        argv = [
            "sbatch",
            "--parsable",
            f"--job-name={job.name}",
            f"--output={job.output}",
            "--nodes=1",
            "--ntasks=1",
        ]
        for flag, value in (
            ("--chdir", job.workdir),
            ("--partition", job.queue),
            ("--mem", job.memory),
            ("--time", job.walltime),
            ("--account", job.account),
        ):
            if value:
                argv.append(f"{flag}={value}")
        if job.cpus:
            argv.append(f"--cpus-per-task={job.cpus}")
        if job.gpus:
            argv.append(f"--gpus={job.gpus}")
        return argv + list(job.extra_args)

    def parse_submit(self, out: str) -> str:
        # --parsable: "123" or "123;cluster"; without it "Submitted batch job 123"
        m = re.search(r"^(\d+)(?:;\S*)?\s*$", out.strip(), re.M) or re.search(
            r"Submitted batch job (\d+)", out
        )
        if not m:
            raise SchedulerError(f"no job id in sbatch's answer {out.strip()!r}")
        return m.group(1)

    def status(self, job_ids: list[str]) -> list[str]:
        return [
            "squeue",
            "--noheader",
            "--states=all",
            f"--jobs={','.join(job_ids)}",
            "--format=%i|%T|%r|%N",
        ]

    def parse_status(self, out: str) -> dict[str, JobState]:
        states = {}
        for line in out.splitlines():
            fields = line.strip().split("|")
            if len(fields) != 4:
                continue
            job_id, state, reason, nodes = fields
            state = state.split()[0].rstrip("+") if state else "UNKNOWN"
            phase = (
                PENDING
                if state in self._PENDING
                else RUNNING
                if state in self._RUNNING
                else FINISHED
            )
            reason = "" if reason in ("None", "(null)") else reason
            node = nodes.split(",")[0] if nodes not in ("", "(null)", "n/a") else ""
            states[job_id] = JobState(job_id, phase, state, reason, _first_node(node))
        return states

    def signal(self, job_id: str, signame: str) -> list[str]:
        # --full: the batch step and its children too (by default only job steps are
        # signalled, and a kernel started by the batch script is not in a step)
        return ["scancel", f"--signal={signame}", "--full", job_id]

    def cancel(self, job_id: str) -> list[str]:
        return ["scancel", job_id]

    def ping(self) -> list[str]:
        return ["sinfo", "--noheader", "--format=%P"]  # asks slurmctld


def _first_node(nodelist: str) -> str:
    """ "node[01-04]" -> "node01"; "gpu7" -> "gpu7"."""
    m = re.match(r"^([^\[,]*)\[(\d+)", nodelist)
    return m.group(1) + m.group(2) if m else nodelist.split(",")[0]


class GridEngine(Scheduler):
    """Son of Grid Engine / Univa / Altair Grid Engine. It has no way to deliver SIGINT to a
    job, so its kernelspecs interrupt by message (ipykernel then signals itself)."""

    name, label, can_signal = "sge", "Grid Engine job", False

    def submit(self, job: JobRequest) -> list[str]:
        argv = ["qsub", "-terse", "-N", job.name, "-o", job.output, "-j", "y", "-S", "/bin/sh"]
        argv += ["-wd", job.workdir] if job.workdir else ["-cwd"]
        if job.queue:
            argv += ["-q", job.queue]
        if job.cpus:
            argv += ["-pe", "smp", str(job.cpus)]
        if job.memory:
            argv += ["-l", f"h_vmem={job.memory}"]
        if job.gpus:
            argv += ["-l", f"gpu={job.gpus}"]
        if job.walltime:
            argv += ["-l", f"h_rt={job.walltime}"]
        if job.account:
            argv += ["-P", job.account]
        return argv + list(job.extra_args)

    def parse_submit(self, out: str) -> str:
        # -terse: "4711"; without: 'Your job 4711 ("name") has been submitted'
        m = re.search(r"^(\d+)(?:\.\S+)?\s*$", out.strip(), re.M) or re.search(
            r"Your job (\d+)", out
        )
        if not m:
            raise SchedulerError(f"no job id in qsub's answer {out.strip()!r}")
        return m.group(1)

    def status(self, job_ids: list[str]) -> list[str]:
        return ["qstat"]  # plain qstat lists the user's jobs; -j would be one per call

    def parse_status(self, out: str) -> dict[str, JobState]:
        states = {}
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 5 or not fields[0].isdigit():
                continue
            job_id, state = fields[0], fields[4]
            queue = fields[7] if len(fields) > 8 and "@" in fields[7] else ""
            if "E" in state:  # Eqw: an error holds it in the queue
                phase, reason = PENDING, "error state; see qstat -j " + job_id
            elif "d" in state:
                phase, reason = FINISHED, "being deleted"
            elif state.endswith("qw") or "h" in state:
                phase, reason = PENDING, "on hold" if "h" in state else ""
            else:  # r, t, R, s, S, T
                phase, reason = RUNNING, ""
            states[job_id] = JobState(job_id, phase, state, reason, queue.partition("@")[2])
        return states

    def signal(self, job_id: str, signame: str) -> list[str]:
        raise SchedulerError(
            "Grid Engine cannot send a signal to a job "
            "(use interrupt_mode 'message' in the kernelspec)"
        )

    def cancel(self, job_id: str) -> list[str]:
        return ["qdel", job_id]

    def ping(self) -> list[str]:
        return ["qstat"]


class PBS(Scheduler):
    """OpenPBS / PBS Professional (qstat -F json needs 19.x or later)."""

    name, label = "pbs", "PBS job"
    _PENDING = frozenset({"Q", "H", "W", "T", "S", "U", "M", "B"})

    def submit(self, job: JobRequest) -> list[str]:
        select = [f"ncpus={job.cpus or 1}"]
        if job.memory:
            select.append(f"mem={_memory(job.memory, suffix='b')}")
        if job.gpus:
            select.append(f"ngpus={job.gpus}")
        argv = [
            "qsub",
            "-N",
            job.name[:15],
            "-o",
            job.output,
            "-j",
            "oe",
            "-l",
            "select=1:" + ":".join(select),
        ]
        if job.queue:
            argv += ["-q", job.queue]
        if job.walltime:
            argv += ["-l", f"walltime={job.walltime}"]
        if job.account:
            argv += ["-A", job.account]
        # PBS has no option for the directory; the job script changes to it
        return argv + list(job.extra_args)

    def parse_submit(self, out: str) -> str:
        m = re.search(r"^(\d+(?:\[\])?\.\S+|\d+)\s*$", out.strip(), re.M)
        if not m:
            raise SchedulerError(f"no job id in qsub's answer {out.strip()!r}")
        return m.group(1)

    def status(self, job_ids: list[str]) -> list[str]:
        return ["qstat", "-f", "-F", "json", "-x", *job_ids]

    def parse_status(self, out: str) -> dict[str, JobState]:
        start = out.find("{")
        if start < 0:
            return {}
        try:
            jobs = json.loads(out[start:]).get("Jobs", {})
        except ValueError as e:
            raise SchedulerError(f"qstat -F json gave no JSON: {e}") from e
        states = {}
        for job_id, attrs in jobs.items():
            state = attrs.get("job_state", "?")
            phase = (
                FINISHED if state in ("F", "X") else PENDING if state in self._PENDING else RUNNING
            )  # R, E (exiting)
            if state == "E":
                phase = FINISHED  # the kernel process has already exited
            node = attrs.get("exec_host", "").split("/")[0].split("+")[0]
            reason = attrs.get("comment", "") if phase == PENDING else ""
            states[job_id] = JobState(job_id, phase, state, reason, node)
        return states

    def signal(self, job_id: str, signame: str) -> list[str]:
        return ["qsig", "-s", f"SIG{signame}", job_id]

    def cancel(self, job_id: str) -> list[str]:
        return ["qdel", job_id]

    def ping(self) -> list[str]:
        return ["qstat", "-B"]  # the server's status


class LSF(Scheduler):
    """IBM Spectrum LSF (bjobs -o needs 9.1.3 or later)."""

    name, label = "lsf", "LSF job"
    _PENDING = frozenset({"PEND", "PSUSP", "WAIT", "PROV"})
    _RUNNING = frozenset({"RUN", "USUSP", "SSUSP", "UNKWN"})

    def submit(self, job: JobRequest) -> list[str]:
        argv = ["bsub", "-J", job.name, "-o", job.output]
        if job.workdir:
            argv += ["-cwd", job.workdir]
        if job.queue:
            argv += ["-q", job.queue]
        if job.cpus:
            argv += ["-n", str(job.cpus), "-R", "span[hosts=1]"]
        if job.memory:
            argv += [
                "-M",
                job.memory.upper() + ("B" if job.memory[-1:].isalpha() else ""),
                "-R",
                f"rusage[mem={job.memory.upper()}B]",
            ]
        if job.gpus:
            argv += ["-gpu", f"num={job.gpus}"]
        if job.walltime:
            argv += ["-W", _hhmm(job.walltime)]
        if job.account:
            argv += ["-P", job.account]
        return argv + list(job.extra_args)

    def parse_submit(self, out: str) -> str:
        m = re.search(r"Job <(\d+)> is submitted", out)
        if not m:
            raise SchedulerError(f"no job id in bsub's answer {out.strip()!r}")
        return m.group(1)

    def status(self, job_ids: list[str]) -> list[str]:
        return [
            "bjobs",
            "-noheader",
            "-o",
            "jobid stat exec_host pend_reason delimiter='|'",
            *job_ids,
        ]

    def parse_status(self, out: str) -> dict[str, JobState]:
        states = {}
        for line in out.splitlines():
            fields = line.strip().split("|")
            if len(fields) != 4 or not fields[0].isdigit():
                continue  # "Job <12> is not found"
            job_id, state, hosts, reason = (f.strip() for f in fields)
            phase = (
                PENDING
                if state in self._PENDING
                else RUNNING
                if state in self._RUNNING
                else FINISHED
            )  # DONE, EXIT, ZOMBI
            node = hosts.split(":")[0].split("*")[-1] if hosts not in ("", "-") else ""
            reason = "" if reason == "-" else reason.rstrip(";")
            states[job_id] = JobState(job_id, phase, state, reason, node)
        return states

    def signal(self, job_id: str, signame: str) -> list[str]:
        return ["bkill", "-s", signame, job_id]

    def cancel(self, job_id: str) -> list[str]:
        return ["bkill", job_id]

    def ping(self) -> list[str]:
        return ["lsid"]  # the cluster and its master


SCHEDULERS: dict[str, Scheduler] = {s.name: s for s in (Slurm(), GridEngine(), PBS(), LSF())}
