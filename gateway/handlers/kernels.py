"""/api/kernels: list, start, get, delete, interrupt, restart. A non-admin sees and acts on
only the kernels they started (users.py); anyone else's answers as a missing id does."""

from __future__ import annotations

from ..errors import BadRequest
from ..kernels.registry import KernelRegistry
from ..users import visible
from .base import APIHandler

_ID = r"(?P<kernel_id>[\w-]+)"


class KernelsHandler(APIHandler):
    registry: KernelRegistry

    def get(self) -> None:
        self.write_json([k.model() for k in visible(self.registry.list(), self.user)])

    async def post(self) -> None:
        body = self.json_body()
        name = body.get("name")
        if name is not None and not isinstance(name, str):  # jupyter_client would raise
            raise BadRequest("'name' must be a string: a kernelspec's name")
        kernel = await self.registry.start(name, body.get("env"), self.user)
        self.set_header("Location", f"{self.config.base_url}api/kernels/{kernel.id}")
        self.write_json(kernel.model(), 201)


class KernelHandler(APIHandler):
    registry: KernelRegistry

    def get(self, kernel_id: str) -> None:
        self.write_json(self.own_kernel(kernel_id).model())

    async def delete(self, kernel_id: str) -> None:
        self.own_kernel(kernel_id)
        await self.registry.shutdown(kernel_id)
        self.set_status(204)
        self.finish()


class KernelActionHandler(APIHandler):
    registry: KernelRegistry

    async def post(self, kernel_id: str, action: str) -> None:
        kernel = self.own_kernel(kernel_id)
        if action == "interrupt":
            await kernel.interrupt()
            self.set_status(204)
            self.finish()
        else:
            await kernel.restart()
            self.write_json(kernel.model())


routes = [
    (r"api/kernels/?", KernelsHandler),
    (rf"api/kernels/{_ID}/?", KernelHandler),
    (rf"api/kernels/{_ID}/(?P<action>interrupt|restart)/?", KernelActionHandler),
]
