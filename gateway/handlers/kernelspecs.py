"""/api/kernelspecs and the kernelspec resource files at /kernelspecs/NAME/FILE."""

from __future__ import annotations

import mimetypes
import os
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from ..errors import NotFound
from .base import APIHandler


def spec_model(base_url: str, name: str, spec: dict[str, Any], resource_dir: str) -> dict[str, Any]:
    resources = {}
    try:
        files = sorted(os.listdir(resource_dir))
    except OSError:
        files = []
    for fname in files:
        stem = os.path.splitext(fname)[0]
        if stem.startswith("logo-") or fname in ("kernel.js", "kernel.css"):
            resources[stem if stem.startswith("logo-") else fname] = (
                f"{base_url}kernelspecs/{name}/{fname}"
            )
    return {"name": name, "spec": spec, "resources": resources}


class KernelSpecsHandler(APIHandler):
    specs: KernelSpecManager

    def _models(self) -> dict[str, dict[str, Any]]:
        return {
            name: spec_model(self.config.base_url, name, info["spec"], info["resource_dir"])
            for name, info in self.specs.get_all_specs().items()
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
        try:
            spec = self.specs.get_kernel_spec(name)
        except NoSuchKernel:
            raise NotFound(f"no kernelspec named {name!r}") from None
        self.write_json(spec_model(self.config.base_url, name, spec.to_dict(), spec.resource_dir))


class KernelSpecHandler(KernelSpecsHandler):
    def get(self, name: str) -> None:  # type: ignore[override]
        self._one(name)


class KernelSpecResourceHandler(APIHandler):
    specs: KernelSpecManager

    def get(self, name: str, path: str) -> None:
        try:
            root = os.path.realpath(self.specs.get_kernel_spec(name).resource_dir)
        except NoSuchKernel:
            raise NotFound(f"no kernelspec named {name!r}") from None
        full = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, full]) != root or not os.path.isfile(full):
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
