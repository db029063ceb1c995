"""A notebook's folder kept in sync with a folder on an SSH host (`sync` in an rkg-ssh
kernelspec), over the host's shared SFTP session: nothing runs there but sshd.

A *pass* lists both sides (size and whole-second mtime of every regular file, symlinks and
excluded names skipped), compares each file with what the last pass left on both sides (the
baseline, kept in a JSON file in the gateway's Jupyter data directory, so a restarted gateway
or the next kernel of the same folder knows it too) and then:

- a file changed on one side only is copied to the other, its mtime kept, through a temporary
  name and a rename (no half-written file under the real name);
- a file changed on both sides, or different on both with no baseline, is a *conflict*: the
  newer keeps the name on both sides and the other is kept beside it as
  `NAME.sync-conflict-<when>-<where it was written><.ext>`, on both sides;
- nothing is deleted: a file removed on one side is neither removed on the other nor brought
  back, unless it changes there again.

The kernel's side cannot reach outside the folder here: names from the host are checked, a
local path is written only when no symlink leads out of the folder, and modes lose setuid,
setgid and sticky bits. Credentials (`.ssh`, `.gnupg`) and unfinished copies never sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import io
import json
import logging
import os
import secrets
import shlex
import stat
import tarfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jupyter_core.paths import jupyter_data_dir

from ..errors import KernelStartError

if TYPE_CHECKING:
    import asyncssh

    from .sshpool import SSHHost

log = logging.getLogger(__name__)

DEFAULT_EXCLUDES = (".git", ".ipynb_checkpoints", "__pycache__")
NEVER = (".ssh", ".gnupg", ".rkg-sync-*")  # credentials, and our own unfinished copies
TEMP_PREFIX = ".rkg-sync-"
TRANSFERS = 32  # files in flight at once: small files are bound by round trips, not bytes
SMALL_FILE = 256 * 1024  # bytes: read and written in one piece, not by asyncssh's put/get
BULK_FILES = 64  # this many small files new to one side go there as tar streams
BULK_BYTES = 32 * 2**20  # per stream
PROGRESS_EVERY = 2.0  # seconds between progress lines of a large pass
LARGE_PASS = (200, 50 * 2**20)  # files, bytes: a pass that logs its progress
MODE_BITS = 0o777  # no setuid, setgid or sticky bit crosses over


# a kernelspec's settings (rkg spec add ssh --sync-*): default, and the range allowed
MAX_FILE_MB = (100.0, 0.0, 1e7)  # larger files are left where they are, with a warning
MAX_TOTAL_MB = (2048.0, 0.0, 1e7)  # a folder holding more is refused: not a whole home
INTERVAL = (5.0, 0.2, 3600.0)  # seconds between passes while the kernel runs


@dataclass(frozen=True)
class Options:
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    max_file_bytes: int = int(MAX_FILE_MB[0] * 2**20)
    max_total_bytes: int = int(MAX_TOTAL_MB[0] * 2**20)
    interval: float = INTERVAL[0]


class OutOfRange(ValueError):
    """A sync setting out of its range: args (the setting's name, what is wrong with it)."""


def options(
    excludes: Iterable[str], max_file_mb: float, max_total_mb: float, interval: float
) -> Options:
    """A kernelspec's settings as a pass uses them, each checked against its range (above
    its low end, up to its high end): by `rkg spec add` as it writes them and by the SSH
    backend at each start, which may read a kernel.json written by hand."""
    for name, value, (_, low, high) in (
        ("sync_max_file_mb", max_file_mb, MAX_FILE_MB),
        ("sync_max_total_mb", max_total_mb, MAX_TOTAL_MB),
        ("sync_interval", interval, INTERVAL),
    ):
        if not low < value <= high:
            raise OutOfRange(name, f"{value:g} is out of range (over {low:g}, at most {high:g})")
    return Options(
        tuple(excludes), int(max_file_mb * 2**20), int(max_total_mb * 2**20), float(interval)
    )


@dataclass(frozen=True)
class Stat:
    size: int
    mtime: int  # whole seconds: SFTP version 3, which OpenSSH speaks, has no more
    mode: int = 0o644

    def same(self, other: Stat | None) -> bool:
        return other is not None and (self.size, self.mtime) == (other.size, other.mtime)


@dataclass
class Plan:
    """What one pass does, file by file (relative paths with '/')."""

    push: list[str] = field(default_factory=list)  # here -> host
    pull: list[str] = field(default_factory=list)  # host -> here
    conflicts: list[str] = field(default_factory=list)
    settled: dict[str, tuple[Stat, Stat]] = field(default_factory=dict)  # in sync already


def plan(here: dict[str, Stat], there: dict[str, Stat], base: dict[str, tuple[Stat, Stat]]) -> Plan:
    """Compare both sides with the baseline (module docstring). `base[path]` is (here, there)
    as the last pass left them."""
    out = Plan()
    for path in sorted(here.keys() | there.keys()):
        h, t, b = here.get(path), there.get(path), base.get(path)
        h_changed = h is not None and not h.same(b[0] if b else None)
        t_changed = t is not None and not t.same(b[1] if b else None)
        if h is not None and t is not None:
            if h.same(t):
                out.settled[path] = (h, t)
            elif b is not None and h_changed != t_changed:
                (out.push if h_changed else out.pull).append(path)
            elif b is None or (h_changed and t_changed):
                out.conflicts.append(path)
        elif h is not None and h_changed:  # new here, or changed here since removed there
            out.push.append(path)
        elif t is not None and t_changed:
            out.pull.append(path)
    return out


def conflict_name(path: str, when: float, where: str) -> str:
    """`dir/name.sync-conflict-20261202-101500-gpu1.ext` for `dir/name.ext`."""
    head, _, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no extension, or a dot file
        stem, dot, ext = name, "", ""
    tag = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in where)[:40]
    named = f"{stem}.sync-conflict-{tag}-{safe}{dot}{ext}"
    return f"{head}/{named}" if head else named


class Excludes:
    """fnmatch patterns: one without '/' matches any component, one with '/' the whole
    relative path."""

    def __init__(self, patterns: Iterable[str]) -> None:
        pats = [*NEVER, *patterns]
        self.names = [p for p in pats if "/" not in p]
        self.paths = [p.strip("/") for p in pats if "/" in p]

    def __call__(self, rel: str, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.names) or any(
            fnmatch.fnmatchcase(rel, p) for p in self.paths
        )


def valid_name(name: str) -> bool:
    """A directory entry from the host that may become a path here."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


@dataclass
class Listing:
    files: dict[str, Stat] = field(default_factory=dict)
    too_large: list[tuple[str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(s.size for s in self.files.values())

    def add(self, rel: str, mode: int, size: int, mtime: float, max_file: int) -> bool:
        """Take one entry (lstat's mode: a symlink is neither); True for a directory, to
        be listed in turn."""
        if stat.S_ISDIR(mode):
            return True
        if stat.S_ISREG(mode):
            if size > max_file:
                self.too_large.append((rel, size))
            else:
                self.files[rel] = Stat(size, int(mtime), mode & MODE_BITS)
        return False


def list_here(root: str, excludes: Excludes, max_file: int) -> Listing:
    """The folder's regular files, symlinks not followed (run in a thread)."""
    out = Listing()
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel_dir)))
        except OSError as e:
            log.debug("sync: cannot list %s: %s", os.path.join(root, rel_dir), e)
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if excludes(rel, entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if out.add(rel, st.st_mode, st.st_size, st.st_mtime, max_file):
                stack.append(rel)
    return out


async def list_there(
    sftp: asyncssh.SFTPClient, root: str, excludes: Excludes, max_file: int
) -> Listing:
    """The host folder's regular files (readdir gives lstat attributes: symlinks skipped),
    one directory level at a time, its directories read at once."""
    out = Listing()
    level = [""]
    while level:
        listings = await asyncio.gather(
            *(sftp.readdir(f"{root}/{d}" if d else root) for d in level),
            return_exceptions=True,
        )
        nxt = []
        for rel_dir, names in zip(level, listings, strict=True):
            if isinstance(names, BaseException):
                if not isinstance(names, Exception):
                    raise names
                log.debug("sync: cannot list %s/%s: %s", root, rel_dir, names)
                continue
            for n in names:
                name = str(n.filename)
                if not valid_name(name):
                    continue
                rel = f"{rel_dir}/{name}" if rel_dir else name
                mode = n.attrs.permissions
                if excludes(rel, name) or mode is None:
                    continue
                size, mtime = int(n.attrs.size or 0), int(n.attrs.mtime or 0)
                if out.add(rel, mode, size, mtime, max_file):
                    nxt.append(rel)
        level = nxt
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass
class Progress:
    """Log lines (and the start's stage) while a large pass moves files."""

    what: str
    files: int
    total: int
    report: Callable[[str], None] | None = None
    done_files: int = 0
    done_bytes: int = 0
    _last: float = field(default_factory=time.monotonic)

    @property
    def large(self) -> bool:
        return self.files >= LARGE_PASS[0] or self.total >= LARGE_PASS[1]

    def line(self) -> str:
        return (
            f"{self.what}: {self.done_files}/{self.files} files, "
            f"{_mb(self.done_bytes)} of {_mb(self.total)}"
        )

    def advance(self, nbytes: int, files: int = 0) -> None:
        self.done_bytes += nbytes
        self.done_files += files
        now = time.monotonic()
        if self.large and now - self._last >= PROGRESS_EVERY:
            self._last = now
            log.info("%s", self.line())
            if self.report is not None:
                self.report(self.line())


class Mirror:
    """One local folder and its copy on one host; shared by every kernel that syncs that
    pair (two notebooks in one folder), which `acquire` counts."""

    def __init__(self, ssh: SSHHost, local: str, remote: str, options: Options) -> None:
        self.ssh, self.local, self.remote, self.options = ssh, local, remote, options
        self.excludes = Excludes(options.excludes)
        self.refs = 0
        self.base: dict[str, tuple[Stat, Stat]] = {}
        self._lock = asyncio.Lock()
        self._loop: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        # host directories this pass made or found, relative: one request each, however
        # many files go there at once
        self._made: dict[str, asyncio.Future[None]] = {}
        self._checked: set[str] = set()  # local folders this pass found to be folders
        key = f"{ssh.name}\0{remote}\0{local}".encode()
        self.state_file = os.path.join(
            jupyter_data_dir(), "rkg-sync", hashlib.sha256(key).hexdigest()[:24] + ".json"
        )
        self._load()

    @property
    def label(self) -> str:
        return f"sync {self.local} <-> {self.ssh.name}:{self.remote}"

    # -- the baseline ------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            with open(self.state_file) as f:
                data = json.load(f)
            self.base = {
                p: (Stat(int(v[0]), int(v[1])), Stat(int(v[2]), int(v[3])))
                for p, v in data["files"].items()
            }
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            log.warning(
                "%s: baseline %s unreadable (%s): starting afresh", self.label, self.state_file, e
            )

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.state_file), mode=0o700, exist_ok=True)
        data = {
            "local": self.local,
            "host": self.ssh.name,
            "remote": self.remote,
            "files": {p: [h.size, h.mtime, t.size, t.mtime] for p, (h, t) in self.base.items()},
        }
        tmp = f"{self.state_file}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.state_file)

    # -- passes --------------------------------------------------------------------------

    async def sync(
        self, *, first: bool = False, report: Callable[[str], None] | None = None
    ) -> Plan:
        """One pass. `first` (before the kernel starts): a folder over the total cap is a
        start error; later passes skip it with a warning."""
        async with self._lock:
            return await self._pass(first, report)

    async def _pass(self, first: bool, report: Callable[[str], None] | None) -> Plan:
        opts = self.options
        sftp = await self.ssh.sftp()
        here, there = await asyncio.gather(
            asyncio.to_thread(list_here, self.local, self.excludes, opts.max_file_bytes),
            list_there(sftp, self.remote, self.excludes, opts.max_file_bytes),
        )
        for side, listing in (("here", here), (self.ssh.name, there)):
            if listing.total > opts.max_total_bytes:
                msg = (
                    f"{self.label}: the folder holds {_mb(listing.total)} to sync on {side} "
                    f"({len(listing.files)} files), over the kernelspec's sync_max_total_mb "
                    f"({opts.max_total_bytes // 2**20}): sync a smaller folder, exclude more "
                    "(sync_excludes) or raise the cap"
                )
                if first:
                    raise KernelStartError(msg)
                self._warn_once("total", msg)
                return Plan()
            for rel, size in listing.too_large:
                self._warn_once(
                    f"large:{side}:{rel}",
                    f"{self.label}: {rel} on {side} ({_mb(size)}) is over sync_max_file_mb "
                    f"({opts.max_file_bytes // 2**20}): not synced",
                )
        self._made.clear()
        self._checked.clear()
        todo = plan(here.files, there.files, self.base)
        changed = self._settle(todo.settled, here.files.keys() | there.files.keys())
        moving = [*todo.push, *todo.pull, *todo.conflicts]
        if moving:
            nbytes = sum(here.files[p].size for p in todo.push) + sum(
                there.files[p].size for p in todo.pull
            )
            progress = Progress(self.label, len(moving), nbytes, report)
            if progress.large:
                log.info("%s: %d files, %s to copy", self.label, len(moving), _mb(nbytes))
            gate = asyncio.Semaphore(TRANSFERS)

            async def one(path: str, copy: Callable[..., Awaitable[None]]) -> None:
                async with gate:
                    h, t = here.files.get(path), there.files.get(path)
                    await self._guarded(path, copy(sftp, path, h, t, progress))

            pushes = await self._in_bulk(
                todo.push, here.files, there.files, lambda b: self._tar_to_host(b, progress)
            )
            pulls = await self._in_bulk(
                todo.pull, there.files, here.files, lambda b: self._tar_from_host(b, progress)
            )
            await asyncio.gather(
                *(one(p, self._push) for p in pushes),
                *(one(p, self._pull) for p in pulls),
                *(one(p, self._conflict) for p in todo.conflicts),
            )
            changed = True
            log.info(
                "%s: %d up, %d down, %d conflicts kept both%s",
                self.label,
                len(todo.push),
                len(todo.pull),
                len(todo.conflicts),
                f" ({_mb(nbytes)})" if nbytes else "",
            )
        if changed:
            await asyncio.to_thread(self._save)
        return todo

    def _settle(self, settled: dict[str, tuple[Stat, Stat]], present: set[str]) -> bool:
        """Record the files found in sync; forget those gone from both sides."""
        gone = self.base.keys() - present
        for path in gone:
            del self.base[path]
        changed = bool(gone)
        for path, (h, t) in settled.items():
            old = self.base.get(path)
            if old is None or not (old[0].same(h) and old[1].same(t)):
                self.base[path] = (h, t)
                changed = True
        return changed

    async def _guarded(self, path: str, job: Awaitable[None]) -> None:
        """A file that went away or cannot be copied now is left for the next pass."""
        import asyncssh

        try:
            await job
        except (OSError, asyncssh.SFTPError) as e:
            self._warn_once(f"copy:{path}", f"{self.label}: {path} not copied: {e}")

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", msg)

    # -- copies --------------------------------------------------------------------------

    def _here(self, rel: str) -> str:
        """The local path of `rel`, its parent directories made; refused when a symlink (or
        anything but a directory) on the way would lead out of the folder."""
        parts = rel.split("/")
        if not all(valid_name(p) for p in parts):
            raise OSError(f"refusing the name {rel!r}")
        parent = self.local
        for part in parts[:-1]:
            parent = os.path.join(parent, part)
            if parent in self._checked:
                continue
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent)
            if not stat.S_ISDIR(os.lstat(parent).st_mode):
                raise OSError(f"{parent} is not a directory of the folder (a symlink?)")
            self._checked.add(parent)
        return os.path.join(parent, parts[-1])

    def _there(self, rel: str) -> str:
        return f"{self.remote}/{rel}"

    async def _push(
        self, sftp: asyncssh.SFTPClient, rel: str, h: Stat | None, t: Stat | None, pr: Progress
    ) -> None:
        import asyncssh

        assert h is not None
        src, dst = os.path.join(self.local, rel), self._there(rel)
        await self._folder_there(sftp, rel.rpartition("/")[0])
        tmp = f"{dst.rpartition('/')[0]}/{TEMP_PREFIX}{secrets.token_hex(6)}"
        stamp = asyncssh.SFTPAttrs(permissions=h.mode | 0o600, atime=h.mtime, mtime=h.mtime)
        try:
            if h.size <= SMALL_FILE:  # one read, and no request but open, write, stamp, close
                data = await asyncio.to_thread(_read, src)
                async with sftp.open(tmp, "wb") as f:
                    await f.write(data)
                    await f.setstat(stamp)
                written = len(data)
                pr.advance(written)
            else:  # asyncssh's pipelined reads and writes
                await sftp.put(src, tmp, progress_handler=_bytes_to(pr))
                await sftp.setstat(tmp, stamp)
                written = int((await sftp.lstat(tmp)).size or 0)
            await _rename(sftp, tmp, dst)
        except BaseException:
            with contextlib.suppress(Exception):
                await sftp.remove(tmp)
            raise
        pr.advance(0, 1)
        # the baseline is the file as listed here and as written there: one written here
        # while it was copied is newer than the baseline and moves again next pass
        self.base[rel] = (h, Stat(written, h.mtime))

    async def _in_bulk(
        self,
        paths: list[str],
        source: dict[str, Stat],
        dest: dict[str, Stat],
        move: Callable[[list[str]], Awaitable[list[str]]],
    ) -> list[str]:
        """Many small files new to one side (a first sync, a kernel's output) go as tar
        streams over one exec channel per BULK_BYTES instead of five SFTP requests per file:
        the other side has no such file yet, so nobody there can see one half written.
        `move` sends a batch (_tar_to_host, _tar_from_host) and gives back what did not go.
        The paths left to copy one by one."""
        new = [p for p in paths if p not in dest and source[p].size <= SMALL_FILE and _plain(p)]
        if len(new) < BULK_FILES:
            return paths
        taken = set(new)
        rest = [p for p in paths if p not in taken]
        batch: list[str] = []
        size = 0
        for path in new:
            batch.append(path)
            size += source[path].size + 1024  # and its tar header
            if size >= BULK_BYTES:
                rest += await move(batch)
                batch, size = [], 0
        if batch:
            rest += await move(batch)
        return rest

    async def _tar_to_host(self, paths: list[str], pr: Progress) -> list[str]:
        """Into `tar -x` on the host: modes and owners are this side's choice (no setuid
        bits, no owner restored). All of `paths` back when the host has no working tar."""
        archive, sent = await asyncio.to_thread(_tar, self.local, paths)
        if await self._tar_on_host("-xof -", archive) is None:
            return paths
        for path, st in sent.items():
            self.base[path] = (st, Stat(st.size, st.mtime))
            pr.advance(st.size, 1)
        return []

    async def _tar_from_host(self, paths: list[str], pr: Progress) -> list[str]:
        """Out of `tar -c` on the host, the names on its stdin. The stream is the host's
        word: only the names asked for, only regular files, each put in place as a pulled
        file is. Those of `paths` that did not come (a refused one fails again one by one,
        and says why)."""
        archive = await self._tar_on_host("-cf - -T -", "".join(f"{p}\n" for p in paths).encode())
        if archive is None:
            return paths
        landed = await asyncio.to_thread(self._untar, archive, set(paths))
        for path, (st, there) in landed.items():
            self.base[path] = (st, there)
            pr.advance(st.size, 1)
        return [p for p in paths if p not in landed]

    async def _tar_on_host(self, args: str, stdin: bytes) -> bytes | None:
        """`tar ARGS` in the host's folder: its output, or None (said once) when it failed."""
        conn = await self.ssh.connection()
        command = f"cd {shlex.quote(self.remote)} && tar {args}"
        async with self.ssh.sessions:
            done = await conn.run(command, input=stdin, encoding=None, check=False, timeout=300)
        if done.exit_status == 0 and isinstance(done.stdout, bytes):
            return done.stdout
        err = done.stderr.decode(errors="replace") if isinstance(done.stderr, bytes) else ""
        self._warn_once(f"tar {args}", f"{self.label}: tar on the host failed: {err.strip()[:200]}")
        return None

    def _untar(self, archive: bytes, wanted: set[str]) -> dict[str, tuple[Stat, Stat]]:
        """Land the wanted regular files of a tar from the host (in a thread)."""
        landed: dict[str, tuple[Stat, Stat]] = {}
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            for member in tar:
                if member.name not in wanted or not member.isreg() or member.size > SMALL_FILE:
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                there = Stat(member.size, int(member.mtime), member.mode & MODE_BITS)
                try:
                    landed[member.name] = (self._land(member.name, there, f.read()), there)
                except OSError as e:
                    self._warn_once(f"copy:{member.name}", f"{self.label}: {member.name}: {e}")
        return landed

    async def _folder_there(self, sftp: asyncssh.SFTPClient, rel_dir: str) -> None:
        """The host has the folder `rel_dir` (relative; '' is the mirror itself)."""
        if not rel_dir:
            return
        made = self._made.get(rel_dir)
        if made is None:
            made = self._made[rel_dir] = asyncio.ensure_future(self._mkdir(sftp, rel_dir))
        await made

    async def _mkdir(self, sftp: asyncssh.SFTPClient, rel_dir: str) -> None:
        import asyncssh

        await self._folder_there(sftp, rel_dir.rpartition("/")[0])
        path = self._there(rel_dir)
        try:
            await sftp.mkdir(path)
        except asyncssh.SFTPError:  # SFTP v3 says only "failure" when it exists
            if not stat.S_ISDIR((await sftp.stat(path)).permissions or 0):
                raise

    async def _pull(
        self, sftp: asyncssh.SFTPClient, rel: str, h: Stat | None, t: Stat | None, pr: Progress
    ) -> None:
        assert t is not None
        src = self._there(rel)
        if t.size <= SMALL_FILE:  # open, one read of the listed size, close; then one thread hop
            async with sftp.open(src, "rb") as f:
                data = await f.read(t.size)
            assert isinstance(data, bytes)  # opened in binary mode
            here = await asyncio.to_thread(self._land, rel, t, data)
            pr.advance(len(data))
        else:
            here = await asyncio.to_thread(self._land, rel, t, None)
            tmp = self._temp(rel)
            try:
                await sftp.get(src, tmp, progress_handler=_bytes_to(pr))
                here = await asyncio.to_thread(self._land, rel, t, tmp)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        pr.advance(0, 1)
        self.base[rel] = (here, t)

    def _temp(self, rel: str) -> str:
        return os.path.join(self.local, os.path.dirname(rel), TEMP_PREFIX + secrets.token_hex(6))

    def _land(self, rel: str, t: Stat, data: bytes | str | None) -> Stat:
        """Put a pulled file in place here (in a thread): `data` written to a temporary
        file, or `data` naming one already written, then its mode and mtime, then renamed over
        `rel` (a symlink there is replaced, never written through). `data` None only makes
        the folders on the way. The file as it now is here."""
        dst = self._here(rel)
        if data is None:
            return Stat(0, 0)
        tmp = data if isinstance(data, str) else self._temp(rel)
        try:
            if isinstance(data, bytes):
                _write(tmp, data)
            os.chmod(tmp, t.mode | 0o600)
            os.utime(tmp, (t.mtime, t.mtime))
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        done = os.stat(dst, follow_symlinks=False)
        return Stat(done.st_size, int(done.st_mtime))

    async def _conflict(
        self, sftp: asyncssh.SFTPClient, rel: str, h: Stat | None, t: Stat | None, pr: Progress
    ) -> None:
        """The newer keeps the name (here on a tie); the other is renamed beside it on its own
        side, then each side gets the other's file."""
        assert h is not None and t is not None
        here_wins = h.mtime >= t.mtime
        loser_at = self.ssh.target.hop.host if here_wins else "gateway"
        kept = conflict_name(rel, t.mtime if here_wins else h.mtime, loser_at)
        if here_wins:
            await _rename(sftp, self._there(rel), self._there(kept))
            await self._push(sftp, rel, h, None, pr)
            await self._pull(sftp, kept, None, t, pr)
        else:
            os.rename(await asyncio.to_thread(self._here, rel), os.path.join(self.local, kept))
            await self._pull(sftp, rel, None, t, pr)
            await self._push(sftp, kept, h, None, pr)
        log.warning(
            "%s: %s changed on both sides: kept both, the older as %s", self.label, rel, kept
        )

    # -- while the kernel runs ----------------------------------------------------------

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name=self.label)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.options.interval)
            if self.ssh.lost or not self.ssh.up:
                continue
            try:
                # shielded: stop() cancels the wait between passes, never a pass half done
                await asyncio.shield(self.sync())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a dropped connection: the next pass tries again
                self._warn_once(f"pass:{type(e).__name__}", f"{self.label}: pass failed: {e}")

    async def stop(self, final: bool) -> None:
        """Called when the last kernel of this pair stops: one last pass (its files written
        at the end come back), then no more. A pass under way finishes first (the lock)."""
        task, self._loop = self._loop, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if final and not self.ssh.lost and self.ssh.up:
            try:
                await self.sync()
            except Exception as e:
                log.warning("%s: last pass failed: %s", self.label, e)


def _tar(root: str, paths: list[str]) -> tuple[bytes, dict[str, Stat]]:
    """A tar of these files under `root` (symlinks not followed; one that vanished or is no
    longer a regular file is left out), and each file's size and mtime as it was read."""
    buf = io.BytesIO()
    sent: dict[str, Stat] = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for rel in paths:
            try:
                fd = os.open(os.path.join(root, rel), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                data = f.read()
            info = tarfile.TarInfo(rel)
            info.size, info.mtime = len(data), int(st.st_mtime)
            info.mode = (st.st_mode & MODE_BITS) | 0o600
            tar.addfile(info, io.BytesIO(data))
            sent[rel] = Stat(len(data), int(st.st_mtime))
    return buf.getvalue(), sent


def _plain(rel: str) -> bool:
    """A name tar takes as it is (`-T` reads names one a line): no option lookalike, no
    line break."""
    return not any(part.startswith("-") for part in rel.split("/")) and "\n" not in rel


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _bytes_to(pr: Progress) -> Callable[[bytes, bytes, int, int], None]:
    seen = 0

    def handler(src: bytes, dst: bytes, copied: int, total: int) -> None:
        nonlocal seen
        pr.advance(copied - seen)
        seen = copied

    return handler


async def _rename(sftp: asyncssh.SFTPClient, src: str, dst: str) -> None:
    """Over an existing file: OpenSSH's posix-rename, else remove and rename."""
    import asyncssh

    try:
        await sftp.posix_rename(src, dst)
    except asyncssh.SFTPOpUnsupported:
        with contextlib.suppress(asyncssh.SFTPNoSuchFile):
            await sftp.remove(dst)
        await sftp.rename(src, dst)


_MIRRORS: dict[tuple[str, str, str], Mirror] = {}


def acquire(ssh: SSHHost, local: str, remote: str, options: Options) -> Mirror:
    key = (ssh.name, remote, local)
    mirror = _MIRRORS.get(key)
    if mirror is None:
        mirror = _MIRRORS[key] = Mirror(ssh, local, remote, options)
    mirror.refs += 1
    return mirror


async def release(mirror: Mirror, *, final: bool = True) -> None:
    mirror.refs -= 1
    if mirror.refs > 0:
        return
    _MIRRORS.pop((mirror.ssh.name, mirror.remote, mirror.local), None)
    await mirror.stop(final)


def remote_folder(local: str, workdir: str) -> str:
    """Where `local` is mirrored on the host, relative to the SFTP session's directory (the
    remote home) unless `workdir` is absolute: `<workdir>/rkg-sync/<name>-<hash>`, stable for a
    folder, so its next kernel finds it there."""
    base = workdir.removeprefix("~").lstrip("/") if workdir.startswith("~") else workdir
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(local))
    digest = hashlib.sha256(local.encode()).hexdigest()[:10]
    leaf = f"rkg-sync/{name or 'root'}-{digest}"
    return f"{base.rstrip('/')}/{leaf}" if base else leaf
