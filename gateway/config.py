"""The gateway's configuration: one typed object, read once from the command line and the
RKG_* environment variables, then passed to whoever needs it.

A field that `rkg serve` sets declares its `Option` (flag, help, variable) in its metadata;
the parser, its --help and the variables are generated from those, so each setting is written
once. A flag wins over its variable, except that a repeatable flag adds to the list its
variable gives. Fields without an Option are tuning knobs for code (tests, embedders)."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest


@dataclass(frozen=True)
class Option:
    """How `rkg serve` sets one Config field. The kind of value (switch, number, text,
    repeatable list) is the type of the field's default."""

    flag: str
    help: str
    env: str
    negate: bool = False  # a --no-X switch: given, the field is False
    clean: Callable[[Any], Any] | None = None  # normalises or rejects (ValueError) a value
    cli_default: Callable[[], Any] | None = None  # when the CLI's differs from the field's
    shown_default: str = ""  # for --help, when the value itself says too little


def _option(default: Any, flag: str, help: str, *, env: str = "", **kw: Any) -> Any:
    env = env or "RKG_" + flag.removeprefix("--").upper().replace("-", "_")
    return field(default=default, metadata={"option": Option(flag, help, env, **kw)})


def normalize_base_url(value: str) -> str:
    """'/', 'gw', '/gw/' -> '/', '/gw/', '/gw/'."""
    stripped = value.strip("/")
    return f"/{stripped}/" if stripped else "/"


def default_state_db() -> str:
    from jupyter_core.paths import jupyter_data_dir

    return os.path.join(jupyter_data_dir(), "remote-kernel-gateway", "state.sqlite")


def _tcp_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ValueError("is not a TCP port")
    return port


def _log_level(name: str) -> str:
    if name.upper() not in logging.getLevelNamesMapping():
        raise ValueError("is not a log level (DEBUG, INFO, WARNING, ERROR)")
    return name.upper()


def _log_format(name: str) -> str:
    if name.lower() not in ("text", "json"):
        raise ValueError("is not a log format (text or json)")
    return name.lower()


def _user_names(value: str) -> str:
    """'alice, bob' -> 'alice,bob' (users.py reads the list)."""
    return ",".join(sorted({v.strip() for v in value.split(",") if v.strip()}))


def _abspaths(paths: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(os.path.abspath(p) for p in paths)


def default_memory_budget() -> int:
    """1 GiB, or a quarter of the machine's memory if that is less."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1024**3
    return min(1024**3, ram // 4)


def is_loopback(ip: str) -> bool:
    """Whether --ip is reachable from this machine only ('localhost', 127.0.0.0/8, ::1)."""
    if ip.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False  # a name, or '' (every address)


POOL_MAX = 32  # kernels kept warm per kernelspec, at most


def pool_size(value: object) -> int:
    """A warm pool's size (--pool, a kernelspec's metadata.rkg.pool): 0 to POOL_MAX."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= POOL_MAX:
        raise ValueError(f"must be a whole number from 0 to {POOL_MAX}, not {value!r}")
    return value


def _pools(items: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """SPEC=N items -> ((SPEC, N), ...), one per kernelspec, the last given winning (so a
    flag wins over RKG_POOLS, which comes first)."""
    sizes: dict[str, int] = {}
    for item in items:
        name, sep, size = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"has {item!r}: give SPEC=N, e.g. python3=2")
        try:
            sizes[name.strip()] = pool_size(size)
        except ValueError as e:
            raise ValueError(f"has {item!r}: N {e}") from None
    return tuple(sizes.items())


@dataclass(frozen=True)
class Config:
    ip: str = _option("127.0.0.1", "--ip", "address to listen on")
    port: int = _option(8888, "--port", "port", clean=_tcp_port)
    base_url: str = _option(
        "/", "--base-url", "prefix of every URL (behind a proxy)", clean=normalize_base_url
    )
    token: str = _option(
        "",
        "--token",
        "API token (or a file named by RKG_TOKEN_FILE)",
        shown_default="generated and printed",
    )
    token_generated: bool = False
    no_auth: bool = _option(
        False, "--no-auth", "serve without any token (only behind something that authenticates)"
    )
    no_auth_open: bool = _option(
        False,
        "--no-auth-i-know-this-is-open",
        "allow --no-auth on an address that is not loopback: anyone who reaches it runs code",
    )
    allowed_hosts: tuple[str, ...] = _option(
        (),
        "--allowed-host",
        "a name clients may use in Host besides loopback names, this machine's name and --ip "
        "(against DNS rebinding; '*': any)",
        env="RKG_ALLOWED_HOSTS",
    )
    certfile: str = _option("", "--certfile", "TLS certificate (PEM): serve https and wss")
    keyfile: str = _option("", "--keyfile", "TLS private key (PEM), if not in --certfile")
    idle_timeout: float = _option(
        20.0,
        "--idle-timeout",
        "seconds a connection may sit idle between requests, or take to send its headers",
    )
    body_timeout: float = _option(
        60.0, "--body-timeout", "seconds a request may take to send its body"
    )
    kernelspec_dirs: tuple[str, ...] = _option(
        (),
        "--kernelspec-dir",
        "more kernelspecs beside the Jupyter paths",
        env="RKG_KERNELSPEC_DIRS",
        clean=_abspaths,
    )
    default_kernel_name: str = _option(
        "python3", "--default-kernel", "kernelspec used when a client names none"
    )
    allowed_kernelspecs: tuple[str, ...] = _option(
        (),
        "--allowed-kernelspecs",
        "kernelspec offered and startable (default: all); others are as if absent, the "
        "native python3 too unless named",
    )
    authorized_users: str = _option(
        "",
        "--authorized-users",
        "comma-separated KERNEL_USERNAMEs that may start a kernelspec naming none of its own "
        "(empty: everyone)",
        clean=_user_names,
        shown_default="everyone",
    )
    unauthorized_users: str = _option(
        "root",
        "--unauthorized-users",
        "comma-separated KERNEL_USERNAMEs that may start no kernelspec",
        clean=_user_names,
    )
    env_allowlist: tuple[str, ...] = _option(
        (), "--env-allow", "variable a client may pass to its kernel besides KERNEL_*"
    )
    working_dir_root: str = _option(
        "",
        "--working-dir-root",
        "a KERNEL_WORKING_DIR that exists here must be under this directory (else a 403); "
        "{user} in it is the requester's name",
        shown_default="the home directory of the user running the gateway",
    )
    secret_env: tuple[str, ...] = _option(
        (),
        "--secret-env",
        "variable of the gateway's environment that local kernels must not inherit, "
        "besides every RKG_* (a name or a glob such as AWS_*)",
    )
    kernel_launch_timeout: float = _option(
        60.0,
        "--kernel-launch-timeout",
        "seconds a start may take; a client's KERNEL_LAUNCH_TIMEOUT overrides it",
    )
    cull_idle_timeout: float = _option(
        0.0, "--cull-idle-timeout", "shut down kernels idle this many seconds (0: never)"
    )
    cull_interval: float = _option(60.0, "--cull-interval", "seconds between looks for idle ones")
    cull_connected: bool = _option(False, "--cull-connected", "cull kernels with clients too")
    cull_busy: bool = _option(False, "--cull-busy", "cull busy kernels too")
    autorestart: bool = _option(
        True, "--no-autorestart", "do not restart kernels that die", negate=True
    )
    restart_limit: int = 5
    # iopub kept for a disconnected session_id, replayed when it reconnects
    replay_seconds: float = 300.0
    replay_max_bytes: int = 256 * 1024 * 1024
    allow_origin: str = _option(
        "", "--allow-origin", "CORS origin allowed to call the API ('*' for any)"
    )
    shutdown_timeout: float = 10.0
    state_db: str = _option(
        "",
        "--state-db",
        "SQLite file recording kernels and sessions (':memory:' for none)",
        cli_default=default_state_db,
    )
    keep_kernels: bool = _option(
        False,
        "--keep-kernels",
        "on shutdown leave kernels running, for the next gateway to re-attach",
    )
    pools: tuple[tuple[str, int], ...] = _option(
        (),
        "--pool",
        "SPEC=N: keep N kernels of kernelspec SPEC started, for starts to take at once",
        env="RKG_POOLS",
        clean=_pools,
    )
    max_kernels: int = _option(500, "--max-kernels", "kernels in all (0: no limit)")
    max_sessions_per_kernel: int = _option(
        32,
        "--max-sessions-per-kernel",
        "client sessions (websockets, and those kept for a reconnect) per kernel (0: no limit)",
    )
    memory_budget: int = _option(
        1024**3,
        "--memory-budget",
        "bytes of output the gateway holds in all, for replay and for clients slow to read",
        cli_default=default_memory_budget,
        shown_default="1 GiB, or a quarter of RAM if less",
    )
    max_kernels_per_user: int = _option(
        0, "--max-kernels-per-user", "kernels per KERNEL_USERNAME (0: no limit)"
    )
    malloc_keep_mb: int = _option(
        64,
        "--malloc-keep-mb",
        "glibc keeps a freed block up to this size for reuse (0: glibc's 32 MiB mmap default)",
    )
    ws_compress_max: int = _option(
        1024 * 1024,
        "--ws-compress-max",
        "websocket messages above this many bytes are not deflated (0: no permessage-deflate)",
    )
    log_level: str = _option(
        "INFO", "--log-level", "DEBUG, INFO, WARNING or ERROR", clean=_log_level
    )
    log_format: str = _option(
        "text",
        "--log-format",
        "text, or json: one object per line, with kernel id, user, backend and host as fields",
        clean=_log_format,
    )
    trusted_proxies: tuple[str, ...] = _option(
        (),
        "--trusted-proxy",
        "address of a reverse proxy whose X-Forwarded-For names the client (else it is ignored)",
        env="RKG_TRUSTED_PROXIES",
    )
    metrics_open_on_loopback: bool = _option(
        False,
        "--metrics-open-on-loopback",
        "let /metrics be scraped without a token from 127.0.0.1 or ::1",
    )


def options() -> Iterator[tuple[dataclasses.Field[Any], Option]]:
    """The fields `rkg serve` sets, in declaration order, each with its Option."""
    for f in dataclasses.fields(Config):
        if "option" in f.metadata:
            yield f, f.metadata["option"]


def shown_default(f: dataclasses.Field[Any], opt: Option) -> str:
    """The default as --help (and the README table) state it."""
    if opt.shown_default:
        return opt.shown_default
    if opt.cli_default:
        return str(opt.cli_default())
    if isinstance(f.default, bool):
        return "off"  # a switch (--no-X included) is off unless given
    if isinstance(f.default, float):
        return f"{f.default:g}"
    return str(f.default) if f.default not in ("", ()) else "none"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `rkg serve`. Their defaults are None ("not given"): config_from_args()
    falls back to the variable, then to the field's default."""
    for f, opt in options():
        kind: type = type(f.default)
        text = f"{opt.help} [{opt.env}, default {shown_default(f, opt)}]"
        if kind is tuple:
            text = f"{opt.help}; repeatable, adds to {opt.env} (comma-separated)"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": text.replace("%", "%%")}
        if kind is bool:
            kw["action"] = "store_true"
        elif kind is tuple:
            kw["action"] = "append"
        else:
            kw["type"] = kind
        if kind is not bool:
            kw["metavar"] = opt.flag.removeprefix("--").upper().replace("-", "_")
        parser.add_argument(opt.flag, **kw)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_NOUN = {int: "an integer", float: "a number"}


def _from_env(kind: type, name: str, raw: str) -> Any:
    if kind is bool:
        if raw.strip().lower() in _TRUE + _FALSE:
            return raw.strip().lower() in _TRUE
        raise BadRequest(f"{name}={raw!r}: use 1, true, yes or on (0, false, no or off)")
    if kind is tuple:
        return tuple(v.strip() for v in raw.split(",") if v.strip())
    try:
        return kind(raw)
    except ValueError:
        raise BadRequest(f"{name}={raw!r} is not {_NOUN[kind]}") from None


def _value(f: dataclasses.Field[Any], opt: Option, given: Any, environ: Mapping[str, str]) -> Any:
    kind: type = type(f.default)
    raw = environ.get(opt.env)
    if given is not None and kind is not tuple:
        raw = None  # the flag wins, even over a variable that would not parse
    from_env = None if raw is None else _from_env(kind, opt.env, raw)
    if kind is tuple:
        value: Any = (*(from_env or ()), *(given or ()))
    elif given is not None:
        value = given
    elif from_env is not None:
        value = from_env
    elif opt.negate:
        value = False  # the --no-X switch, not given
    else:
        value = opt.cli_default() if opt.cli_default else f.default
    if opt.negate:
        value = not value
    if opt.clean is not None:
        try:
            value = opt.clean(value)
        except ValueError as e:
            # a repeatable flag's values and its variable's are cleaned together: name both
            sources = [f"{opt.env}={raw!r}"] if raw is not None else []
            sources += [f"{opt.flag} {given!r}"] if given is not None else []
            raise BadRequest(f"{' and '.join(sources)} {e}") from None
    return value


MIN_TOKEN_LENGTH = 16
# what tutorials and example files put where a token belongs (compared without case and
# punctuation), and what our own deploy files once did
_PLACEHOLDERS = ("changeme", "replaceme", "yourtoken", "mytoken", "placeholder", "example")
_PLACEHOLDER_WORDS = frozenset({"token", "secret", "password", "passwd", "test", "admin", "rkg"})


def check_token(token: str) -> None:
    """Refuse a token that is a placeholder or too short to be guessed with difficulty (a
    BadRequest saying how to make one). The token itself is never echoed."""
    plain = "".join(c for c in token.lower() if c.isalnum())
    if plain in _PLACEHOLDER_WORDS or any(p in plain for p in _PLACEHOLDERS):
        problem = "is a placeholder"
    elif len(token) < MIN_TOKEN_LENGTH:
        problem = f"has {len(token)} characters, fewer than {MIN_TOKEN_LENGTH}"
    else:
        return
    raise BadRequest(
        f"the token (--token, RKG_TOKEN or the file RKG_TOKEN_FILE names) {problem}: make one "
        "with `python3 -c 'import secrets; print(secrets.token_hex(24))'` or "
        "`openssl rand -hex 24`, or give no token to have one generated and printed"
    )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """The Config of parsed `rkg serve` flags (add_serve_arguments) and the environment.
    A bad variable or value is a BadRequest naming it."""
    values = {f.name: _value(f, opt, getattr(args, f.name), environ) for f, opt in options()}
    token, generated = values["token"], False
    if not token and environ.get("RKG_TOKEN_FILE"):
        with open(environ["RKG_TOKEN_FILE"]) as file:
            token = file.read().strip()
    if values["no_auth"]:
        token = ""
        if not is_loopback(values["ip"]) and not values["no_auth_open"]:
            raise BadRequest(
                f"--no-auth on --ip {values['ip'] or '(every address)'} lets anyone who can "
                "reach it run code as this user: listen on 127.0.0.1, use a token, or, if "
                "something in front authenticates, add --no-auth-i-know-this-is-open"
            )
    elif not token:
        token, generated = secrets.token_hex(24), True
    else:
        check_token(token)
    return Config(**values | {"token": token, "token_generated": generated})


def parse_serve_args(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    parser = argparse.ArgumentParser(prog="rkg serve")
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(argv), environ)
