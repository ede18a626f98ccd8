"""Placement planner: DistServe's two search algorithms, plus an exhaustive reference search.

Objective: the highest per-GPU goodput (requests/s/GPU meeting the SLO attainment target)
for a ``ClusterDesc``, a ``LatencyProfile``, a trace and an ``SloConfig``. Every number
comes from the simulator (``pdserve.cluster.planning.simulator``): each rate a bisection
probes is simulated on a steady-state window sized in time for that rate (warm-up,
measured span, cool-down; ``simulator/window.py``), cut from the trace at the start of
its most representative stretch and replayed cyclically when longer than the trace; a
probe stops as soon as its measured misses decide it. Bisections stop at a relative
precision ``tol`` (the plan states it); goodput searches are cached by simulation key.
Before the plan is written, ``check.check_plan`` replays the chosen plan on the whole
trace at the claimed rate (backing off when it does not hold) and measures its attainment
on ``replicates`` other windows of the trace (the plan's confidence figure). When nothing
meets the SLO, ``infeasibility.explain`` says which target binds and what would relax it.

Phase curves (Alg. 1) are measured on a sparse grid of instance counts (steps of about
25%) and interpolated between; once the per-instance goodput stops growing (pooling
gains below ``curve_growth`` per step) the curve is extended at that per-instance rate,
a lower bound, as adding identical instances to a pool does not lower its per-instance
goodput. Estimates only rank candidates: the best are verified as whole systems.

- High node-affinity (DistServe Alg. 1; fast cross-node network): search each phase's
  ``(tp, pp)`` alone (prefill: TTFT only; decode: TPOT only, fed as if prefill were
  instant), measuring the phase goodput of ``n`` instances, ``g_p(n)`` and ``g_d(n)``
  (pooling makes these superlinear, so a single instance's goodput would misjudge the
  counts), and rank configurations by their best per-GPU phase goodput (the best
  ``keep_per_phase``; default all, since the granularity of a phase's instances matters
  as much as its efficiency). Then estimate every count pair fitting the cluster as
  ``min(g_p(n_p), g_d(n_d)) / GPUs`` (the phases balanced) and verify the ``verify_top``
  best estimates by simulating the whole system. Constraints: ``tp <= gpus_per_node``,
  ``tp`` in the profile, ``pp <= max_pp``, and the KV of one instance (a decode lane)
  must hold the longest request.
- Low node-affinity (Alg. 2; slow cross-node network): each node holds one pipeline
  segment of a *unit* of ``n_p`` prefill and ``n_d`` decode instances
  (``n_p*tp_p*pp_p_seg + n_d*tp_d*pp_d_seg <= gpus_per_node``; DistServe uses one of
  each, the ratio is our extension), ``pp_cross`` such segments span nodes, and KV moves
  at intra-node bandwidth. Units are ranked by the phase bound ``min(g_p, g_d)`` and
  simulated whole until the bound drops below the best found; the best few are then
  replicated over the cluster and simulated as a whole (KV stays inside each unit).
- ``exhaustive``: every full disaggregated configuration ``(tp_p, pp_p, n_p, tp_d, pp_d,
  n_d)`` within the cluster (and colocated ``(tp, pp, count)``), each simulated as a whole;
  the reference the planner is checked against.

``plan(affinity="auto")`` runs both algorithms and keeps the higher per-GPU goodput; with
``consider_colocated`` it also weighs the colocated baseline and may return a colocated
plan. DistServe's algorithms only search disaggregated placements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from pdserve.cluster.planning.check import PlanCheck, check_plan
from pdserve.cluster.planning.cluster_desc import ClusterDesc
from pdserve.cluster.planning.curves import curve_grid, fill_curve
from pdserve.cluster.planning.infeasibility import Infeasibility, explain
from pdserve.cluster.planning.parallel import evaluate_many
from pdserve.cluster.planning.plan import (
    Plan,
    SearchStats,
    assign_nodes,
    instance_groups,
    low_affinity_groups,
)
from pdserve.cluster.planning.replicate import replicate, split_cluster
from pdserve.cluster.planning.simulator.config import DisaggPlanSpec, InstanceSpec, SimConfig
from pdserve.cluster.planning.simulator.evaluator import Candidate, Evaluation, Evaluator, sim_key
from pdserve.cluster.planning.simulator.goodput import GoodputResult
from pdserve.cluster.planning.simulator.window import SteadyWindows, WindowConfig, instances_of
from pdserve.cluster.planning.simulator.workload import (
    Workload,
    representative_slice,
    representative_start,
)
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.router.slo import SloConfig
from pdserve.workloads.trace import Trace

AFFINITY_CHOICES = ("auto", "high", "low")


class PlanningError(ValueError):
    """No configuration meets the SLO on this cluster; ``infeasibility`` says why when
    known (its message is the error's)."""

    def __init__(self, message: str, infeasibility: Infeasibility | None = None) -> None:
        super().__init__(message)
        self.infeasibility = infeasibility


@dataclass(frozen=True)
class PlannerConfig:
    """``max_requests``: plan on a representative slice of this many requests (None: the
    whole trace; windows replay either cyclically). ``tol``: relative precision of the
    whole-system goodput bisections, ``phase_tol`` of the phase curves (which only rank).
    ``replicates``: windows of the confidence figure; ``final_check``: replay the chosen
    plan on the whole trace before writing it. ``workers`` > 1 runs whole-system
    verifications and exhaustive searches in that many processes. ``max_search_gpus``:
    a larger cluster is searched as identical sub-clusters (``replicate``)."""

    max_requests: int | None = None
    max_pp: int = 4
    tol: float = 0.01
    phase_tol: float = 0.02
    keep_per_phase: int | None = None  # None: every (tp, pp) that meets its SLO alone
    verify_top: int = 8
    low_affinity_final: int = 3  # unit configs replicated and simulated whole
    max_instances: int | None = None  # per pool, exhaustive search only
    consider_colocated: bool = False  # plan(): also search colocated (tp, pp, count)
    window: WindowConfig = field(default_factory=WindowConfig)
    curve_growth: float = 0.02
    replicates: int = 4
    final_check: bool = True
    workers: int = 1
    max_search_gpus: int = 64  # larger clusters: searched as identical sub-clusters

    def __post_init__(self) -> None:
        if (self.max_requests is not None and self.max_requests < 10) or self.max_pp < 1:
            raise ValueError("need max_requests >= 10 (or None) and max_pp >= 1")
        if not (0 < self.tol < 0.5 and 0 < self.phase_tol < 0.5):
            raise ValueError("need 0 < tol, phase_tol < 0.5")
        if self.curve_growth < 0 or self.replicates < 0 or min(self.workers,
                                                                self.max_search_gpus) < 1:
            raise ValueError("need curve_growth >= 0, replicates >= 0, workers >= 1 and "
                             "max_search_gpus >= 1")
        if min(self.keep_per_phase or 1, self.verify_top, self.low_affinity_final) < 1:
            raise ValueError("keep_per_phase, verify_top and low_affinity_final must be >= 1")
        if self.max_instances is not None and self.max_instances < 1:
            raise ValueError("max_instances must be >= 1")


@dataclass(frozen=True)
class _Found:
    evaluation: Evaluation
    affinity: str
    layout: tuple = ()  # low affinity: (tp_p, pp_p_seg, n_p, tp_d, pp_d_seg, n_d, pp_cross)
    candidates: int = 0


class Planner:
    """Holds the workload slice and the goodput cache shared by all searches."""

    def __init__(self, cluster: ClusterDesc, profile: LatencyProfile, trace: Trace,
                 slo: SloConfig, sim_config: SimConfig | None = None,
                 config: PlannerConfig | None = None, arrivals: str = "trace") -> None:
        """``arrivals`` names the arrival model of ``trace`` (``workloads.arrivals``), for
        the plan's record; the trace already has it."""
        self.cluster, self.profile, self.slo = cluster, profile, slo
        self.arrivals = arrivals
        self.cfg = sim_config or SimConfig()
        self.pc = config or PlannerConfig()
        self.trace = (representative_slice(trace, self.pc.max_requests)
                      if self.pc.max_requests else trace)
        self.workload = Workload.from_trace(self.trace)
        # Windows start where the trace's lengths look most like the whole of it (its
        # head is often unlike the rest: see ``representative_start``).
        start = representative_start(self.trace, min(len(self.trace),
                                                     max(1500, len(self.trace) // 4)))
        self.windows = SteadyWindows(self.workload, slo, self.pc.window, start)
        self.ev = Evaluator(profile, self.workload, slo, self.cfg, self.pc.tol, self.windows)
        self.max_prompt = max(self.workload.prompt)
        self.max_footprint = self.workload.max_footprint

    # -- search space -------------------------------------------------------------------
    def fits(self, role: str, tp: int, pp: int) -> bool:
        """The model fits and one instance (decode/colocated: one lane) holds the longest
        request (the profile's KV capacity already accounts for the weights)."""
        inst = self.profile.instance(tp, pp)
        if role == "prefill":
            return inst.kv_capacity_tokens >= self.max_prompt
        return inst.entry.kv_capacity_tokens >= self.max_footprint

    def parallel_configs(self, role: str, max_gpus: int | None = None) -> list[tuple[int, int]]:
        limit = max_gpus if max_gpus is not None else self.cluster.num_gpus
        return [(tp, pp) for tp in self.profile.tp_degrees if tp <= self.cluster.gpus_per_node
                for pp in range(1, self.pc.max_pp + 1)
                if tp * pp <= limit and self.fits(role, tp, pp)]

    def bandwidth(self, gpus: int) -> float:
        """KV bandwidth of a whole-system candidate: NVLink if it fits one node."""
        c = self.cluster
        return c.intra_node_bandwidth if gpus <= c.gpus_per_node else c.inter_node_bandwidth

    def phase_goodput(self, role: str, tp: int, pp: int, n: int,
                      lo: float | None = None, hi: float | None = None) -> GoodputResult:
        inst = InstanceSpec(tp, pp, n)
        return self.ev.goodput(DisaggPlanSpec(inst, inst), role, lo, hi, self.pc.phase_tol)

    def _curve(self, role: str, tp: int, pp: int, max_n: int) -> dict[int, float]:
        """Phase goodput (req/s) of 1..max_n instances: measured on ``curve_grid``, each
        search seeded by the last, until the per-instance goodput stops growing; linear
        in between, and at the last measured per-instance rate beyond (module doc)."""
        measured: dict[int, float] = {}
        prev_n, prev = 0, 0.0
        for n in curve_grid(max_n):
            hint = (prev, prev * n / prev_n * 1.1) if prev > 0 else (None, None)
            g = self.phase_goodput(role, tp, pp, n, *hint).rate
            measured[n] = g
            if g <= 0 or (n >= 4 and g / n < prev / prev_n * (1 + self.pc.curve_growth)):
                break
            prev_n, prev = n, g
        return fill_curve(measured, max_n)

    # -- Alg. 1 -------------------------------------------------------------------------
    def _high(self) -> _Found:
        G = self.cluster.num_gpus
        configs = {role: self.parallel_configs(role, G - 1) for role in ("prefill", "decode")}
        if not configs["prefill"] or not configs["decode"]:
            raise PlanningError("the model does not fit any parallel configuration")
        curves: dict[tuple, dict[int, float]] = {}
        ranked: dict[str, list[tuple[int, int]]] = {}
        for role, other in (("prefill", "decode"), ("decode", "prefill")):
            room = G - min(tp * pp for tp, pp in configs[other])
            scored = []
            for tp, pp in configs[role]:
                # Goodput 0 for one instance means the SLO fails even at negligible load
                # (``GoodputSearch``), which no number of instances fixes.
                if self.phase_goodput(role, tp, pp, 1).rate <= 0:
                    continue
                curve = curves[role, tp, pp] = self._curve(role, tp, pp, room // (tp * pp))
                scored.append((max(g / (n * tp * pp) for n, g in curve.items()), -tp * pp,
                               tp, pp))
            scored.sort(reverse=True)
            ranked[role] = [(tp, pp) for *_, tp, pp in scored[:self.pc.keep_per_phase]]
            if not ranked[role]:
                raise PlanningError(f"no {role} configuration meets the SLO on its own")
        options = []
        for tp_p, pp_p in ranked["prefill"]:
            for tp_d, pp_d in ranked["decode"]:
                cp, cd = curves["prefill", tp_p, pp_p], curves["decode", tp_d, pp_d]
                for n_p, g_p in cp.items():
                    for n_d, g_d in cd.items():
                        gpus = n_p * tp_p * pp_p + n_d * tp_d * pp_d
                        est = min(g_p, g_d)
                        if gpus <= G and est > 0:
                            cand = Candidate.disagg(InstanceSpec(tp_p, pp_p, n_p),
                                                    InstanceSpec(tp_d, pp_d, n_d),
                                                    self.bandwidth(gpus))
                            options.append((est / gpus, est, cand))
        options.sort(key=lambda o: (o[0], o[1]), reverse=True)
        # The phase estimates miss what only the whole system shows (KV transfers queueing
        # on a slow link delay decode, which TPOT counts: at 8x8 on the Azure trace every
        # top estimate had pp > 1 prefill instances whose links saturate), so the best
        # estimates may all share one prefill configuration that fails as a whole. Verify
        # in stages: the best count pair of each prefill (tp, pp); then, with the prefill
        # that verified best, of each decode (tp, pp); then more count pairs of that
        # pairing. ``verify_top`` bounds each stage.
        k = self.pc.verify_top

        def firsts(opts: list, key) -> list:
            seen: dict = {}
            for o in opts:
                seen.setdefault(key(o[2]), o)
            return list(seen.values())[:k]

        def stage(opts: list) -> Evaluation:
            self.verify_many([(c, 0.85 * est, est) for _, est, c in opts])
            evals.extend(self.ev.evaluate(c) for _, _, c in opts)
            return max(evals, key=lambda e: (e.per_gpu_goodput, e.goodput.rate))

        evals: list[Evaluation] = []
        b = stage(firsts(options, lambda c: (c.prefill.tp, c.prefill.pp))).candidate
        same_p = [o for o in options if o[2].prefill.tp == b.prefill.tp
                  and o[2].prefill.pp == b.prefill.pp]
        b = stage(firsts(same_p, lambda c: (c.decode.tp, c.decode.pp))).candidate
        best = stage([o for o in same_p if (o[2].decode.tp, o[2].decode.pp) ==
                      (b.decode.tp, b.decode.pp)][:k])
        if best.goodput.rate <= 0:
            raise PlanningError("no high-affinity configuration meets the SLO")
        return _Found(best, "high", candidates=len(options))

    # -- Alg. 2 -------------------------------------------------------------------------
    def _low(self) -> _Found:
        c, pc = self.cluster, self.pc
        bw = c.intra_node_bandwidth
        options = []
        for pp_cross in range(1, min(c.num_nodes, pc.max_pp) + 1):
            segs = {}
            for role in ("prefill", "decode"):
                segs[role] = [(tp, s) for tp in self.profile.tp_degrees
                              for s in range(1, pc.max_pp // pp_cross + 1)
                              if tp * s <= c.gpus_per_node and self.fits(role, tp, pp_cross * s)]
            for tp_p, s_p in segs["prefill"]:
                for tp_d, s_d in segs["decode"]:
                    for n_p in range(1, c.gpus_per_node // (tp_p * s_p) + 1):
                        left = c.gpus_per_node - n_p * tp_p * s_p
                        for n_d in range(1, left // (tp_d * s_d) + 1):
                            options.append(self._low_option(tp_p, s_p, n_p, tp_d, s_d, n_d,
                                                            pp_cross, bw))
        options = [o for o in options if o[0] > 0]
        if not options:
            raise PlanningError("no low-affinity unit meets the SLO")
        options.sort(key=lambda o: o[0], reverse=True)
        units: list[tuple[Evaluation, tuple]] = []
        best = 0.0
        for bound, layout, cand in options:
            if bound < best * (1 - 2 * pc.tol):
                break  # the phase bound is (up to noise) an upper bound: nothing better left
            e = self.ev.evaluate(cand, lo=0.85 * bound * cand.num_gpus,
                                 hi=bound * cand.num_gpus)
            units.append((e, layout))
            best = max(best, e.per_gpu_goodput)
        units.sort(key=lambda u: u[0].per_gpu_goodput, reverse=True)
        finals = []
        for e, layout in units[:pc.low_affinity_final]:
            if e.goodput.rate <= 0:
                continue
            tp_p, s_p, n_p, tp_d, s_d, n_d, pp_cross = layout
            n_units = (c.num_nodes // pp_cross) * (c.gpus_per_node //
                                                   (n_p * tp_p * s_p + n_d * tp_d * s_d))
            whole = Candidate.disagg(InstanceSpec(tp_p, pp_cross * s_p, n_p * n_units),
                                     InstanceSpec(tp_d, pp_cross * s_d, n_d * n_units), bw,
                                     n_units)
            est = e.goodput.rate * n_units
            finals.append((self.ev.evaluate(whole, lo=0.9 * est, hi=1.1 * est), layout))
        if not finals:
            raise PlanningError("no low-affinity unit meets the SLO")
        best_e, layout = max(finals, key=lambda f: (f[0].per_gpu_goodput, f[0].goodput.rate))
        return _Found(best_e, "low", layout, len(options))

    def _low_option(self, tp_p: int, s_p: int, n_p: int, tp_d: int, s_d: int, n_d: int,
                    pp_cross: int, bw: float) -> tuple[float, tuple, Candidate]:
        g_p = self.phase_goodput("prefill", tp_p, pp_cross * s_p, n_p).rate
        g_d = self.phase_goodput("decode", tp_d, pp_cross * s_d, n_d).rate if g_p > 0 else 0.0
        cand = Candidate.disagg(InstanceSpec(tp_p, pp_cross * s_p, n_p),
                                InstanceSpec(tp_d, pp_cross * s_d, n_d), bw)
        return min(g_p, g_d) / cand.num_gpus, (tp_p, s_p, n_p, tp_d, s_d, n_d, pp_cross), cand

    # -- public -------------------------------------------------------------------------
    def plan(self, affinity: str = "auto") -> Plan:
        """The best plan (module doc); a cluster larger than ``max_search_gpus`` is
        searched as identical sub-clusters (``replicate``) and checked whole."""
        if affinity not in AFFINITY_CHOICES:
            raise ValueError(f"affinity must be one of {AFFINITY_CHOICES}, got {affinity!r}")
        t0 = time.perf_counter()
        sub, copies = split_cluster(self.cluster, self.pc.max_search_gpus)
        searcher = self if copies == 1 else Planner(
            sub, self.profile, self.trace, self.slo, self.cfg,
            replace(self.pc, max_requests=None, final_check=False), self.arrivals)
        found = searcher.search(affinity)
        best = max(found, key=lambda f: (f.evaluation.per_gpu_goodput,
                                         f.evaluation.goodput.rate))
        if copies > 1:
            e = best.evaluation
            cand = replicate(e.candidate, copies, best.affinity, sub)
            rate = e.goodput.rate * copies
            g = replace(e.goodput, rate=rate, per_gpu_rate=rate / cand.num_gpus,
                        interpolated_rate=e.goodput.interpolated_rate * copies,
                        num_gpus=cand.num_gpus)
            best = replace(best, evaluation=Evaluation(cand, rate / cand.num_gpus, g))
        check = None
        if self.pc.final_check:
            e = best.evaluation
            spec = e.candidate.spec()
            check = check_plan(spec, self.profile, self.windows, self.slo, self.cfg,
                               e.goodput.rate, instances_of(spec), self.pc.replicates,
                               self.pc.tol, explore_up=copies > 1)
        w = self.pc.window
        split = (f"; searched one {sub.num_nodes}x{sub.gpus_per_node} sub-cluster, "
                 f"replicated {copies}x" if copies > 1 else "")
        ev = searcher.ev
        stats = SearchStats(sum(f.candidates for f in found), ev.num_sims,
                            time.perf_counter() - t0, len(self.workload),
                            f"affinity={affinity}; goodput bisection precision {self.pc.tol:g} "
                            f"(phase curves {self.pc.phase_tol:g}); steady-state windows: "
                            f"warm-up {w.warmup:g}, measured {w.measure:g}, cool-down "
                            f"{w.cooldown:g} x {self.windows.scale_s:.1f} s, >= "
                            f"{w.min_per_instance} measured requests per instance{split}",
                            ev.requests_simulated)
        return self.make_plan(best, stats, check)

    def search(self, affinity: str) -> list[_Found]:
        """The best of each search ``affinity`` asks for; ``PlanningError`` with the
        reason (``explain``) when none meets the SLO."""
        found, failed = [], []
        searches = [("high", self._high), ("low", self._low)]
        if self.pc.consider_colocated:
            searches.append(("auto", self._colocated))
        for kind, search in searches:
            if affinity in (kind, "auto"):
                try:
                    found.append(search())
                except PlanningError as exc:
                    failed.append(str(exc))
        if not found:
            why = self.explain()
            raise PlanningError(f"{why.message()}\n(searches: {'; '.join(failed)})", why)
        return found

    def explain(self) -> Infeasibility:
        """Why no plan meets the SLO (``infeasibility``)."""
        G = self.cluster.num_gpus
        return explain(self.profile, self.workload, self.slo, self.cfg,
                       {r: self.parallel_configs(r, G) for r in ("prefill", "decode")},
                       self.cluster.gpus_per_node)

    def _colocated(self) -> _Found:
        """The colocated baseline as a plan option (``consider_colocated``)."""
        cands = self.colocated_candidates()
        evals, prev = [], {}
        for cand in cands:
            i = cand.colocated
            last = prev.get((i.tp, i.pp), 0.0)
            e = self.ev.evaluate(cand, lo=last or None,
                                 hi=last * i.count / (i.count - 1) * 1.1 if last else None)
            prev[i.tp, i.pp] = e.goodput.rate
            evals.append(e)
        best = max(evals, key=lambda e: (e.per_gpu_goodput, e.goodput.rate), default=None)
        if best is None or best.goodput.rate <= 0:
            raise PlanningError("no colocated configuration meets the SLO")
        return _Found(best, "none", candidates=len(cands))

    def make_plan(self, found: _Found, stats: SearchStats, check: PlanCheck | None = None
                  ) -> Plan:
        e, c = found.evaluation, self.cluster
        cand = e.candidate
        rate = check.rate if check is not None else e.goodput.rate
        extra = {"arrivals": self.arrivals, "check": check}
        if cand.mode == "colocated":
            groups = assign_nodes(instance_groups("colocated", cand.colocated), c.num_nodes,
                                  c.gpus_per_node)
            return Plan(self.profile.model, f"{self.profile.model} on {self.profile.hardware}",
                        "colocated", "none", colocated=cand.colocated, placement=tuple(groups),
                        expected_rate=rate, expected_per_gpu_goodput=rate / cand.num_gpus,
                        slo=self.slo, trace=self.trace.name, search=stats, cluster=c, **extra)
        if found.affinity == "low":
            tp_p, s_p, n_p, tp_d, s_d, n_d, pp_cross = found.layout
            groups = low_affinity_groups(tp_p, s_p, n_p, tp_d, s_d, n_d, pp_cross, cand.units,
                                         c.gpus_per_node)
        else:
            groups = assign_nodes(instance_groups("prefill", cand.prefill)
                                  + instance_groups("decode", cand.decode),
                                  c.num_nodes, c.gpus_per_node)
        return Plan(self.profile.model, f"{self.profile.model} on {self.profile.hardware}",
                    "disaggregated", found.affinity, cand.prefill, cand.decode, None, cand.units,
                    cand.transfer_bandwidth, tuple(groups), rate, rate / cand.num_gpus,
                    self.slo, self.trace.name, stats, c, **extra)

    def candidates(self, include_colocated: bool = True) -> list[Candidate]:
        """Every full configuration within the cluster (bounded by ``max_instances``)."""
        G, cap = self.cluster.num_gpus, self.pc.max_instances or self.cluster.num_gpus
        out = []
        pre, dec = self.parallel_configs("prefill", G - 1), self.parallel_configs("decode", G - 1)
        for tp_p, pp_p in pre:
            for n_p in range(1, min(cap, (G - 1) // (tp_p * pp_p)) + 1):
                left = G - n_p * tp_p * pp_p
                for tp_d, pp_d in dec:
                    for n_d in range(1, min(cap, left // (tp_d * pp_d)) + 1):
                        gpus = n_p * tp_p * pp_p + n_d * tp_d * pp_d
                        out.append(Candidate.disagg(InstanceSpec(tp_p, pp_p, n_p),
                                                    InstanceSpec(tp_d, pp_d, n_d),
                                                    self.bandwidth(gpus)))
        return out + (self.colocated_candidates() if include_colocated else [])

    def colocated_candidates(self) -> list[Candidate]:
        G, cap = self.cluster.num_gpus, self.pc.max_instances or self.cluster.num_gpus
        return [Candidate.colo(InstanceSpec(tp, pp, n))
                for tp, pp in self.parallel_configs("colocated", G)
                for n in range(1, min(cap, G // (tp * pp)) + 1)]

    def verify_many(self, jobs: list[tuple[Candidate, float | None, float | None]],
                    workers: int | None = None) -> None:
        """Whole-system goodput searches of ``jobs`` into the cache (``parallel``), in
        ``workers`` processes (default ``PlannerConfig.workers``)."""
        evaluate_many(self.ev, jobs, workers or self.pc.workers)

    def exhaustive(self, include_colocated: bool = True, workers: int = 1) -> list[Evaluation]:
        """Simulate every candidate as a whole system (equivalent ones once), best first.

        Shortcut, exact: a disaggregated system's TTFTs are those of its prefill pool
        alone, so when the prefill pool's TTFT-only goodput is 0 the system's is 0 too.
        Otherwise the phase goodputs only seed the bisection (``lo``/``hi`` hints)."""
        cands = self.candidates(include_colocated)
        reps: dict[tuple, Candidate] = {}
        for cand in cands:
            reps.setdefault(sim_key(cand.spec(), "both"), cand)
        jobs = []
        for key, cand in reps.items():
            if key in self.ev.cache:
                continue
            lo = hi = None
            if cand.mode == "disaggregated":
                p, d = cand.prefill, cand.decode
                g_p = self.phase_goodput("prefill", p.tp, p.pp, p.count).rate
                if g_p <= 0:
                    self.ev.cache[key] = GoodputResult(0.0, 0.0, 0.0, 0.0, cand.num_gpus, (), 0)
                    continue
                est = min(g_p, self.phase_goodput("decode", d.tp, d.pp, d.count).rate)
                lo, hi = (0.85 * est, est) if est > 0 else (None, g_p)
            jobs.append((key, cand, lo, hi))
        self.verify_many([j[1:] for j in jobs], workers)
        out = [self.ev.evaluate(cand) for cand in cands]
        out.sort(key=lambda e: (e.per_gpu_goodput, e.goodput.rate), reverse=True)
        return out


def plan(cluster: ClusterDesc, profile: LatencyProfile, trace: Trace, slo: SloConfig,
         affinity: str = "auto", sim_config: SimConfig | None = None,
         config: PlannerConfig | None = None) -> Plan:
    """The best disaggregated plan found by DistServe's Alg. 1 ("high"), Alg. 2 ("low"),
    or both ("auto", keeping the higher per-GPU goodput)."""
    return Planner(cluster, profile, trace, slo, sim_config, config).plan(affinity)


def exhaustive(cluster: ClusterDesc, profile: LatencyProfile, trace: Trace, slo: SloConfig,
               sim_config: SimConfig | None = None, max_instances: int | None = None,
               include_colocated: bool = True, workers: int = 1,
               config: PlannerConfig | None = None) -> list[Evaluation]:
    """Every candidate with its per-GPU goodput (``Evaluation``), best first."""
    pc = config or PlannerConfig()
    if max_instances is not None:
        pc = PlannerConfig(**{**pc.__dict__, "max_instances": max_instances})
    return Planner(cluster, profile, trace, slo, sim_config, pc).exhaustive(include_colocated,
                                                                           workers)
