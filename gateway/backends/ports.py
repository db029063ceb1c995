"""Ports for a kernel, chosen where the kernel runs and written into its connection file
before it starts: every kernel (IRkernel, IJulia, xeus-python, ipykernel) binds the ports
it is given, so no kernel has to write its ports back.

    parse_range      "LO-HI" (a spec's `port_range`) as (lo, hi), or a clear error
    default_range    a range outside the host's ephemeral range
    used_ports       the local ports of every TCP socket in /proc/net/tcp and tcp6
    choose           n free ports from a range, avoiding used and reserved ones
    Reservations     ports handed out by this gateway per host, until the kernel ends
    choose_script    the same choice in POSIX sh and awk, for a job script on its node

Why there is no window for another process to take a chosen port: the ports come from a range
outside the host's ephemeral range (ip_local_port_range), and the kernel is started with them
at once. The system hands out ports to binds of port 0 and to outgoing connections from the
ephemeral range only, so between the choice and the kernel's bind only a process that binds
that very port number explicitly could take it. Ports in use (any state, any address) are
read from /proc/net/tcp and tcp6 on the host, and this gateway's own starts in flight are
kept apart by Reservations. A kernel that still meets EADDRINUSE (someone else's explicit
bind) exits at once with "Address already in use" in its output; the backend then launches
it again on fresh ports. An explicit `port_range` that overlaps the ephemeral range is the
user's choice (a cluster firewall); the retry covers it too.
"""

from __future__ import annotations

import random
import shlex

CHANNEL_COUNT = 5
ADDRESS_IN_USE = ("Address already in use", "EADDRINUSE")
LINUX_EPHEMERAL = (32768, 60999)


def parse_range(text: str) -> tuple[int, int] | None:
    """`LO-HI` as (lo, hi); empty: None (the default range). Raises ValueError with a
    message fit for the user."""
    text = text.strip()
    if not text:
        return None
    lo_s, sep, hi_s = text.partition("-")
    try:
        lo, hi = int(lo_s), int(hi_s)
    except ValueError:
        lo = hi = -1
    if not sep or not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"port range {text!r} must be LO-HI with 1024 <= LO <= HI <= 65535")
    if hi - lo + 1 < CHANNEL_COUNT:
        raise ValueError(f"port range {text!r} has fewer than {CHANNEL_COUNT} ports")
    return lo, hi


def parse_ephemeral(text: str | None) -> tuple[int, int]:
    """The contents of /proc/sys/net/ipv4/ip_local_port_range (Linux's default if absent)."""
    try:
        lo, hi = (int(w) for w in (text or "").split()[:2])
        return lo, hi
    except ValueError:
        return LINUX_EPHEMERAL


def default_range(ephemeral: tuple[int, int]) -> tuple[int, int]:
    """Up to 16384 ports just below the ephemeral range, else above it, else all of them
    (a host whose ephemeral range covers everything: the retry on EADDRINUSE remains)."""
    elo, ehi = ephemeral
    low = max(1024, elo - 16384)
    if elo - low >= 1024:
        return low, elo - 1
    if 65535 - ehi >= 1024:
        return ehi + 1, min(65535, ehi + 16384)
    return 1024, 65535


def used_ports(*tables: str | None) -> set[int]:
    """Local ports of every socket listed in /proc/net/tcp-style tables, in any state
    (listening, connected, TIME_WAIT): none of them is offered to a kernel. TIME_WAIT counts:
    xeus-python's bind fails on such a port ("Address already in use"), so a tight
    --port-range needs room for a minute of TIME_WAIT after its kernels' restarts."""
    used: set[int] = set()
    for table in tables:
        for line in (table or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 1 and ":" in fields[1]:
                try:
                    used.add(int(fields[1].rpartition(":")[2], 16))
                except ValueError:
                    continue
    return used


def choose(
    n: int,
    span: tuple[int, int],
    avoid: set[int],
    rng: random.Random | None = None,
) -> list[int]:
    """n distinct ports from span (inclusive) that are not in `avoid`, at random (two
    gateways or users on one host rarely pick the same). Raises ValueError if the range
    has too few free ports."""
    lo, hi = span
    rng = rng or random.SystemRandom()
    free = (hi - lo + 1) - len({p for p in avoid if lo <= p <= hi})
    if free < n:
        raise ValueError(f"only {max(free, 0)} free ports in {lo}-{hi}, {n} needed")
    picked: list[int] = []
    if free > 4 * n:  # a sparse range: draws are cheap
        while len(picked) < n:
            port = rng.randint(lo, hi)
            if port not in avoid and port not in picked:
                picked.append(port)
        return picked
    return rng.sample([p for p in range(lo, hi + 1) if p not in avoid], n)


class Reservations:
    """Ports this gateway handed to kernels per host, from the choice until the kernel ends:
    two starts on one host at once never get the same port (the host's tables show a
    port only once its kernel bound it)."""

    def __init__(self) -> None:
        self._by_host: dict[str, set[int]] = {}

    def of(self, host: str) -> set[int]:
        return set(self._by_host.get(host, ()))

    def take(self, host: str, ports: list[int]) -> None:
        self._by_host.setdefault(host, set()).update(ports)

    def give_back(self, host: str, ports: list[int]) -> None:
        held = self._by_host.get(host)
        if held is not None:
            held.difference_update(ports)
            if not held:
                del self._by_host[host]


RESERVED = Reservations()


def address_in_use(output: str) -> bool:
    """Whether a kernel's output says it could not bind a port."""
    return any(words in output for words in ADDRESS_IN_USE)


def choose_script(conn_file: str, span: tuple[int, int] | None, channels: tuple[str, ...]) -> str:
    """POSIX sh (awk, od, sed, mv) that picks the kernel's ports on the machine it runs on,
    as `choose` does, and writes them into `conn_file` (a connection file written with
    json indent, every port 0) in place of the zeros; it exits 5 if it cannot. For a job
    script: the node is known only there, and it may have no Python."""
    lo, hi = span or (0, 0)
    cf = shlex.quote(conn_file)
    subst = " ".join(
        f'-e \'s/"{ch}_port": 0/"{ch}_port": \'"${{{i}}}"\'/\'' for i, ch in enumerate(channels, 1)
    )
    awk = r"""
function hex(s,  i, v) {
  v = 0
  for (i = 1; i <= length(s); i++)
    v = v * 16 + index("0123456789ABCDEF", toupper(substr(s, i, 1))) - 1
  return v
}
NR == 1 { elo = $1; ehi = $2; next }
$2 ~ /:/ { n = split($2, a, ":"); used[hex(a[n])] = 1 }
END {
  if (lo == 0) {
    low = elo - 16384; if (low < 1024) low = 1024
    if (elo - low >= 1024) { lo = low; hi = elo - 1 }
    else if (65535 - ehi >= 1024) { lo = ehi + 1; hi = ehi + 16384; if (hi > 65535) hi = 65535 }
    else { lo = 1024; hi = 65535 }
  }
  srand(seed)
  got = 0
  for (try = 0; try < 100000 && got < want; try++) {
    p = lo + int(rand() * (hi - lo + 1))
    if (!(p in used)) { used[p] = 1; out = out " " p; got++ }
  }
  if (got == want) print out
}"""
    return "\n".join(
        [
            # awk's srand takes seeds below 2^31 only (mawk maps larger ones to one seed)
            "rkg_seed=$(od -An -N4 -tu4 /dev/urandom 2>/dev/null | tr -d ' ')",
            "rkg_seed=$(( ${rkg_seed:-$$} % 2147483647 ))",
            f"rkg_ports=$( {{ cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null "
            f"|| echo {LINUX_EPHEMERAL[0]} {LINUX_EPHEMERAL[1]}; "
            "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; } | "
            f"awk -v lo={lo} -v hi={hi} -v want={len(channels)} "
            f'-v seed="$rkg_seed" {shlex.quote(awk)} )',
            '[ -n "$rkg_ports" ] || { echo "rkg: cannot choose the kernel\'s ports'
            ' (awk, /proc/net/tcp)" >&2; exit 5; }',
            "set -- $rkg_ports",
            f"sed {subst} {cf} > {cf}.tmp && mv {cf}.tmp {cf} || "
            "{ echo 'rkg: cannot write the connection file' >&2; exit 5; }",
        ]
    )
