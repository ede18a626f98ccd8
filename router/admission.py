"""Admission and load: whether a request may enter, and which workers it goes to.

The router's live view of every worker (``WorkerLoad``: what it has in flight there,
refreshed by the workers' stats) is kept here, and the routing policy ranks workers from
it. ``admit`` bounds the requests the router holds; ``pick_prefill`` applies the per-worker
queue bound and, with admission "reject", the TTFT target the policy predicts the best
worker would miss: each answers RESOURCE_EXHAUSTED at once (``Overloaded`` with a retry
hint and a ``reason`` for the metrics), rather than queueing a response that is already
late. Retries skip both: the request was admitted already. A worker that is draining
(leaving its pool, ``router/membership.py``) is never offered to the policy.
"""

from __future__ import annotations

from collections.abc import Iterable

from pdserve.router.policy import RoutingPolicy, RoutingRequest, WorkerLoad
from pdserve.router.reliability import ReliabilityConfig
from pdserve.router.status import NoWorkerAvailable, Overloaded

ADMISSION_MODES = ("reject", "best_effort")


def open_loads(loads: Iterable[WorkerLoad]) -> list[WorkerLoad]:
    """The workers that may take new requests: those not draining (whether a worker is
    alive stays the policy's test)."""
    return [w for w in loads if not w.draining]


def overloaded(message: str, retry_after_s: float, reason: str) -> Overloaded:
    err = Overloaded(message, retry_after_s=retry_after_s)
    err.reason = reason
    return err


class Admission:
    def __init__(self, policy: RoutingPolicy, prefills: Iterable[str], decodes: Iterable[str],
                 mode: str, units: dict[str, int], reliability: ReliabilityConfig):
        """``units`` maps worker ids to units: a request's prefill worker is then chosen
        among those of its decode worker's unit (low node-affinity plans keep KV in a node)."""
        if mode not in ADMISSION_MODES:
            raise ValueError(f"admission must be one of {ADMISSION_MODES}, got {mode!r}")
        self.policy = policy
        self.mode = mode
        self.units = units
        self.reliability = reliability
        self.prefill_load = {w: WorkerLoad(w) for w in prefills}
        self.decode_load = {w: WorkerLoad(w) for w in decodes}
        self.rejected = 0

    def admit(self, in_flight: int) -> None:
        if in_flight >= self.reliability.max_in_flight:
            raise overloaded(f"the router already holds {in_flight} requests", 1.0, "queue_full")

    def rank_decode(self, routing: RoutingRequest) -> list[str]:
        ranked = self.policy.rank_decode(routing, open_loads(self.decode_load.values()))
        if not ranked:
            raise NoWorkerAvailable("no healthy decode worker")
        return ranked

    def decode_room_likely(self, routing: RoutingRequest) -> bool:
        """Whether a decode worker is likely to take this prompt's reservation: it had
        free blocks for twice the prompt at its last heartbeat, has refused no reservation
        since, and holds fewer requests from this router than it takes. Then the prompt may
        go to prefill before its reservation is made. When decode is full, reserving first
        keeps a request that will be refused from costing a prefill (and the router a
        prefill call and its abort)."""
        return any(w.healthy and not w.refused
                   and not w.seats_full
                   and w.free_blocks >= 2 * -(-routing.num_prompt_tokens // w.block_size)
                   for w in open_loads(self.decode_load.values()))

    def pick_prefill(self, routing: RoutingRequest, unit: int | None = None,
                     admit: bool = True) -> str:
        """The policy's best prefill worker (within ``unit`` if given); with ``admit``,
        the queue bound and the TTFT target first (see the module doc)."""
        loads = [w for w in open_loads(self.prefill_load.values())
                 if unit is None or self.units.get(w.worker_id) == unit]
        ranked = self.policy.rank_prefill(routing, loads)
        if not ranked:
            raise NoWorkerAvailable("no healthy prefill worker")
        if not admit:
            return ranked[0]
        cap = self.reliability.max_queued_per_prefill
        if all(self.prefill_load[w].in_flight >= cap for w in ranked):
            self.rejected += 1
            raise overloaded(f"every prefill queue holds {cap} requests", 1.0, "queue_full")
        best = next(w for w in ranked if self.prefill_load[w].in_flight < cap)
        predicted = self.policy.predict_ttft_s(routing, self.prefill_load[best])
        if (self.mode == "reject" and predicted is not None
                and routing.ttft_slo_s is not None and predicted > routing.ttft_slo_s):
            self.rejected += 1
            raise overloaded(f"predicted TTFT {predicted:.3f}s exceeds the target "
                             f"{routing.ttft_slo_s:.3f}s", predicted - routing.ttft_slo_s,
                             "ttft_slo")
        return best
