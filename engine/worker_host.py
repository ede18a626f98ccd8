"""What every worker host shares: the step loop, and the calls that only observe.

``WorkerHost`` owns a worker and the ``StepLoop`` thread that drives it; subclasses
(``PrefillHost``, ``DecodeHost``) add their request-path calls. ``WorkerActorCalls`` is
what every worker's Ray actor forwards to its host. ``_call`` runs a function
on the loop thread and awaits its result, so worker state is only touched by that thread.
"""

from __future__ import annotations

import asyncio
import os
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
        # The runner's error: a lost tensor-parallel rank, noticed even while idle.
        return (self._loop.alive and self._loop.error is None
                and self.worker.runner.error is None)


class WorkerActorCalls:
    """The calls every worker's Ray actor answers alike, whatever its pool: the launcher's,
    the router's and the metrics endpoint's view of any worker. A mixin for the thin actor
    classes (``*_worker/actor.py``), which hold a ``host`` and add their request-path
    methods and ``node_id``; it imports no Ray itself."""

    host: WorkerHost

    async def ready(self) -> str:
        return self.host.worker.worker_id

    def pid(self) -> int:
        """This worker's process id (chaos tests kill it)."""
        return os.getpid()

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
        ranks = getattr(self, "ranks", None)
        if ranks is not None:
            ranks.close()

    def exit_when_group_breaks(self, interval_s: float = 0.2) -> None:
        """For rank 0 of a tensor-parallel instance: once a rank is lost (the runner's or
        the step loop's error), this process exits, so the instance restarts as a group:
        the actor system restarts rank 0, whose followers died with it (they are its own),
        and rank 0 starts new ones. The router retries and resumes its requests."""
        import logging
        import threading
        import time

        def watch() -> None:
            loop = self.host._loop
            while loop.error is None and self.host.worker.runner.error is None:
                time.sleep(interval_s)
            logging.getLogger(__name__).error(
                "%s: a tensor-parallel rank failed (%s); exiting so the instance restarts",
                self.host.worker.worker_id, loop.error or self.host.worker.runner.error)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="pdserve-tp-watch").start()
