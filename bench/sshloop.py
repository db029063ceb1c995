"""A loopback OpenSSH server for the benchmark's `ours-ssh` target (../shared/INFRA.md,
loopback recipe): host and client keys in a temporary folder, sshd on 127.0.0.1 and a free
port, and a kernelspec for the gateway's SSH backend pointing at it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
KERNEL_NAME = "ssh-loopback"


class LoopbackSSH:
    def __init__(self, tmp: Path) -> None:
        if not os.path.exists(SSHD):
            raise RuntimeError("ours-ssh needs OpenSSH's sshd (apt-get install openssh-server)")
        self.dir = tmp / "sshloop"
        self.dir.mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        for name in ("host_key", "client_key"):
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "",
                    "-f",
                    str(self.dir / name),
                ],
                check=True,
            )
        (self.dir / "authorized_keys").write_text((self.dir / "client_key.pub").read_text())
        host_pub = " ".join((self.dir / "host_key.pub").read_text().split()[:2])
        (self.dir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")
        (self.dir / "sshd_config").write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"Port {self.port}",
                    f"HostKey {self.dir / 'host_key'}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "AllowTcpForwarding yes",
                    # a login shell's rc files can be slow (pyenv here): keep remote commands lean
                    "SetEnv SHLVL=1",
                    f"Subsystem sftp {SFTP_SERVER}",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        os.makedirs("/run/sshd", exist_ok=True)
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("the loopback sshd did not start")

    def write_kernelspec(self, directory: Path) -> None:
        from gateway.specs import ssh_spec, write_spec

        spec = ssh_spec("127.0.0.1", display_name="Python over loopback SSH")
        spec["metadata"]["kernel_provisioner"]["config"] = {
            "host": f"{os.environ.get('USER', 'root')}@127.0.0.1:{self.port}",
            "identity_file": str(self.dir / "client_key"),
            "known_hosts": str(self.dir / "known_hosts"),
            "python": sys.executable,
            "runtime_dir": str(self.dir / "remote-runtime"),
        }
        write_spec(KERNEL_NAME, spec, str(directory))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
