"""Failover kernelspecs: one name for kernelspecs of any backend, tried in order at each start.

    {"argv": [], "display_name": "Python (PC, else cluster)", "language": "python",
     "metadata": {"rkg_failover": {"specs": ["pc", "cluster", "python3"],
                                   "attempt_timeout": 30}}}

The registry starts such a kernel as the first member that starts and answers kernel_info
within `attempt_timeout` seconds (0: the launch timeout), moving on when a member's start
fails or times out; nothing of a failed attempt is left. The kernel keeps the failover spec's
name (clients see what they asked for) while its manager is the member's, so a restart, a
re-attach, the culler and a warm pool deal with an ordinary kernel of that member; the
kernel's record names the member (`launch["spec"]`) for the re-attach. Members are checked
when they are used: a missing one, or one that is itself a failover spec, is that member's
reason in the error of a start that no member made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BackendUnavailable, GatewayError, KernelError, KernelStartError

KEY = "rkg_failover"  # in a kernelspec's metadata


@dataclass(frozen=True)
class Failover:
    specs: tuple[str, ...]
    attempt_timeout: float = 0.0

    def attempt(self, launch_timeout: float) -> float:
        """Seconds one member has to start and answer."""
        if self.attempt_timeout > 0:
            return min(self.attempt_timeout, launch_timeout)
        return launch_timeout


def of(metadata: Mapping[str, Any] | None) -> Failover | None:
    """The failover a kernelspec's metadata describes, or None for any other kernelspec."""
    raw = (metadata or {}).get(KEY)
    if not isinstance(raw, Mapping):
        return None
    specs = tuple(str(s) for s in raw.get("specs") or ())
    return Failover(specs, float(raw.get("attempt_timeout") or 0))


def spec(
    members: list[str], *, attempt_timeout: float, display_name: str, language: str
) -> dict[str, Any]:
    """The kernel.json of a failover kernelspec."""
    config: dict[str, Any] = {"specs": list(members)}
    if attempt_timeout:
        config["attempt_timeout"] = attempt_timeout
    return {
        "argv": [],  # never run: the registry starts one of the members instead
        "display_name": display_name or f"{members[0]}, else {', else '.join(members[1:])}",
        "language": language,
        "metadata": {KEY: config},
    }


def none_started(name: str, failed: list[tuple[str, GatewayError]]) -> KernelError:
    """The error of a start that no member made, each member's reason in it: a 503 when
    every member's backend was unreachable, else a start error."""
    reasons = "; ".join(f"{member}: {e.message}" for member, e in failed)
    message = f"kernel {name!r} could not start as any of its kernelspecs: {reasons}"
    if failed and all(isinstance(e, BackendUnavailable) for _, e in failed):
        return BackendUnavailable(message)
    return KernelStartError(message)
