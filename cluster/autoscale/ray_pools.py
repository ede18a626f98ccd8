"""A running Ray cluster's prefill and decode pools, resized through its router.

``resize(pool, target)`` adds workers (created as ``launch`` creates them, waited for
until their model is loaded, then handed to the router, ``RouterActor.add_worker``) or
removes them: the router drains a worker first (``RouterActor.drain_worker``: no new
requests, and it returns only once the worker holds no request and no KV block), and only
then is the actor shut down and killed. A drain that times out leaves the worker in
service; a worker that fails to start is killed. The newest workers leave first (they
hold the least prefix cache and were added for the load that is now gone); a worker
still starting when its pool shrinks leaves as soon as it has joined.

Counts (``count``) are what the autoscaler reasons about: workers in service plus those
starting, minus those draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any

from pdserve.cluster.launch.launcher import ClusterSpec, create_worker

log = logging.getLogger(__name__)

POOLS = ("prefill", "decode")


class RayPools:
    def __init__(self, spec: ClusterSpec, router: Any, prefills: list[tuple[str, Any]],
                 decodes: list[tuple[str, Any]], threads: int, ready_timeout_s: float = 300.0,
                 drain_timeout_s: float = 600.0):
        self.spec, self.router, self.threads = spec, router, threads
        self.ready_timeout_s, self.drain_timeout_s = ready_timeout_s, drain_timeout_s
        self.members: dict[str, dict[str, Any]] = {"prefill": dict(prefills),
                                                   "decode": dict(decodes)}
        self._next = {p: 1 + max((_index(w) for w in self.members[p]), default=-1)
                      for p in POOLS}
        self._starting = dict.fromkeys(POOLS, 0)
        # starting workers no longer wanted (the pool shrank while they loaded): each
        # leaves as soon as it has joined
        self._unwanted = dict.fromkeys(POOLS, 0)
        self._leaving: set[str] = set()
        self.events: list[dict] = []  # what happened to each worker, when (monotonic)

    def count(self, pool: str) -> int:
        return (len(self.members[pool]) + self._starting[pool] - self._unwanted[pool]
                - sum(1 for w in self.members[pool] if w in self._leaving))

    async def resize(self, pool: str, target: int) -> None:
        have = self.count(pool)
        if target > have:
            await asyncio.gather(*(self._add(pool) for _ in range(target - have)),
                                 return_exceptions=True)
        elif target < have:
            # Workers still starting go first (they serve nobody yet), then the newest.
            cancel = min(have - target, self._starting[pool] - self._unwanted[pool])
            self._unwanted[pool] += cancel
            staying = [w for w in self.members[pool] if w not in self._leaving]
            victims = sorted(staying, key=_index)[len(staying) - (have - target - cancel):]
            await asyncio.gather(*(self._remove(pool, w) for w in victims),
                                 return_exceptions=True)

    def _event(self, pool: str, worker: str, what: str) -> None:
        self.events.append({"t": time.monotonic(), "pool": pool, "worker": worker, "event": what})

    async def _add(self, pool: str) -> None:
        index = self._next[pool]
        self._next[pool] += 1
        self._starting[pool] += 1
        wid, handle = create_worker(self.spec, pool, index, self.threads)
        self._event(pool, wid, "starting")
        try:
            await asyncio.wait_for(handle.ready.remote(), self.ready_timeout_s)
            await self.router.add_worker.remote(pool, wid, handle)
        except BaseException as exc:
            log.error("new %s worker %s did not start: %s", pool, wid, exc)
            self._event(pool, wid, "failed")
            _kill(handle)
            if self._unwanted[pool] > 0:  # it was to leave anyway
                self._unwanted[pool] -= 1
            raise
        finally:
            self._starting[pool] -= 1
        self.members[pool][wid] = handle
        self._event(pool, wid, "joined")
        if self._unwanted[pool] > 0:
            self._unwanted[pool] -= 1
            await self._remove(pool, wid)

    async def _remove(self, pool: str, wid: str) -> None:
        handle = self.members[pool][wid]
        self._leaving.add(wid)
        self._event(pool, wid, "draining")
        try:
            await self.router.drain_worker.remote(wid, self.drain_timeout_s)
        except BaseException as exc:  # DrainTimeout: it stays in service
            log.warning("%s worker %s stays: %s", pool, wid, exc)
            self._event(pool, wid, "stayed")
            raise
        finally:
            self._leaving.discard(wid)
        del self.members[pool][wid]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(handle.shutdown.remote(), 30)
        _kill(handle)
        self._event(pool, wid, "left")

    def workers(self) -> dict[str, list[tuple[str, Any]]]:
        return {p: list(self.members[p].items()) for p in POOLS}


def _index(worker_id: str) -> int:
    m = re.search(r"(\d+)$", worker_id)
    return int(m.group(1)) if m else 0


def _kill(handle: Any) -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.kill(handle)
