"""The gateway's configuration: one typed object, read once from the command line and the
RKG_* environment variables (flags win), then passed to whoever needs it."""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import BadRequest


@dataclass(frozen=True)
class Config:
    ip: str = "127.0.0.1"
    port: int = 8888
    base_url: str = "/"
    token: str = ""
    token_generated: bool = False
    no_auth: bool = False
    kernelspec_dirs: tuple[str, ...] = ()
    default_kernel_name: str = "python3"
    # Names the client may set in POST /api/kernels {"env"} besides KERNEL_*.
    env_allowlist: tuple[str, ...] = ()
    kernel_launch_timeout: float = 60.0
    cull_idle_timeout: float = 0.0  # seconds; 0 disables culling
    cull_interval: float = 60.0
    cull_connected: bool = False
    cull_busy: bool = False
    autorestart: bool = True
    restart_limit: int = 5
    # iopub kept for a disconnected session_id, replayed when it reconnects
    replay_seconds: float = 300.0
    replay_max_bytes: int = 256 * 1024 * 1024
    allow_origin: str = ""
    shutdown_timeout: float = 10.0
    state_db: str = ""
    keep_kernels: bool = False
    max_kernels: int = 0  # 0: no limit
    max_kernels_per_user: int = 0
    # messages larger than this go uncompressed on deflate connections; 0: no deflate at all
    ws_compress_max: int = 1024 * 1024
    log_level: str = "INFO"
    extra: Mapping[str, str] = field(default_factory=dict)


def normalize_base_url(value: str) -> str:
    """'/', 'gw', '/gw/' -> '/', '/gw/', '/gw/'."""
    stripped = value.strip("/")
    return f"/{stripped}/" if stripped else "/"


def default_state_db() -> str:
    from jupyter_core.paths import jupyter_data_dir

    return os.path.join(jupyter_data_dir(), "remote-kernel-gateway", "state.sqlite")


def _env_flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def add_serve_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Flags of `rkg serve`; each default comes from its RKG_* variable (for docker-compose)."""
    e = environ.get
    parser.add_argument("--ip", default=e("RKG_IP", Config.ip))
    parser.add_argument("--port", type=int, default=int(e("RKG_PORT", Config.port)))
    parser.add_argument("--base-url", default=e("RKG_BASE_URL", Config.base_url))
    parser.add_argument("--token", default=e("RKG_TOKEN", ""),
                        help="API token (RKG_TOKEN, or a file named by RKG_TOKEN_FILE); "
                        "generated and printed when not given")
    parser.add_argument("--no-auth", action="store_true", default=_env_flag(environ, "RKG_NO_AUTH"),
                        help="serve without any token (only behind something that authenticates)")
    parser.add_argument("--kernelspec-dir", action="append",
                        default=list(_csv(e("RKG_KERNELSPEC_DIRS", ""))),
                        help="extra directory of kernelspecs (repeatable)")
    parser.add_argument("--default-kernel",
                        default=e("RKG_DEFAULT_KERNEL", Config.default_kernel_name))
    parser.add_argument("--env-allow", action="append",
                        default=list(_csv(e("RKG_ENV_ALLOW", ""))),
                        help="variable a client may pass to its kernel besides KERNEL_*")
    parser.add_argument("--kernel-launch-timeout", type=float,
                        default=float(e("RKG_KERNEL_LAUNCH_TIMEOUT", Config.kernel_launch_timeout)))
    parser.add_argument("--cull-idle-timeout", type=float,
                        default=float(e("RKG_CULL_IDLE_TIMEOUT", Config.cull_idle_timeout)),
                        help="shut down kernels idle this many seconds (0: never)")
    parser.add_argument("--cull-interval", type=float,
                        default=float(e("RKG_CULL_INTERVAL", Config.cull_interval)))
    parser.add_argument("--cull-connected", action="store_true",
                        default=_env_flag(environ, "RKG_CULL_CONNECTED"))
    parser.add_argument("--cull-busy", action="store_true",
                        default=_env_flag(environ, "RKG_CULL_BUSY"))
    parser.add_argument("--no-autorestart", action="store_true",
                        default=_env_flag(environ, "RKG_NO_AUTORESTART"))
    parser.add_argument("--allow-origin", default=e("RKG_ALLOW_ORIGIN", ""),
                        help="CORS origin allowed to call the API ('*' for any)")
    parser.add_argument("--state-db", default=e("RKG_STATE_DB", default_state_db()),
                        help="SQLite file recording kernels and sessions (':memory:' for none)")
    parser.add_argument("--keep-kernels", action="store_true",
                        default=_env_flag(environ, "RKG_KEEP_KERNELS"),
                        help="on shutdown leave kernels running, for the next gateway to re-attach")
    parser.add_argument("--max-kernels", type=int, default=int(e("RKG_MAX_KERNELS", "0")))
    parser.add_argument("--max-kernels-per-user", type=int,
                        default=int(e("RKG_MAX_KERNELS_PER_USER", "0")),
                        help="per KERNEL_USERNAME")
    parser.add_argument("--ws-compress-max", type=int,
                        default=int(e("RKG_WS_COMPRESS_MAX", Config.ws_compress_max)),
                        help="websocket messages above this many bytes are not deflated "
                        "(0: no permessage-deflate)")
    parser.add_argument("--log-level", default=e("RKG_LOG_LEVEL", Config.log_level))


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    token, generated = args.token, False
    if not token and environ.get("RKG_TOKEN_FILE"):
        with open(environ["RKG_TOKEN_FILE"]) as f:
            token = f.read().strip()
    if args.no_auth:
        token = ""
    elif not token:
        token, generated = secrets.token_hex(24), True
    if args.port < 0 or args.port > 65535:
        raise BadRequest(f"--port {args.port} is not a TCP port")
    return Config(
        ip=args.ip,
        port=args.port,
        base_url=normalize_base_url(args.base_url),
        token=token,
        token_generated=generated,
        no_auth=args.no_auth,
        kernelspec_dirs=tuple(os.path.abspath(d) for d in args.kernelspec_dir),
        default_kernel_name=args.default_kernel,
        env_allowlist=tuple(args.env_allow),
        kernel_launch_timeout=args.kernel_launch_timeout,
        cull_idle_timeout=args.cull_idle_timeout,
        cull_interval=args.cull_interval,
        cull_connected=args.cull_connected,
        cull_busy=args.cull_busy,
        autorestart=not args.no_autorestart,
        allow_origin=args.allow_origin,
        log_level=args.log_level.upper(),
        state_db=args.state_db,
        keep_kernels=args.keep_kernels,
        max_kernels=args.max_kernels,
        max_kernels_per_user=args.max_kernels_per_user,
        ws_compress_max=args.ws_compress_max,
    )


def parse_serve_args(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    parser = argparse.ArgumentParser(prog="rkg serve")
    add_serve_arguments(parser, environ)
    return config_from_args(parser.parse_args(argv), environ)
