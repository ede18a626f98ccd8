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

TTFT and TPOT are defined as in ``disagg.py``.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from pdserve.cluster.planning.simulator.config import ColocatedPlanSpec, SimConfig
from pdserve.cluster.planning.simulator.costs import DecodeCost, PrefillCost, mixed_step_s
from pdserve.cluster.planning.simulator.result import SimResult
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.engine.latency_profile import LatencyProfile


def run_colocated(plan: ColocatedPlanSpec, profile: LatencyProfile, w: Workload,
                  cfg: SimConfig) -> SimResult:
    inst = profile.instance(plan.instance.tp, plan.instance.pp)
    pc, dc = PrefillCost.of(inst), DecodeCost.of(inst)
    n_lanes = plan.instance.count * plan.instance.pp
    cap = inst.entry.kv_capacity_tokens
    budget, chunked = cfg.prefill_token_budget, cfg.chunked_prefill
    max_batch, step_oh = cfg.max_decode_batch, cfg.step_overhead_s
    least_loaded = cfg.dispatch == "least_loaded"

    arr, prompt, out = w.arrival, w.prompt, w.output
    n = len(arr)
    first = [math.nan] * n
    last = [math.nan] * n
    rejected = [False] * n
    heap: list = []
    push, pop = heapq.heappush, heapq.heappop
    seq = 0
    events = 0

    waiting = [deque() for _ in range(n_lanes)]
    partial: list[list[int]] = [[] for _ in range(n_lanes)]  # admitted, prefill unfinished
    p_done = [0] * n
    admitted = [0] * n_lanes  # admitted prompts not yet decoding
    queued_tok = [0] * n_lanes
    d_n = [0] * n_lanes
    d_ctx = [0] * n_lanes
    reserved = [0] * n_lanes
    steps = [0] * n_lanes
    finish: list[dict[int, list[int]]] = [{} for _ in range(n_lanes)]
    busy = [False] * n_lanes
    kicked = [False] * n_lanes
    assigned = [0] * n_lanes
    rr = 0

    def form(lane: int, now: float) -> None:
        nonlocal seq
        if busy[lane]:
            return
        k = d_n[lane]
        room = budget - k
        tokens = sq = 0
        completing: list[int] = []
        still: list[int] = []
        for rid in partial[lane]:
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
        wq = waiting[lane]
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
        partial[lane] = still
        if k == 0 and tokens == 0:
            return
        busy[lane] = True
        seq += 1
        dur = mixed_step_s(pc, dc, tokens, sq, d_ctx[lane], k) + step_oh
        push(heap, (now + dur, seq, lane, completing))

    i = 0
    while True:
        # Arrivals first at equal times, so simultaneous prompts can share a step.
        if heap and (i >= n or heap[0][0] < arr[i]):
            now, _, lane, completing = pop(heap)
            events += 1
            if completing is None:  # kick after arrivals at an idle lane
                kicked[lane] = False
                form(lane, now)
                continue
            steps[lane] += 1
            step = steps[lane]
            d_ctx[lane] += d_n[lane]
            done_now = finish[lane].pop(step, None)
            if done_now:
                for rid in done_now:
                    last[rid] = now
                    f = prompt[rid] + out[rid]
                    d_n[lane] -= 1
                    d_ctx[lane] -= f
                    reserved[lane] -= f
                    assigned[lane] -= 1
            for rid in completing:
                first[rid] = now
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
            rid, now = i, arr[i]
            i += 1
            events += 1
            f = prompt[rid] + out[rid]
            if f > cap:
                rejected[rid] = True
                continue
            if least_loaded:
                lane = min(range(n_lanes), key=lambda j: (assigned[j], queued_tok[j]))
            else:
                lane = rr % n_lanes
                rr += 1
            assigned[lane] += 1
            queued_tok[lane] += prompt[rid]
            waiting[lane].append(rid)
            if not busy[lane] and not kicked[lane]:
                kicked[lane] = True
                seq += 1
                push(heap, (now, seq, lane, None))
        else:
            break

    oh = cfg.request_overhead_s
    ttft = tuple(math.inf if rejected[r] else first[r] - arr[r] + oh for r in range(n))
    tpot = tuple(None if (rejected[r] or out[r] < 2) else (last[r] - first[r]) / (out[r] - 1)
                 for r in range(n))
    return SimResult(plan.label(), "both", plan.num_gpus, w.rate, arr, prompt, out,
                     tuple(first), tuple(last), ttft, tpot, sum(rejected), events)
