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

*Prefix caching* (``SimConfig.prefix_caching``, ``prefix_cache.py``): when a batch is
formed, a request joining it for the first time skips the leading tokens its instance
holds; it is then as far along as a chunked prompt with those tokens done (the rest
attends to them: cost ``b*(l-s) + c*(l^2-s^2)``). When the batch ends its prompts' blocks
are cached. ``dispatch="kv_aware"`` routes like ``slo_aware`` with the prompt (and each
queued prompt not yet started) counted as the tokens the router's record does not expect
the instance to hold; a tie goes to the instance expected to hold more.

*Conditional disaggregation* (``SimConfig.local_prefill``, phase ``"both"`` only): at
arrival, after the prefill instance is picked, the router's rule
(``router.local_prefill.decide``) is asked where to prefill, with the uncached tokens
(the prompt less what the router's record expects the instance to hold with
``kv_aware``, less what the picked instance really holds with ``prefix_caching`` under
another dispatch, else the whole prompt), the predicted TTFT of the best prefill
instance (``slo_aware``'s prediction, computed for the rule when the dispatch does not
predict) and the time to prefill the whole prompt on the decode instance (its profile's
prefill formula, unpipelined: the decode instance holds no prefix cache). A *local*
request never enters the prefill pool and moves no KV: it waits in its lane's FIFO like
a request whose KV has landed, and once admitted (same KV reservation) its prefill runs
as a step of its own on the lane, batched with other admitted local prompts under the
token budget. The lane's running requests gain no token during that step: the
interference disaggregation exists to avoid. Its first token is at the step's end, when
it joins the running batch. A request with one output token prefilled locally still
takes a lane for that step. Decisions are counted by reason (``SimResult.prefill_decisions``).

Requests with one output token finish at prefill (remote). Phase ``"prefill"`` stops after step 2;
phase ``"decode"`` starts at step 4 with the KV present at arrival (first token = arrival).
Per-step work is O(1) plus the requests finishing: finishing steps are bucketed by index,
and context sums are kept incrementally, so no per-token loop over the batch is needed.

``run_disagg`` runs a ``_DisaggSim``: its loop handles the end of a decode step (nearly
every event) and of a prefill batch on local names, and calls a method for the rest
(arrival, batch formation, KV landed, decode admission); hot methods copy attributes into
locals first (the planner runs thousands of simulations).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from heapq import heappop, heappush

from pdserve.cluster.planning.simulator.config import DisaggPlanSpec, SimConfig
from pdserve.cluster.planning.simulator.costs import DecodeCost, PrefillCost, contended_s
from pdserve.cluster.planning.simulator.prefix_cache import PoolPrefixCaches
from pdserve.cluster.planning.simulator.result import SimResult
from pdserve.cluster.planning.simulator.window import StopRule
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.router.local_prefill import decide
from pdserve.router.policy_slo import TokenRate, predict_ttft_s

# Event kinds. An event is (time, seq, kind, instance or lane, request ids, kv_at); seq
# increases with every push, so events at one instant run in the order they were pushed.
# _LSTEP: a local prefill step on a decode lane ended; _CALL: a callback the caller
# scheduled (``_DisaggSim.call_at``; the autoscaler's ticks).
_PDONE, _PFREE, _KV, _DSTEP, _LSTEP, _CALL = 0, 1, 2, 3, 4, 5


def run_disagg(plan: DisaggPlanSpec, profile: LatencyProfile, w: Workload, cfg: SimConfig,
               phase: str = "both", stop: StopRule | None = None) -> SimResult:
    sim = _DisaggSim(plan, profile, w, cfg, phase)
    sim.run(stop)
    return sim.result(plan, phase)


class _DisaggSim:
    """The state of one run. Requests are indexed ``rid`` (their place in the workload),
    prefill instances ``p``, decode lanes ``lane``; per-index state lives in flat lists."""

    # Every field, by concern. Slots keep attribute access as fast as the local names the
    # event loop once used: with this many fields in a __dict__, CPython's shared-key fast
    # path is lost and a run took ~10% longer.
    __slots__ = (
        # the run: workload, phases, per-request results, events, round-robin cursors
        "w", "cfg", "arr", "prompt", "out", "do_prefill", "do_decode", "first", "last",
        "rejected", "admission_rejected", "lane_of", "heap", "seq", "events", "rr",
        "least_loaded", "slo_aware", "kv_aware", "stopped", "transfers",
        # conditional disaggregation: the rule, decode-side prefill cost, per-request flag
        "local_cfg", "local_on", "lpc", "is_local", "decisions",
        # prefill instances
        "pc", "pp", "pre_cap", "n_pre", "p_active", "budget", "chunked", "p_slow", "secs_per_token",
        "p_queue", "p_outstanding", "p_stage_free", "p_link_free", "p_kick", "p_done",
        "rates", "caches",
        # decode lanes
        "dc", "lane_cap", "n_lanes", "max_batch", "step_oh", "d_slow", "d_wait", "d_n",
        "d_ctx", "d_reserved", "d_steps", "d_finish", "d_busy", "d_assigned",
        "d_assigned_tok", "d_idle_at", "pre_per_unit", "unit_lanes", "all_lanes",
    )

    def __init__(self, plan: DisaggPlanSpec, profile: LatencyProfile, w: Workload,
                 cfg: SimConfig, phase: str):
        self.w, self.cfg = w, cfg
        self.arr, self.prompt, self.out = w.arrival, w.prompt, w.output
        self.do_prefill, self.do_decode = phase != "decode", phase != "prefill"
        self.least_loaded = cfg.dispatch == "least_loaded"
        self.slo_aware = cfg.dispatch == "slo_aware"
        self.kv_aware = cfg.dispatch == "kv_aware"
        self.step_oh = cfg.step_overhead_s
        n = len(self.arr)
        self.first, self.last = [math.nan] * n, [math.nan] * n
        self.rejected, self.admission_rejected = [False] * n, [False] * n
        self.lane_of = [-1] * n
        self.heap: list = []
        self.seq = itertools.count(1)
        self.events = 0
        self.stopped = False
        self.transfers = 0
        self.rr = [0, 0]  # round-robin cursors: prefill instance, decode lane
        cont = cfg.contention
        self._init_prefill(plan, profile, cont.prefill if cont is not None else 1.0)
        self._init_decode(plan, profile, cont.decode if cont is not None else 1.0)
        # The rule needs both pools: phase-isolated runs (the planner's) always disaggregate.
        self.local_cfg = cfg.local_prefill
        self.local_on = cfg.local_prefill.enabled and phase == "both"
        self.lpc = PrefillCost.of(profile.instance(plan.decode.tp, plan.decode.pp))
        self.is_local = [False] * n
        self.decisions: dict[str, int] = {}

    def _init_prefill(self, plan: DisaggPlanSpec, profile: LatencyProfile, slow: float) -> None:
        pre = profile.instance(plan.prefill.tp, plan.prefill.pp)
        self.pc, self.pp, self.pre_cap = PrefillCost.of(pre), pre.pp, pre.kv_capacity_tokens
        self.budget, self.chunked = self.cfg.prefill_token_budget, self.cfg.chunked_prefill
        self.p_slow = slow
        self.secs_per_token = profile.kv_bytes_per_token / plan.transfer_bandwidth
        self.n_pre = n_pre = plan.prefill.count
        self.p_active = list(range(n_pre))  # instances taking new prompts (``elastic.py``)
        self.p_queue = [deque() for _ in range(n_pre)]
        self.p_outstanding = [0] * n_pre  # prompt tokens assigned and not yet batched
        self.p_stage_free = [[0.0] * self.pp for _ in range(n_pre)]
        self.p_link_free = [0.0] * n_pre
        self.p_kick = [False] * n_pre  # a same-instant batch formation is scheduled
        self.p_done = [0] * len(self.arr)  # per request: prompt tokens already batched
        self.rates = [TokenRate() for _ in range(n_pre)]
        self.caches = PoolPrefixCaches(n_pre, self.pre_cap, self.w, self.kv_aware) \
            if self.cfg.prefix_caching and self.do_prefill else None

    def _init_decode(self, plan: DisaggPlanSpec, profile: LatencyProfile, slow: float) -> None:
        dec = profile.instance(plan.decode.tp, plan.decode.pp)
        self.dc, self.lane_cap, self.d_slow = DecodeCost.of(dec), dec.entry.kv_capacity_tokens, slow
        self.max_batch = self.cfg.max_decode_batch
        self.n_lanes = n_lanes = plan.decode.count * plan.decode.pp
        self.d_wait = [deque() for _ in range(n_lanes)]
        self.d_n = [0] * n_lanes  # running requests
        self.d_ctx = [0] * n_lanes  # sum of their contexts
        self.d_reserved = [0] * n_lanes  # KV tokens reserved by running requests
        self.d_steps = [0] * n_lanes
        self.d_finish: list[dict[int, list[int]]] = [{} for _ in range(n_lanes)]
        self.d_busy = [False] * n_lanes
        self.d_assigned = [0] * n_lanes  # requests dispatched here and not finished
        self.d_assigned_tok = [0] * n_lanes
        self.d_idle_at = [0.0] * n_lanes  # when the lane last ran out of requests
        # Low-affinity units: prefill instance p sends its KV only to its own unit's lanes.
        units = plan.units
        self.pre_per_unit = self.n_pre // units
        per_unit = n_lanes // units
        # Lanes taking new requests; one list shared by the single unit, so that a pool
        # resized while it runs (``elastic.py``, single unit only) changes both at once.
        self.all_lanes = list(range(n_lanes))
        self.unit_lanes = [self.all_lanes] if units == 1 else [
            range(u * per_unit, (u + 1) * per_unit) for u in range(units)]

    def run(self, stop: StopRule | None = None) -> None:
        """Run to the last event, or until ``stop`` sees too many measured misses (the
        checks cost a comparison per first token and per finished request)."""
        heap, arr, n = self.heap, self.arr, len(self.arr)
        s_lo, s_hi, max_miss = (stop.lo, stop.hi, stop.max_misses) if stop else (0, 0, n)
        ttft_s, tpot_s = (stop.ttft_s, stop.tpot_s) if stop else (math.inf, math.inf)
        oh = self.cfg.request_overhead_s if self.do_prefill else 0.0
        misses = 0
        rejected = self.rejected
        kv_landed, kick_decode, form_prefill = self._kv_landed, self._kick_decode, \
            self._form_prefill
        do_decode, pp, first, caches = self.do_decode, self.pp, self.first, self.caches
        # The end of a decode step (nearly every event) and of a prefill batch are handled
        # here, on local names; other events have a method each.
        d_steps, d_ctx, d_n, d_finish, d_busy = self.d_steps, self.d_ctx, self.d_n, \
            self.d_finish, self.d_busy
        prompt, out, last = self.prompt, self.out, self.last
        d_reserved, d_assigned, d_assigned_tok = self.d_reserved, self.d_assigned, \
            self.d_assigned_tok
        d_idle_at = self.d_idle_at
        i = events = transfers = 0
        while True:
            # Arrivals go before events at the same instant, so that simultaneous arrivals
            # can share a batch (an idle instance starts one through a same-time kick event).
            if heap and (i >= n or heap[0][0] < arr[i]):
                now, _, kind, x, payload, kv_at = heappop(heap)
                events += 1
                if kind == _DSTEP:  # every running request gained a token; free the finished
                    lane = x
                    d_steps[lane] += 1
                    d_ctx[lane] += d_n[lane]
                    done_now = d_finish[lane].pop(d_steps[lane], None)
                    if done_now:
                        for rid in done_now:
                            last[rid] = now
                            if s_lo <= rid < s_hi and first[rid] - arr[rid] + oh <= ttft_s \
                                    and now - first[rid] > tpot_s * (out[rid] - 1):
                                misses += 1
                            f = prompt[rid] + out[rid]
                            d_n[lane] -= 1
                            d_ctx[lane] -= f
                            d_reserved[lane] -= f
                            d_assigned[lane] -= 1
                            d_assigned_tok[lane] -= f
                        if not d_assigned[lane]:
                            d_idle_at[lane] = now
                    d_busy[lane] = False
                    kick_decode(lane, now)
                elif kind == _PDONE:  # first tokens; KV moves on (or is in flight)
                    for rid in payload:
                        first[rid] = now
                        if s_lo <= rid < s_hi and now - arr[rid] + oh > ttft_s:
                            misses += 1
                        if not do_decode or out[rid] == 1:
                            last[rid] = now
                    if do_decode:
                        moving = [rid for rid in payload if out[rid] > 1]
                        transfers += len(moving)
                        if moving:
                            if kv_at <= now:
                                kv_landed(moving, now)
                            else:
                                heappush(heap, (kv_at, next(self.seq), _KV, -1, moving, 0.0))
                    if caches is not None:
                        caches.finished(x, payload)
                    if pp == 1:
                        form_prefill(x, now)
                elif kind == _KV:
                    kv_landed(payload, now)
                elif kind == _LSTEP:  # first tokens of local prefills; they join the batch
                    for rid in payload:
                        if s_lo <= rid < s_hi and now - arr[rid] + oh > ttft_s:
                            misses += 1
                    self._local_done(x, payload, now)
                elif kind == _CALL:
                    payload(now)
                else:  # _PFREE: stage 0 freed, or a kick after arrivals at an idle instance
                    self.p_kick[x] = False
                    form_prefill(x, now)
            elif i < n:
                events += 1
                self._arrive(i, arr[i])
                if rejected[i] and s_lo <= i < s_hi:
                    misses += 1
                i += 1
            else:
                break
            if misses > max_miss:  # never without a stop rule: misses stay 0
                self.stopped = True
                break
        self.events = events
        self.transfers = transfers

    def result(self, plan: DisaggPlanSpec, phase: str) -> SimResult:
        label = plan.label() + ("" if phase == "both" else f" [{phase} only]")
        gpus = (plan.prefill.num_gpus if self.do_prefill else 0) + (
            plan.decode.num_gpus if self.do_decode else 0)
        return SimResult.from_run(
            label, phase, gpus, self.w, self.first, self.last, self.rejected,
            self.cfg.request_overhead_s if self.do_prefill else 0.0, self.events,
            self.do_decode, tuple(self.admission_rejected), self.stopped,
            tuple(self.caches.cached) if self.caches is not None else (),
            tuple(sorted(self.decisions.items())), self.transfers, sum(self.is_local))

    def call_at(self, t: float, fn: Callable[[float], None]) -> None:
        """Run ``fn(now)`` at virtual time ``t``, after the events already due then."""
        heappush(self.heap, (t, next(self.seq), _CALL, -1, fn, 0.0))

    def _arrive(self, rid: int, now: float) -> None:
        """Reject ``rid``, or queue it at a prefill instance (least outstanding prompt
        tokens, round robin, or lowest predicted TTFT, of its uncached part with
        ``kv_aware``, with admission control) after picking its decode lane, as pdserve's
        orchestrator reserves on decode first; or, when the local-prefill rule says so,
        queue it at its decode lane alone (admission control does not apply: its
        prediction is the prefill pool's)."""
        p_len, o_len = self.prompt[rid], self.out[rid]
        do_prefill = self.do_prefill
        needs_decode = self.do_decode and o_len > 1
        if (do_prefill and p_len > self.pre_cap) or (
                needs_decode and p_len + o_len > self.lane_cap):
            self.rejected[rid] = True
            return
        act = self.p_active
        pred = None  # the dispatch's predicted TTFT on p, when it predicts
        expected = 0  # prompt tokens the router's record expects p to hold (kv_aware)
        if not do_prefill:
            p = -1
        elif self.slo_aware:
            preds = [self._predicted_ttft(x, p_len, now) for x in act]
            j = min(range(len(act)), key=preds.__getitem__)
            p, pred = act[j], preds[j]
        elif self.kv_aware:
            p, expected, pred = self._kv_pick(rid, p_len, now)
        elif self.least_loaded:
            p = min(act, key=self.p_outstanding.__getitem__)
        else:
            p = act[self.rr[0] % len(act)]
            self.rr[0] += 1
        local = self.local_on and self._prefill_locally(rid, p, p_len, expected, pred, now)
        if pred is not None and not local:
            self.rates[p].observe(now, p_len - expected)
            limit = self.cfg.admission_ttft_s
            if limit is not None and pred > limit:
                self.rejected[rid] = self.admission_rejected[rid] = True
                return
            if self.kv_aware:
                self.caches.routed(p, rid, expected)
        if needs_decode or local:
            lane = self._pick_lane(p_len + o_len, self.unit_lanes[p // self.pre_per_unit]
                                   if p >= 0 else self.all_lanes)
            self.lane_of[rid] = lane
            self.d_assigned[lane] += 1
            self.d_assigned_tok[lane] += p_len + o_len
        if local:
            self.is_local[rid] = True
            self.d_wait[lane].append(rid)
            self._kick_decode(lane, now)
            return
        if not do_prefill:
            self.first[rid] = now
            if needs_decode:
                self.d_wait[lane].append(rid)
                self._kick_decode(lane, now)
            else:
                self.last[rid] = now
            return
        self.p_outstanding[p] += p_len
        self.p_queue[p].append(rid)
        if not self.p_kick[p] and self.p_stage_free[p][0] <= now:
            self.p_kick[p] = True
            heappush(self.heap, (now, next(self.seq), _PFREE, p, None, 0.0))

    def _prefill_locally(self, rid: int, p: int, p_len: int, expected: int,
                         pred: float | None, now: float) -> bool:
        """The router's rule for ``rid`` (module doc), its answer counted by reason."""
        cfg = self.local_cfg
        if self.kv_aware:
            uncached = p_len - expected
        elif self.caches is not None:
            uncached = p_len - self.caches.lookup(p, rid, p_len)[1]
        else:
            uncached = p_len
        remote_s = local_s = None
        if cfg.needs_profile:
            remote_s = pred if pred is not None else min(
                self._predicted_ttft(x, p_len, now) for x in self.p_active)
            local_s = self._local_s(p_len, p_len * p_len)
        d = decide(cfg, p_len, uncached, remote_s, local_s)
        self.decisions[d.reason] = self.decisions.get(d.reason, 0) + 1
        return d.local

    def _local_s(self, tokens: int, sq: int) -> float:
        """A local prefill step on a decode lane: its instance's prefill formula over the
        lane's ``pp`` stages (as a colocated lane's prefill part)."""
        return self.lpc.unpipelined_ms(tokens, sq) / 1e3 + self.step_oh

    def _pick_lane(self, f: int, lanes: Sequence[int]) -> int:
        d_assigned_tok, lane_cap = self.d_assigned_tok, self.lane_cap
        if not self.least_loaded:
            rr = self.rr
            for _ in lanes:
                lane = lanes[rr[1] % len(lanes)]
                rr[1] += 1
                if d_assigned_tok[lane] + f <= lane_cap:
                    return lane
            return lane
        d_assigned = self.d_assigned
        best, best_key = -1, None
        for lane in lanes:
            key = (d_assigned_tok[lane] + f > lane_cap, d_assigned[lane])
            if best_key is None or key < best_key:
                best, best_key = lane, key
        return best

    def _kv_pick(self, rid: int, p_len: int, now: float) -> tuple[int, int, float]:
        """(instance, tokens expected cached there, predicted TTFT) of the lowest
        prediction for the prompt's expected-uncached part; ties to the larger hit, then
        to the lower index (so with no hits anywhere this is ``slo_aware``'s choice)."""
        caches = self.caches
        best, best_key = 0, None
        for x in self.p_active:
            expected = caches.expected(x, rid, p_len)
            key = (self._predicted_ttft(x, p_len - expected, now), -expected)
            if best_key is None or key < best_key:
                best, best_key = x, key
        return best, -best_key[1], best_key[0]

    def _predicted_ttft(self, p: int, p_len: int, now: float) -> float:
        """The router's SloAware prediction (same function), from the simulator's state;
        with ``kv_aware``, queued prompts count their expected-uncached tokens."""
        prompt, p_done = self.prompt, self.p_done
        if self.kv_aware:
            left = self.caches.uncached_left
            queue = [left(r, prompt[r], p_done[r]) for r in self.p_queue[p]]
        else:
            queue = [prompt[r] - p_done[r] for r in self.p_queue[p]]
        return predict_ttft_s(self._batch_s, queue, p_len, self.budget,
                              busy_s=max(0.0, self.p_stage_free[p][-1] - now),
                              tokens_per_s=self.rates[p].rate(now)) + self.cfg.request_overhead_s

    def _batch_s(self, lens: list[int]) -> float:
        return self.pc.stage_s(sum(lens), sum(x * x for x in lens)) * self.pp + self.step_oh

    def _form_prefill(self, p: int, now: float) -> None:
        q = self.p_queue[p]
        sf = self.p_stage_free[p]
        if not q or sf[0] > now:
            return
        prompt, p_done, budget, chunked = self.prompt, self.p_done, self.budget, self.chunked
        caches = self.caches
        tokens = sq = skipped = 0
        completing = []
        while q:
            rid = q[0]
            done = p_done[rid]
            hit = None
            if caches is not None and caches.hit_blocks[rid] < 0:  # first time in a batch
                hit = caches.lookup(p, rid, prompt[rid])
                done = hit[1]
            rem = prompt[rid] - done
            if chunked:
                take = min(rem, budget - tokens)
                if take <= 0:
                    break
            else:
                if tokens and tokens + rem > budget:
                    break
                take = rem
            if hit is not None:  # it joins: its cached tokens are done
                caches.commit(rid, *hit)
                p_done[rid] = done
                skipped += done
            end = done + take
            tokens += take
            sq += end * end - done * done
            if take == rem:
                q.popleft()
                completing.append(rid)
            else:
                p_done[rid] = end
        self.p_outstanding[p] -= tokens + skipped
        dur = self.pc.stage_s(tokens, sq) + self.step_oh
        if self.p_slow != 1.0:
            dur = contended_s(dur, self.p_slow, self._decode_busy_for(now))
        t = now
        for s in range(self.pp):
            start = sf[s] if sf[s] > t else t
            t = start + dur
            sf[s] = t
        link_start = max(now, self.p_link_free[p])
        kv_at = max(t, link_start + tokens * self.secs_per_token)
        self.p_link_free[p] = kv_at
        heappush(self.heap, (t, next(self.seq), _PDONE, p, completing, kv_at))
        if self.pp > 1:
            heappush(self.heap, (sf[0], next(self.seq), _PFREE, p, None, 0.0))

    def _kv_landed(self, rids: list[int], now: float) -> None:
        d_wait, lane_of = self.d_wait, self.lane_of
        lanes = set()
        for rid in rids:
            d_wait[lane_of[rid]].append(rid)
            lanes.add(lane_of[rid])
        for lane in sorted(lanes):
            self._kick_decode(lane, now)

    def _decode_busy_for(self, now: float) -> float:
        """How long the decode pool stays busy with what it runs now: each lane until its
        longest request finishes (the simulator knows output lengths), at its current
        step time. Requests still waiting to join are left out."""
        longest = 0.0
        for lane in range(self.n_lanes):
            if self.d_n[lane]:
                steps_left = max(self.d_finish[lane]) - self.d_steps[lane]
                step = self.dc.lane_ms(self.d_ctx[lane], self.d_n[lane]) / 1e3 + self.step_oh
                longest = max(longest, steps_left * step)
        return longest

    def _kick_decode(self, lane: int, now: float) -> None:
        """Start the lane's next step unless it is running one, first admitting waiting
        requests whose final footprint fits."""
        if self.d_busy[lane]:
            return
        wq = self.d_wait[lane]
        d_n = self.d_n
        k = d_n[lane]
        max_batch = self.max_batch
        local: list[int] = []  # admitted local prefills: this lane's next step is theirs
        if wq and k < max_batch:
            prompt, out, lane_cap = self.prompt, self.out, self.lane_cap
            d_reserved, d_ctx = self.d_reserved, self.d_ctx
            reserved, ctx, fin, step = d_reserved[lane], d_ctx[lane], self.d_finish[lane], \
                self.d_steps[lane]
            is_local, budget, ltok = self.is_local, self.budget, 0
            while wq and k + len(local) < max_batch:
                rid = wq[0]
                f = prompt[rid] + out[rid]
                if reserved + f > lane_cap:
                    break
                if is_local[rid]:
                    if local and ltok + prompt[rid] > budget:
                        break
                    local.append(rid)
                    ltok += prompt[rid]
                else:
                    k += 1
                    ctx += prompt[rid] + 1
                    fin.setdefault(step + out[rid] - 1, []).append(rid)
                wq.popleft()
                reserved += f
            d_reserved[lane], d_ctx[lane], d_n[lane] = reserved, ctx, k
        if local:
            self._start_local(lane, local, now)
            return
        if k == 0:
            return
        self.d_busy[lane] = True
        dur = self.dc.lane_ms(self.d_ctx[lane], k) / 1e3 + self.step_oh
        if self.d_slow != 1.0:
            dur = contended_s(dur, self.d_slow, max(sf[-1] for sf in self.p_stage_free) - now)
        heappush(self.heap, (now + dur, next(self.seq), _DSTEP, lane, None, 0.0))

    def _start_local(self, lane: int, rids: list[int], now: float) -> None:
        """Run the admitted local prefills as the lane's next step: its running requests
        wait for it (they gain no token)."""
        prompt = self.prompt
        self.d_busy[lane] = True
        dur = self._local_s(sum(prompt[r] for r in rids), sum(prompt[r] ** 2 for r in rids))
        if self.d_slow != 1.0:
            dur = contended_s(dur, self.d_slow, max(sf[-1] for sf in self.p_stage_free) - now)
        heappush(self.heap, (now + dur, next(self.seq), _LSTEP, lane, rids, 0.0))

    def _local_done(self, lane: int, rids: list[int], now: float) -> None:
        """Local prefills ended: first tokens; each joins the running batch (a one-token
        request is done and frees its reservation)."""
        prompt, out, first, last = self.prompt, self.out, self.first, self.last
        fin, step = self.d_finish[lane], self.d_steps[lane]
        for rid in rids:
            first[rid] = now
            if out[rid] == 1:
                last[rid] = now
                f = prompt[rid] + 1
                self.d_reserved[lane] -= f
                self.d_assigned[lane] -= 1
                self.d_assigned_tok[lane] -= f
                if not self.d_assigned[lane]:
                    self.d_idle_at[lane] = now
            else:
                self.d_n[lane] += 1
                self.d_ctx[lane] += prompt[rid] + 1
                fin.setdefault(step + out[rid] - 1, []).append(rid)
        self.d_busy[lane] = False
        self._kick_decode(lane, now)
