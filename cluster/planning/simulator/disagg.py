"""Discrete-event simulation of a disaggregated plan: prefill pool -> KV transfer -> decode pool.

Request lifecycle (times are virtual seconds):

1. *Arrival*: the dispatcher picks a prefill instance (least outstanding prompt tokens)
   and a decode lane (fewest assigned requests among lanes whose KV has room for the
   request's final footprint, prompt + output; else the fewest assigned overall; with
   ``units`` > 1, only lanes of the prefill instance's unit). Picking both at arrival
   mirrors pdserve's orchestrator, which reserves on decode first.
2. *Prefill*: FIFO queue per instance. When stage 0 is free, a batch takes queued prompts
   while their tokens fit ``prefill_token_budget`` (a longer prompt runs alone, or is cut
   into budget-sized chunks with ``chunked_prefill``). The batch passes ``pp`` stages of
   ``PrefillCost.stage_s`` each; the first token exists when it leaves the last stage.
   TTFT = that time - arrival + ``request_overhead_s``.
3. *KV transfer*: pdserve sends KV layer by layer while prefill runs, so a batch's KV
   lands at ``max(prefill_end, link_start + bytes / bandwidth)``, where the link (one per
   prefill instance, shared by its batches in order) starts at the batch's start or when
   it frees. The transfer is therefore hidden unless the link is slower than prefill.
4. *Decode*: continuous batching per lane (``costs.py`` explains lanes for ``pp > 1``).
   A request whose KV has arrived waits in the lane's FIFO until its final footprint fits
   the lane's free KV and the batch has room, and joins at a step boundary. The simulator
   knows each output length, so admission reserves prompt + output tokens: an oracle
   admission control that never needs preemption. The step time uses the live contexts
   (prompt + tokens generated so far). TPOT = (last - first token) / (output - 1).

*Shared host* (``SimConfig.contention``): pools on one CPU host slow each other down. A
step is stretched by ``1 + (k - 1) * f``, where ``f`` is the share of it during which the
other pool stays busy: for a decode step, the running prefill batch's remaining time;
for a prefill batch, how long the decode lanes keep running their current requests.
``k`` is the measured factor (``HostContention``, from ``cluster/planning/calibration.py``).

Requests with one output token finish at prefill. Phase ``"prefill"`` stops after step 2;
phase ``"decode"`` starts at step 4 with the KV present at arrival (first token = arrival).
Per-step work is O(1) plus the requests finishing: finishing steps are bucketed by index,
and context sums are kept incrementally, so no per-token loop over the batch is needed.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from pdserve.cluster.planning.simulator.config import DisaggPlanSpec, SimConfig
from pdserve.cluster.planning.simulator.costs import DecodeCost, PrefillCost
from pdserve.cluster.planning.simulator.result import SimResult
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.router.policy_slo import TokenRate, predict_ttft_s

_PDONE, _PFREE, _KV, _DSTEP = 0, 1, 2, 3


def run_disagg(plan: DisaggPlanSpec, profile: LatencyProfile, w: Workload, cfg: SimConfig,
               phase: str = "both") -> SimResult:
    pre = profile.instance(plan.prefill.tp, plan.prefill.pp)
    dec = profile.instance(plan.decode.tp, plan.decode.pp)
    pc, dc = PrefillCost.of(pre), DecodeCost.of(dec)
    n_pre, pp = plan.prefill.count, plan.prefill.pp
    n_lanes = plan.decode.count * plan.decode.pp
    lane_cap = dec.entry.kv_capacity_tokens
    pre_cap = pre.kv_capacity_tokens
    secs_per_token = profile.kv_bytes_per_token / plan.transfer_bandwidth
    budget, chunked = cfg.prefill_token_budget, cfg.chunked_prefill
    max_batch, step_oh = cfg.max_decode_batch, cfg.step_overhead_s
    cont = cfg.contention
    p_slow = cont.prefill if cont is not None else 1.0
    d_slow = cont.decode if cont is not None else 1.0
    least_loaded = cfg.dispatch == "least_loaded"
    slo_aware = cfg.dispatch == "slo_aware"
    do_prefill, do_decode = phase != "decode", phase != "prefill"

    arr, prompt, out = w.arrival, w.prompt, w.output
    n = len(arr)
    first = [math.nan] * n
    last = [math.nan] * n
    rejected = [False] * n
    admission_rejected = [False] * n
    heap: list = []
    push, pop = heapq.heappush, heapq.heappop
    seq = 0
    events = 0

    # Prefill state.
    p_queue = [deque() for _ in range(n_pre)]
    p_outstanding = [0] * n_pre  # prompt tokens assigned and not yet batched
    p_stage_free = [[0.0] * pp for _ in range(n_pre)]
    p_link_free = [0.0] * n_pre
    p_kick = [False] * n_pre  # a same-instant batch formation is scheduled
    p_done = [0] * n  # prompt tokens already batched (chunked prefill)
    # Decode state, per lane.
    lane_of = [-1] * n
    d_wait = [deque() for _ in range(n_lanes)]
    d_n = [0] * n_lanes  # running requests
    d_ctx = [0] * n_lanes  # sum of their contexts
    d_reserved = [0] * n_lanes  # KV tokens reserved by running requests
    d_steps = [0] * n_lanes
    d_finish: list[dict[int, list[int]]] = [{} for _ in range(n_lanes)]
    d_busy = [False] * n_lanes
    d_assigned = [0] * n_lanes  # requests dispatched here and not finished
    d_assigned_tok = [0] * n_lanes
    rr = [0, 0]
    # Low-affinity units: prefill instance p sends its KV only to its own unit's lanes.
    pre_per_unit = n_pre // plan.units
    lanes_per_unit = n_lanes // plan.units
    unit_lanes = [range(u * lanes_per_unit, (u + 1) * lanes_per_unit) for u in range(plan.units)]
    all_lanes = range(n_lanes)

    rates = [TokenRate() for _ in range(n_pre)]

    def batch_s(lens: list[int]) -> float:
        return pc.stage_s(sum(lens), sum(x * x for x in lens)) * pp + step_oh

    def overlap(other_busy_s: float, dur: float) -> float:
        """The share of a step of ``dur`` during which the other pool stays busy."""
        return min(1.0, other_busy_s / dur) if other_busy_s > 0 else 0.0

    def decode_busy_for(now: float) -> float:
        """How long the decode pool stays busy with what it runs now: each lane until its
        longest request finishes (the simulator knows output lengths), at its current
        step time. Requests still waiting to join are left out."""
        longest = 0.0
        for lane in range(n_lanes):
            if d_n[lane]:
                steps_left = max(d_finish[lane]) - d_steps[lane]
                step = dc.lane_ms(d_ctx[lane], d_n[lane]) / 1e3 + step_oh
                longest = max(longest, steps_left * step)
        return longest

    def predicted_ttft(p: int, p_len: int, now: float) -> float:
        """The router's SloAware prediction (same function), from the simulator's state."""
        queue = [prompt[r] - p_done[r] for r in p_queue[p]]
        return predict_ttft_s(batch_s, queue, p_len, budget,
                              busy_s=max(0.0, p_stage_free[p][-1] - now),
                              tokens_per_s=rates[p].rate(now)) + cfg.request_overhead_s

    def form_prefill(p: int, now: float) -> None:
        nonlocal seq
        q = p_queue[p]
        sf = p_stage_free[p]
        if not q or sf[0] > now:
            return
        tokens = sq = 0
        completing = []
        while q:
            rid = q[0]
            done = p_done[rid]
            rem = prompt[rid] - done
            if chunked:
                take = min(rem, budget - tokens)
                if take <= 0:
                    break
            else:
                if tokens and tokens + rem > budget:
                    break
                take = rem
            end = done + take
            tokens += take
            sq += end * end - done * done
            if take == rem:
                q.popleft()
                completing.append(rid)
            else:
                p_done[rid] = end
        p_outstanding[p] -= tokens
        dur = pc.stage_s(tokens, sq) + step_oh
        if p_slow != 1.0:
            dur *= 1 + (p_slow - 1) * overlap(decode_busy_for(now), dur)
        t = now
        for s in range(pp):
            start = sf[s] if sf[s] > t else t
            t = start + dur
            sf[s] = t
        link_start = max(now, p_link_free[p])
        kv_at = max(t, link_start + tokens * secs_per_token)
        p_link_free[p] = kv_at
        seq += 1
        push(heap, (t, seq, _PDONE, p, completing, kv_at))
        if pp > 1:
            seq += 1
            push(heap, (sf[0], seq, _PFREE, p, None, 0.0))

    def kick_decode(lane: int, now: float) -> None:
        nonlocal seq
        if d_busy[lane]:
            return
        wq = d_wait[lane]
        k = d_n[lane]
        if wq and k < max_batch:
            reserved, ctx, fin, step = d_reserved[lane], d_ctx[lane], d_finish[lane], d_steps[lane]
            while wq and k < max_batch:
                rid = wq[0]
                f = prompt[rid] + out[rid]
                if reserved + f > lane_cap:
                    break
                wq.popleft()
                k += 1
                reserved += f
                ctx += prompt[rid] + 1
                fin.setdefault(step + out[rid] - 1, []).append(rid)
            d_reserved[lane], d_ctx[lane], d_n[lane] = reserved, ctx, k
        if k == 0:
            return
        d_busy[lane] = True
        seq += 1
        dur = dc.lane_ms(d_ctx[lane], k) / 1e3 + step_oh
        if d_slow != 1.0:
            prefill_left = max(sf[-1] for sf in p_stage_free) - now
            dur *= 1 + (d_slow - 1) * overlap(prefill_left, dur)
        push(heap, (now + dur, seq, _DSTEP, lane, None, 0.0))

    def pick_lane(f: int, lanes: range) -> int:
        if not least_loaded:
            for _ in lanes:
                lane = lanes[rr[1] % len(lanes)]
                rr[1] += 1
                if d_assigned_tok[lane] + f <= lane_cap:
                    return lane
            return lane
        best, best_key = -1, None
        for lane in lanes:
            key = (d_assigned_tok[lane] + f > lane_cap, d_assigned[lane])
            if best_key is None or key < best_key:
                best, best_key = lane, key
        return best

    i = 0
    while True:
        # Arrivals go before events at the same instant, so that simultaneous arrivals
        # can share a batch (an idle instance starts one through a same-time kick event).
        if heap and (i >= n or heap[0][0] < arr[i]):
            now, _, kind, x, payload, kv_at = pop(heap)
            events += 1
            if kind == _DSTEP:
                lane = x
                d_steps[lane] += 1
                d_ctx[lane] += d_n[lane]
                done_now = d_finish[lane].pop(d_steps[lane], None)
                if done_now:
                    for rid in done_now:
                        last[rid] = now
                        f = prompt[rid] + out[rid]
                        d_n[lane] -= 1
                        d_ctx[lane] -= f
                        d_reserved[lane] -= f
                        d_assigned[lane] -= 1
                        d_assigned_tok[lane] -= f
                d_busy[lane] = False
                kick_decode(lane, now)
            elif kind == _PDONE:
                for rid in payload:
                    first[rid] = now
                    if not do_decode or out[rid] == 1:
                        last[rid] = now
                if do_decode:
                    moving = [rid for rid in payload if out[rid] > 1]
                    if moving:
                        if kv_at <= now:
                            lanes = set()
                            for rid in moving:
                                d_wait[lane_of[rid]].append(rid)
                                lanes.add(lane_of[rid])
                            for lane in sorted(lanes):
                                kick_decode(lane, now)
                        else:
                            seq += 1
                            push(heap, (kv_at, seq, _KV, -1, moving, 0.0))
                if pp == 1:
                    form_prefill(x, now)
            elif kind == _KV:
                lanes = set()
                for rid in payload:
                    d_wait[lane_of[rid]].append(rid)
                    lanes.add(lane_of[rid])
                for lane in sorted(lanes):
                    kick_decode(lane, now)
            else:  # _PFREE: stage 0 freed, or a kick after arrivals at an idle instance
                p_kick[x] = False
                form_prefill(x, now)
        elif i < n:
            rid, now = i, arr[i]
            i += 1
            events += 1
            p_len, o_len = prompt[rid], out[rid]
            needs_decode = do_decode and o_len > 1
            if (do_prefill and p_len > pre_cap) or (needs_decode and p_len + o_len > lane_cap):
                rejected[rid] = True
                continue
            if not do_prefill:
                p = -1
            elif slo_aware:
                preds = [predicted_ttft(x, p_len, now) for x in range(n_pre)]
                p = min(range(n_pre), key=preds.__getitem__)
                rates[p].observe(now, p_len)
                if cfg.admission_ttft_s is not None and preds[p] > cfg.admission_ttft_s:
                    rejected[rid] = admission_rejected[rid] = True
                    continue
            elif least_loaded:
                p = min(range(n_pre), key=p_outstanding.__getitem__)
            else:
                p = rr[0] % n_pre
                rr[0] += 1
            if needs_decode:
                lane = pick_lane(p_len + o_len, unit_lanes[p // pre_per_unit] if p >= 0
                                 else all_lanes)
                lane_of[rid] = lane
                d_assigned[lane] += 1
                d_assigned_tok[lane] += p_len + o_len
            if not do_prefill:
                first[rid] = now
                if needs_decode:
                    d_wait[lane].append(rid)
                    kick_decode(lane, now)
                else:
                    last[rid] = now
                continue
            p_outstanding[p] += p_len
            p_queue[p].append(rid)
            if not p_kick[p] and p_stage_free[p][0] <= now:
                p_kick[p] = True
                seq += 1
                push(heap, (now, seq, _PFREE, p, None, 0.0))
        else:
            break

    oh = cfg.request_overhead_s if do_prefill else 0.0
    ttft = tuple(math.inf if rejected[r] else first[r] - arr[r] + oh for r in range(n))
    tpot = tuple(None if (rejected[r] or not do_decode or out[r] < 2)
                 else (last[r] - first[r]) / (out[r] - 1) for r in range(n))
    label = plan.label() + ("" if phase == "both" else f" [{phase} only]")
    gpus = (plan.prefill.num_gpus if do_prefill else 0) + (plan.decode.num_gpus if do_decode
                                                            else 0)
    return SimResult(label, phase, gpus, w.rate, arr, prompt, out, tuple(first), tuple(last),
                     ttft, tpot, sum(rejected), events, tuple(admission_rejected))
