"""A private dockerd for the benchmark's `ours-docker` target (../shared/INFRA.md: its own
socket, no iptables, no IP forwarding, addresses in the test range, blackholed below its own
bridge routes), and a kernelspec for the gateway's Docker backend using the kernel image the
tests build (tests/dockerinfra.py, kept in the same data root). Needs root."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DATA_ROOT = "/var/lib/rkg-test-docker"  # the tests' data root: their kernel image is there
IMAGE = "rkg-test-kernel:latest"
KERNEL_NAME = "docker-python"
BLACKHOLES = ["10.200.99.0/24", "10.201.0.0/16"]


class LocalDockerd:
    def __init__(self, tmp: Path) -> None:
        if not shutil.which("dockerd") or os.geteuid() != 0:
            raise RuntimeError("ours-docker needs dockerd (apt-get install docker.io) and root")
        self.dir = tmp / "dockerd"
        self.dir.mkdir()
        # the tests' data root holds one dockerd at a time (tests/dockerinfra.py: same lock)
        self.lock = open(f"{DATA_ROOT}.lock", "w")  # closed in stop()
        print(f"ours-docker: waiting for {DATA_ROOT} (a test run may hold it)", file=sys.stderr)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.sock = self.dir / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}"}
        (self.dir / "daemon.json").write_text(
            json.dumps(
                {
                    "bip": "10.200.99.1/24",
                    "default-address-pools": [{"base": "10.201.0.0/16", "size": 24}],
                    "storage-driver": "overlay2",
                    "iptables": False,
                    "ip-forward": False,
                    "data-root": DATA_ROOT,
                    "exec-root": str(self.dir / "exec"),
                    "pidfile": str(self.dir / "docker.pid"),
                    "hosts": [f"unix://{self.sock}"],
                }
            )
        )
        for net in BLACKHOLES:
            subprocess.run(
                ["ip", "route", "replace", "blackhole", net, "metric", "4000"], check=True
            )
        self.log = open(self.dir / "dockerd.log", "wb")  # closed in stop()
        # not marked as the run's (bench.py MARK): a daemon, stopped here, not a kernel
        daemon_env = {k: v for k, v in os.environ.items() if k != "RKG_BENCH_RUN"}
        self.proc = subprocess.Popen(
            ["dockerd", "--config-file", str(self.dir / "daemon.json")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=daemon_env,
            start_new_session=True,
        )
        for _ in range(100):
            if self._docker("info").returncode == 0:
                break
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"dockerd did not start; see {self.dir / 'dockerd.log'}")
        if self._docker("image", "inspect", IMAGE).returncode != 0:
            self.stop()
            raise RuntimeError(
                f"no {IMAGE} in {DATA_ROOT}: run the tests once "
                "(tests/test_docker_backend.py builds it)"
            )

    def _docker(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, check=False, timeout=60
        )

    def write_kernelspec(self, directory: Path) -> None:
        from gateway.specs import write_spec

        config = {"image": IMAGE, "docker_host": self.env["DOCKER_HOST"]}
        write_spec(
            KERNEL_NAME,
            {
                "argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python in Docker",
                "language": "python",
                "metadata": {
                    "kernel_provisioner": {"provisioner_name": "rkg-docker", "config": config}
                },
            },
            str(directory),
        )

    def stop(self) -> None:
        leftover = self._docker("ps", "-aq", "--filter", "label=app=remote-kernel-gateway")
        ids = leftover.stdout.decode().split()
        if ids:
            print(
                f"ours-docker: {len(ids)} container(s) left behind by the gateway: {ids}",
                file=sys.stderr,
            )
            self._docker("rm", "-f", *ids)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        self.lock.close()
        for link in ("docker0",):  # dockerd leaves its bridge; it makes it again next start
            subprocess.run(["ip", "link", "del", link], check=False, capture_output=True)
        for net in BLACKHOLES:
            subprocess.run(
                ["ip", "route", "del", "blackhole", net, "metric", "4000"],
                check=False,
                capture_output=True,
            )
