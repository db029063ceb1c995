"""Kernels found on their own: every kernelspec installed on an SSH host, listed by the gateway.

An SSH kernelspec whose provisioner config says `discover: true` (`rkg spec add ssh NAME --host H
--discover`) is a template, not itself listed: the gateway lists each kernelspec found on H as
`NAME-<remote name>`, display name "<remote display name> (NAME)", with the remote language,
argv (run as the template's kernel_cmd, so {connection_file} is the SSH backend's) and logos.

    SpecManager          the KernelSpecManager the gateway uses: local kernelspecs minus the
                         templates, plus what was found (a local name wins)
    Discovery.run()      owned by serve(): reads each template's host every `discover_interval`
                         seconds (default 20) over the shared SSH connection, SFTP only; a
                         read that takes over `discover_timeout` seconds (default 10) fails
    Discovery.settled()  serve() waits (bounded) for the first reads before re-attaching
                         kernels and sizing warm pools

A failover kernelspec whose members are all templates (`rkg spec add failover any pc server`)
is a template too: `any-x` for each `x` found on any member's host, a failover kernelspec of
`pc-x`, `server-x` (those found now, in that order), so the PC is preferred whenever it is up.

Nothing runs on the host but sshd: kernel.json and the logo/kernel.js files are read from
`discover_paths` and the Jupyter data paths (~/.local/share, /usr/local/share, /usr/share).
Resource files are copied to a directory private to this gateway, again only when their size or
mtime changed. Requests are served from memory and never wait for a refresh; a host that cannot
be read has its kernels hidden at once (a start there would fail anyway), and listed again at the
first refresh that reads it. Kernels already running of a spec that disappears keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

from ..backends import sshpool
from . import failover

log = logging.getLogger(__name__)


def is_resource(fname: str) -> bool:
    """The files a client may fetch from a kernelspec's directory (handlers/kernelspecs.py
    serves only these), and so the only ones copied from a host."""
    stem, ext = os.path.splitext(fname)
    if stem.startswith("logo-"):
        return ext in (".png", ".svg") and "/" not in fname
    return fname in ("kernel.js", "kernel.css")


DEFAULT_PATHS = (
    ".local/share/jupyter/kernels",  # SFTP paths are relative to the login's home
    "/usr/local/share/jupyter/kernels",
    "/usr/share/jupyter/kernels",
)
INTERVAL = 20.0  # seconds between two reads of a host
SCAN = 5.0  # seconds between two looks for new, changed or removed templates
ATTEMPT = 10.0  # seconds one read of a host may take, connecting included
MAX_FILE = 1 << 20  # a kernel.json or logo larger than this is not read
Found = dict[str, tuple[dict[str, Any], str]]  # name: (kernelspec, resource dir)
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# the template's own keys, not passed on to the kernelspecs found
_TEMPLATE_KEYS = (
    "discover",
    "discover_paths",
    "discover_interval",
    "discover_timeout",
    "kernel_cmd",
    "python",
)


class SpecManager(KernelSpecManager):
    """The local kernelspecs, minus discovery templates, plus the kernelspecs found (read by
    the REST handlers, the registry's start, the pool and the status page, unchanged)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.templates: set[str] = set()
        self.found: Found = {}  # name: (spec, resource dir)

    def local_specs(self) -> dict[str, str]:
        return super().find_kernel_specs()

    def find_kernel_specs(self) -> dict[str, str]:
        specs = {n: d for n, d in self.local_specs().items() if n not in self.templates}
        for name, (_, resource_dir) in self.found.items():
            specs.setdefault(name, resource_dir)
        return specs

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name in self.templates:
            raise NoSuchKernel(kernel_name)
        try:
            return super().get_kernel_spec(kernel_name)
        except NoSuchKernel:
            found = self.found.get(kernel_name)
            if found is None:
                raise
            spec, resource_dir = found
            return KernelSpec(resource_dir=resource_dir, **json.loads(json.dumps(spec)))


def read_templates(specs: SpecManager) -> tuple[dict[str, Any], dict[str, failover.Failover]]:
    """The local kernelspecs marked for discovery (name -> their whole kernel.json), and the
    failover kernelspecs whose members are all such templates (blocking: run in a thread)."""
    out, chains = {}, {}
    for name, resource_dir in specs.local_specs().items():
        try:
            with open(os.path.join(resource_dir, "kernel.json")) as f:
                spec = json.load(f)
            chain = failover.of(spec.get("metadata"))
            if chain is not None:
                chains[name] = chain
                continue
            prov = spec["metadata"]["kernel_provisioner"]
            if prov.get("provisioner_name") == "rkg-ssh" and prov["config"].get("discover"):
                out[name] = spec
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return out, {n: c for n, c in chains.items() if c.specs and set(c.specs) <= set(out)}


def composed(chains: dict[str, failover.Failover], by_template: dict[str, Found]) -> Found:
    """For a failover kernelspec of templates, `CHAIN-x` for every `x` found on any of its
    members' hosts: a failover kernelspec of the members that list `x` now, in its order."""
    out = {}
    for chain_name, chain in chains.items():
        names: dict[str, list[str]] = {}
        found: Found = {}
        for template in chain.specs:
            found.update(by_template.get(template) or {})
            for name in sorted(by_template.get(template) or {}):
                names.setdefault(name[len(template) + 1 :], []).append(name)
        for x, members in names.items():
            first, resource_dir = found[members[0]]
            display = str(first["display_name"]).rpartition(" (")[0]  # "R (pc)": R
            spec = failover.spec(
                members,
                attempt_timeout=chain.attempt_timeout,
                display_name=f"{display} ({chain_name})",
                language=str(first.get("language") or ""),
            )
            out[f"{chain_name}-{x}"] = (spec, resource_dir)
    return out


def found_spec(template: str, tspec: dict[str, Any], remote: dict[str, Any], rdir: str) -> Any:
    """The kernelspec of remote kernelspec `remote` (in `rdir` on the host) as the gateway
    lists it, or a string saying why it is skipped."""
    argv = remote.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or not argv:
        return "its argv is not a list of strings"
    argv = [a.replace("{resource_dir}", rdir) for a in argv]
    if not any("{connection_file}" in a for a in argv):
        return "its argv has no {connection_file}, so the kernel could not be told its ports"
    tmeta = dict(tspec.get("metadata") or {})
    tconfig = dict(tmeta.pop("kernel_provisioner")["config"])
    config = {k: v for k, v in tconfig.items() if k not in _TEMPLATE_KEYS}
    config["kernel_cmd"] = argv
    rmeta: dict[str, Any] = remote.get("metadata") or {}
    if not isinstance(rmeta, dict):
        rmeta = {}
    metadata = {k: v for k, v in rmeta.items() if k not in ("kernel_provisioner", "rkg")}
    metadata.update(tmeta)
    metadata["kernel_provisioner"] = {"provisioner_name": "rkg-ssh", "config": config}
    env: dict[str, Any] = remote.get("env") or {}
    if not isinstance(env, dict):
        env = {}
    return {
        "argv": argv,
        "display_name": f"{remote.get('display_name') or os.path.basename(rdir)} ({template})",
        "language": str(remote.get("language") or ""),
        "interrupt_mode": remote.get("interrupt_mode") or "signal",
        "env": {str(k): str(v) for k, v in env.items()},
        "metadata": metadata,
    }


@dataclass
class Source:
    """One template and its host: the last read, and the lease on the host's connection."""

    name: str
    spec: dict[str, Any]
    cache: str
    lease: sshpool.SSHHost | None = None
    up: bool | None = None
    skipped: set[str] = field(default_factory=set)
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)  # cached file: size, mtime
    jsons: dict[str, tuple[tuple[int, int], Any]] = field(default_factory=dict)
    last_bytes: int = 0
    published: asyncio.Event = field(default_factory=asyncio.Event)  # after the first read
    last_seconds: float = 0.0

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.spec["metadata"]["kernel_provisioner"]["config"])

    @property
    def interval(self) -> float:
        return float(self.config.get("discover_interval") or INTERVAL)

    @property
    def attempt(self) -> float:
        return float(self.config.get("discover_timeout") or ATTEMPT)

    def paths(self) -> list[str]:
        return [*(self.config.get("discover_paths") or []), *DEFAULT_PATHS]

    async def _host(self) -> sshpool.SSHHost:
        if self.lease is not None and self.lease.lost:
            self.close()
        if self.lease is None:
            from ..backends.ssh import SSHProvisioner

            config = self.config
            host = (config.get("hosts") or [config.get("host")])[0]
            target = SSHProvisioner.from_config({**config, "host": host}).target()
            self.lease = await sshpool.acquire(target)
        return self.lease

    async def read(self) -> Found:
        """The kernelspecs on the host now (with their resource files cached)."""
        started, self.last_bytes = time.perf_counter(), 0
        sftp = await (await self._host()).sftp()
        out: Found = {}
        skipped: set[str] = set()
        read: set[str] = set()
        for base in self.paths():
            try:
                names = sorted(await sftp.listdir(base))
            except Exception as e:  # no such directory there: nothing installed
                log.debug("discovery on %s: no kernels in %s: %s", self.name, base, e)
                continue
            for rname in names:
                name = f"{self.name}-{rname}"
                if rname.startswith(".") or name in out or not _NAME.match(rname):
                    continue
                rdir = f"{base}/{rname}"
                read.add(rdir)
                try:
                    files = {str(e.filename): e.attrs for e in await sftp.readdir(rdir)}
                    meta = files.get("kernel.json")
                    if meta is None or (meta.size or 0) > MAX_FILE:
                        continue
                    remote = await self._kernel_json(sftp, rdir, meta)
                except Exception as e:
                    skipped.add(f"{rdir}: cannot be read ({e})")
                    continue
                spec = (
                    found_spec(self.name, self.spec, remote, rdir)
                    if isinstance(remote, dict)
                    else "its kernel.json is not an object"
                )
                if isinstance(spec, str):
                    skipped.add(f"{rdir}: {spec}")
                    continue
                out[name] = (spec, await self._resources(sftp, name, rdir, files))
        self.jsons = {p: v for p, v in self.jsons.items() if p.rpartition("/")[0] in read}
        for why in skipped - self.skipped:
            log.warning("discovery on %s: skipping %s", self.name, why)
        self.skipped = skipped
        self.last_seconds = time.perf_counter() - started
        return out

    async def _kernel_json(self, sftp: Any, rdir: str, attrs: Any) -> Any:
        """The remote kernel.json, parsed; read again only when its size or mtime changed."""
        path, stamp = f"{rdir}/kernel.json", (attrs.size or 0, attrs.mtime or 0)
        cached = self.jsons.get(path)
        if cached is None or cached[0] != stamp:
            cached = self.jsons[path] = (stamp, json.loads(await self._fetch(sftp, path)))
        return cached[1]

    async def _fetch(self, sftp: Any, path: str) -> bytes:
        async with sftp.open(path, "rb") as f:
            data: bytes = await f.read(MAX_FILE)
        self.last_bytes += len(data)
        return data

    async def _resources(self, sftp: Any, name: str, rdir: str, files: dict[str, Any]) -> str:
        """The local copy of the remote spec's logos and kernel.js/css: its directory."""
        local = os.path.join(self.cache, name)
        await asyncio.to_thread(os.makedirs, local, 0o700, True)
        for fname, attrs in files.items():
            if not is_resource(fname) or (attrs.size or 0) > MAX_FILE:
                continue
            stamp, key = (attrs.size or 0, attrs.mtime or 0), os.path.join(local, fname)
            if self.stamps.get(key) != stamp:
                data = await self._fetch(sftp, f"{rdir}/{fname}")
                await asyncio.to_thread(_write, key, data)
                self.stamps[key] = stamp
        return local

    def close(self) -> None:
        if self.lease is not None:
            sshpool.release(self.lease, linger=0)
            self.lease = None


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


class Discovery:
    """The refresher: one task per template, started, restarted and stopped as templates are
    added, changed and removed. Owned by serve(), which cancels run()."""

    def __init__(self, specs: SpecManager) -> None:
        self.specs = specs
        self.sources: dict[str, tuple[Source, asyncio.Task[None]]] = {}
        self.chains: dict[str, failover.Failover] = {}
        self.raw: dict[str, Found] = {}  # by template
        self.cache = ""
        self._scanned = asyncio.Event()

    async def run(self) -> None:
        self.cache = await asyncio.to_thread(tempfile.mkdtemp, prefix="rkg-discovered-")
        try:
            while True:
                self._follow(*await asyncio.to_thread(read_templates, self.specs))
                self._scanned.set()
                await asyncio.sleep(SCAN)
        finally:
            for name in list(self.sources):
                await self._stop(name)
            await asyncio.to_thread(shutil.rmtree, self.cache, True)

    async def settled(self, within: float = ATTEMPT + 1) -> None:
        """Called by serve() before it re-attaches kernels and sizes warm pools, which need
        the kernelspecs found: waits (bounded) for the first read of every host."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._scanned.wait()
                for source, _ in list(self.sources.values()):
                    await source.published.wait()

    def _follow(self, templates: dict[str, Any], chains: dict[str, failover.Failover]) -> None:
        self.specs.templates = set(templates) | set(chains)
        if chains != self.chains:
            self.chains = chains
            self._found()
        for name in list(self.sources):
            if templates.get(name) != self.sources[name][0].spec:
                task = asyncio.create_task(self._stop(name))
                task.add_done_callback(lambda t: t.exception())
        for name, spec in templates.items():
            if name not in self.sources:
                source = Source(name, spec, os.path.join(self.cache, name))
                self.sources[name] = (source, asyncio.create_task(self._refresh_forever(source)))

    async def _stop(self, name: str) -> None:
        entry = self.sources.pop(name, None)
        if entry is None:  # stopped already
            return
        source, task = entry
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        source.close()
        self._publish(source, {})
        await asyncio.to_thread(shutil.rmtree, source.cache, True)

    async def _refresh_forever(self, source: Source) -> None:
        while True:
            try:
                async with asyncio.timeout(source.attempt):
                    found = await source.read()
                if source.up is not True:
                    log.info("discovery on %s: %d kernelspec(s)", source.name, len(found))
                source.up = True
            except Exception as e:  # a host down or unreadable: its kernels hidden
                found = {}
                if source.up is not False:
                    why = "no answer" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
                    log.warning(
                        "discovery on %s: host not read, its kernels hidden: %s", source.name, why
                    )
                source.up = False
                source.close()
            else:
                log.debug(
                    "discovery on %s: %d kernelspec(s), %d bytes in %.1f ms",
                    source.name,
                    len(found),
                    source.last_bytes,
                    1000 * source.last_seconds,
                )
            self._publish(source, found)
            source.published.set()
            await asyncio.sleep(source.interval)

    def _publish(self, source: Source, found: Found) -> None:
        if found:
            self.raw[source.name] = found
        else:
            self.raw.pop(source.name, None)
        self._found()

    def _found(self) -> None:
        found = {n: v for by_name in self.raw.values() for n, v in by_name.items()}
        # one assignment: readers see the old list or the new one
        self.specs.found = {**found, **composed(self.chains, self.raw)}
