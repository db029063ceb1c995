"""What a client may put into its kernel's environment (POST /api/kernels {"env"}), checked
once, before any backend sees it: the variables that pass, KERNEL_LAUNCH_TIMEOUT, and
KERNEL_WORKING_DIR, which must name a directory under --working-dir-root."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest, Forbidden, KernelStartError

log = logging.getLogger(__name__)

# Never from a client, whatever the allow list says: they would change what runs.
_NEVER = frozenset(
    {
        "PATH",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONEXECUTABLE",
        "JPY_PARENT_PID",
    }
)


def client_env(env: Any, allowlist: Iterable[str]) -> dict[str, str]:
    """The part of a client's env that reaches the kernel: KERNEL_* and allow-listed names."""
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise BadRequest("'env' must be an object of strings")
    allowed = set(allowlist) - _NEVER
    out = {}
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BadRequest(f"env entry {key!r} must be a string, not {type(value).__name__}")
        if key in _NEVER:
            continue
        if key.startswith("KERNEL_") or key in allowed:
            out[key] = value
    return out


def launch_timeout(env: Mapping[str, str], default: float) -> float:
    raw = env.get("KERNEL_LAUNCH_TIMEOUT")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"KERNEL_LAUNCH_TIMEOUT must be seconds, not {raw!r}") from None
    if not 0 < value <= 24 * 3600:
        raise BadRequest("KERNEL_LAUNCH_TIMEOUT must be between 0 and 86400 seconds")
    return value


def spec_launch_timeout(metadata: Mapping[str, Any]) -> float | None:
    """A kernelspec's own launch timeout (`rkg spec add ... --launch-timeout`), kept in its
    provisioner config as `launch_timeout`; None when it has none (or 0, a backend's "the
    gateway's"). One that is not a number in range is the spec's mistake, and said so."""
    prov = metadata.get("kernel_provisioner") or {}
    raw = (prov.get("config") or {}).get("launch_timeout") if isinstance(prov, Mapping) else None
    if raw in (None, 0, 0.0):
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw <= 24 * 3600:
        raise KernelStartError(
            f"the kernelspec's launch_timeout {raw!r} must be seconds between 0 and 86400"
        )
    return float(raw)


SOURCES = ("KERNEL_LAUNCH_TIMEOUT", "the kernelspec's launch_timeout", "--kernel-launch-timeout")


def working_dir_root(configured: str, user: str = "", admin: bool = True) -> str:
    """--working-dir-root, canonical; unset, the home directory of the user running the
    gateway. A `{user}` in it is the requester's name (a user's name is a plain word:
    users.py), so each user's kernels work, mount and sync only under their own folder; an
    admin's root is the part before `{user}`."""
    if "{user}" in configured:
        head, _, tail = configured.partition("{user}")
        configured = head if admin else head + user + tail
    return os.path.realpath(os.path.expanduser(configured or "~"))


def working_dir(env: Mapping[str, str], root: str) -> str | None:
    """KERNEL_WORKING_DIR, canonical (symlinks and '..' resolved), when it names a directory
    under `root`; None (the kernel's default directory) when it names nothing here, which is
    what jupyter_server's gateway client sends from another machine (its own root, maybe
    C:\\...). A path that exists here outside `root` is a Forbidden, and so is one with a
    ':' (a mount spec's separator): neither reaches a backend, to be mounted or entered."""
    raw = env.get("KERNEL_WORKING_DIR")
    if not raw:
        return None
    if any(c in raw for c in "\0\n\r"):
        raise BadRequest("KERNEL_WORKING_DIR may not contain NUL or line breaks")
    path = os.path.expanduser(raw)
    if not os.path.isabs(path) or not os.path.exists(path):
        log.debug("KERNEL_WORKING_DIR %r is no path here: the kernel starts in its default", raw)
        return None
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root:
        resolved = f" ({real})" if real != raw else ""
        raise Forbidden(
            f"KERNEL_WORKING_DIR {raw!r}{resolved} is outside {root}, the directory kernels "
            "may work in here (rkg serve --working-dir-root)"
        )
    if ":" in raw or ":" in real:
        raise Forbidden(f"KERNEL_WORKING_DIR {raw!r} may not contain ':'")
    if not os.path.isdir(real):
        log.debug("KERNEL_WORKING_DIR %r is not a directory: the kernel starts in its default", raw)
        return None
    return real


@dataclass(frozen=True)
class LaunchRequest:
    """A client's start request, checked once: what its kernel is given explicitly. The
    registry hands `env` and `timeout` to the kernel's manager for the backends, and `env`
    (over this process's environment) and `cwd` to jupyter_client's start_kernel. In `env`,
    KERNEL_WORKING_DIR is `cwd` or absent: no backend sees a path that was not checked."""

    env: Mapping[str, str]  # KERNEL_* and allow-listed names (client_env)
    # the client's KERNEL_LAUNCH_TIMEOUT, else the kernelspec's, else the gateway's
    timeout: float
    cwd: str | None  # KERNEL_WORKING_DIR, canonical, when it names a directory under the root
    timeout_source: str = SOURCES[2]  # which of the three `timeout` is (SOURCES)

    @classmethod
    def from_client(
        cls,
        env: Any,
        allowlist: Iterable[str],
        timeout: float,
        root: str = "",
        spec_timeout: float | None = None,
        user: str = "",
        admin: bool = True,
    ) -> LaunchRequest:
        """`root`: --working-dir-root ('' for the default); `timeout`: the gateway's;
        `spec_timeout`: the kernelspec's (spec_launch_timeout); `user`, `admin`: the
        requester, for a `{user}` in `root`."""
        extra = client_env(env, allowlist)
        cwd = working_dir(extra, working_dir_root(root, user, admin))
        extra.pop("KERNEL_WORKING_DIR", None)
        if cwd is not None:
            extra["KERNEL_WORKING_DIR"] = cwd
        if "KERNEL_LAUNCH_TIMEOUT" in extra:
            return cls(extra, launch_timeout(extra, timeout), cwd, SOURCES[0])
        if spec_timeout:
            return cls(extra, spec_timeout, cwd, SOURCES[1])
        return cls(extra, timeout, cwd, SOURCES[2])
