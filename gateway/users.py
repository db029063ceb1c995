"""Users: who a request is, what they may see, and which kernelspecs they may start.

    admin        the --token (RKG_TOKEN) token, user name "admin"; with --no-auth, everyone.
                 Sees and manages every kernel and session; may set any KERNEL_USERNAME.
    user tokens  `rkg token add NAME [--admin]`: 32 random bytes, stored as their SHA-256 in
                 the state database's `tokens` table, printed once. A running gateway reads
                 the table again when another process (`rkg token`) changed the database,
                 so an added or removed token takes effect at once, without a restart.

A non-admin owns the kernels they start (and so the sessions on them), sees only those, and
gets the same 404 for anyone else's as for a missing id; their KERNEL_USERNAME is their name.
Who may start a kernelspec: `authorized_users` / `unauthorized_users`, each a list or a
comma-separated string, in its metadata.kernel_provisioner.config or (as Enterprise Gateway
reads them) metadata.process_proxy.config, else the gateway's --authorized-users (empty:
everyone); the gateway's --unauthorized-users (default root) always apply.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import default_state_db
from .errors import BadRequest, Forbidden, NotFound
from .state import StateStore

ADMIN = "admin"
ACCESS_KEYS = ("authorized_users", "unauthorized_users")
_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\Z")


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False

    def sees(self, owner: str) -> bool:
        """Whether this user may see and manage what `owner` owns."""
        return self.admin or owner == self.name


ADMIN_USER = User(ADMIN, admin=True)


def token_hash(token: str) -> str:
    """Tokens are 32 random bytes: a fast hash cannot be searched back, a slow one would only
    cost every request its time."""
    return hashlib.sha256(token.encode()).hexdigest()


def user_name(name: str) -> str:
    if name == ADMIN:
        raise BadRequest("the user name 'admin' is the --token's (RKG_TOKEN); choose another")
    if not _NAME.match(name):
        raise BadRequest(
            f"user name {name!r} must be a lowercase letter or '_' then up to 31 lowercase "
            "letters, digits, '_', '.' or '-'"
        )
    return name


def names(value: Any) -> frozenset[str]:
    """A list of user names, given as a list or a comma-separated string."""
    if value is None or value == "":
        return frozenset()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise ValueError(f"must be a list of user names or a comma-separated string: {value!r}")
    return frozenset(str(v).strip() for v in items if str(v).strip())


class Tokens:
    """The admin token and the user tokens: the user a request's token belongs to."""

    def __init__(self, admin_token: str, store: StateStore) -> None:
        self._admin = admin_token
        self._store = store
        self._version: int | None = None  # the database's data_version at the last read
        self._users: list[tuple[str, User]] = []  # (token hash, user)

    def user(self, token: str) -> User | None:
        """The token's user, or None. Every hash is compared (in constant time each), so the
        time taken says nothing about which one came close."""
        if self._admin and secrets.compare_digest(token.encode(), self._admin.encode()):
            return ADMIN_USER
        given = token_hash(token)
        found = None
        for known, user in self._current():
            if secrets.compare_digest(given, known):
                found = user
        return found

    def _current(self) -> list[tuple[str, User]]:
        """The table as last read, read again when another process changed the database
        (StateStore.changed_elsewhere: microseconds, so asked every time)."""
        try:
            version = self._store.changed_elsewhere()
            if version != self._version:
                rows = self._store.tokens()
                self._users = [(h, User(n, bool(a))) for n, h, a, _ in rows]
                self._version = version
        except sqlite3.Error:
            pass  # the database is busy or gone: keep the last table read
        return self._users


# -- at start: KERNEL_USERNAME and the kernelspec's lists -------------------------------------


def claimed_env(user: User, env: Any) -> Any:
    """The client's env with KERNEL_USERNAME set to a non-admin's name when absent; a claim
    of another name is a Forbidden. Admins may set any (as Enterprise Gateway allows). An
    env that is not an object is left for the launch request to refuse."""
    if user.admin:
        return env
    if env is None:
        env = {}
    if not isinstance(env, dict):
        return env
    claimed = env.get("KERNEL_USERNAME")
    if claimed in (None, ""):
        return {**env, "KERNEL_USERNAME": user.name}
    if claimed != user.name:
        raise Forbidden(
            f"user {user.name!r} may not start a kernel as KERNEL_USERNAME {claimed!r}: "
            "leave it out, or set it to your own name"
        )
    return env


def check_may_start(
    username: str,
    spec_name: str,
    metadata: Mapping[str, Any],
    authorized: str,
    unauthorized: str,
    *,
    as_gateway_user: User | None = None,
) -> None:
    """Forbidden unless `username` (the effective KERNEL_USERNAME) may start kernelspec
    `spec_name`: the spec's lists (both places) and the gateway's (`authorized` applies only
    to a spec that names no authorized_users of its own).

    `as_gateway_user`: the requester, when the spec's kernels run as the gateway's own system
    user (local kernels, jobs submitted from this machine). Such a kernel can read the state
    database and the gateway's environment (every key and token), so a non-admin may start it
    only when the spec's own authorized_users names them: the operator's explicit choice."""
    allowed: set[str] = set()
    refused = set(names(unauthorized))
    for where in ("kernel_provisioner", "process_proxy"):
        config = (metadata.get(where) or {}).get("config") or {}
        try:
            allowed |= names(config.get("authorized_users"))
            refused |= names(config.get("unauthorized_users"))
        except ValueError as e:
            raise Forbidden(
                f"kernelspec {spec_name!r} has unreadable user lists ({e}); "
                "the operator must fix it before anyone may start it"
            ) from None
    requester = as_gateway_user
    if requester is not None and not requester.admin and requester.name not in allowed:
        raise Forbidden(
            f"user {requester.name!r} may not start kernelspec {spec_name!r}: its kernels run "
            "as the gateway's own system user, which can read every kernel's key and token, "
            "so only admins may, unless the kernelspec's own authorized_users names the user"
        )
    allowed = allowed or set(names(authorized))
    if username in refused or (allowed and username not in allowed):
        raise Forbidden(f"user {username!r} is not authorized to start kernelspec {spec_name!r}")


def strip_access_keys(metadata: Mapping[str, Any]) -> None:
    """Take the user lists out of a loaded kernelspec's provisioner config: they are the
    gateway's, and a provisioner given options it does not know warns (traitlets)."""
    config = (metadata.get("kernel_provisioner") or {}).get("config")
    if isinstance(config, dict):
        for key in ACCESS_KEYS:
            config.pop(key, None)


def hidden(owner: str, user: User, what: str) -> None:
    """A NotFound (with the same message as a missing `what`) unless `user` sees `owner`'s."""
    if not user.sees(owner):
        raise NotFound(what)


def visible(items: Iterable[Any], user: User) -> list[Any]:
    """The items (with an `owner`) `user` may see."""
    return [i for i in items if user.sees(i.owner)]


# -- `rkg token` ------------------------------------------------------------------------------


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="verb", required=True)
    add = sub.add_parser("add", help="create a user and print their token (shown only once)")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may see and manage every kernel")
    remove = sub.add_parser("remove", help="remove a user: their token stops working")
    remove.add_argument("name")
    listing = sub.add_parser("list", help="list the users (never their tokens)")
    for p in (add, remove, listing):
        p.add_argument(
            "--state-db",
            help="the gateway's state database [RKG_STATE_DB, default as `rkg serve`'s]",
        )


def run_token_command(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    path = args.state_db or environ.get("RKG_STATE_DB") or default_state_db()
    if path == ":memory:":
        raise BadRequest("users live in the state database: give a file, not ':memory:'")
    store = StateStore(path)
    try:
        if args.verb == "add":
            name = user_name(args.name)
            token = secrets.token_urlsafe(32)
            try:
                store.add_token(name, token_hash(token), args.admin, time.time())
            except sqlite3.IntegrityError:
                raise BadRequest(
                    f"user {name!r} exists; `rkg token remove {name}` first to replace the token"
                ) from None
            role = "admin" if args.admin else "user"
            print(f"added {role} {name!r}; the token (not shown again, only its hash is kept):")
            print(token)
        elif args.verb == "remove":
            if not store.remove_token(args.name):
                raise NotFound(f"no user named {args.name!r} in {path}")
            print(f"removed {args.name!r}: their token no longer works")
        else:
            for name, _, admin, created in store.tokens():
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
                print(f"{name}\t{'admin' if admin else 'user'}\t{when}")
    finally:
        store.close()
