"""What a client may put into its kernel's environment (POST /api/kernels {"env"})."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest

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


def working_dir(env: Mapping[str, str]) -> str | None:
    """KERNEL_WORKING_DIR when it names a directory here; otherwise the default."""
    path = env.get("KERNEL_WORKING_DIR")
    if path and os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    return None


@dataclass(frozen=True)
class LaunchRequest:
    """A client's start request, checked once: what its kernel is given explicitly. The
    registry hands `env` and `timeout` to the kernel's manager for the backends, and `env`
    (over this process's environment) and `cwd` to jupyter_client's start_kernel."""

    env: Mapping[str, str]  # KERNEL_* and allow-listed names (client_env)
    timeout: float  # the client's KERNEL_LAUNCH_TIMEOUT, else the gateway's
    cwd: str | None  # KERNEL_WORKING_DIR when it names a directory here

    @classmethod
    def from_client(cls, env: Any, allowlist: Iterable[str], timeout: float) -> LaunchRequest:
        extra = client_env(env, allowlist)
        return cls(extra, launch_timeout(extra, timeout), working_dir(extra))
