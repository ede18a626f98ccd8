"""Discrete-event simulation of the colocated baseline (vLLM v1-like instances).

Each instance of a ``(tp, pp, count)`` plan is ``pp`` lanes (``costs.py``); a request is
dispatched at arrival to the lane with the fewest unfinished requests (then fewest
queued prompt tokens) among lanes whose KV can ever hold it. A lane loops over steps:

1. every running decode contributes one token (they all fit: admission reserved their
   final footprint, and the batch is capped at ``max_decode_batch``);
2. prompts in progress (chunked) continue, then waiting prompts are admitted in FIFO
   order while the step's tokens stay within ``prefill_token_budget`` (decodes count one
   each), their final footprint fits the lane's free KV and the batch has room. Without
   ``chunked_prefill`` a prompt must fit whole, except that the step's first prompt may
   overflow the budget (otherwise a long prompt would starve);
3. the step lasts ``costs.mixed_step_s``; at its end decodes gain a token, finished
   requests free their KV, and prompts whose last chunk ran produce their first token and
   decode from the next step on.

TTFT and TPOT are defined as in ``disagg.py``. ``run_colocated`` runs a ``_ColocatedSim``
whose loop handles the end of a step itself (nearly every event) and calls ``_form`` for
the lane's next step; like ``disagg.py`` it keeps its fields in slots and hot state in
local names, for speed.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from heapq import heappop, heappush

from pdserve.cluster.planning.simulator.config import ColocatedPlanSpec, SimConfig
from pdserve.cluster.planning.simulator.costs import DecodeCost, PrefillCost, mixed_step_s
from pdserve.cluster.planning.simulator.result import SimResult
from pdserve.cluster.planning.simulator.window import StopRule
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.engine.latency_profile import LatencyProfile


def run_colocated(plan: ColocatedPlanSpec, profile: LatencyProfile, w: Workload,
                  cfg: SimConfig, stop: StopRule | None = None) -> SimResult:
    sim = _ColocatedSim(plan, profile, w, cfg)
    stopped = sim.run(stop)
    return SimResult.from_run(plan.label(), "both", plan.num_gpus, w, sim.first, sim.last,
                              sim.rejected, cfg.request_overhead_s, sim.events,
                              stopped_early=stopped)


class _ColocatedSim:
    """The state of one run: per-request lists indexed by ``rid``, per-lane lists by
    ``lane``; events are ``(time, seq, lane, prompts completing)``, ``None`` for a kick
    after arrivals at an idle lane."""

    # Slots: see disagg.py (attribute access stays as fast as local names).
    __slots__ = (
        "arr", "prompt", "out", "first", "last", "rejected", "p_done", "heap", "seq",
        "events", "rr", "pc", "dc", "cap", "budget", "chunked", "max_batch", "step_oh",
        "request_oh", "least_loaded", "n_lanes", "waiting", "partial", "admitted", "queued_tok", "d_n",
        "d_ctx", "reserved", "steps", "finish", "busy", "kicked", "assigned",
    )

    def __init__(self, plan: ColocatedPlanSpec, profile: LatencyProfile, w: Workload,
                 cfg: SimConfig):
        inst = profile.instance(plan.instance.tp, plan.instance.pp)
        self.pc, self.dc = PrefillCost.of(inst), DecodeCost.of(inst)
        self.cap = inst.entry.kv_capacity_tokens
        self.budget, self.chunked = cfg.prefill_token_budget, cfg.chunked_prefill
        self.max_batch, self.step_oh = cfg.max_decode_batch, cfg.step_overhead_s
        self.request_oh = cfg.request_overhead_s
        self.least_loaded = cfg.dispatch == "least_loaded"
        self.arr, self.prompt, self.out = w.arrival, w.prompt, w.output
        n = len(self.arr)
        self.first, self.last = [math.nan] * n, [math.nan] * n
        self.rejected = [False] * n
        self.p_done = [0] * n
        self.heap: list = []
        self.seq = itertools.count(1)
        self.events = self.rr = 0
        self.n_lanes = n_lanes = plan.instance.count * plan.instance.pp
        self.waiting = [deque() for _ in range(n_lanes)]
        self.partial: list[list[int]] = [[] for _ in range(n_lanes)]  # admitted, prefilling
        self.admitted = [0] * n_lanes  # admitted prompts not yet decoding
        self.queued_tok = [0] * n_lanes
        self.d_n = [0] * n_lanes
        self.d_ctx = [0] * n_lanes
        self.reserved = [0] * n_lanes
        self.steps = [0] * n_lanes
        self.finish: list[dict[int, list[int]]] = [{} for _ in range(n_lanes)]
        self.busy = [False] * n_lanes
        self.kicked = [False] * n_lanes
        self.assigned = [0] * n_lanes

    def run(self, stop: StopRule | None = None) -> bool:
        """Run to the last event, or until ``stop`` sees too many measured misses (as in
        ``disagg.py``); True when it stopped early."""
        heap, arr, n, form = self.heap, self.arr, len(self.arr), self._form
        s_lo, s_hi, max_miss = (stop.lo, stop.hi, stop.max_misses) if stop else (0, 0, n)
        ttft_s, tpot_s = (stop.ttft_s, stop.tpot_s) if stop else (math.inf, math.inf)
        oh, rejected = self.request_oh, self.rejected
        misses = 0
        # The end of a step is nearly every event: it is handled here, on locals.
        steps, d_ctx, d_n, finish, busy = self.steps, self.d_ctx, self.d_n, self.finish, \
            self.busy
        prompt, out, first, last = self.prompt, self.out, self.first, self.last
        reserved, assigned, admitted = self.reserved, self.assigned, self.admitted
        i = events = 0
        while True:
            # Arrivals first at equal times, so simultaneous prompts can share a step.
            if heap and (i >= n or heap[0][0] < arr[i]):
                now, _, lane, completing = heappop(heap)
                events += 1
                if completing is None:  # kick after arrivals at an idle lane
                    self.kicked[lane] = False
                    form(lane, now)
                    continue
                steps[lane] += 1
                step = steps[lane]
                d_ctx[lane] += d_n[lane]
                done_now = finish[lane].pop(step, None)
                if done_now:
                    for rid in done_now:
                        last[rid] = now
                        if s_lo <= rid < s_hi and first[rid] - arr[rid] + oh <= ttft_s \
                                and now - first[rid] > tpot_s * (out[rid] - 1):
                            misses += 1
                        f = prompt[rid] + out[rid]
                        d_n[lane] -= 1
                        d_ctx[lane] -= f
                        reserved[lane] -= f
                        assigned[lane] -= 1
                for rid in completing:
                    first[rid] = now
                    if s_lo <= rid < s_hi and now - arr[rid] + oh > ttft_s:
                        misses += 1
                    admitted[lane] -= 1
                    if out[rid] == 1:
                        last[rid] = now
                        reserved[lane] -= prompt[rid] + 1
                        assigned[lane] -= 1
                    else:
                        d_n[lane] += 1
                        d_ctx[lane] += prompt[rid] + 1
                        finish[lane].setdefault(step + out[rid] - 1, []).append(rid)
                busy[lane] = False
                form(lane, now)
            elif i < n:
                events += 1
                self._arrive(i, arr[i])
                if rejected[i] and s_lo <= i < s_hi:
                    misses += 1
                i += 1
            else:
                break
            if misses > max_miss:  # never without a stop rule: misses stay 0
                self.events = events
                return True
        self.events = events
        return False

    def _arrive(self, rid: int, now: float) -> None:
        if self.prompt[rid] + self.out[rid] > self.cap:
            self.rejected[rid] = True
            return
        if self.least_loaded:
            assigned, queued_tok = self.assigned, self.queued_tok
            lane = min(range(self.n_lanes), key=lambda j: (assigned[j], queued_tok[j]))
        else:
            lane = self.rr % self.n_lanes
            self.rr += 1
        self.assigned[lane] += 1
        self.queued_tok[lane] += self.prompt[rid]
        self.waiting[lane].append(rid)
        if not self.busy[lane] and not self.kicked[lane]:
            self.kicked[lane] = True
            heappush(self.heap, (now, next(self.seq), lane, None))

    def _form(self, lane: int, now: float) -> None:
        """Start the lane's next step unless it is running one: its decodes, the chunks of
        prompts in progress, then waiting prompts admitted in FIFO order while their final
        footprint fits the free KV, the batch has room and their tokens the budget (without
        chunking, the step's first prompt may overflow it: otherwise a long prompt would
        starve). Called once per step, so it works on local names."""
        if self.busy[lane]:
            return
        k = self.d_n[lane]
        room = self.budget - k
        prompt, p_done = self.prompt, self.p_done
        tokens = sq = 0
        completing: list[int] = []
        still: list[int] = []
        for rid in self.partial[lane]:
            take = min(prompt[rid] - p_done[rid], room - tokens)
            if take <= 0:
                still.append(rid)
                continue
            s, e = p_done[rid], p_done[rid] + take
            tokens += take
            sq += e * e - s * s
            if e == prompt[rid]:
                completing.append(rid)
            else:
                p_done[rid] = e
                still.append(rid)
        wq = self.waiting[lane]
        if wq:
            out, chunked, cap, max_batch = self.out, self.chunked, self.cap, self.max_batch
            reserved, admitted, queued_tok = self.reserved, self.admitted, self.queued_tok
            while wq:
                rid = wq[0]
                f = prompt[rid] + out[rid]
                if reserved[lane] + f > cap or k + admitted[lane] >= max_batch:
                    break
                p_len = prompt[rid]
                if chunked:
                    take = min(p_len, room - tokens)
                    if take <= 0:
                        break
                else:
                    if tokens and p_len > room - tokens:
                        break
                    take = p_len
                wq.popleft()
                reserved[lane] += f
                admitted[lane] += 1
                queued_tok[lane] -= p_len
                tokens += take
                sq += take * take
                if take == p_len:
                    completing.append(rid)
                else:
                    p_done[rid] = take
                    still.append(rid)
        self.partial[lane] = still
        if k == 0 and tokens == 0:
            return
        self.busy[lane] = True
        dur = mixed_step_s(self.pc, self.dc, tokens, sq, self.d_ctx[lane], k) + self.step_oh
        heappush(self.heap, (now + dur, next(self.seq), lane, completing))
