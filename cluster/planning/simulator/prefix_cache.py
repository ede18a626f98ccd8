"""Prefix caches of a simulated prefill pool: what each instance holds, and what the router thinks.

Two records per prefill instance, both LRUs of chained block keys (a Mooncake trace's
``hash_ids``: equal keys = equal prompt prefixes up to that block):

- the *true* cache: what the instance really holds. Its capacity is the instance's KV
  capacity in blocks (``kv_capacity_tokens // block_size``): a prefill instance ships each
  prompt's KV to decode and keeps the blocks only as cache, so nearly all of its KV is
  cache. When a batch is formed, each new request's leading blocks found here are not
  computed (at most ``prompt - 1`` tokens: the last token is always computed, as the
  engine needs its logits); when the batch ends, its prompts' full blocks are recorded.
  Requests in the same batch do not share blocks they are computing.
- the router's estimate (``router.prefix_index.PrefixIndex``, the very class the router
  uses): updated when a request is routed (``record``) and corrected when its prefill
  reports its true hit (``observe``). Only ``kv_aware`` dispatch keeps it.

``WorkerPrefixes`` serves as the true cache too: it is exactly an LRU of keys bounded in
blocks, so the instance and the router's view of it evict by the same rule and differ
only in what they learn and when.
"""

from __future__ import annotations

from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.router.prefix_index import PrefixIndex, WorkerPrefixes


class PoolPrefixCaches:
    """Per-instance true caches, the router's estimate and per-request hit bookkeeping."""

    __slots__ = ("bs", "true", "index", "names", "keys", "hit_blocks", "cached", "estimated")

    def __init__(self, instances: int, capacity_tokens: int, w: Workload, estimate: bool):
        self.bs = bs = w.block_size
        cap = max(1, capacity_tokens // bs)
        self.true = [WorkerPrefixes(cap) for _ in range(instances)]
        self.index = PrefixIndex(cap) if estimate else None
        self.names = [f"prefill-{p}" for p in range(instances)]
        n = len(w)
        self.keys: tuple[tuple[int, ...], ...] = w.prefix or ((),) * n
        self.hit_blocks = [-1] * n  # true leading blocks found at batch formation; -1 = not yet
        self.cached = [0] * n  # prompt tokens not computed
        self.estimated = [0] * n  # prompt tokens the router expected cached when routing

    def lookup(self, p: int, rid: int, prompt_len: int) -> tuple[int, int]:
        """(leading blocks instance ``p`` holds, tokens that spares) for ``rid`` now."""
        blocks = self.true[p].match(self.keys[rid])
        return blocks, min(blocks * self.bs, prompt_len - 1)

    def commit(self, rid: int, blocks: int, tokens: int) -> None:
        """``rid`` joined a batch with that hit."""
        self.hit_blocks[rid], self.cached[rid] = blocks, tokens

    def expected(self, p: int, rid: int, prompt_len: int) -> int:
        """Tokens of ``rid`` the router's record says instance ``p`` holds."""
        blocks = self.index.match(self.names[p], self.keys[rid])
        return min(blocks * self.bs, prompt_len - 1)

    def routed(self, p: int, rid: int, expected_tokens: int) -> None:
        """The router sent ``rid`` to ``p``: it will hold the prompt's blocks."""
        self.estimated[rid] = expected_tokens
        self.index.record(self.names[p], self.keys[rid])

    def uncached_left(self, rid: int, prompt_len: int, done: int) -> int:
        """Tokens of a queued request the router expects still to be computed: its true
        remainder once it has started, else the prompt less the expected hit."""
        return prompt_len - (done if self.hit_blocks[rid] >= 0 else self.estimated[rid])

    def finished(self, p: int, rids: list[int]) -> None:
        """A batch ended on ``p``: its prompts' blocks are cached; the router learns each
        true hit (and forgets what it wrongly expected)."""
        true, index, name = self.true[p], self.index, self.names[p]
        for rid in rids:
            keys = self.keys[rid]
            if keys:
                true.record(keys)
                if index is not None:
                    index.observe(name, keys, self.hit_blocks[rid])
