"""Where each attempt's tokens go: the router's table of attempts in flight.

Ids: a client's request has one ``request_id``; each try at serving it is an attempt with
its own ``AttemptId`` (``attempt_id``: the request id itself for the first attempt,
``<request_id>:retry<n>`` after), which is the id the workers know the request by (their
messages' ``request_id``, the KV transfer's ``transfer_id``). A failed attempt's leftovers
(blocks still being released, late tokens from a worker that was only hung) carry the old
attempt id and so never reach the next attempt.

Lifecycle: an attempt ``open``s a ``Route`` (the request's token queue, the decode worker
it reserved on, once it has one) and ``close``s it when it ends. The decode workers'
``TokenBatch`` stream is ``dispatch``ed here: each delta goes to the route of its attempt,
and only from the decode worker that route is on. ``fail_worker`` ends every route on a
dead decode worker with a retryable error.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import NewType

from pdserve.decode_worker.messages import TokenBatch, TokenDelta

AttemptId = NewType("AttemptId", str)


def attempt_id(request_id: str, attempt: int) -> AttemptId:
    """The id workers know attempt ``attempt`` (0 = the first) of ``request_id`` by."""
    return AttemptId(request_id if attempt == 0 else f"{request_id}:retry{attempt}")


@dataclass
class Route:
    """One attempt's route: the request's token queue (shared by its attempts) and the
    decode worker the attempt's tokens may come from."""

    queue: asyncio.Queue[TokenDelta]
    decode_worker: str | None = None
    died: bool = False  # its decode worker died: the error in the queue is a death


@dataclass
class RouteTable:
    routes: dict[AttemptId, Route] = field(default_factory=dict)

    def open(self, aid: AttemptId, queue: asyncio.Queue[TokenDelta]) -> Route:
        while not queue.empty():  # what a failed attempt's worker said last
            queue.get_nowait()
        route = self.routes[aid] = Route(queue)
        return route

    def close(self, aid: AttemptId) -> None:
        self.routes.pop(aid, None)

    def dispatch(self, batch: TokenBatch, contexts: dict[str, int]) -> None:
        """Deliver one decode step's deltas; ``contexts`` (the worker's decode contexts by
        attempt) grow by the tokens delivered."""
        for delta in batch.deltas:
            route = self.routes.get(AttemptId(delta.request_id))
            if route is None or route.decode_worker != batch.worker_id:
                continue
            if delta.request_id in contexts:
                contexts[delta.request_id] += len(delta.token_ids)
            route.queue.put_nowait(delta)

    def fail_worker(self, wid: str) -> None:
        """Every attempt waiting on decode worker ``wid``'s stream gets a retryable error."""
        for aid, route in self.routes.items():
            if route.decode_worker == wid:
                route.queue.put_nowait(TokenDelta(aid, (), (), "abort",
                                                  error=f"decode worker {wid} died"))
                route.died = True
