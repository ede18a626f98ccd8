"""Choosing a prefill and a decode worker for a request (a plug-in).

A policy ranks candidates from the router's live view of each worker (``WorkerLoad``:
what the router itself has in flight there, refreshed by the workers' stats). The
orchestrator tries decode workers in rank order until one reserves the KV, and sends
the prompt to the first-ranked prefill worker. A policy may also predict a request's
TTFT on a worker (``predict_ttft_s``): the orchestrator uses that for admission
control. ``LeastLoaded`` is the default; ``SloAware`` (``policy_slo.py``) uses a
latency profile; ``RoundRobin`` is the simple fake used in tests and for comparison.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class WorkerLoad:
    """The router's view of one worker. Mutable: updated as requests come and go."""

    worker_id: str
    healthy: bool = True
    in_flight: int = 0  # requests this router has assigned and not yet seen finish
    queued_tokens: int = 0  # prefill: prompt tokens assigned and not yet prefilled
    free_blocks: int = 0  # decode: from the last stats refresh
    total_blocks: int = 1
    block_size: int = 16
    max_seqs: int = 0  # decode: requests it holds at most (0: unknown), from its stats
    refused: bool = False  # decode: it refused a reservation since the last stats refresh
    # prefill: prompt lengths assigned and not yet returned, in arrival order
    prefill_queue: dict[str, int] = field(default_factory=dict)
    # decode: current context length of each request running there
    decode_contexts: dict[str, int] = field(default_factory=dict)
    # leaving the pool (router/membership.py): takes no new request, finishes what it holds
    draining: bool = False

    @property
    def seats_full(self) -> bool:
        """Decode: this router alone holds as many requests here as the worker takes
        (``max_seqs``), so it would refuse another reservation."""
        return bool(self.max_seqs) and self.in_flight >= self.max_seqs


@dataclass(frozen=True)
class RoutingRequest:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    # the prompt itself (KV-aware routing keys its prefix blocks); () when not needed
    prompt_token_ids: tuple[int, ...] = field(default=(), repr=False)


class RoutingPolicy(ABC):
    name: str = ""

    @abstractmethod
    def rank_prefill(self, req: RoutingRequest, loads: Sequence[WorkerLoad]) -> list[str]:
        """Healthy prefill worker ids, best first."""

    @abstractmethod
    def rank_decode(self, req: RoutingRequest, loads: Sequence[WorkerLoad]) -> list[str]:
        """Healthy decode worker ids, best first."""

    def predict_ttft_s(self, req: RoutingRequest, load: WorkerLoad) -> float | None:
        """Predicted TTFT if ``req`` went to this prefill worker now (None: cannot predict)."""
        return None

    # -- what a policy may learn from (all optional) ------------------------------------
    def routed(self, worker_id: str, prompt_tokens: int) -> None:
        """A prompt of ``prompt_tokens`` tokens to compute was sent to ``worker_id`` (by a
        policy that wraps this one)."""
        return  # (nothing to learn for a policy that keeps no such state)

    def observe_prefill(self, req: RoutingRequest, worker_id: str, cached_tokens: int,
                        block_size: int) -> None:
        """``req``'s prefill on ``worker_id`` found ``cached_tokens`` in its prefix cache."""
        return  # (nothing to learn for a policy that keeps no such state)

    def prefill_stats(self, worker_id: str, num_blocks: int) -> None:
        """A prefill worker's KV cache holds ``num_blocks`` blocks (from its stats)."""
        return  # (nothing to learn for a policy that keeps no such state)

    def forget_worker(self, worker_id: str) -> None:
        """The worker died or restarted: whatever its caches held is gone."""
        return  # (nothing to learn for a policy that keeps no such state)


class LeastLoaded(RoutingPolicy):
    """Prefill: fewest queued prompt tokens. Decode: fewest in-flight requests, then most
    free KV blocks. Ties rotate, so light load still spreads over every worker instead of
    always landing on the first."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._turns = {"prefill": itertools.count(), "decode": itertools.count()}

    def _tiebreak(self, pool: str, n: int):
        k = next(self._turns[pool])
        return lambda i: (i - k) % max(n, 1)

    def rank_prefill(self, req, loads):
        ok = [w for w in loads if w.healthy]
        tb = self._tiebreak("prefill", len(ok))
        order = sorted(range(len(ok)), key=lambda i: (ok[i].queued_tokens, ok[i].in_flight, tb(i)))
        return [ok[i].worker_id for i in order]

    def rank_decode(self, req, loads):
        ok = [w for w in loads if w.healthy]
        tb = self._tiebreak("decode", len(ok))
        order = sorted(range(len(ok)), key=lambda i: (ok[i].in_flight, tb(i)))
        return [ok[i].worker_id for i in order]


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._p = itertools.count()
        self._d = itertools.count()

    @staticmethod
    def _rotate(ids: list[str], k: int) -> list[str]:
        if not ids:
            return ids
        k %= len(ids)
        return ids[k:] + ids[:k]

    def rank_prefill(self, req, loads):
        return self._rotate([w.worker_id for w in loads if w.healthy], next(self._p))

    def rank_decode(self, req, loads):
        return self._rotate([w.worker_id for w in loads if w.healthy], next(self._d))
