"""Run one function on every rank of a local tensor-parallel group, for tests.

``run_ranks(fn, size, *args)`` starts ``size`` processes from a fork server that has
already imported torch and the engine (so a rank starts in well under a second instead of
re-importing them), joins them into a gloo group on a free loopback port, calls
``fn(group, *args)`` on each (``device="cuda"``: rank ``r`` on GPU ``r``, NCCL) and returns every rank's result, rank 0 first. A rank that
raises, dies or outlives ``timeout_s`` fails the call at once and the others are killed:
a broken rank fails its test, it never hangs the run. Results travel pickled by value
(numpy, not torch tensors, whose shared-memory handles die with the rank).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

PRELOAD = ["torch", "transformers.models.auto.configuration_auto", "pdserve.engine.loader",
           "pdserve.engine.parallel.group", "tests.tp_scenario"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, size, rank, port, args, results, collective_timeout_s, device) -> None:
    from pdserve.engine.parallel.group import TPGroup, TPGroupConfig

    try:
        group = TPGroup.join(TPGroupConfig(
            size, rank, f"tcp://127.0.0.1:{port}", timeout_s=collective_timeout_s,
            device=f"cuda:{rank}" if device == "cuda" else "cpu"))
        try:
            results.put((rank, True, fn(group, *args)))
        finally:
            group.close()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _check_alive(procs, got: dict[int, Any], deadline: float, timeout_s: float) -> None:
    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got]
    if dead:
        raise RuntimeError(f"rank(s) {dead} died without a result "
                           f"(exit codes {[procs[r].exitcode for r in dead]})")
    if time.monotonic() > deadline:
        missing = sorted(set(range(len(procs))) - set(got))
        raise TimeoutError(f"ranks {missing} gave no result within {timeout_s} s")


def run_ranks(fn: Callable[..., Any], size: int, *args: Any, timeout_s: float = 120.0,
              collective_timeout_s: float = 60.0, preload: tuple[str, ...] = (),
              device: str = "cpu") -> list[Any]:
    """``fn`` (importable by name) on ``size`` ranks; their results by rank. ``device``
    "cuda" puts rank ``r`` on GPU ``r`` (NCCL); "cpu" is gloo."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOAD, *preload])
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(fn, size, r, port, args, results, collective_timeout_s, device))
             for r in range(size)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < size:
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue.Empty:
                _check_alive(procs, got, deadline, timeout_s)
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {size} failed:\n{payload}")
            got[rank] = payload
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [got[r] for r in range(size)]
