"""What every worker host shares: the step loop, and the calls that only observe.

``WorkerHost`` owns a worker and the ``StepLoop`` thread that drives it; subclasses
(``PrefillHost``, ``DecodeHost``) add their request-path calls. ``_call`` runs a function
on the loop thread and awaits its result, so worker state is only touched by that thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pdserve.engine.step_loop import StepLoop


class WorkerHost:
    def __init__(self, worker: Any, on_step=None, name: str = "worker"):
        self.worker = worker
        self._loop = StepLoop(worker, on_step=on_step, name=name)
        self._loop.start()

    async def _call(self, fn):
        return await asyncio.wrap_future(self._loop.call(fn))

    async def stats(self):
        return await self._call(self.worker.stats)

    async def step_log(self, last: int | None = None) -> list:
        """Recent ``StepRecord``s (shape and measured duration of each model step)."""
        log = getattr(self.worker, "step_log", None)
        return await self._call(lambda: log.records(last) if log is not None else [])

    def metrics_text(self) -> str:
        """This worker's Prometheus exposition (empty if it has no metrics attached)."""
        m = getattr(self.worker, "metrics", None)
        return m.text() if m is not None else ""

    def healthy(self) -> bool:
        return self._loop.alive and self._loop.error is None
