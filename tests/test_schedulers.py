"""The scheduler templates (gateway/backends/schedulers.py): the commands they produce and the
outputs they parse. SLURM also runs for real in test_slurm_backend.py; Grid Engine, PBS and LSF
cannot run on this machine, so their outputs below are samples in the exact formats those
schedulers print (Son of Grid Engine 8.1 qstat/qsub, OpenPBS 22 qstat -f -F json and qsub,
LSF 10.1 bsub and bjobs -o), reconstructed from their documentation and typical sessions
rather than captured here. The SLURM lines are in the form this machine's slurm 22.05 printed."""

from __future__ import annotations

import pytest

from gateway.backends.schedulers import (
    FINISHED,
    PENDING,
    RUNNING,
    SCHEDULERS,
    JobRequest,
)
from gateway.errors import SchedulerError

pytestmark = pytest.mark.unit

FULL = JobRequest(
    name="rkg-k1",
    output="/shared/rt/k1.log",
    workdir="/shared/me",
    queue="gpu",
    cpus=4,
    memory="16G",
    gpus=1,
    walltime="01:30:00",
    account="proj42",
    extra_args=("--extra",),
)
BARE = JobRequest(name="rkg-k1", output="/shared/rt/k1.log")

# -- SLURM ---------------------------------------------------------------------------------

SLURM_SQUEUE = """\
41|RUNNING|None|vm
42|PENDING|PartitionDown|
43|PENDING|Resources|
44|COMPLETING|None|vm
45|FAILED|NonZeroExitCode|vm
46|RUNNING|None|node[07-08]
47|CANCELLED|None|vm
"""


def test_slurm_commands():
    s = SCHEDULERS["slurm"]
    assert s.submit(FULL) == [
        "sbatch",
        "--parsable",
        "--job-name=rkg-k1",
        "--output=/shared/rt/k1.log",
        "--nodes=1",
        "--ntasks=1",
        "--chdir=/shared/me",
        "--partition=gpu",
        "--mem=16G",
        "--time=01:30:00",
        "--account=proj42",
        "--cpus-per-task=4",
        "--gpus=1",
        "--extra",
    ]
    assert s.submit(BARE) == [
        "sbatch",
        "--parsable",
        "--job-name=rkg-k1",
        "--output=/shared/rt/k1.log",
        "--nodes=1",
        "--ntasks=1",
    ]
    assert s.status(["41", "42"]) == [
        "squeue",
        "--noheader",
        "--states=all",
        "--jobs=41,42",
        "--format=%i|%T|%r|%N",
    ]
    assert s.signal("41", "INT") == ["scancel", "--signal=INT", "--full", "41"]
    assert s.cancel("41") == ["scancel", "41"]


def test_slurm_parsing():
    s = SCHEDULERS["slurm"]
    assert s.parse_submit("41\n") == "41"
    assert s.parse_submit("41;cluster2\n") == "41"
    assert s.parse_submit("Submitted batch job 41\n") == "41"
    with pytest.raises(SchedulerError):
        s.parse_submit("sbatch: error: Batch job submission failed\n")
    st = s.parse_status(SLURM_SQUEUE)
    assert (st["41"].phase, st["41"].node, st["41"].reason) == (RUNNING, "vm", "")
    assert (st["42"].phase, st["42"].describe()) == (PENDING, "PENDING (PartitionDown)")
    assert st["43"].node == ""
    assert st["44"].phase == st["45"].phase == st["47"].phase == FINISHED
    assert st["47"].state == "CANCELLED"
    assert st["46"].node == "node07"
    assert s.parse_status("") == {}


# -- Grid Engine ---------------------------------------------------------------------------

SGE_QSTAT = """\
job-ID  prior   name       user         state submit/start at     queue                          slots ja-task-ID
-----------------------------------------------------------------------------------------------------------------
   4711 0.55500 rkg-k1     alice        r     11/22/2026 13:40:12 all.q@node01.cluster.local         4
   4712 0.00000 rkg-k2     alice        qw    11/22/2026 13:41:03                                    4
   4713 0.00000 rkg-k3     alice        hqw   11/22/2026 13:41:05                                    1
   4714 0.00000 rkg-k4     alice        Eqw   11/22/2026 13:41:09                                    1
   4715 0.55500 rkg-k5     alice        dr    11/22/2026 13:39:00 gpu.q@gpu03.cluster.local          1
"""  # noqa: E501 - qstat's own column widths


def test_sge_commands():
    s = SCHEDULERS["sge"]
    assert s.submit(FULL) == [
        "qsub",
        "-terse",
        "-N",
        "rkg-k1",
        "-o",
        "/shared/rt/k1.log",
        "-j",
        "y",
        "-S",
        "/bin/sh",
        "-wd",
        "/shared/me",
        "-q",
        "gpu",
        "-pe",
        "smp",
        "4",
        "-l",
        "h_vmem=16G",
        "-l",
        "gpu=1",
        "-l",
        "h_rt=01:30:00",
        "-P",
        "proj42",
        "--extra",
    ]
    assert s.submit(BARE)[-1] == "-cwd"
    assert s.cancel("4711") == ["qdel", "4711"]
    assert not s.can_signal
    with pytest.raises(SchedulerError, match="interrupt_mode 'message'"):
        s.signal("4711", "INT")


def test_sge_parsing():
    s = SCHEDULERS["sge"]
    assert s.parse_submit("4711\n") == "4711"
    assert s.parse_submit('Your job 4711 ("rkg-k1") has been submitted\n') == "4711"
    st = s.parse_status(SGE_QSTAT)
    assert (st["4711"].phase, st["4711"].node) == (RUNNING, "node01.cluster.local")
    assert st["4712"].phase == PENDING and st["4712"].state == "qw"
    assert st["4713"].phase == PENDING and st["4713"].reason == "on hold"
    assert st["4714"].phase == PENDING and "error" in st["4714"].reason
    assert st["4715"].phase == FINISHED
    assert s.parse_status("") == {}  # qstat prints nothing when the user has no jobs


# -- PBS -----------------------------------------------------------------------------------

PBS_QSTAT_JSON = """\
{
    "timestamp":1795354812,
    "pbs_version":"22.05.11",
    "pbs_server":"pbs01",
    "Jobs":{
        "1234.pbs01":{
            "Job_Name":"rkg-k1",
            "Job_Owner":"alice@login01",
            "job_state":"R",
            "queue":"workq",
            "server":"pbs01",
            "exec_host":"node07/0*4",
            "exec_vnode":"(node07:ncpus=4:mem=16777216kb:ngpus=1)",
            "Resource_List":{"ncpus":4, "mem":"16gb", "ngpus":1, "nodect":1,
                             "select":"1:ncpus=4:mem=16gb:ngpus=1", "walltime":"01:30:00"},
            "substate":42
        },
        "1235.pbs01":{
            "Job_Name":"rkg-k2",
            "job_state":"Q",
            "queue":"workq",
            "comment":"Not Running: Insufficient amount of resource: ngpus (R: 1 A: 0 T: 8)",
            "substate":10
        },
        "1236.pbs01":{
            "Job_Name":"rkg-k3",
            "job_state":"F",
            "queue":"workq",
            "exec_host":"node02/1",
            "Exit_status":0,
            "comment":"Job run at Sun Nov 22 at 13:30 on (node02:ncpus=1) and finished",
            "substate":92
        },
        "1237.pbs01":{
            "Job_Name":"rkg-k4",
            "job_state":"E",
            "exec_host":"node03/0+node04/0",
            "substate":51
        }
    }
}
"""


def test_pbs_commands():
    s = SCHEDULERS["pbs"]
    assert s.submit(FULL) == [
        "qsub",
        "-N",
        "rkg-k1",
        "-o",
        "/shared/rt/k1.log",
        "-j",
        "oe",
        "-l",
        "select=1:ncpus=4:mem=16gb:ngpus=1",
        "-q",
        "gpu",
        "-l",
        "walltime=01:30:00",
        "-A",
        "proj42",
        "--extra",
    ]
    assert s.submit(BARE) == [
        "qsub",
        "-N",
        "rkg-k1",
        "-o",
        "/shared/rt/k1.log",
        "-j",
        "oe",
        "-l",
        "select=1:ncpus=1",
    ]
    long_name = JobRequest(name="rkg-0123456789abcdef", output="o")
    assert s.submit(long_name)[2] == "rkg-0123456789a"  # PBS keeps 15 characters
    assert s.status(["1234.pbs01"]) == ["qstat", "-f", "-F", "json", "-x", "1234.pbs01"]
    assert s.signal("1234.pbs01", "INT") == ["qsig", "-s", "SIGINT", "1234.pbs01"]
    assert s.cancel("1234.pbs01") == ["qdel", "1234.pbs01"]


def test_pbs_parsing():
    s = SCHEDULERS["pbs"]
    assert s.parse_submit("1234.pbs01\n") == "1234.pbs01"
    with pytest.raises(SchedulerError):
        s.parse_submit("qsub: Unknown queue\n")
    st = s.parse_status(PBS_QSTAT_JSON)
    assert (st["1234.pbs01"].phase, st["1234.pbs01"].node) == (RUNNING, "node07")
    assert st["1235.pbs01"].phase == PENDING
    assert "Insufficient amount of resource: ngpus" in st["1235.pbs01"].describe()
    assert st["1236.pbs01"].phase == FINISHED and st["1236.pbs01"].reason == ""
    assert st["1237.pbs01"].phase == FINISHED and st["1237.pbs01"].node == "node03"
    # a job qstat no longer knows is only on stderr ("qstat: Unknown Job Id 99.pbs01")
    assert s.parse_status("") == {}
    with pytest.raises(SchedulerError):
        s.parse_status("{ not json")


# -- LSF -----------------------------------------------------------------------------------

LSF_BJOBS = """\
5501|RUN|4*node07|-
5502|PEND|-|Job's requirements for resource reservation not satisfied: 1 host;
5503|PSUSP|-|The job was suspended by the user while pending: 1 host;
5504|DONE|node02|-
5505|EXIT|node03|-
5506|RUN|2*node10:2*node11|-
Job <5507> is not found
"""


def test_lsf_commands():
    s = SCHEDULERS["lsf"]
    assert s.submit(FULL) == [
        "bsub",
        "-J",
        "rkg-k1",
        "-o",
        "/shared/rt/k1.log",
        "-cwd",
        "/shared/me",
        "-q",
        "gpu",
        "-n",
        "4",
        "-R",
        "span[hosts=1]",
        "-M",
        "16GB",
        "-R",
        "rusage[mem=16GB]",
        "-gpu",
        "num=1",
        "-W",
        "1:30",
        "-P",
        "proj42",
        "--extra",
    ]
    assert s.submit(BARE) == ["bsub", "-J", "rkg-k1", "-o", "/shared/rt/k1.log"]
    assert s.submit(JobRequest(name="n", output="o", walltime="00:10:30"))[-1] == "0:11"
    assert s.status(["5501"]) == [
        "bjobs",
        "-noheader",
        "-o",
        "jobid stat exec_host pend_reason delimiter='|'",
        "5501",
    ]
    assert s.signal("5501", "INT") == ["bkill", "-s", "INT", "5501"]
    assert s.cancel("5501") == ["bkill", "5501"]


def test_lsf_parsing():
    s = SCHEDULERS["lsf"]
    assert s.parse_submit("Job <5501> is submitted to queue <normal>.\n") == "5501"
    assert s.parse_submit("Job <5501> is submitted to default queue <normal>.\n") == "5501"
    with pytest.raises(SchedulerError):
        s.parse_submit("gpu: No such queue. Job not submitted.\n")
    st = s.parse_status(LSF_BJOBS)
    assert (st["5501"].phase, st["5501"].node) == (RUNNING, "node07")
    assert st["5502"].phase == PENDING
    assert st["5502"].reason.startswith("Job's requirements for resource reservation")
    assert st["5503"].phase == PENDING
    assert st["5504"].phase == st["5505"].phase == FINISHED
    assert st["5506"].node == "node10"
    assert "5507" not in st


def test_job_script():
    from gateway.backends.batch import job_script
    from gateway.backends.common import remote_env

    script = job_script(
        cmd=["python3", "-m", "ipykernel_launcher", "-f", "/rt/k 1.json"],
        env={"KERNEL_ID": "k1", "A": "x y"},
        workdir="~/work dir",
        pre_command="module load cuda",
    )
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh" and lines[1] == "umask 077"
    assert lines[2].startswith("""cd "$HOME"'/work dir' || """)
    assert "module load cuda" in script and "export A='x y'" in script
    assert lines[-1] == "exec python3 -m ipykernel_launcher -f '/rt/k 1.json' </dev/null"
    env = remote_env({"KERNEL_ID": "k1", "BAD-NAME": "1"}, {"PATH": "/x"}, {"OMP_NUM_THREADS": "4"})
    assert env == {"KERNEL_ID": "k1", "OMP_NUM_THREADS": "4"}
