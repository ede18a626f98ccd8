"""Can the Ray cluster hold the workers we are about to launch? Say so at once, never hang.

Contract:

- ``Demand`` is what one pool (or one placement group) asks for: ``count`` units, each
  needing ``per_unit`` resources (CPU, GPU, custom) on a single node.
- ``check_fits(demands, nodes, available)`` is pure: ``nodes`` are ``ray.nodes()`` entries
  (``Alive``, ``Resources``), ``available`` is ``ray.available_resources()`` (default: the
  alive nodes' totals). It raises ``PlacementError`` (a ``ValueError``, printed by the CLI
  as one line) only when placement is certainly impossible now: one unit of a demand fits
  on no alive node, or the demands together ask for more of a resource than the cluster has
  free. It names the pool, what it asks for and what the cluster has. Passing does not
  promise placement (fragmentation across nodes, label selectors); ``wait_ready`` covers
  that.
- ``wait_until_placeable(demands, timeout_s)`` retries ``check_fits`` on the live cluster
  until it passes or ``timeout_s`` is up (autoscaling clusters and KubeRay pods may add
  nodes after the driver starts), then raises the last error.
- ``wait_ready(workers, ...)`` waits for every worker's ``ready()`` (placed and model
  loaded), at most ``ready_timeout_s``; then it raises ``PlacementError`` listing the
  workers still pending, which of them Ray has not placed on any node, what the pools
  asked for and what the cluster has. Workers still unplaced after ``placement_timeout_s``
  are logged (not fatal: a worker process may just be slow to start). A worker whose
  constructor raised makes its error propagate unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PLACEMENT_TIMEOUT_S = 10.0
DEFAULT_READY_TIMEOUT_S = 600.0
_EPS = 1e-6  # Ray keeps resources to 1e-4; this absorbs float sums of fractional GPUs

Nodes = Sequence[Mapping[str, Any]]
ClusterView = Callable[[], tuple[Nodes, Mapping[str, float]]]


class PlacementError(ValueError):
    """The cluster cannot hold (or did not place) the workers being launched."""


@dataclass(frozen=True)
class Demand:
    """``count`` units named ``name``, each needing ``per_unit`` on one node."""

    name: str  # "decode pool", "placement group 0 (prefill-0, decode-0)"
    count: int
    per_unit: tuple[tuple[str, float], ...]
    unit: str = "worker"

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("a demand's count must be >= 0")
        if any(v < 0 for _, v in self.per_unit):
            raise ValueError("resource amounts must be >= 0")

    @classmethod
    def of_pool(cls, name: str, pool: Any) -> Demand:
        """A launcher ``PoolSpec`` (count, num_cpus, num_gpus, resources, tp): a worker of
        tp ranks needs tp times a rank's resources on one node."""
        tp = getattr(pool, "tp", 1)
        per = {"CPU": pool.num_cpus * tp, "GPU": pool.num_gpus * tp}
        for key, value in pool.resources:
            per[key] = per.get(key, 0.0) + value * tp
        return cls(f"{name} pool", pool.count, _positive(per))

    @property
    def needs(self) -> dict[str, float]:
        return dict(self.per_unit)

    def describe(self) -> str:
        plural = "s" if self.count != 1 else ""
        return f"{self.count} {self.unit}{plural} x {_fmt_dict(self.needs)}"


def check_fits(demands: Iterable[Demand], nodes: Nodes,
               available: Mapping[str, float] | None = None) -> None:
    demands = [d for d in demands if d.count > 0]
    alive = [dict(n.get("Resources") or {}) for n in nodes if n.get("Alive", n.get("alive"))]
    total = _sum(alive)
    free = dict(total) if available is None else dict(available)
    keys = sorted({k for d in demands for k in d.needs}, key=_key_order)
    for d in demands:
        if not any(_fits(d.needs, node) for node in alive):
            raise PlacementError(
                f"cannot place the {d.name}: it asks for {d.describe()}, and no node can hold "
                f"one; {_fmt_cluster(alive, total, free, keys)}")
    asked: dict[str, float] = {}
    for d in demands:
        for key, value in d.needs.items():
            asked[key] = asked.get(key, 0.0) + d.count * value
    short = {k: v - free.get(k, 0.0) for k, v in asked.items() if v > free.get(k, 0.0) + _EPS}
    if short:
        users = [d for d in demands if any(d.needs.get(k, 0.0) > 0 for k in short)]
        missing = ", ".join(f"{k} {_num(short[k])}" for k in sorted(short, key=_key_order))
        in_all = ", ".join(f"{k} {_num(asked[k])}" for k in sorted(short, key=_key_order))
        if len(users) == 1:
            head = f"cannot place the {users[0].name}: it asks for {users[0].describe()}"
        elif len(users) <= 4:
            head = (f"cannot place the {_and([d.name for d in users])} together: "
                    + " + ".join(f"{d.name} {d.describe()}" for d in users))
        else:
            head = f"cannot place these {len(users)} {users[0].unit}s' demands together"
        raise PlacementError(
            f"{head} = {in_all}, {missing} more than the cluster has free; "
            f"{_fmt_cluster(alive, total, free, keys)}")


def cluster_view() -> tuple[Nodes, Mapping[str, float]]:
    """The live Ray cluster, as ``check_fits`` reads it."""
    import ray

    return ray.nodes(), ray.available_resources()


def describe_cluster(demands: Iterable[Demand] = (), view: ClusterView = cluster_view) -> str:
    nodes, available = view()
    alive = [dict(n.get("Resources") or {}) for n in nodes if n.get("Alive", n.get("alive"))]
    keys = sorted({k for d in demands for k in d.needs} | {"CPU", "GPU"}, key=_key_order)
    return _fmt_cluster(alive, _sum(alive), dict(available), keys)


def wait_until_placeable(demands: Sequence[Demand], timeout_s: float,
                         view: ClusterView = cluster_view, poll_s: float = 0.5,
                         clock: Callable[[], float] = time.monotonic,
                         sleep: Callable[[float], None] = time.sleep) -> None:
    deadline = clock() + timeout_s
    waited = False
    while True:
        try:
            check_fits(demands, *view())
            return
        except PlacementError as exc:
            if clock() >= deadline:
                if waited:
                    raise PlacementError(f"{exc} (after waiting {timeout_s:g} s)") from None
                raise
            if not waited:
                log.warning("%s; waiting up to %g s for the cluster to grow", exc, timeout_s)
                waited = True
        sleep(poll_s)


def wait_ready(workers: Sequence[tuple[str, Any]], ready_timeout_s: float,
               placement_timeout_s: float, demands: Sequence[Demand] = (),
               view: ClusterView = cluster_view, poll_s: float = 1.0) -> None:
    """Wait for ``ready()`` of every ``(worker id, actor handle)``; see the module doc."""
    import ray

    refs = {h.ready.remote(): (wid, h) for wid, h in workers}
    pending = set(refs)
    start = time.monotonic()
    warned = False
    while pending:
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll_s)
        ray.get(done)  # a worker that failed to start raises its own error here
        pending.difference_update(done)
        if not pending:
            return
        elapsed = time.monotonic() - start
        if elapsed < placement_timeout_s or (warned and elapsed < ready_timeout_s):
            continue
        placed = {refs[r][0]: _placed(refs[r][1]) for r in pending}
        unplaced = [w for w in placed if placed[w] is False]
        status = "; ".join(
            f"{label}: {', '.join(sorted(ws, key=_worker_order))}"
            for label, ws in (("not placed on any node yet", unplaced),
                              ("placed, still loading", [w for w in placed if placed[w]]),
                              ("pending", [w for w in placed if placed[w] is None]))
            if ws)
        if elapsed >= ready_timeout_s:
            raise PlacementError(
                f"{len(pending)} worker(s) not ready after {elapsed:.0f} s ({status}); "
                f"{_asks(demands)}{describe_cluster(demands, view)}")
        if unplaced:
            # Not fatal yet: a worker process may still be starting, or other work may still
            # be giving resources back.
            log.warning("%s after %.0f s; %s%s", status, elapsed, _asks(demands),
                        describe_cluster(demands, view))
        warned = True


def _placed(handle: Any) -> bool | None:
    """Whether Ray has started the actor's process on a node (None: cannot tell).

    Ray's public API does not say whether an actor still in its constructor has a node;
    its GCS actor table does (a process id once placed). Best effort: on any surprise we
    fall back to the ready timeout alone.
    """
    try:
        from ray._private import state

        info = state.actors(actor_id=handle._actor_id.hex())
        if info.get("State") == "ALIVE":
            return True
        return bool(info.get("Pid"))
    except Exception:  # private API: never let it break a launch
        return None


def _asks(demands: Sequence[Demand]) -> str:
    if not demands:
        return ""
    return "asked for " + ", ".join(f"{d.name}: {d.describe()}" for d in demands) + "; "


def _positive(per: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple((k, float(v)) for k, v in sorted(per.items(), key=lambda kv: _key_order(kv[0]))
                 if v > 0)


def _fits(needs: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(node.get(k, 0.0) + _EPS >= v for k, v in needs.items())


def _sum(nodes: Iterable[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _fmt_cluster(alive: list[dict[str, float]], total: Mapping[str, float],
                 free: Mapping[str, float], keys: Sequence[str]) -> str:
    keys = list(keys) or ["CPU", "GPU"]
    parts = []
    for k in keys:
        t, f = total.get(k, 0.0), free.get(k, 0.0)
        parts.append(f"{k} {_num(t)}" + (f" ({_num(f)} free)" if abs(t - f) > _EPS else ""))
    n = len(alive)
    where = f"{n} node" + ("s" if n != 1 else "")
    if 1 < n <= 4:
        where += ": " + ", ".join(_fmt_dict({k: node.get(k, 0.0) for k in keys}) for node in alive)
    return f"the cluster has {', '.join(parts)} on {where}"


def _and(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def _fmt_dict(d: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in d.items()) + "}"


def _num(v: float) -> str:
    return f"{v:.4g}"


def _key_order(key: str) -> tuple[int, str]:
    return ({"CPU": 0, "GPU": 1}.get(key, 2), key)


def _worker_order(wid: str) -> tuple[str, int]:
    role, _, idx = wid.rpartition("-")
    return (role, int(idx)) if idx.isdigit() else (wid, 0)
