"""Drives a steppable worker in a background thread, fed by thread-safe commands.

Lifecycle: ``start()`` launches the thread; callers (an asyncio actor, a test, a
benchmark host without Ray) ``post(fn)`` commands, which run *on the loop thread*
between steps, so the worker's state is only ever touched by one thread and needs no
locks. Each iteration drains commands, then calls ``step()`` while the worker
``has_work()``; otherwise it sleeps until a command arrives (or ``idle_tick_s`` passes,
so time-based duties such as lease expiry still run). ``stop()`` joins the thread.
``call(fn)`` posts and returns a ``concurrent.futures.Future`` with fn's result, which
asyncio code awaits with ``asyncio.wrap_future``. A worker may have an ``after_step()``:
what can wait until a step's results are handed on (``on_step``), such as its metrics and
step log, runs there, off the requests' path.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Steppable(Protocol):
    def has_work(self) -> bool: ...
    def step(self) -> Any: ...


class StepLoop:
    def __init__(self, worker: Steppable, on_step: Callable[[Any], None] | None = None,
                 idle_tick_s: float = 0.05, name: str = "pdserve-step-loop"):
        self.worker = worker
        self._on_step = on_step
        self._idle_tick_s = idle_tick_s
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopping = False
        # Optional time-based duties (e.g. expiring unclaimed KV reservations).
        self._housekeeping = getattr(worker, "housekeeping", None)
        self._after_step = getattr(worker, "after_step", None)
        self.error: BaseException | None = None

    def start(self) -> StepLoop:
        self._thread.start()
        return self

    def post(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:  # delivered to the caller, not swallowed
                fut.set_exception(exc)

        self.post(run)
        return fut

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=self._idle_tick_s) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd is None:
                return
            cmd()
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain(block=not self.worker.has_work())
                if self._stopping:
                    break
                if self._housekeeping is not None:
                    self._housekeeping()
                if self.worker.has_work():
                    result = self.worker.step()
                    if self._on_step is not None:
                        self._on_step(result)
                    if self._after_step is not None:
                        self._after_step()
        except BaseException as exc:  # a crashed loop must be visible to health checks
            self.error = exc
            log.exception("step loop crashed")
            raise
