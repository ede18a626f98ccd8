"""How many requests per second one prefill or one decode instance sustains within the SLO.

The autoscaler sizes each pool as ``ceil(rate / (per-instance rate * headroom))``; this
module supplies the per-instance rates (``PoolRates``) for a load's mean prompt and output
lengths. ``CapacityModel`` is the interface; two implementations:

- ``ProfileCapacity``: from a latency profile, by the planner's phase-isolated goodput
  (``simulator.evaluator.Evaluator`` on steady-state windows, the searches the planner's
  ``phase_goodput`` runs): the prefill rate of one instance is the highest rate at which
  the SLO's share of prompts meet the TTFT target (prefill pool alone); the decode rate
  the highest at which that share meet the TPOT target (decode pool alone, as if prefill
  were instant). The workload is synthetic: Poisson arrivals, prompt and output lengths
  uniform on [mean/2, 3*mean/2] (the autoscaler observes means only). Results are cached
  per length bucket (means rounded to a geometric grid of ``bucket`` relative steps,
  10% by default), so a decision costs a dictionary lookup once its bucket has been seen;
  a new bucket costs two goodput searches (about a second each).
- ``FixedCapacity``: given rates (tests; an operator who measured them).

One instance is measured alone: a pool of ``n`` shares its queue and does a little better
than ``n`` times that (pooling), which the headroom and the attainment rules absorb.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from pdserve.cluster.autoscale.config import AutoscaleConfig
from pdserve.cluster.planning.simulator.config import DisaggPlanSpec, InstanceSpec, SimConfig
from pdserve.cluster.planning.simulator.evaluator import Evaluator
from pdserve.cluster.planning.simulator.window import SteadyWindows, WindowConfig
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.router.slo import SloConfig
from pdserve.workloads.synthetic import synthetic


@dataclass(frozen=True)
class PoolRates:
    """Sustainable request rate of one instance of each pool (req/s); 0 = the SLO cannot
    be met at these lengths even when idle."""

    prefill: float
    decode: float

    def __post_init__(self) -> None:
        for name in ("prefill", "decode"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} rate must be finite and >= 0 req/s, got {v!r}")


class CapacityModel(ABC):
    """Per-instance rates for a load's mean lengths."""

    @abstractmethod
    def rates(self, mean_prompt_tokens: float, mean_output_tokens: float) -> PoolRates: ...


class FixedCapacity(CapacityModel):
    """The same rates whatever the lengths."""

    def __init__(self, prefill: float, decode: float) -> None:
        self._rates = PoolRates(prefill, decode)

    def rates(self, mean_prompt_tokens: float, mean_output_tokens: float) -> PoolRates:
        return self._rates


class ProfileCapacity(CapacityModel):
    """Rates from a latency profile by phase-isolated simulation (module docstring)."""

    def __init__(
        self,
        profile: LatencyProfile,
        slo: SloConfig,
        prefill_tp: int = 1,
        decode_tp: int = 1,
        sim_config: SimConfig | None = None,
        requests: int = 400,
        bucket: float = 0.1,
        tol: float = 0.03,
    ) -> None:
        if requests < 10 or not (0 < bucket < 1) or not (0 < tol < 1):
            raise ValueError("need requests >= 10, 0 < bucket < 1 and 0 < tol < 1")
        self.profile, self.slo = profile, slo
        self.prefill_tp, self.decode_tp = prefill_tp, decode_tp
        self.cfg = sim_config or SimConfig()
        self.requests, self.tol = requests, tol
        self._step = math.log1p(bucket)
        self._cache: dict[tuple[int, int], PoolRates] = {}

    @classmethod
    def from_config(
        cls, config: AutoscaleConfig, sim_config: SimConfig | None = None
    ) -> ProfileCapacity:
        """The capacity model an ``Autoscaler`` built from ``config`` uses."""
        return cls(config.profile, config.slo, config.prefill_tp, config.decode_tp, sim_config)

    def bucket(self, mean_tokens: float) -> int:
        return round(math.log(max(1.0, mean_tokens)) / self._step)

    def _centre(self, bucket: int) -> int:
        return max(1, round(math.exp(bucket * self._step)))

    def rates(self, mean_prompt_tokens: float, mean_output_tokens: float) -> PoolRates:
        key = (self.bucket(mean_prompt_tokens), self.bucket(mean_output_tokens))
        if key not in self._cache:
            self._cache[key] = self._measure(self._centre(key[0]), self._centre(key[1]))
        return self._cache[key]

    @property
    def buckets_measured(self) -> int:
        return len(self._cache)

    def _measure(self, prompt: int, output: int) -> PoolRates:
        def spread(m: int) -> tuple[int, int]:
            return max(1, m // 2), max(1, (3 * m) // 2)

        trace = synthetic(self.requests, 1.0, spread(prompt), spread(output), seed=0)
        w = Workload.from_trace(trace)
        windows = SteadyWindows(w, self.slo, WindowConfig(min_per_instance=100))
        ev = Evaluator(self.profile, w, self.slo, self.cfg, self.tol, windows)
        pre = InstanceSpec(self.prefill_tp, 1, 1)
        dec = InstanceSpec(self.decode_tp, 1, 1)
        return PoolRates(
            ev.goodput(DisaggPlanSpec(pre, dec), "prefill").rate,
            ev.goodput(DisaggPlanSpec(pre, dec), "decode").rate,
        )
