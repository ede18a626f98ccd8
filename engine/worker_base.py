"""What the prefill and decode workers share: identity, engine parts, metrics, step log.

Lifecycle: a worker is made from ``EngineParts`` (``EngineParts.build`` from the engine
config) and its transfer end; its host builder attaches ``metrics`` after construction,
and from then on ``refresh_state`` pushes the worker's gauges whenever its state changes
(a request queued, reserved, admitted, finished or released), not only on steps, so a
dashboard never shows work that is gone. Each worker steps with the shared ``ModelStep``
and records every model step in ``step_log`` (shape and duration: what the profiler and
the simulator's calibration read back).
"""

from __future__ import annotations

from typing import ClassVar

from pdserve.engine.metrics import WorkerMetrics
from pdserve.engine.model_step import EngineParts
from pdserve.engine.step_log import StepLog


class EngineWorker:
    # Decode workers' blocks are written by prefill workers: they have no prefix cache to
    # report, although their block manager counts every allocation as a lookup.
    REPORTS_PREFIX_CACHE: ClassVar[bool] = True

    def __init__(self, worker_id: str, parts: EngineParts):
        self.worker_id = worker_id
        self.parts = parts
        self.loaded = parts.loaded
        self.runner = parts.runner
        self.scheduler = parts.scheduler
        self.blocks = parts.blocks
        self.sampler = parts.sampler
        self.model_step = parts.model_step()
        self.metrics: WorkerMetrics | None = None  # attached by the host builder
        self.step_log = StepLog()

    def num_waiting(self) -> int:
        """What the waiting gauge shows (a decode worker adds its reservations)."""
        return len(self.scheduler.waiting)

    def refresh_state(self) -> None:
        if self.metrics is None:
            return
        s = self.blocks.stats()
        prefix = ((s.prefix_queries_tokens, s.prefix_hit_tokens) if self.REPORTS_PREFIX_CACHE
                  else (0, 0))
        self.metrics.set_state(len(self.scheduler.running), self.num_waiting(),
                               self.blocks.usage, s.num_blocks, self.blocks.block_size, *prefix)
