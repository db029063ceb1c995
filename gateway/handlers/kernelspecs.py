"""/api/kernelspecs and the kernelspec resource files at /kernelspecs/NAME/FILE.

Only the kernelspecs --allowed-kernelspecs offers (default: all) are listed or served. Clients
see no provisioner config (hosts, identity files, env, user lists): metadata.kernel_provisioner
and metadata.process_proxy are replaced by metadata.rkg = {"backend", "host"} (a native spec,
naming neither, is served as it is). The resource
route serves only what a front-end shows: logo-*.png / logo-*.svg, kernel.js, kernel.css."""

from __future__ import annotations

import mimetypes
import os
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from ..backends.common import RemoteProvisioner
from ..backends.contract import GatewayHooks
from ..errors import NotFound
from ..kernels import jc
from ..kernels.discovery import is_resource
from ..kernels.registry import DEFAULT_PROVISIONER
from .base import APIHandler

_PRIVATE_METADATA = ("kernel_provisioner", "process_proxy", "rkg")


def summary(metadata: dict[str, Any]) -> dict[str, str]:
    """What a client may know of a kernelspec's provisioner: its backend, and a host label
    (no user name, no path, no option)."""
    prov = metadata.get("kernel_provisioner") or {}
    name = str(prov.get("provisioner_name") or DEFAULT_PROVISIONER)
    cls = jc.provisioner_class(name)
    backend, host = name, ""
    if isinstance(cls, type) and issubclass(cls, GatewayHooks):
        backend = cls.backend or name
    if isinstance(cls, type) and issubclass(cls, RemoteProvisioner):
        try:
            host = cls.from_config(dict(prov.get("config") or {})).location()
        except Exception:  # a bad config is reported when it is used, not here
            host = ""
    return {"backend": backend, "host": host.removeprefix("via ").rpartition("@")[2]}


def public_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec a client sees: a native one (no provisioner named) as it is, as jupyter_server
    serves it; else with the summary in place of the provisioner's config."""
    metadata = dict(spec.get("metadata") or {})
    if not any(k in metadata for k in _PRIVATE_METADATA):
        return spec
    public = {k: v for k, v in metadata.items() if k not in _PRIVATE_METADATA}
    return {**spec, "metadata": {**public, "rkg": summary(metadata)}}


def spec_model(base_url: str, name: str, spec: dict[str, Any], resource_dir: str) -> dict[str, Any]:
    resources = {}
    try:
        files = sorted(os.listdir(resource_dir))
    except OSError:
        files = []
    for fname in files:
        if is_resource(fname):
            stem = os.path.splitext(fname)[0]
            resources[stem if stem.startswith("logo-") else fname] = (
                f"{base_url}kernelspecs/{name}/{fname}"
            )
    return {"name": name, "spec": public_spec(spec), "resources": resources}


class KernelSpecsHandler(APIHandler):
    specs: KernelSpecManager

    def _models(self) -> dict[str, dict[str, Any]]:
        allowed = self.config.allowed_kernelspecs
        return {
            name: spec_model(self.config.base_url, name, info["spec"], info["resource_dir"])
            for name, info in self.specs.get_all_specs().items()
            if not allowed or name in allowed
        }

    def get(self) -> None:
        # jupyter_server with KERNEL_USERNAME asks for one spec as ?user=alice/python3
        user = self.get_query_argument("user", "")
        if "/" in user:
            self._one(user.split("/", 1)[1])
            return
        models = self._models()
        default = self.config.default_kernel_name
        if default not in models and models:
            default = sorted(models)[0]
        self.write_json({"default": default, "kernelspecs": models})

    def _one(self, name: str) -> None:
        spec = self.registry.spec_exists(name)
        self.write_json(spec_model(self.config.base_url, name, spec.to_dict(), spec.resource_dir))


class KernelSpecHandler(KernelSpecsHandler):
    def get(self, name: str) -> None:  # type: ignore[override]
        self._one(name)


class KernelSpecResourceHandler(APIHandler):
    specs: KernelSpecManager

    def get(self, name: str, path: str) -> None:
        root = os.path.realpath(self.registry.spec_exists(name).resource_dir)
        full = os.path.realpath(os.path.join(root, path))
        if (
            not is_resource(path)
            or not is_resource(os.path.basename(full))  # nor a link named like one
            or os.path.commonpath([root, full]) != root
            or not os.path.isfile(full)
        ):
            raise NotFound(f"kernelspec {name!r} has no resource {path!r}")
        self.set_header("Content-Type", mimetypes.guess_type(full)[0] or "application/octet-stream")
        self.set_header("Cache-Control", "max-age=3600")
        with open(full, "rb") as f:
            self.finish(f.read())


_NAME = r"(?P<name>[\w.\-]+)"
routes = [
    (r"api/kernelspecs/?", KernelSpecsHandler),
    (rf"api/kernelspecs/{_NAME}/?", KernelSpecHandler),
    (rf"kernelspecs/{_NAME}/(?P<path>.+)", KernelSpecResourceHandler),
]
