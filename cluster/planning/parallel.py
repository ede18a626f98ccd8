"""Independent goodput searches in worker processes, merged into one evaluator's cache.

The planner's whole-system verifications (and the exhaustive search) are independent
bisections; on a multi-core host they run in a ``ProcessPoolExecutor`` whose workers
each hold an ``Evaluator`` over the same workload, windows and SLO (sent once, at
start-up). Results come back with their simulation and request counts and land in the
parent's cache under their simulation key, so later lookups are free. Jobs already cached,
or equivalent to another job (same key), are not searched again.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

from pdserve.cluster.planning.simulator.evaluator import Candidate, Evaluator, sim_key
from pdserve.cluster.planning.simulator.goodput import GoodputResult

Job = tuple[Candidate, float | None, float | None]  # candidate, lo and hi rate hints


def evaluate_many(ev: Evaluator, jobs: list[Job], workers: int = 1) -> None:
    """Search every new job's goodput into ``ev.cache``, in ``workers`` processes when
    more than one job is new."""
    todo: dict[tuple, Job] = {}
    for job in jobs:
        key = sim_key(job[0].spec(), "both")
        if key not in ev.cache:
            todo.setdefault(key, job)
    if workers <= 1 or len(todo) <= 1:
        for cand, lo, hi in todo.values():
            ev.evaluate(cand, lo, hi)
        return
    args = (ev.profile, ev.workload, ev.slo, ev.cfg, ev.tol, ev.windows)
    with ProcessPoolExecutor(min(workers, len(todo)), initializer=_init_worker,
                             initargs=args) as pool:
        results = list(pool.map(_worker_goodput, todo.values()))
    for key, (res, reqs) in zip(todo, results, strict=True):
        ev.cache[key] = res
        ev.num_sims += res.num_sims
        ev.requests_simulated += reqs


_WORKER: Evaluator | None = None


def _init_worker(profile, workload, slo, cfg, tol, windows) -> None:
    global _WORKER
    _WORKER = Evaluator(profile, workload, slo, cfg, tol, windows)


def _worker_goodput(job: Job) -> tuple[GoodputResult, int]:
    cand, lo, hi = job
    before = _WORKER.requests_simulated
    res = _WORKER.evaluate(cand, lo, hi).goodput
    return res, _WORKER.requests_simulated - before
