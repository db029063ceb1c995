"""/api/kernels: list, start, get, delete, interrupt, restart."""

from __future__ import annotations

from ..kernels.registry import KernelRegistry
from .base import APIHandler

_ID = r"(?P<kernel_id>[\w-]+)"


class KernelsHandler(APIHandler):
    registry: KernelRegistry

    def get(self) -> None:
        self.write_json([k.model() for k in self.registry.list()])

    async def post(self) -> None:
        body = self.json_body()
        kernel = await self.registry.start(body.get("name"), body.get("env"))
        self.set_header("Location", f"{self.config.base_url}api/kernels/{kernel.id}")
        self.write_json(kernel.model(), 201)


class KernelHandler(APIHandler):
    registry: KernelRegistry

    def get(self, kernel_id: str) -> None:
        self.write_json(self.registry.get(kernel_id).model())

    async def delete(self, kernel_id: str) -> None:
        await self.registry.shutdown(kernel_id)
        self.set_status(204)
        self.finish()


class KernelActionHandler(APIHandler):
    registry: KernelRegistry

    async def post(self, kernel_id: str, action: str) -> None:
        kernel = self.registry.get(kernel_id)
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
