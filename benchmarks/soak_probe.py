"""What the soak samples (benchmarks/soak.py): memory, threads and open fds of each
process from /proc, and the KV block and queue counts of every worker and the router.

``Sampler`` is a daemon thread that appends one ``take_sample`` row every ``interval_s``
seconds until ``stop`` is set; a failed sample is recorded in ``errors`` and does not end
the soak. Rows: ``t_s`` (seconds since ``t0``), ``procs`` (name -> ``proc_status`` or
None once the process is gone), ``prefill`` and ``decode`` (worker id -> counts),
``router_in_flight``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import ray


def actor_pid(_actor) -> int:
    """Run through ``__ray_call__`` on an actor: the pid of its process."""
    return os.getpid()


def proc_status(pid: int) -> dict[str, float]:
    """RSS and anonymous RSS (MiB), threads and open fds of a local process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return {"rss_mib": int(fields["VmRSS"][0]) / 1024, "anon_mib": int(fields["RssAnon"][0]) / 1024,
            "threads": int(fields["Threads"][0]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def take_sample(cluster, pids: dict[str, int], t0: float) -> dict:
    row: dict = {"t_s": time.time() - t0, "procs": {}, "prefill": {}, "decode": {}}
    for name, pid in pids.items():
        try:
            row["procs"][name] = proc_status(pid)
        except (OSError, KeyError):
            row["procs"][name] = None  # the process is gone
    for wid, h in cluster.prefills:
        s = ray.get(h.stats.remote(), timeout=30)
        row["prefill"][wid] = {"used": s.num_blocks - s.num_free_blocks, "free": s.num_free_blocks,
                               "running": s.num_running, "waiting": s.num_waiting,
                               "completed": s.completed, "failed": s.failed}
    for wid, h in cluster.decodes:
        s = ray.get(h.stats.remote(), timeout=30)
        row["decode"][wid] = {"used": s.num_used_blocks, "free": s.num_free_blocks,
                              "reserved": s.num_reserved, "running": s.num_running,
                              "waiting": s.num_waiting}
    row["router_in_flight"] = ray.get(cluster.router.in_flight.remote(), timeout=30)
    return row


class Sampler(threading.Thread):
    def __init__(self, cluster, pids: dict[str, int], t0: float, interval_s: float):
        super().__init__(name="soak-sampler", daemon=True)
        self.cluster, self.pids, self.t0, self.interval_s = cluster, pids, t0, interval_s
        self.samples: list[dict] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.samples.append(take_sample(self.cluster, self.pids, self.t0))
            except Exception as exc:  # noqa: BLE001 - a slow stats call must not end the soak
                self.errors.append(f"{time.time() - self.t0:.1f} s: {exc!r}")
            if self.stop.wait(self.interval_s):
                return
