"""SLO-aware routing from a latency profile (DistServe-style prediction at the router).

Prefill: the predicted TTFT of a request on a worker is the time to prefill everything
queued there before it plus its own prefill, batching the queue the way the worker does
(consecutive prompts up to the token budget per step), using the profile's
``a + b*sum(l) + c*sum(l^2)``. The worker with the lowest prediction wins; the
orchestrator rejects at once (RESOURCE_EXHAUSTED) when even the best prediction misses
the TTFT target, instead of queueing a request that is bound to miss.

Decode: among workers with KV headroom for the prompt plus its expected output, pick the
lowest predicted step time with the request added (``a + b*sum(ctx+1) + c*B``), i.e. the
best predicted TPOT; workers predicted over the TPOT target go last.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.cluster.profile import InstanceModel, LatencyProfile
from pdserve.router.policy import RoutingPolicy, RoutingRequest, WorkerLoad


class SloAware(RoutingPolicy):
    name = "slo_aware"

    def __init__(self, profile: LatencyProfile, prefill_token_budget: int = 2048,
                 tp: int = 1, pp: int = 1):
        self.model: InstanceModel = profile.instance(tp, pp)
        self.budget = prefill_token_budget

    # -- prefill ------------------------------------------------------------------------
    def _drain_s(self, lens: Sequence[int]) -> float:
        """Time to prefill ``lens`` in order, batched greedily under the token budget."""
        total, batch, used = 0.0, [], 0
        for n in lens:
            if batch and used + n > self.budget:
                total += self.model.prefill_s(batch)
                batch, used = [], 0
            batch.append(n)
            used += n
        if batch:
            total += self.model.prefill_s(batch)
        return total

    def predict_ttft_s(self, req: RoutingRequest, load: WorkerLoad) -> float:
        return self._drain_s([*load.prefill_queue.values(), req.num_prompt_tokens])

    def rank_prefill(self, req, loads):
        ok = [w for w in loads if w.healthy]
        return [w.worker_id for w in sorted(ok, key=lambda w: self.predict_ttft_s(req, w))]

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
