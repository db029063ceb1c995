"""The gateway's durable registry: kernels (with what re-attaching to them needs) and sessions,
in an embedded SQLite database. Writes happen on one worker thread, so the event loop never
waits on the disk, and in order, so a kernel is recorded before its start is acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import stat
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import StateError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kernels (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    username TEXT NOT NULL DEFAULT '',
    connection_info TEXT NOT NULL,
    provisioner_info TEXT NOT NULL,
    launch TEXT NOT NULL,
    created REAL NOT NULL,
    pooled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    kernel_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    admin INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
"""


def private_dir(path: str) -> None:
    """Make `path` (and what it lacks above it) mode 0700 whatever the umask, or narrow an
    existing one to 0700 (and say so): the state database and the runtime dir hold every
    kernel's HMAC key, which lets whoever reads it sign messages to that kernel."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent != path and not os.path.isdir(parent):
            private_dir(parent)
        os.makedirs(path, mode=0o700, exist_ok=True)
    _narrow(path, 0o700)


def private_file(path: str) -> None:
    """Make `path` an empty file of mode 0600 whatever the umask, or narrow an existing one
    to 0600 (and say so). Called before anything secret is written to it."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    _narrow(path, 0o600)


def _narrow(path: str, mode: int) -> None:
    """chmod to `mode`, keeping the sticky bit jupyter_client sets on the runtime dir."""
    current = stat.S_IMODE(os.stat(path).st_mode)
    if current & 0o777 != mode:
        os.chmod(path, (current & ~0o777) | mode)
        log.warning("%s was mode %04o; made it %04o", path, current & 0o777, mode)


@dataclass
class KernelRecord:
    id: str
    name: str
    username: str
    connection_info: dict[str, Any]
    provisioner_info: dict[str, Any]
    launch: dict[str, Any]  # the client's env extras and cwd, to relaunch on restart
    created: float
    pooled: bool = False  # a warm pool's kernel, no one's yet (kernels/pool.py)
    owner: str = "admin"  # the user who started it (users.py); older records: the admin


class StateStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rkg-state")
        if path != ":memory:":
            # SQLite gives the -wal and -shm files the database's own mode when it makes them
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                private_dir(folder)
            try:
                for name in (path, f"{path}-wal", f"{path}-shm"):
                    if name == path or os.path.exists(name):
                        private_file(name)
            except OSError as e:
                raise StateError(f"cannot make the state database {path} private: {e}") from e
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.Error as e:
            raise StateError(f"cannot open the state database {path}: {e}") from e

    def _migrate(self) -> None:
        """A database an older gateway wrote: add what it lacks (CREATE TABLE IF NOT EXISTS
        leaves an existing table as it was)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(kernels)")}
        if "pooled" not in columns:
            self._db.execute("ALTER TABLE kernels ADD COLUMN pooled INTEGER NOT NULL DEFAULT 0")
        if "owner" not in columns:
            self._db.execute("ALTER TABLE kernels ADD COLUMN owner TEXT NOT NULL DEFAULT 'admin'")

    async def _run(self, sql: str, args: tuple[Any, ...]) -> None:
        def run() -> None:
            self._db.execute(sql, args)

        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, run)
        except sqlite3.Error as e:
            raise StateError(f"cannot write the state database {self.path}: {e}") from e

    def gateway_id(self) -> str:
        """This gateway's name for what it creates elsewhere (container labels), kept with its
        state so a restarted gateway knows its own leftovers. Read at start-up."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'gateway_id'").fetchone()
        if row:
            return str(row[0])
        value = uuid.uuid4().hex[:12]
        self._db.execute("INSERT INTO meta VALUES ('gateway_id', ?)", (value,))
        return value

    # -- kernels -----------------------------------------------------------------------

    async def put_kernel(self, rec: KernelRecord) -> None:
        info = dict(rec.connection_info)
        if isinstance(info.get("key"), bytes):
            info["key"] = info["key"].decode()
        await self._run(
            "INSERT OR REPLACE INTO kernels (id, name, username, connection_info, "
            "provisioner_info, launch, created, pooled, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.id,
                rec.name,
                rec.username,
                json.dumps(info),
                json.dumps(rec.provisioner_info, default=str),
                json.dumps(rec.launch),
                rec.created,
                int(rec.pooled),
                rec.owner,
            ),
        )

    async def delete_kernel(self, kernel_id: str) -> None:
        await self._run("DELETE FROM kernels WHERE id = ?", (kernel_id,))
        await self._run("DELETE FROM sessions WHERE kernel_id = ?", (kernel_id,))

    def kernels(self) -> list[KernelRecord]:
        """Read once at start-up, before serving."""
        rows = self._db.execute(
            "SELECT id, name, username, connection_info, provisioner_info, "
            "launch, created, pooled, owner FROM kernels ORDER BY created"
        ).fetchall()
        return [
            KernelRecord(
                r[0],
                r[1],
                r[2],
                json.loads(r[3]),
                json.loads(r[4]),
                json.loads(r[5]),
                r[6],
                bool(r[7]),
                r[8],
            )
            for r in rows
        ]

    # -- sessions ----------------------------------------------------------------------

    async def put_session(self, sid: str, path: str, name: str, type_: str, kernel_id: str) -> None:
        await self._run(
            "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?)",
            (sid, path, name, type_, kernel_id),
        )

    async def delete_session(self, sid: str) -> None:
        await self._run("DELETE FROM sessions WHERE id = ?", (sid,))

    def sessions(self) -> list[tuple[str, str, str, str, str]]:
        return self._db.execute("SELECT id, path, name, type, kernel_id FROM sessions").fetchall()

    # -- user tokens (users.py; `rkg token` writes them, the gateway reads them) ----------

    def add_token(self, name: str, token_hash: str, admin: bool, created: float) -> None:
        """Called by `rkg token add`; a name already there is a sqlite3.IntegrityError."""
        self._db.execute(
            "INSERT INTO tokens (name, hash, admin, created) VALUES (?, ?, ?, ?)",
            (name, token_hash, int(admin), created),
        )

    def remove_token(self, name: str) -> bool:
        """Called by `rkg token remove`: whether there was such a user."""
        return self._db.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount > 0

    def changed_elsewhere(self) -> int:
        """SQLite's data_version: it changes when another connection (`rkg token`) commits,
        never for this one's own writes. A few microseconds: asked on every token check."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def tokens(self) -> list[tuple[str, str, bool, float]]:
        """(name, SHA-256 of the token, admin, created) of every user, by name. Read by
        `rkg token list` and by the gateway when another process changed the database."""
        rows = self._db.execute(
            "SELECT name, hash, admin, created FROM tokens ORDER BY name"
        ).fetchall()
        return [(r[0], r[1], bool(r[2]), r[3]) for r in rows]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._db.close()
