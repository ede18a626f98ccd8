"""What the simulator is asked to run: scheduler knobs and the plan's instance layout.

``SimConfig`` holds the scheduling parameters shared by both modes; ``DisaggPlanSpec`` and
``ColocatedPlanSpec`` describe a deployment as instance specs ``(tp, pp, count)``. All are
frozen and validated on construction, so a simulation never starts from a nonsensical
layout. ``Phase`` selects a phase-isolated run for the planner: ``"prefill"`` simulates
only the prefill pool (TTFT), ``"decode"`` feeds requests straight into the decode pool
as if prefill were instant (TPOT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pdserve.router.local_prefill import LocalPrefillConfig

Phase = Literal["both", "prefill", "decode"]
PHASES: tuple[str, ...] = ("both", "prefill", "decode")
DISPATCH_POLICIES: tuple[str, ...] = ("least_loaded", "round_robin", "slo_aware", "kv_aware")
# Policies that predict TTFT per instance, and so can reject an arrival predicted to miss.
PREDICTING_POLICIES: tuple[str, ...] = ("slo_aware", "kv_aware")


@dataclass(frozen=True)
class HostContention:
    """Step-time multipliers for a disaggregated plan whose pools share one host.

    When prefill and decode instances run on the same cores and memory bandwidth (the
    CPU demo: one prefill and one decode worker on a 2-core machine), a step that runs
    while the other pool is busy takes longer than the same step alone, which is what the
    profile measured. A step of either phase that the other pool overlaps for a share
    ``f`` of its duration is stretched by ``1 + (k - 1) * f``, with ``k`` = ``prefill`` or
    ``decode`` (``disagg.py`` says how ``f`` is predicted). Both 1.0 (or
    ``contention=None``) is the usual case of pools on separate GPUs.
    ``cluster/planning/calibration.py`` measures them from the workers' step logs.
    """

    prefill: float = 1.0
    decode: float = 1.0

    def __post_init__(self) -> None:
        for name in ("prefill", "decode"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"contention.{name} must be finite and > 0, got {v!r}")


@dataclass(frozen=True)
class SimConfig:
    """Scheduler parameters.

    ``prefill_token_budget`` caps the prompt tokens of one prefill batch (and, colocated,
    the tokens of one mixed step, decodes counting one each); a single prompt longer than
    the budget runs alone unless ``chunked_prefill`` splits it into budget-sized chunks.
    ``max_decode_batch`` caps the requests of one decode lane (see ``disagg.py``).
    ``request_overhead_s`` is added to every TTFT (router, tokenizer, network);
    ``step_overhead_s`` to every model step (scheduling, sampling, launch).
    ``dispatch="slo_aware"`` sends a prompt to the prefill instance with the lowest
    predicted TTFT (the router's ``SloAware`` rule: the running batch's remaining time plus
    its queue and the prompt, batched under the token budget); with ``admission_ttft_s``
    set, an arrival predicted to miss that target is rejected at once (admission control).
    ``contention`` (disaggregated plans only) models pools sharing one host.

    ``prefix_caching`` (disaggregated plans only) gives every prefill instance a prefix
    cache: a prompt's leading blocks that the instance still holds are not computed again
    (``prefix_cache.py``). It changes nothing for a trace without prefix hashes.
    ``dispatch="kv_aware"`` (needs ``prefix_caching``) is ``slo_aware`` where the prompt
    counts only the tokens the router's record (``router.prefix_index``) does not expect
    the instance to hold; on a trace without prefix hashes it equals ``slo_aware``.

    ``local_prefill`` (disaggregated plans, phase ``"both"`` only) is conditional
    disaggregation: the router's per-request rule (``router.local_prefill.decide``) may
    prefill a request on its decode instance instead of the prefill pool (``disagg.py``
    says how that is modelled). The default never does.
    """

    prefill_token_budget: int = 4096
    chunked_prefill: bool = False
    max_decode_batch: int = 256
    request_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    dispatch: str = "least_loaded"
    admission_ttft_s: float | None = None
    contention: HostContention | None = None
    prefix_caching: bool = False
    local_prefill: LocalPrefillConfig = LocalPrefillConfig()

    def __post_init__(self) -> None:
        if self.admission_ttft_s is not None and (self.dispatch not in PREDICTING_POLICIES
                                                  or not self.admission_ttft_s > 0):
            raise ValueError("admission_ttft_s needs dispatch='slo_aware' or 'kv_aware' and "
                             "a positive target")
        if self.dispatch == "kv_aware" and not self.prefix_caching:
            raise ValueError("dispatch='kv_aware' needs prefix_caching=True (there is no "
                             "cache to route to otherwise)")
        if self.prefill_token_budget < 1:
            raise ValueError("prefill_token_budget must be >= 1")
        if self.max_decode_batch < 1:
            raise ValueError("max_decode_batch must be >= 1")
        for name in ("request_overhead_s", "step_overhead_s"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        if self.dispatch not in DISPATCH_POLICIES:
            raise ValueError(f"unknown dispatch {self.dispatch!r}; choose from "
                             f"{', '.join(DISPATCH_POLICIES)}")


@dataclass(frozen=True)
class InstanceSpec:
    """``count`` identical instances, each ``tp`` x ``pp`` GPUs."""

    tp: int = 1
    pp: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.count < 1:
            raise ValueError(f"tp, pp and count must be >= 1, got {self}")

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.count

    def with_count(self, count: int) -> InstanceSpec:
        return InstanceSpec(self.tp, self.pp, count)

    def label(self) -> str:
        return f"{self.count}x(tp{self.tp},pp{self.pp})"


@dataclass(frozen=True)
class DisaggPlanSpec:
    """Separate prefill and decode pools; KV moves at ``transfer_bandwidth`` bytes/s.

    ``units`` > 1 splits both pools into that many equal units (low node-affinity plans):
    a request's decode instance is then chosen within its prefill instance's unit."""

    prefill: InstanceSpec
    decode: InstanceSpec
    transfer_bandwidth: float = 25e9
    units: int = 1

    def __post_init__(self) -> None:
        if not (self.transfer_bandwidth > 0):
            raise ValueError("transfer_bandwidth must be > 0 bytes/s")
        if self.units < 1 or self.prefill.count % self.units or self.decode.count % self.units:
            raise ValueError("units must be >= 1 and divide both instance counts")

    @property
    def num_gpus(self) -> int:
        return self.prefill.num_gpus + self.decode.num_gpus

    def label(self) -> str:
        u = f" in {self.units} units" if self.units > 1 else ""
        return f"disagg P={self.prefill.label()} D={self.decode.label()}{u}"


@dataclass(frozen=True)
class ColocatedPlanSpec:
    """vLLM-like instances that run both phases (the baseline)."""

    instance: InstanceSpec

    @property
    def num_gpus(self) -> int:
        return self.instance.num_gpus

    def label(self) -> str:
        return f"colocated {self.instance.label()}"


PlanSpec = DisaggPlanSpec | ColocatedPlanSpec
