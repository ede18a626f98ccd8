"""A bounded log of recent model steps: their shape and how long they really took.

Workers append one ``StepRecord`` per step. Comparing the records with a latency
profile's predictions gives correction factors for the deployment at hand (CPU/GPU
contention, per-step overheads the isolated profiler cannot see), in the spirit of
Dynamo's SLA planner, which corrects its profile by observed/expected ratios.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class StepRecord:
    kind: str  # "prefill" | "decode"
    # prefill: tokens of each chunk in the step; decode: context length of each sequence
    lens: tuple[int, ...]
    # prefill: the step's wall time; decode: the loop cycle (step start to next step start)
    duration_s: float
    # wall-clock start (time.time()): lets calibration see which steps of the two pools
    # overlapped in time on a shared host
    start_s: float = 0.0


class StepLog:
    def __init__(self, capacity: int = 32768):
        self._records: deque[StepRecord] = deque(maxlen=capacity)

    def add(self, kind: str, lens, duration_s: float, start_s: float = 0.0) -> None:
        self._records.append(StepRecord(kind, tuple(lens), duration_s, start_s))

    def records(self, last: int | None = None) -> list[StepRecord]:
        recs = list(self._records)
        return recs if last is None else recs[-last:]

    def clear(self) -> None:
        self._records.clear()
