"""The load the router saw over the last minutes: what the autoscaler decides from.

Every request is recorded twice: when it arrives (``arrived``) and when its stream ends
(``finished``), with its token counts and whether it met each SLO. ``summary(now,
window_s)`` reduces the records of the last ``window_s`` seconds to rates, means and SLO
attainment. Requests refused at admission count as arrivals (they are demand the pools did
not serve) and as TTFT misses. Records older than ``horizon_s`` are dropped, so memory is
bounded by the request rate times the horizon.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LoadSummary:
    """Attainments are fractions of the requests finished in the window (None: none
    finished); means are over those finished normally."""

    window_s: float
    arrivals: int
    arrival_rate: float  # requests/s
    finished: int
    mean_prompt_tokens: float | None
    mean_output_tokens: float | None
    ttft_attainment: float | None
    tpot_attainment: float | None
    errors: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Finished:
    t: float
    prompt_tokens: int
    output_tokens: int
    ttft_met: bool
    tpot_met: bool
    ok: bool


class LoadWindow:
    def __init__(self, horizon_s: float = 900.0, clock=time.monotonic):
        if horizon_s <= 0:
            raise ValueError("horizon_s must be > 0")
        self.horizon_s = horizon_s
        self.clock = clock
        self._arrivals: deque[float] = deque()
        self._finished: deque[_Finished] = deque()

    def arrived(self, t: float | None = None) -> None:
        self._arrivals.append(self.clock() if t is None else t)
        self._trim()

    def finished(self, prompt_tokens: int, output_tokens: int, ttft_met: bool, tpot_met: bool,
                 ok: bool, t: float | None = None) -> None:
        self._finished.append(_Finished(self.clock() if t is None else t, prompt_tokens,
                                        output_tokens, ttft_met, tpot_met, ok))
        self._trim()

    def _trim(self) -> None:
        old = self.clock() - self.horizon_s
        while self._arrivals and self._arrivals[0] < old:
            self._arrivals.popleft()
        while self._finished and self._finished[0].t < old:
            self._finished.popleft()

    def summary(self, window_s: float, now: float | None = None) -> LoadSummary:
        if not 0 < window_s <= self.horizon_s:
            raise ValueError(f"window_s must be in (0, {self.horizon_s:g}], got {window_s}")
        now = self.clock() if now is None else now
        since = now - window_s
        arrivals = sum(1 for t in self._arrivals if since <= t <= now)
        done = [f for f in self._finished if since <= f.t <= now]
        ok = [f for f in done if f.ok]

        def mean(xs: list[int]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        def share(flags: list[bool]) -> float | None:
            return sum(flags) / len(flags) if flags else None

        return LoadSummary(
            window_s=window_s, arrivals=arrivals, arrival_rate=arrivals / window_s,
            finished=len(done), mean_prompt_tokens=mean([f.prompt_tokens for f in ok]),
            mean_output_tokens=mean([f.output_tokens for f in ok]),
            ttft_attainment=share([f.ttft_met for f in done]),
            tpot_attainment=share([f.tpot_met for f in done]),
            errors=sum(1 for f in done if not f.ok))
