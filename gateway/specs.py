"""`rkg spec`: write, list and remove kernelspecs for the backends (SSH, containers, batch
jobs), in the user's Jupyter kernels directory or a given one. The specs are plain
kernelspecs, so a JupyterLab without the gateway runs them too."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir

from .backends import sync as fsync
from .errors import BadRequest, Conflict, NotFound
from .kernels import failover

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def kernels_dir(directory: str | None) -> Path:
    return Path(directory) if directory else Path(jupyter_data_dir()) / "kernels"


def ssh_spec(
    host: str | list[str],
    *,
    jump: list[str] | None = None,
    python: str = "python3",
    workdir: str = "",
    identity: str = "",
    known_hosts: str = "",
    pre: str = "",
    display_name: str = "",
    kernel_cmd: list[str] | None = None,
    env: dict[str, str] | None = None,
    password_command: str = "",
    password_file: str = "",
    discover: bool = False,
    discover_paths: list[str] | None = None,
    sync: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The kernel.json of a Python kernel on `host` ([user@]host[:port]); a list of hosts is
    tried in order at each start (failover), the first kept as `host`. With `discover`, a
    template: the gateway lists the kernelspecs installed on the host instead
    (kernels/discovery.py)."""
    hosts = [host] if isinstance(host, str) else list(host)
    host = hosts[0]
    config: dict[str, Any] = {"host": host, "python": python}
    if len(hosts) > 1:
        config["hosts"] = hosts
    if password_command and password_file:
        raise BadRequest("give --password-command or --password-file, not both")
    if password_file:
        from .backends.sshpool import check_password_file

        password_file = check_password_file(password_file)
    for key, value in (
        ("jump_hosts", jump),
        ("workdir", workdir),
        ("identity_file", identity),
        ("known_hosts", known_hosts),
        ("pre_command", pre),
        ("kernel_cmd", kernel_cmd),
        ("env", env),
        ("password_command", password_command),
        ("password_file", password_file),
        ("discover", discover),
        ("discover_paths", discover_paths),
    ):
        if value:
            config[key] = value
    config.update(sync or {})
    argv = kernel_cmd or [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    return {
        "argv": argv,  # informative: the provisioner runs this on the remote host
        "display_name": display_name or f"Python ({host.rpartition('@')[2]})",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"kernel_provisioner": {"provisioner_name": "rkg-ssh", "config": config}},
    }


SCHEDULER_NAMES = {"slurm": "SLURM", "sge": "Grid Engine", "pbs": "PBS", "lsf": "LSF"}


def batch_spec(
    scheduler: str,
    *,
    partition: str = "",
    cpus: int = 0,
    memory: str = "",
    gpus: int = 0,
    walltime: str = "",
    account: str = "",
    submit_args: list[str] | None = None,
    python: str = "python3",
    pre: str = "",
    workdir: str = "",
    runtime_dir: str = "",
    login: str = "",
    jump: list[str] | None = None,
    identity: str = "",
    known_hosts: str = "",
    display_name: str = "",
) -> dict[str, Any]:
    """The kernel.json of a Python kernel run as a batch job (gateway/backends/batch.py),
    submitted on the gateway's machine or, with `login`, on a login node over SSH."""
    config: dict[str, Any] = {"scheduler": scheduler, "python": python}
    for key, value in (
        ("partition", partition),
        ("cpus", cpus),
        ("memory", memory),
        ("gpus", gpus),
        ("walltime", walltime),
        ("account", account),
        ("submit_args", submit_args),
        ("pre_command", pre),
        ("workdir", workdir),
        ("runtime_dir", runtime_dir),
        ("login", login),
        ("jump_hosts", jump),
        ("identity_file", identity),
        ("known_hosts", known_hosts),
    ):
        if value:
            config[key] = value
    where = f" {partition}" if partition else ""
    return {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],  # informative
        "display_name": display_name or f"Python ({SCHEDULER_NAMES[scheduler]}{where})",
        "language": "python",
        # Grid Engine cannot signal a job: ipykernel interrupts itself on a control message
        "interrupt_mode": "message" if scheduler == "sge" else "signal",
        "metadata": {"kernel_provisioner": {"provisioner_name": "rkg-batch", "config": config}},
    }


CONTAINER_BACKENDS = {"docker": "rkg-docker", "swarm": "rkg-swarm"}


def pairs(items: list[str], what: str) -> dict[str, str]:
    """['K=V', ...] from repeated options, as a dict; a missing '=' is the user's mistake."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadRequest(f"{what} {item!r} must be KEY=VALUE")
        out[key] = value
    return out


def container_spec(
    backend: str, image: str, *, display_name: str = "", **options: Any
) -> dict[str, Any]:
    """The kernel.json of a Python kernel in a container (docker.py) or a Swarm service
    (swarm.py). Only the options given go into the config; the provisioner has the defaults."""
    if not image:
        raise BadRequest("an image is needed (--image)")
    config: dict[str, Any] = {"image": image}
    config.update(
        {
            k: v
            for k, v in options.items()
            if v is not None and v is not False and v != "" and v != [] and v != {}
        }
    )
    python = str(config.get("python", "python3"))
    return {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],  # informative
        "display_name": display_name or f"Python ({image}, {backend.capitalize()})",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": CONTAINER_BACKENDS[backend],
                "config": config,
            }
        },
    }


def any_kernel(
    spec: dict[str, Any],
    kernel_cmd: str = "",
    language: str = "",
    port_range: str = "",
    interrupt_mode: str = "",
) -> dict[str, Any]:
    """`spec` made to run any kernel: `kernel_cmd` (a shell-quoted command line that must hold
    {connection_file}) becomes its argv and, for a backend that runs it elsewhere, its
    config's kernel_cmd; `language` its language (and the display name's first word when
    that was the default "Python ..."); `port_range` (LO-HI) the config's port_range;
    `interrupt_mode` (signal, message) how the kernel is interrupted."""
    from .backends.ports import parse_range

    prov = spec.get("metadata", {}).get("kernel_provisioner")
    config = prov.setdefault("config", {}) if prov is not None else {}
    if kernel_cmd:
        try:
            argv = shlex.split(kernel_cmd)
        except ValueError as e:
            raise BadRequest(f"--kernel-cmd {kernel_cmd!r}: {e}") from e
        if not any("{connection_file}" in a for a in argv):
            raise BadRequest(
                f"--kernel-cmd {kernel_cmd!r} has no {{connection_file}}: the kernel must be "
                "given its connection file (its ports and key), e.g. "
                "'R --slave -e IRkernel::main() --args {connection_file}'"
            )
        spec["argv"] = argv
        if prov is not None:
            config["kernel_cmd"] = argv
    if language:
        spec["language"] = language
        if kernel_cmd and spec.get("display_name", "").startswith("Python ("):
            spec["display_name"] = language + spec["display_name"].removeprefix("Python")
    if port_range:
        try:
            parse_range(port_range)
        except ValueError as e:
            raise BadRequest(f"--port-range: {e}") from e
        config["port_range"] = port_range
    if interrupt_mode:
        spec["interrupt_mode"] = interrupt_mode
    return spec


def add_any_kernel_arguments(parser: argparse.ArgumentParser, ports: bool = True) -> None:
    parser.add_argument(
        "--kernel-cmd",
        default="",
        help="any kernel's command line, with {connection_file} (default: ipykernel)",
    )
    parser.add_argument("--language", default="", help="the kernel's language (default: python)")
    parser.add_argument(
        "--interrupt-mode",
        choices=["signal", "message"],
        default="",
        help="signal: SIGINT (default); message: an interrupt_request, for kernels that die of "
        "SIGINT (xeus-python)",
    )
    if ports:
        parser.add_argument(
            "--port-range", default="", help="LO-HI: the kernel's ports (a firewall's open range)"
        )


def add_access_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, who in (("--authorized-users", "only these"), ("--unauthorized-users", "not these")):
        parser.add_argument(
            flag,
            default="",
            help=f"comma-separated KERNEL_USERNAMEs: {who} may start it (a 403 otherwise)",
        )


def with_access(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`spec` with the user lists given (--authorized-users, --unauthorized-users) in its
    provisioner config, where the gateway reads them (users.py)."""
    config = spec["metadata"]["kernel_provisioner"].setdefault("config", {})
    for key in ("authorized_users", "unauthorized_users"):
        given = [n.strip() for n in (getattr(args, key, "") or "").split(",") if n.strip()]
        if given:
            config[key] = given
    return spec


def local_spec(
    python: str,
    *,
    display_name: str = "",
    env: dict[str, str] | None = None,
    ipykernel: bool = True,
) -> dict[str, Any]:
    """The kernel.json of an ipykernel in another environment on this machine (a conda env,
    a venv): `python` must be an executable that can import ipykernel (unless not
    `ipykernel`: another kernel's command replaces the argv)."""
    import os
    import subprocess

    path = os.path.abspath(os.path.expanduser(python))
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise BadRequest(f"--python {python!r} is not an executable file")
    if ipykernel:
        try:
            probe = subprocess.run(
                [path, "-c", "import ipykernel"], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BadRequest(f"--python {python!r} does not run: {e}") from e
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            raise BadRequest(
                f"{path} has no ipykernel ({last}); install it there: "
                f"{path} -m pip install ipykernel"
            )
    spec: dict[str, Any] = {
        "argv": [path, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": display_name or f"Python ({path})",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"kernel_provisioner": {"provisioner_name": "rkg-local", "config": {}}},
    }
    if env:
        spec["env"] = env
    return spec


def with_launch_timeout(spec: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """`spec` with a launch timeout of its own (--launch-timeout), kept in its provisioner
    config as `launch_timeout`: a start of it may take that long unless the client sets
    KERNEL_LAUNCH_TIMEOUT (kernels/env.py spec_launch_timeout)."""
    if seconds is None:
        return spec
    if not 0 < seconds <= 24 * 3600:
        raise BadRequest("--launch-timeout must be between 0 and 86400 seconds")
    spec["metadata"]["kernel_provisioner"].setdefault("config", {})["launch_timeout"] = seconds
    return spec


def write_spec(
    name: str, spec: dict[str, Any], directory: str | None = None, force: bool = False
) -> Path:
    """Refuses to replace an existing kernelspec unless `force`."""
    if not _NAME.match(name):
        raise BadRequest(f"kernelspec name {name!r} may only use letters, digits, '.', '_', '-'")
    path = kernels_dir(directory) / name
    if (path / "kernel.json").exists() and not force:
        raise Conflict(f"{path} exists already; add --force to replace it")
    path.mkdir(parents=True, exist_ok=True)
    (path / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
    return path


def list_specs(directory: str | None = None) -> list[tuple[str, str, str]]:
    """(name, backend, display name) of every kernelspec in the directory."""
    out = []
    base = kernels_dir(directory)
    for spec_file in sorted(base.glob("*/kernel.json")) if base.is_dir() else []:
        try:
            spec = json.loads(spec_file.read_text())
        except (OSError, ValueError):
            continue
        prov = spec.get("metadata", {}).get("kernel_provisioner", {})
        backend = prov.get("provisioner_name", "local")
        where = _where(prov.get("config", {}))
        chain = failover.of(spec.get("metadata"))
        if chain is not None:
            backend, where = "failover", " ".join(chain.specs)
        out.append(
            (spec_file.parent.name, f"{backend} {where}".strip(), spec.get("display_name", ""))
        )
    return out


def _where(config: dict[str, Any]) -> str:
    return str(
        config.get("host", "")
        or config.get("image", "")
        or " ".join(w for w in (config.get("scheduler", ""), config.get("login", "")) if w)
    )


def show_spec(name: str, directory: str | None = None) -> str:
    """A kernelspec for people: one paragraph (backend, where, what runs) and its kernel.json,
    pretty-printed."""
    path = kernels_dir(directory) / name / "kernel.json"
    if not _NAME.match(name) or not path.is_file():
        raise NotFound(f"no kernelspec {name!r} in {kernels_dir(directory)}")
    try:
        spec = json.loads(path.read_text())
    except ValueError as e:
        raise BadRequest(f"{path} is not JSON: {e}") from e
    prov = spec.get("metadata", {}).get("kernel_provisioner") or {}
    backend = prov.get("provisioner_name", "")
    config = prov.get("config") or {}
    where = _where(config)
    runs = shlex.join(config.get("kernel_cmd") or spec.get("argv") or [])
    lines = [
        f"{name}: {spec.get('display_name', '')!r}, {spec.get('language', '?')}, "
        + (f"backend {backend}" if backend else "a plain local kernel (jupyter_client)")
        + (f" on {where}" if where else " on this machine")
        + f"; runs: {runs}"
    ]
    extras = []
    if config.get("jump_hosts"):
        extras.append("via " + ", ".join(config["jump_hosts"]))
    limit = config.get("launch_timeout")
    if limit:
        extras.append(
            f"launch timeout {limit:g} s"
            if isinstance(limit, int | float)
            else f"launch timeout {limit!r}"
        )
    if config.get("port_range"):
        extras.append(f"ports {config['port_range']}")
    if config.get("sync"):
        extras.append(f"files in sync every {config.get('sync_interval', 5):g} s")
    if config.get("password_command"):
        extras.append("password from a command")
    if config.get("password_file"):
        extras.append(f"password from {config['password_file']}")
    if extras:
        lines[0] += "; " + "; ".join(extras)
    lines[0] += "."
    return "\n".join([*lines, f"{path}:", json.dumps(spec, indent=2)])


def remove_spec(name: str, directory: str | None = None) -> Path:
    path = kernels_dir(directory) / name
    if not _NAME.match(name) or not (path / "kernel.json").is_file():
        raise NotFound(f"no kernelspec {name!r} in {kernels_dir(directory)}")
    shutil.rmtree(path)
    return path


# -- command line ------------------------------------------------------------------------


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="spec_command", required=True)
    add = sub.add_parser("add", help="write a kernelspec")
    backends = add.add_subparsers(dest="backend", required=True)
    ssh = backends.add_parser("ssh", help="a kernel on another machine over SSH")
    ssh.add_argument("name")
    ssh.add_argument(
        "--host",
        required=True,
        action="append",
        help="user@host[:port]; repeated: tried in this order at each start (failover)",
    )
    ssh.add_argument("--jump", action="append", default=[], help="jump host (repeatable)")
    ssh.add_argument("--python", default="python3", help="python on the remote host")
    ssh.add_argument("--workdir", default="", help="remote working directory")
    ssh.add_argument("--identity", default="", help="private key file (default: agent, ~/.ssh)")
    ssh.add_argument("--known-hosts", default="", help="known_hosts file")
    ssh.add_argument("--pre", default="", help="shell command run first (module load ...)")
    ssh.add_argument("--display-name", default="")
    ssh.add_argument(
        "--password-command",
        default="",
        help="command run on the gateway's machine whose output is the SSH password or "
        "one-time code (e.g. 'pass show gpu1')",
    )
    ssh.add_argument(
        "--password-file", default="", help="file holding the SSH password (mode 0600)"
    )
    ssh.add_argument(
        "--discover",
        action="store_true",
        help="list every kernelspec installed on the host as NAME-<its name> (read over SFTP)",
    )
    ssh.add_argument(
        "--discover-path",
        dest="discover_paths",
        action="append",
        default=[],
        help="a kernels directory on the host to read first, with --discover (repeatable)",
    )
    add_sync_arguments(ssh)
    local = backends.add_parser("local", help="a kernel in another environment on this machine")
    local.add_argument("name")
    local.add_argument("--python", required=True, help="that environment's python")
    local.add_argument("--env", action="append", default=[], help="KEY=VALUE (repeatable)")
    local.add_argument("--display-name", default="")
    for scheduler, what in SCHEDULER_NAMES.items():
        batch = backends.add_parser(scheduler, help=f"a kernel run as a {what} batch job")
        batch.add_argument("name")
        queue = "--partition" if scheduler == "slurm" else "--queue"
        batch.add_argument(queue, dest="partition", default="", help="partition or queue")
        batch.add_argument("--cpus", type=int, default=0)
        batch.add_argument("--memory", default="", help="4G, 512M")
        batch.add_argument("--gpus", type=int, default=0)
        batch.add_argument("--walltime", default="", help="HH:MM:SS")
        batch.add_argument("--account", default="")
        batch.add_argument(
            "--submit-arg",
            action="append",
            default=[],
            dest="submit_args",
            help="extra argument for the submit command (repeatable)",
        )
        batch.add_argument("--python", default="python3", help="python on the compute nodes")
        batch.add_argument("--pre", default="", help="shell command run first (module load ...)")
        batch.add_argument("--workdir", default="", help="the kernel's working directory")
        batch.add_argument(
            "--runtime-dir", default="", help="connection files, on a filesystem the nodes share"
        )
        batch.add_argument(
            "--login", default="", help="user@host[:port] of a login node to submit from over SSH"
        )
        batch.add_argument("--jump", action="append", default=[], help="jump host (repeatable)")
        batch.add_argument("--identity", default="", help="private key for the login node")
        batch.add_argument("--known-hosts", default="", help="known_hosts file")
        batch.add_argument("--display-name", default="")
    for backend, provisioner in CONTAINER_BACKENDS.items():
        what = "a Swarm service" if backend == "swarm" else "a Docker container"
        c = backends.add_parser(backend, help=f"a kernel in {what} ({provisioner})")
        c.add_argument("name")
        c.add_argument("--image", required=True, help="kernel image, already on the engine")
        c.add_argument(
            "--docker-host",
            default="",
            help="unix://, tcp:// or ssh:// engine URL (default: DOCKER_HOST)",
        )
        c.add_argument("--network", default="")
        c.add_argument(
            "--reach",
            choices=["published", "network"],
            default=None,
            help="ports published on 127.0.0.1 (default) or the container address",
        )
        c.add_argument(
            "--volume",
            action="append",
            default=[],
            dest="volumes",
            help="SRC:DST[:ro] (repeatable)",
        )
        c.add_argument(
            "--mirror-working-dir",
            action="store_true",
            help="bind KERNEL_WORKING_DIR at the same path and start there",
        )
        c.add_argument("--workdir", default="")
        c.add_argument("--env", action="append", default=[], help="KEY=VALUE (repeatable)")
        c.add_argument(
            "--working-dir-rw",
            action="store_const",
            const="rw",
            default=None,
            dest="working_dir_mode",
            help="mount the mirrored working directory read-write (default: read-only)",
        )
        c.add_argument("--uid", type=int, default=None)
        c.add_argument("--gid", type=int, default=None)
        c.add_argument("--uid-range", default="", help="KERNEL_UID a client may choose: 1000-65533")
        c.add_argument("--gid-range", default="", help="KERNEL_GID a client may choose: 1000-65533")
        c.add_argument("--cpus", type=float, default=None)
        c.add_argument("--memory", default="", help="4g, 512m")
        c.add_argument("--pids-limit", type=int, default=None)
        c.add_argument(
            "--gpus", default="", help="Docker: all, a count, device=0,1; Swarm: a count"
        )
        c.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
        c.add_argument("--python", default="", help="the image's python (default python3)")
        c.add_argument("--display-name", default="")
        if backend == "swarm":
            c.add_argument(
                "--constraint",
                action="append",
                default=[],
                dest="constraints",
                help="placement constraint, e.g. node.labels.gpu==true (repeatable)",
            )
    batches = [backends.choices[s] for s in (*SCHEDULER_NAMES, *CONTAINER_BACKENDS)]
    for p in (
        ssh,
        local,
        *batches,
        sub.add_parser("list", help="list kernelspecs"),
        sub.add_parser("show", help="show a kernelspec, readable"),
        sub.add_parser("remove", help="remove a kernelspec"),
    ):
        p.add_argument("--dir", default=None, help="kernels directory (default: Jupyter's)")
    for name, p in backends.choices.items():
        # a Swarm service's published ports cannot be given as a range; local kernels get
        # theirs from jupyter_client
        add_any_kernel_arguments(p, ports=name not in ("swarm", "local"))
        add_access_arguments(p)
        p.add_argument("--force", action="store_true", help="replace an existing kernelspec")
        p.add_argument(
            "--launch-timeout",
            type=float,
            default=None,
            help="seconds a start may take (default: --kernel-launch-timeout); a client's "
            "KERNEL_LAUNCH_TIMEOUT overrides it",
        )
    add_failover_arguments(backends)
    sub.choices["remove"].add_argument("name")
    sub.choices["show"].add_argument("name")


def add_sync_arguments(ssh: argparse.ArgumentParser) -> None:
    ssh.add_argument(
        "--sync",
        action="store_true",
        help="mirror the notebook's folder (KERNEL_WORKING_DIR) to the host under --workdir, "
        "start the kernel there and bring its files back while it runs",
    )
    ssh.add_argument(
        "--sync-exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also never sync these names (repeatable; always: "
        + " ".join(fsync.DEFAULT_EXCLUDES)
        + ")",
    )
    ssh.add_argument(
        "--sync-max-file-mb",
        type=float,
        default=None,
        help=f"larger files stay put ({fsync.MAX_FILE_MB[0]:g})",
    )
    ssh.add_argument(
        "--sync-max-total-mb",
        type=float,
        default=None,
        help=f"a larger folder is not synced: its start fails ({fsync.MAX_TOTAL_MB[0]:g})",
    )
    ssh.add_argument(
        "--sync-interval",
        type=float,
        default=None,
        help=f"seconds between passes ({fsync.INTERVAL[0]:g})",
    )


def sync_config(args: argparse.Namespace) -> dict[str, Any]:
    """The provisioner config of `--sync` and its options, checked here so that a bad value
    is said when the spec is written."""
    given = {
        "sync_max_file_mb": args.sync_max_file_mb,
        "sync_max_total_mb": args.sync_max_total_mb,
        "sync_interval": args.sync_interval,
    }
    if not args.sync:
        if args.sync_exclude or any(v is not None for v in given.values()):
            raise BadRequest("the --sync-* options need --sync")
        return {}
    excludes = [*fsync.DEFAULT_EXCLUDES, *args.sync_exclude]
    defaults = (fsync.MAX_FILE_MB[0], fsync.MAX_TOTAL_MB[0], fsync.INTERVAL[0])
    try:
        fsync.options(
            excludes,
            *(d if v is None else v for v, d in zip(given.values(), defaults, strict=True)),
        )
    except fsync.OutOfRange as e:
        name, wrong = e.args
        raise BadRequest(f"--{name.replace('_', '-')} {wrong}") from None
    config = {"sync": True, "sync_excludes": excludes}
    return config | {k: v for k, v in given.items() if v is not None}


def add_failover_arguments(backends: Any) -> None:
    """`rkg spec add failover NAME SPEC...`: none of the backends' options apply (who may
    start it: each member's own user lists, checked at the start)."""
    fo = backends.add_parser(
        "failover", help="a kernelspec that tries other kernelspecs in order (PC, else server)"
    )
    fo.add_argument("name")
    fo.add_argument("specs", nargs="+", metavar="SPEC", help="kernelspecs, tried in this order")
    fo.add_argument(
        "--attempt-timeout",
        type=float,
        default=0.0,
        help="seconds one kernelspec has to start and answer (default: the launch timeout)",
    )
    fo.add_argument("--display-name", default="")
    fo.add_argument("--language", default="", help="default: the first kernelspec's")
    fo.add_argument("--dir", default=None, help="kernels directory (default: Jupyter's)")
    fo.add_argument("--force", action="store_true", help="replace an existing kernelspec")


def failover_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The kernel.json `rkg spec add failover` writes; the language is the first member's
    when that kernelspec is in the same directory."""
    language = args.language
    first = kernels_dir(args.dir) / args.specs[0] / "kernel.json"
    if not language and first.is_file():
        language = str(json.loads(first.read_text()).get("language") or "")
    return failover.spec(
        args.specs,
        attempt_timeout=args.attempt_timeout,
        display_name=args.display_name,
        language=language or "python",
    )


def with_args(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`spec` with the options every backend has (--kernel-cmd, --language, --port-range,
    --interrupt-mode)."""
    spec = any_kernel(
        spec,
        getattr(args, "kernel_cmd", ""),
        getattr(args, "language", ""),
        getattr(args, "port_range", ""),
        getattr(args, "interrupt_mode", ""),
    )
    return with_launch_timeout(with_access(spec, args), getattr(args, "launch_timeout", None))


def run_spec_command(args: argparse.Namespace) -> None:
    if args.spec_command == "add" and args.backend in SCHEDULER_NAMES:
        spec = batch_spec(
            args.backend,
            partition=args.partition,
            cpus=args.cpus,
            memory=args.memory,
            gpus=args.gpus,
            walltime=args.walltime,
            account=args.account,
            submit_args=args.submit_args,
            python=args.python,
            pre=args.pre,
            workdir=args.workdir,
            runtime_dir=args.runtime_dir,
            login=args.login,
            jump=args.jump,
            identity=args.identity,
            known_hosts=args.known_hosts,
            display_name=args.display_name,
        )
        print(f"wrote {write_spec(args.name, with_args(spec, args), args.dir, args.force)}")
    elif args.spec_command == "add" and args.backend in CONTAINER_BACKENDS:
        spec = container_spec(
            args.backend,
            args.image,
            display_name=args.display_name,
            docker_host=args.docker_host,
            network=args.network,
            reach=args.reach,
            volumes=args.volumes,
            mirror_working_dir=args.mirror_working_dir,
            working_dir_mode=args.working_dir_mode,
            workdir=args.workdir,
            env=pairs(args.env, "--env"),
            uid=args.uid,
            gid=args.gid,
            uid_range=args.uid_range,
            gid_range=args.gid_range,
            cpus=args.cpus,
            memory=args.memory,
            pids_limit=args.pids_limit,
            gpus=args.gpus,
            labels=pairs(args.label, "--label"),
            python=args.python,
            constraints=getattr(args, "constraints", []),
        )
        print(f"wrote {write_spec(args.name, with_args(spec, args), args.dir, args.force)}")
    elif args.spec_command == "add" and args.backend == "failover":
        print(f"wrote {write_spec(args.name, failover_spec(args), args.dir, args.force)}")
    elif args.spec_command == "add" and args.backend == "local":
        spec = local_spec(
            args.python,
            display_name=args.display_name,
            env=pairs(args.env, "--env"),
            ipykernel=not args.kernel_cmd,
        )
        print(f"wrote {write_spec(args.name, with_args(spec, args), args.dir, args.force)}")
    elif args.spec_command == "add":
        spec = ssh_spec(
            args.host,
            jump=args.jump,
            python=args.python,
            workdir=args.workdir,
            identity=args.identity,
            known_hosts=args.known_hosts,
            pre=args.pre,
            display_name=args.display_name,
            password_command=args.password_command,
            password_file=args.password_file,
            discover=args.discover,
            discover_paths=args.discover_paths,
            sync=sync_config(args),
        )
        if args.discover_paths and not args.discover:
            raise BadRequest("--discover-path needs --discover")
        print(f"wrote {write_spec(args.name, with_args(spec, args), args.dir, args.force)}")
    elif args.spec_command == "show":
        print(show_spec(args.name, args.dir))
    elif args.spec_command == "list":
        for name, backend, display in list_specs(args.dir):
            print(f"{name}\t{backend}\t{display}")
    elif args.spec_command == "remove":
        print(f"removed {remove_spec(args.name, args.dir)}")
