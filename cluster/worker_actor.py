"""Calls every worker actor answers the same way, whatever its pool (a mixin).

The concrete actors (``PrefillWorkerActor``, ``DecodeWorkerActor``) hold a ``host``
(``WorkerHost`` subclass) and add their request-path methods; these are the launcher's,
the router's and the metrics endpoint's view of any worker.
"""

from __future__ import annotations


class WorkerActorMixin:
    host: object

    async def ready(self) -> str:
        return self.host.worker.worker_id

    def pid(self) -> int:
        """This worker's process id (chaos tests kill it)."""
        import os

        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    async def stats(self):
        return await self.host.stats()

    async def step_log(self, last: int | None = None) -> list:
        return await self.host.step_log(last)

    async def metrics_text(self) -> str:
        return self.host.metrics_text()

    async def healthy(self) -> bool:
        return self.host.healthy()

    async def shutdown(self) -> None:
        self.host.close()
