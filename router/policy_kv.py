"""KV-aware prefill routing: prefer the worker that already holds the prompt's prefix.

``KvAware`` wraps another policy (``least_loaded`` or ``slo_aware``). For each healthy
prefill worker it looks up how many of the prompt's full blocks the worker probably holds
(``prefix_index.PrefixIndex``, the router's own record, corrected by every prefill
result), and scores the worker by what the request would cost there with those tokens
cached:

- over ``slo_aware``: the predicted TTFT (queue ahead, batching, the prompt's *uncached*
  tokens), from the latency profile, so a long queue outweighs a cache hit exactly when
  it costs more time than the hit saves;
- over ``least_loaded``: the prompt tokens the worker must compute before this request's
  first token (its queue plus the uncached part of this prompt).

The lowest score wins; equal scores go to the larger hit, then rotate. Decode ranking, and
admission (through ``predict_ttft_s``, which also counts only uncached tokens), are the
wrapped policy's. Block keys are ``engine.block_manager.hash_block`` chains over the
prompt's token ids in the prefill workers' block size (their stats say which), so a key
names the same prefix on the router and in a worker's prefix cache.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from pdserve.engine.block_manager import hash_block
from pdserve.router.policy import RoutingPolicy, RoutingRequest, WorkerLoad
from pdserve.router.prefix_index import PrefixIndex


def block_keys(token_ids: Sequence[int], block_size: int) -> tuple[bytes, ...]:
    """The chained hashes of the prompt's full blocks (what a prefix cache can reuse)."""
    keys, parent = [], None
    for i in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        keys.append(parent)
    return tuple(keys)


class KvAware(RoutingPolicy):
    name = "kv_aware"

    def __init__(self, inner: RoutingPolicy, index: PrefixIndex | None = None):
        if isinstance(inner, KvAware):
            raise ValueError("KvAware wraps a load policy, not itself")
        self.inner = inner
        self.index = index or PrefixIndex()
        self._turn = itertools.count()
        # the last request scored: (request id, its keys, cached tokens by worker)
        self._last: tuple[str, tuple[bytes, ...], dict[str, int]] | None = None

    # -- prefill ------------------------------------------------------------------------
    def _cached(self, req: RoutingRequest, loads: Sequence[WorkerLoad]) -> dict[str, int]:
        if self._last is not None and self._last[0] == req.request_id:
            return self._last[2]
        block_size = loads[0].block_size if loads else 16
        keys = block_keys(req.prompt_token_ids, block_size)
        # The last prompt token is always computed (its logits give the first token).
        cap = max(0, req.num_prompt_tokens - 1)
        cached = {w.worker_id: min(cap, self.index.match(w.worker_id, keys) * w.block_size)
                  for w in loads}
        self._last = (req.request_id, keys, cached)
        return cached

    def cached_tokens(self, req: RoutingRequest, loads: Sequence[WorkerLoad]
                      ) -> dict[str, int]:
        """The prompt tokens each of ``loads`` probably holds (never the last one); no
        side effects beyond remembering the lookup for ``rank_prefill`` of this request."""
        return dict(self._cached(req, loads))

    def _uncached(self, req: RoutingRequest, cached: int) -> RoutingRequest:
        return dataclasses.replace(req, num_prompt_tokens=req.num_prompt_tokens - cached)

    def _score(self, req: RoutingRequest, w: WorkerLoad, cached: int) -> float:
        predicted = self.inner.predict_ttft_s(self._uncached(req, cached), w)
        if predicted is not None:
            return predicted
        return w.queued_tokens + req.num_prompt_tokens - cached

    def rank_prefill(self, req, loads):
        ok = [w for w in loads if w.healthy]
        if not ok:
            return []
        cached = self._cached(req, ok)
        k = next(self._turn)
        order = sorted(range(len(ok)), key=lambda i: (
            self._score(req, ok[i], cached[ok[i].worker_id]), -cached[ok[i].worker_id],
            (i - k) % len(ok)))
        ranked = [ok[i].worker_id for i in order]
        best = ranked[0]
        self.inner.routed(best, req.num_prompt_tokens - cached[best])
        # The orchestrator sends it to the first: from now on that worker holds its blocks.
        self.index.record(best, self._last[1])
        return ranked

    def predict_ttft_s(self, req, load):
        cached = self._cached(req, [load]).get(load.worker_id)
        if cached is None:  # scored against other workers: look this one up
            cached = min(max(0, req.num_prompt_tokens - 1),
                         self.index.match(load.worker_id, self._last[1]) * load.block_size)
        return self.inner.predict_ttft_s(self._uncached(req, cached), load)

    def observe_prefill(self, req: RoutingRequest, worker_id: str, cached_tokens: int,
                        block_size: int) -> None:
        keys = (self._last[1] if self._last is not None and self._last[0] == req.request_id
                else block_keys(req.prompt_token_ids, block_size))
        self.index.observe(worker_id, keys, cached_tokens // block_size)

    def prefill_stats(self, worker_id: str, num_blocks: int) -> None:
        self.index.resize(worker_id, num_blocks)

    def forget_worker(self, worker_id: str) -> None:
        self.index.drop(worker_id)

    # -- decode -------------------------------------------------------------------------
    def rank_decode(self, req, loads):
        return self.inner.rank_decode(req, loads)
