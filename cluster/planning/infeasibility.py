"""Why no plan meets the SLO: each phase's best zero-load attainment and what would relax it.

When the planner finds nothing, "no configuration meets the SLO" leaves a user guessing.
The usual cause is visible without any simulation: even on an idle instance, too few
prompts prefill within the TTFT target, or too few requests decode within the TPOT
target, at every parallelism the profile has. This module computes, per phase and per
``(tp, pp)`` the planner may use, the *zero-load* latency of every request of the
workload (analytically, from the same cost models the simulator uses):

- TTFT: the prompt alone on a prefill instance, its stages (chunks, with
  ``chunked_prefill``) in pipeline order, plus the step and request overheads;
- TPOT: the request alone in a decode batch, its context growing by one per step.

The best configuration of each phase is the one with the highest share meeting its
target. A phase *binds* when that share is below the attainment target; ``needed_s`` is
the target that share would need (the attainment-quantile of its zero-load latencies),
a lower bound, since load only adds to it. When neither phase binds alone, the targets
bind together (few requests meet both) or the cluster is too small for the load to be
spread; the message says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.cluster.planning.simulator.config import SimConfig
from pdserve.cluster.planning.simulator.costs import DecodeCost, PrefillCost
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.router.slo import SloConfig


@dataclass(frozen=True)
class PhaseBest:
    role: str  # "prefill" (TTFT) | "decode" (TPOT)
    tp: int
    pp: int
    attainment: float  # share of requests meeting the phase's target at zero load
    needed_s: float  # the phase target that would make ``attainment`` reach the SLO's


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def zero_load_ttft_s(pc: PrefillCost, prompt: int, cfg: SimConfig) -> float:
    """The prompt alone: chunks (or one batch) through ``pc.pp`` stages."""
    step = cfg.prefill_token_budget if cfg.chunked_prefill else prompt
    free = [0.0] * pc.pp
    done = 0
    while done < prompt:
        end = min(prompt, done + step)
        dur = pc.stage_s(end - done, end * end - done * done) + cfg.step_overhead_s
        t = 0.0
        for s in range(pc.pp):
            free[s] = t = max(free[s], t) + dur
        done = end
    return free[-1] + cfg.request_overhead_s


def zero_load_tpot_s(dc: DecodeCost, prompt: int, output: int, cfg: SimConfig) -> float | None:
    """The request alone in a batch: the mean of its steps, whose context sum grows from
    ``prompt + 1`` by one per step (``lane_ms`` is linear in it)."""
    if output < 2:
        return None
    mean_ctx = prompt + 1 + (output - 2) / 2
    return dc.lane_ms(mean_ctx, 1) / 1e3 + cfg.step_overhead_s


@dataclass(frozen=True)
class Infeasibility:
    slo: SloConfig
    ttft: PhaseBest | None  # None: no prefill configuration fits the model
    tpot: PhaseBest | None
    joint: float  # share meeting both at zero load, each on its phase's best configuration
    max_tp: int
    gpus_per_node: int
    chunked_prefill: bool

    @property
    def binding(self) -> tuple[str, ...]:
        target = self.slo.attainment
        out = tuple(name for name, best in (("TTFT", self.ttft), ("TPOT", self.tpot))
                    if best is not None and best.attainment < target)
        if not out and self.joint < target:
            return ("TTFT", "TPOT")
        return out

    def message(self) -> str:
        s, target = self.slo, self.slo.attainment
        lines = ["no configuration meets the SLO on this cluster."]
        for name, best, goal in (("TTFT", self.ttft, s.ttft_s), ("TPOT", self.tpot, s.tpot_s)):
            if best is None:
                lines.append(f"- {name}: the model does not fit any {best_role(name)} "
                             "configuration")
                continue
            lines.append(f"- {name}: even at zero load at most {best.attainment:.0%} of the "
                         f"requests meet {goal:g} s (best: {best.role} tp{best.tp} pp{best.pp}), "
                         f"against {target:.0%}" if best.attainment < target else
                         f"- {name}: at zero load {best.attainment:.0%} of the requests meet "
                         f"{goal:g} s (best: {best.role} tp{best.tp} pp{best.pp})")
        binding = self.binding
        if not binding:
            lines.append(f"Both targets hold at zero load ({self.joint:.0%} meet both); the "
                         "cluster has too few GPUs to hold them under this trace's load in any "
                         "pool pairing. More GPUs (or looser targets) would relax it.")
            return "\n".join(lines)
        if len(binding) == 2 and self.joint < target and all(
                b is not None and b.attainment >= target for b in (self.ttft, self.tpot)):
            lines.append(f"Each target holds alone, but only {self.joint:.0%} of requests meet "
                         "both at zero load: the two bind together.")
        else:
            lines.append(f"Binding: {' and '.join(binding)}.")
        lines.append("What would relax it:")
        for name in binding:
            best = self.ttft if name == "TTFT" else self.tpot
            if best is not None:
                lines.append(f"- a looser {name} target: at least {best.needed_s:.3f} s reaches "
                             f"{target:.0%} at zero load (more is needed under load)")
        if self.max_tp < self.gpus_per_node:
            lines.append(f"- a larger TP: the profile stops at tp{self.max_tp}, nodes have "
                         f"{self.gpus_per_node} GPUs (profile tp{2 * self.max_tp})")
        if "TTFT" in binding:
            if self.chunked_prefill:
                lines.append("- chunked prefill is on: it splits long prompts but does not "
                             "shorten a lone prompt's prefill")
            else:
                lines.append("- chunked prefill (--chunked-prefill) keeps long prompts from "
                             "holding a batch but does not shorten a lone prompt's prefill: it "
                             "helps only when misses come from queueing")
        lines.append(f"- a lower attainment target than {target:.0%}")
        return "\n".join(lines)


def best_role(name: str) -> str:
    return "prefill" if name == "TTFT" else "decode"


def explain(profile: LatencyProfile, workload: Workload, slo: SloConfig, cfg: SimConfig,
            configs: dict[str, list[tuple[int, int]]], gpus_per_node: int) -> Infeasibility:
    """Zero-load attainment of each phase's best ``(tp, pp)`` among ``configs[role]``."""
    prompt, output = workload.prompt, workload.output
    n, q = len(prompt), slo.attainment
    best: dict[str, tuple[PhaseBest, list[bool]]] = {}
    for role in ("prefill", "decode"):
        for tp, pp in configs.get(role, []):
            inst = profile.instance(tp, pp)
            if role == "prefill":
                pc = PrefillCost.of(inst)
                lat = [zero_load_ttft_s(pc, p, cfg) for p in prompt]
                ok = [x <= slo.ttft_s for x in lat]
            else:
                dc = DecodeCost.of(inst)
                raw = [zero_load_tpot_s(dc, p, o, cfg) for p, o in zip(prompt, output,
                                                                      strict=True)]
                lat = [x for x in raw if x is not None] or [0.0]
                ok = [x is None or x <= slo.tpot_s for x in raw]
            pb = PhaseBest(role, tp, pp, sum(ok) / n, _quantile(lat, q))
            if role not in best or (pb.attainment, -tp * pp) > (best[role][0].attainment,
                                                                  -best[role][0].tp
                                                                  * best[role][0].pp):
                best[role] = (pb, ok)
    pre, dec = best.get("prefill"), best.get("decode")
    joint = (sum(a and b for a, b in zip(pre[1], dec[1], strict=True)) / n
             if pre and dec else 0.0)
    return Infeasibility(slo, pre[0] if pre else None, dec[0] if dec else None, joint,
                         max(profile.tp_degrees), gpus_per_node, cfg.chunked_prefill)
