"""A disaggregated run whose pools grow and shrink while it runs (the autoscaler's simulator).

``ElasticDisagg`` drives ``disagg._DisaggSim`` (the same event loop, one unit only) with
every instance slot it may ever need allocated up front and a list of the instances that
take new work. Instance lifecycle, per pool:

    off --add--> starting --startup_s--> up --remove--> draining --idle--> off

- *add*: the instance is provisioned (its GPUs count from now) and takes requests once
  ``startup_s`` has passed;
- *remove*: a starting instance is cancelled at once; an up one stops taking requests
  and drains: a prefill instance leaves when its queue is empty, its last batch done and
  its last KV sent; a decode instance when its last request finished (no request is
  lost or moved). Its GPUs count until then. Removal takes starting instances first
  (newest first), then the up instance with the least work;
- a freed slot may be provisioned again later.

``call_every`` runs a callback periodically (the autoscaler's tick) while requests remain;
``window`` summarises the last seconds as a ``WindowStats`` (what a metrics scrape would
give the autoscaler); ``finish`` returns the ``SimResult`` and the GPU-seconds used.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from pdserve.cluster.planning.simulator.config import DisaggPlanSpec, InstanceSpec, SimConfig
from pdserve.cluster.planning.simulator.disagg import _DisaggSim
from pdserve.cluster.planning.simulator.result import SimResult
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.router.slo import SloConfig

OFF, STARTING, UP, DRAINING = "off", "starting", "up", "draining"
SLOTS_PER_MAX = 3  # slots per pool = this x its largest size: room for drains to overlap


@dataclass(frozen=True)
class WindowStats:
    """The last ``span_s`` seconds of a run at ``now``.

    ``arrivals``: requests that arrived (mean lengths over them; 0 when none);
    ``ttft_met``/``ttft_judged``: of those, whose TTFT is decided (first token, or already
    past the target) and met it, leaving out prompts that miss the target even on an idle
    prefill instance (``unreachable``: no pool size fixes them, so they must not make the
    pool grow); ``tpot_met``/``tpot_judged``: requests that finished in
    the window and met TPOT; ``slo_met``/``finished``: requests that finished in the window
    and met both; ``prefill_queue``: prompt tokens waiting at prefill instances;
    ``decode_load``: KV tokens reserved or promised on the decode lanes taking work, as a
    share of their capacity; ``prefill``/``decode``: instances starting or up;
    ``prefill_up``/``decode_up``: up only."""

    now: float
    span_s: float
    arrivals: int
    mean_prompt: float
    mean_output: float
    ttft_met: int
    ttft_judged: int
    unreachable: int
    tpot_met: int
    tpot_judged: int
    slo_met: int
    finished: int
    prefill_queue: int
    decode_load: float
    prefill: int
    decode: int
    prefill_up: int
    decode_up: int

    @property
    def rate(self) -> float:
        return self.arrivals / self.span_s

    @staticmethod
    def share(met: int, judged: int) -> float | None:
        return met / judged if judged else None


class _Pool:
    """Slot states and provisioning times of one pool."""

    def __init__(self, slots: int, gpus_per_instance: int) -> None:
        self.state = [OFF] * slots
        self.since = [0.0] * slots  # when the slot was provisioned
        self.drain_at = [0.0] * slots  # when it stopped taking work
        self.gpus = gpus_per_instance
        self.gpu_s = 0.0  # GPU-seconds of instances already gone

    def provisioned(self) -> list[int]:
        return [k for k, s in enumerate(self.state) if s in (STARTING, UP)]

    def count(self, *states: str) -> int:
        return sum(1 for s in self.state if s in states)

    def free_slot(self, role: str) -> int:
        for k, s in enumerate(self.state):
            if s == OFF:
                return k
        raise RuntimeError(f"no free {role} slot: too many instances draining at once")

    def gone(self, k: int, t: float) -> None:
        self.state[k] = OFF
        self.gpu_s += self.gpus * max(0.0, t - self.since[k])


class ElasticDisagg:
    """One elastic run; see the module docstring. ``prefill``/``decode`` give each pool's
    instance shape and starting size (up from time 0); ``max_prefill``/``max_decode`` the
    largest each may reach."""

    def __init__(
        self,
        prefill: InstanceSpec,
        decode: InstanceSpec,
        max_prefill: int,
        max_decode: int,
        profile: LatencyProfile,
        workload: Workload,
        sim_config: SimConfig | None = None,
        transfer_bandwidth: float = 25e9,
        startup_s: float = 0.0,
        lookback_s: float = 600.0,
    ) -> None:
        if not (1 <= prefill.count <= max_prefill and 1 <= decode.count <= max_decode):
            raise ValueError("each pool needs 1 <= starting size <= its maximum")
        slots_p, slots_d = SLOTS_PER_MAX * max_prefill, SLOTS_PER_MAX * max_decode
        plan = DisaggPlanSpec(
            prefill.with_count(slots_p), decode.with_count(slots_d), transfer_bandwidth
        )
        self.sim = sim = _DisaggSim(plan, profile, workload, sim_config or SimConfig(), "both")
        self.label = f"autoscaled P=(tp{prefill.tp},pp{prefill.pp}) D=(tp{decode.tp},pp{decode.pp})"
        self.w, self.startup_s, self.lookback_s = workload, startup_s, lookback_s
        self.dpp = decode.pp  # lanes per decode instance
        self.pre = _Pool(slots_p, prefill.num_gpus // prefill.count)
        self.dec = _Pool(slots_d, decode.num_gpus // decode.count)
        for pool, n in ((self.pre, prefill.count), (self.dec, decode.count)):
            for k in range(n):
                pool.state[k] = UP
        sim.p_active[:] = range(prefill.count)
        sim.all_lanes[:] = range(decode.count * self.dpp)
        self.end_s = 0.0

    # -- pools ----------------------------------------------------------------------------
    def sizes(self) -> tuple[int, int]:
        """Instances starting or up, per pool."""
        return len(self.pre.provisioned()), len(self.dec.provisioned())

    def up_sizes(self) -> tuple[int, int]:
        """Instances taking work, per pool."""
        return self.pre.count(UP), self.dec.count(UP)

    def resize(self, now: float, prefill: int, decode: int) -> None:
        for role, pool, n in (("prefill", self.pre, prefill), ("decode", self.dec, decode)):
            have = pool.provisioned()
            for _ in range(n - len(have)):
                k = pool.free_slot(role)
                pool.state[k], pool.since[k] = STARTING, now
                self.sim.call_at(now + self.startup_s, self._up_callback(role, k))
            for _ in range(len(have) - n):
                self._remove(role, pool, now)

    def _up_callback(self, role: str, k: int) -> Callable[[float], None]:
        def up(now: float) -> None:
            pool = self.pre if role == "prefill" else self.dec
            if pool.state[k] != STARTING:  # cancelled meanwhile
                return
            pool.state[k] = UP
            if role == "prefill":
                self.sim.p_active.append(k)
            else:
                self.sim.all_lanes.extend(range(k * self.dpp, (k + 1) * self.dpp))

        return up

    def _work(self, role: str, k: int) -> int:
        sim = self.sim
        if role == "prefill":
            return sim.p_outstanding[k] + len(sim.p_queue[k])
        return sum(sim.d_assigned[lane] for lane in range(k * self.dpp, (k + 1) * self.dpp))

    def _remove(self, role: str, pool: _Pool, now: float) -> None:
        starting = [k for k, s in enumerate(pool.state) if s == STARTING]
        if starting:  # cancel the newest provisioning: it never took work
            k = max(starting, key=lambda x: pool.since[x])
            pool.gone(k, now)
            return
        up = [k for k, s in enumerate(pool.state) if s == UP]
        k = min(up, key=lambda x: (self._work(role, x), -x))
        pool.state[k], pool.drain_at[k] = DRAINING, now
        sim = self.sim
        if role == "prefill":
            sim.p_active.remove(k)
        else:
            for lane in range(k * self.dpp, (k + 1) * self.dpp):
                sim.all_lanes.remove(lane)
        self._reap(now)

    def _reap(self, now: float) -> None:
        """Draining instances that have finished their work leave (at the time they did)."""
        sim = self.sim
        for k, s in enumerate(self.pre.state):
            if (
                s == DRAINING
                and not sim.p_queue[k]
                and sim.p_stage_free[k][-1] <= now
                and sim.p_link_free[k] <= now
            ):
                self.pre.gone(
                    k, max(self.pre.drain_at[k], sim.p_stage_free[k][-1], sim.p_link_free[k])
                )
        for k, s in enumerate(self.dec.state):
            lanes = range(k * self.dpp, (k + 1) * self.dpp)
            if s == DRAINING and not any(sim.d_assigned[lane] for lane in lanes):
                self.dec.gone(k, max([self.dec.drain_at[k]] + [sim.d_idle_at[x] for x in lanes]))

    # -- ticks and windows ----------------------------------------------------------------
    def call_every(self, interval_s: float, fn: Callable[[float], None]) -> None:
        """``fn(now)`` every ``interval_s`` from ``interval_s`` on, while any request has
        yet to arrive or finish (draining instances are reaped first)."""
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        last_arrival = self.w.arrival[-1]

        def tick(now: float) -> None:
            self._reap(now)
            fn(now)
            if now < last_arrival or self.sim.heap:
                self.sim.call_at(now + interval_s, tick)

        self.sim.call_at(interval_s, tick)

    def window(self, now: float, span_s: float, slo: SloConfig) -> WindowStats:
        sim, arr = self.sim, self.w.arrival
        prompt, out, first, last = sim.prompt, sim.out, sim.first, sim.last
        oh = sim.cfg.request_overhead_s
        lo, hi = bisect.bisect_right(arr, now - span_s), bisect.bisect_right(arr, now)
        n = hi - lo
        t_met = t_judged = unreachable = 0
        for r in range(lo, hi):
            if sim._batch_s([prompt[r]]) + oh > slo.ttft_s:  # the profile's idle prefill
                unreachable += 1
            elif sim.rejected[r]:
                t_judged += 1
            elif first[r] == first[r]:  # not NaN: it has its first token
                t_judged += 1
                t_met += first[r] - arr[r] + oh <= slo.ttft_s
            elif now - arr[r] + oh > slo.ttft_s:
                t_judged += 1
        p_met = done = both = 0
        for r in range(bisect.bisect_right(arr, now - span_s - self.lookback_s), hi):
            if now - span_s < last[r] <= now:
                done += 1
                ttft_ok = first[r] - arr[r] + oh <= slo.ttft_s
                tpot_ok = out[r] < 2 or last[r] - first[r] <= slo.tpot_s * (out[r] - 1)
                p_met += tpot_ok
                both += ttft_ok and tpot_ok
        lanes = sim.all_lanes
        load = (
            sum(sim.d_assigned_tok[x] for x in lanes) / (len(lanes) * sim.lane_cap)
            if lanes
            else 0.0
        )
        p, d = self.sizes()
        pu, du = self.up_sizes()
        return WindowStats(
            now,
            span_s,
            n,
            sum(prompt[lo:hi]) / n if n else 0.0,
            sum(out[lo:hi]) / n if n else 0.0,
            t_met,
            t_judged,
            unreachable,
            p_met,
            done,
            both,
            done,
            sum(sim.p_outstanding[k] for k in range(sim.n_pre)),
            load,
            p,
            d,
            pu,
            du,
        )

    # -- the run --------------------------------------------------------------------------
    def finish(self) -> tuple[SimResult, float]:
        """Run to the end; (result, GPU-seconds of both pools, every instance charged
        from provisioning until it left or the run ended)."""
        sim = self.sim
        sim.run()
        done = [t for t in sim.last if t == t]
        self.end_s = end = max([self.w.arrival[-1], *done])
        self._reap(end)
        for pool in (self.pre, self.dec):
            for k, s in enumerate(pool.state):
                if s != OFF:
                    pool.gone(k, end)
        gpu_s = self.pre.gpu_s + self.dec.gpu_s
        res = sim.result(DisaggPlanSpec(InstanceSpec(), InstanceSpec()), "both")
        return replace(
            res, label=self.label, num_gpus=max(1, math.ceil(gpu_s / end - 1e-9)) if end > 0 else 1
        ), gpu_s
