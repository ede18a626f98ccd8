"""``simulate_autoscaled``: a trace served by pools the ``Autoscaler`` resizes as it runs.

Every ``interval_s`` of virtual time the run is summarised over the last interval
(``simulator.elastic.WindowStats``: what the cluster's metrics would show), turned into an
``Observation``, and the ``Autoscaler``'s decision, if any, is applied: new instances take
work after ``startup_s``, removed ones drain (``simulator/elastic.py``). The run reports
the usual ``SimResult``, a timeline (one point per tick), the decisions, and the
GPU-seconds both pools used.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.cluster.autoscale.capacity import CapacityModel, ProfileCapacity
from pdserve.cluster.autoscale.config import AutoscaleConfig
from pdserve.cluster.autoscale.decide import Autoscaler, Observation, ScaleDecision
from pdserve.cluster.planning.simulator.config import InstanceSpec, SimConfig
from pdserve.cluster.planning.simulator.elastic import ElasticDisagg, WindowStats
from pdserve.cluster.planning.simulator.result import SimResult
from pdserve.cluster.planning.simulator.simulate import as_workload
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.workloads.trace import Trace


@dataclass(frozen=True)
class TimelinePoint:
    """One tick: pool sizes after its decision (``prefill``/``decode``: starting or up;
    ``*_up``: taking work), and the window that led to it (attainments None when no
    request was judged; ``slo_attainment``: both targets, over requests finished)."""

    t: float
    prefill: int
    decode: int
    prefill_up: int
    decode_up: int
    arrival_rate: float
    ttft_attainment: float | None
    tpot_attainment: float | None
    slo_attainment: float | None
    prefill_queue: int
    decode_load: float


@dataclass(frozen=True)
class AutoscaledRun:
    result: SimResult
    timeline: tuple[TimelinePoint, ...]
    decisions: tuple[tuple[float, ScaleDecision], ...]
    gpu_seconds: float
    duration_s: float  # from 0 to the last token (or arrival)

    @property
    def mean_gpus(self) -> float:
        return self.gpu_seconds / self.duration_s if self.duration_s > 0 else 0.0


def simulate_autoscaled(
    trace: Trace | Workload,
    config: AutoscaleConfig,
    initial: tuple[int, int],
    sim_config: SimConfig | None = None,
    capacity: CapacityModel | None = None,
    transfer_bandwidth: float = 25e9,
) -> AutoscaledRun:
    """Serve ``trace`` at its own arrival times from ``initial`` (prefill, decode)
    instances of ``config``'s shapes, resized by an ``Autoscaler(config, capacity)``
    (default capacity: ``ProfileCapacity.from_config(config, sim_config)``)."""
    for role, bounds, n in (
        ("prefill", config.prefill, initial[0]),
        ("decode", config.decode, initial[1]),
    ):
        if bounds.min < 1:
            raise ValueError(
                f"the simulator needs at least one {role} instance: {role} min must be >= 1"
            )
        if bounds.clamp(n) != n:
            raise ValueError(
                f"initial {role} count {n} is outside its bounds [{bounds.min}, {bounds.max}]"
            )
    cfg = sim_config or SimConfig()
    w = as_workload(trace)
    capacity = capacity or ProfileCapacity.from_config(config, cfg)
    scaler = Autoscaler(config, capacity)
    run = ElasticDisagg(
        InstanceSpec(config.prefill_tp, 1, initial[0]),
        InstanceSpec(config.decode_tp, 1, initial[1]),
        config.prefill.max,
        config.decode.max,
        config.profile,
        w,
        cfg,
        transfer_bandwidth,
        config.startup_s,
    )
    timeline: list[TimelinePoint] = []
    decisions: list[tuple[float, ScaleDecision]] = []
    means = [float(sum(w.prompt)) / len(w), float(sum(w.output)) / len(w)]

    def tick(now: float) -> None:
        s = run.window(now, config.interval_s, config.slo)
        if s.arrivals:  # keep the last known lengths through a quiet interval
            means[:] = [s.mean_prompt, s.mean_output]
        d = scaler.decide(observation(s, *means))
        if d is not None:
            decisions.append((now, d))
            run.resize(now, d.prefill, d.decode)
        timeline.append(
            TimelinePoint(
                now,
                *run.sizes(),
                *run.up_sizes(),
                s.rate,
                WindowStats.share(s.ttft_met, s.ttft_judged),
                WindowStats.share(s.tpot_met, s.tpot_judged),
                WindowStats.share(s.slo_met, s.finished),
                s.prefill_queue,
                s.decode_load,
            )
        )

    run.call_every(config.interval_s, tick)
    result, gpu_s = run.finish()
    return AutoscaledRun(result, tuple(timeline), tuple(decisions), gpu_s, run.end_s)


def observation(s: WindowStats, mean_prompt: float, mean_output: float) -> Observation:
    """What the autoscaler sees of a simulated window."""
    return Observation(
        s.now,
        s.rate,
        mean_prompt,
        mean_output,
        WindowStats.share(s.ttft_met, s.ttft_judged),
        WindowStats.share(s.tpot_met, s.tpot_judged),
        s.prefill_queue,
        s.decode_load,
        s.prefill,
        s.decode,
    )
