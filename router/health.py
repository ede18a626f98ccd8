"""Worker liveness as the router sees it: heartbeats, death, and rejoining.

Contract:

* ``WorkerHealth`` holds one ``Liveness`` per worker id. ``mark_dead(wid, why)`` is
  idempotent: it flips the worker's ``WorkerLoad.healthy`` off, sets its ``dead`` event
  (which every request waiting on that worker races against) and calls the ``on_death``
  callback once per death; ``death(wid)`` is a future that the next death completes.
  ``mark_alive(wid)`` undoes it with a fresh ``dead`` event and
  sets ``alive``, which a decode stream consumer waits on to resubscribe.
* ``watch(wid, ping)`` is one heartbeat loop per worker: ``ping`` (the worker's
  ``stats`` call) must answer within ``timeout_s``; a ``WorkerGone``, a timeout or any
  other error marks the worker dead (Ray reports a killed actor at once; a hung one
  only misses heartbeats), and the first answer after that marks it alive again: a
  worker restarted by Ray (``max_restarts``) rejoins its pool with no operator action.
  An answer from another incarnation than the last one seen (``stats.incarnation``) is a
  restart the heartbeat did not catch (it died and came back between two beats): the
  worker is marked dead and at once alive again, so every request that depended on its
  previous life is retried rather than left waiting on state the new process never had.
  ``on_stats`` receives each answer (the router keeps KV headroom from it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pdserve.router.policy import WorkerLoad

log = logging.getLogger(__name__)


@dataclass
class Liveness:
    load: WorkerLoad
    dead: asyncio.Event = field(default_factory=asyncio.Event)
    alive: asyncio.Event = field(default_factory=asyncio.Event)
    deaths: int = 0
    incarnation: str = ""  # the worker's, as its last heartbeat said
    # futures of ``WorkerHealth.death``: done at the next death (cheaper than a task each)
    mourners: set[asyncio.Future] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.alive.set()


class WorkerHealth:
    def __init__(self, loads: dict[str, WorkerLoad], interval_s: float, timeout_s: float,
                 on_death: Callable[[str, str], None] | None = None,
                 on_revival: Callable[[str], None] | None = None):
        if not (interval_s > 0 and timeout_s > 0):
            raise ValueError("heartbeat interval and timeout must be > 0")
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_death = on_death
        self.on_revival = on_revival
        self.workers = {wid: Liveness(load) for wid, load in loads.items()}

    def add(self, wid: str, load: WorkerLoad) -> None:
        """A worker that joined a running router (``Orchestrator.attach``)."""
        if wid in self.workers:
            raise ValueError(f"worker {wid!r} is already known")
        self.workers[wid] = Liveness(load)

    def remove(self, wid: str) -> None:
        """A worker that left; whoever still waits on its death hears it now."""
        w = self.workers.pop(wid)
        for fut in list(w.mourners):
            if not fut.done():
                fut.set_result(None)

    def __getitem__(self, wid: str) -> Liveness:
        return self.workers[wid]

    def is_alive(self, wid: str) -> bool:
        return self.workers[wid].load.healthy

    def death(self, wid: str) -> asyncio.Future:
        """A future done when ``wid`` is next declared dead (already done if it is dead
        now); cancel it once it no longer matters. What a call to ``wid`` races."""
        w = self.workers[wid]
        fut = asyncio.get_running_loop().create_future()
        if w.dead.is_set():
            fut.set_result(None)
        else:
            w.mourners.add(fut)
            fut.add_done_callback(w.mourners.discard)
        return fut

    def mark_dead(self, wid: str, why: str) -> None:
        w = self.workers[wid]
        if w.dead.is_set():
            return
        w.deaths += 1
        w.load.healthy = False
        w.alive.clear()
        w.dead.set()
        for fut in list(w.mourners):
            if not fut.done():
                fut.set_result(None)
        log.error("worker %s is down (%s)", wid, why)
        if self.on_death is not None:
            self.on_death(wid, why)

    def mark_alive(self, wid: str) -> None:
        w = self.workers[wid]
        if not w.dead.is_set():
            return
        w.dead = asyncio.Event()
        w.load.healthy = True
        w.alive.set()
        log.warning("worker %s is back", wid)
        if self.on_revival is not None:
            self.on_revival(wid)

    def note_incarnation(self, wid: str, incarnation: str) -> None:
        """A heartbeat answered from ``incarnation``; a new one means the worker restarted."""
        w = self.workers[wid]
        if incarnation and w.incarnation and incarnation != w.incarnation:
            self.mark_dead(wid, f"restarted (incarnation {w.incarnation[:8]} -> "
                                f"{incarnation[:8]})")
        if incarnation:
            w.incarnation = incarnation

    async def watch(self, wid: str, ping: Callable[[], Awaitable[object]],
                    on_stats: Callable[[str, object], None] | None = None) -> None:
        while True:
            try:
                stats = await asyncio.wait_for(ping(), self.timeout_s)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                self.mark_dead(wid, f"no heartbeat for {self.timeout_s:g}s")
            except Exception as exc:  # WorkerGone, or a worker that errors on stats
                self.mark_dead(wid, f"{type(exc).__name__}: {exc}"[:200])
            else:
                self.note_incarnation(wid, getattr(stats, "incarnation", ""))
                self.mark_alive(wid)
                if on_stats is not None:
                    on_stats(wid, stats)
            await asyncio.sleep(self.interval_s)
