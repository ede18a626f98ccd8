"""SLO-aware routing from a latency profile (DistServe-style prediction at the router).

Prefill: the predicted TTFT of a request on a worker is the time to prefill everything
queued there before it plus its own batch, batching the queue the way the worker does
(consecutive prompts up to the token budget per step), using the profile's
``a + b*sum(l) + c*sum(l^2)``. Under load the worker also packs prompts that arrive
after this one, before its batch starts, into the same batch while the budget allows;
``predict_ttft_s`` counts them from the worker's recent prompt-token arrival rate
(``TokenRate``), which is what keeps the prediction honest near saturation. The
simulator uses the same function, so both make the same admission decisions. The worker with the lowest prediction wins; the
orchestrator rejects at once (RESOURCE_EXHAUSTED) when even the best prediction misses
the TTFT target, instead of queueing a request that is bound to miss.

Decode: among workers with KV headroom for the prompt plus its expected output, pick the
lowest predicted step time with the request added (``a + b*sum(ctx+1) + c*B``), i.e. the
best predicted TPOT; workers predicted over the TPOT target go last.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from pdserve.engine.latency_profile import InstanceModel, LatencyProfile
from pdserve.router.policy import RoutingPolicy, RoutingRequest, WorkerLoad


class TokenRate:
    """Exponentially decaying rate of prompt tokens sent to one worker (tokens/s)."""

    def __init__(self, tau_s: float = 2.0):
        self.tau_s = tau_s
        self._v = 0.0
        self._t: float | None = None

    def _decay(self, now: float) -> None:
        if self._t is not None:
            self._v *= math.exp(-(now - self._t) / self.tau_s)
        self._t = now

    def observe(self, now: float, tokens: int) -> None:
        self._decay(now)
        self._v += tokens

    def rate(self, now: float) -> float:
        self._decay(now)
        return self._v / self.tau_s


def predict_ttft_s(prefill_s: Callable[[list[int]], float], queue: Sequence[int], own: int,
                   budget: int, busy_s: float = 0.0, tokens_per_s: float = 0.0) -> float:
    """Time until ``own``'s prompt is prefilled on a worker that is busy for ``busy_s`` more
    seconds and has ``queue`` (prompt lengths, FIFO) waiting, batching under ``budget``."""
    total, batch, used = busy_s, [], 0
    for n in (*queue, own):
        if batch and used + n > budget:
            total += prefill_s(batch)
            batch, used = [], 0
        batch.append(n)
        used += n
    # Prompts arriving until this batch starts join it while the budget has room.
    room = budget - used
    extra = min(room, tokens_per_s * total)
    mean = max(1, round(sum(batch) / len(batch)))
    while extra >= 1:
        piece = int(min(extra, mean))
        batch.append(piece)
        extra -= piece
    return total + prefill_s(batch)


class SloAware(RoutingPolicy):
    name = "slo_aware"

    def __init__(self, profile: LatencyProfile, prefill_token_budget: int = 2048,
                 tp: int = 1, pp: int = 1, rate_tau_s: float = 2.0):
        self.model: InstanceModel = profile.instance(tp, pp)
        self.budget = prefill_token_budget
        self.rate_tau_s = rate_tau_s
        self._rates: dict[str, TokenRate] = {}
        self.clock: Callable[[], float] = time.monotonic

    # -- prefill ------------------------------------------------------------------------
    def _rate(self, worker_id: str) -> TokenRate:
        rate = self._rates.get(worker_id)
        if rate is None:
            rate = self._rates[worker_id] = TokenRate(self.rate_tau_s)
        return rate

    def predict_ttft_s(self, req: RoutingRequest, load: WorkerLoad) -> float:
        # The router's queue view includes the batch in flight, so busy time is 0 here.
        return predict_ttft_s(self.model.prefill_s, list(load.prefill_queue.values()),
                              req.num_prompt_tokens, self.budget,
                              tokens_per_s=self._rate(load.worker_id).rate(self.clock()))

    def rank_prefill(self, req, loads):
        ok = [w for w in loads if w.healthy]
        ranked = [w.worker_id for w in sorted(ok, key=lambda w: self.predict_ttft_s(req, w))]
        if ranked:  # the orchestrator sends it to the first (or rejects it)
            self.routed(ranked[0], req.num_prompt_tokens)
        return ranked

    def routed(self, worker_id: str, prompt_tokens: int) -> None:
        self._rate(worker_id).observe(self.clock(), prompt_tokens)

    # -- decode -------------------------------------------------------------------------
    def predict_tpot_s(self, req: RoutingRequest, load: WorkerLoad) -> float:
        ctx = [*load.decode_contexts.values(), req.num_prompt_tokens]
        return self.model.decode_s(ctx)

    def _headroom(self, req: RoutingRequest, load: WorkerLoad) -> bool:
        need = -(-(req.num_prompt_tokens + req.max_tokens) // load.block_size)
        return load.free_blocks >= need or load.total_blocks <= 1  # unknown yet: allow

    def rank_decode(self, req, loads):
        ok = [w for w in loads if w.healthy]

        def key(w: WorkerLoad):
            tpot = self.predict_tpot_s(req, w)
            over = req.tpot_slo_s is not None and tpot > req.tpot_slo_s
            return (not self._headroom(req, w), over, tpot)

        return [w.worker_id for w in sorted(ok, key=key)]
