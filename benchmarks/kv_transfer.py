"""Bandwidth of the CPU KV transfer backends against a plain memory copy, in one run.

What is measured
----------------
Moving one request's KV cache, every layer, from a prefill worker into blocks a decode
worker reserved. The shape is Llama-3.2-1B's (16 layers, 8 KV heads, head_dim 64, bf16:
32 KiB per token; block_size 16), for prompts of 1k tokens (32 MiB) and 8k tokens
(256 MiB). Destination blocks are a fresh random sample of a decode cache twice the
request's size each repetition (scattered: the worst case for a paged cache).

* ``memcpy``: ``dst.copy_(src)`` of two flat bf16 tensors of the same byte count.
* ``index_copy_``: ``cache[layer].index_copy_(1, idx, kv)`` for every layer: torch's
  own scatter of the same blocks, what the naive backend would do.
* ``inprocess``: the in-process backend (the reference: ``begin``, 16 x ``send_layer``,
  ``finish``, all in this process).
* ``shm``: the decode cache lives in a shared-memory segment owned by the receiver in
  THIS process; the sender runs in a spawned child, attached to the segment, and times
  its own ``begin .. finish`` (each ``send_layer`` copies synchronously, so ``finish``
  returning is delivery).
* ``tcp``: receiver (listening on 127.0.0.1, its connection thread scattering into the
  cache) in THIS process; sender in a spawned child. Timed from the child's ``begin`` to
  the moment this process's ``receiver.wait`` sees DONE (all bytes received and written),
  both read from ``time.perf_counter`` (CLOCK_MONOTONIC, one clock for every process on
  the host; recorded in the JSON).
* ``shm+sample``, ``shm+full``, ``tcp+full``: the same transfers with the end-to-end KV
  checksum on (``kv_transfer/checksum.py``): the sender hashes what it ships, inline in
  ``send_layer``. Every other transfer case runs with checksums off.
* ``verify:sample``, ``verify:full``: the decode side's half of the checksum, recomputing
  the digest over the request's blocks of the receiver's cache (``checksum_blocks``),
  this process. The checksum's cost per request is the sender's extra time plus this.

The sender's per-layer K/V tensors are made before timing, as a prefill produces them
(one [2, n_blocks, 16, 8, 64] tensor per layer); gathering them from a prefill cache is
not part of the transfer. Bandwidth = KV bytes / seconds (GB = 1e9 bytes). Each case is
warmed up once (first touch of the pages, the child's segment attach and TCP connect),
then the repetitions are interleaved (every case and size per repetition, in a rotating
order) so a drifting machine load hits all cases alike; medians are reported with the
ratio to the memcpy median of the same size. Received blocks are checked against the
source after every repetition (outside the timing). All processes use the same torch
thread count (``--threads``, default 1: on a small shared host a second intra-op
thread mostly adds scheduling noise; the copies here are memory-bound either way).

Acceptance goal: ``shm`` reaches at least half of the memcpy bandwidth.

Run
---
    python benchmarks/kv_transfer.py                # writes benchmarks/results/kv_transfer.*
    python benchmarks/kv_transfer.py --quick        # small sizes, 3 reps, temp dir
    python benchmarks/kv_transfer.py --reps 15 --out-dir /tmp/kv

Results: ``<out-dir>/kv_transfer.json`` (host, versions, per-rep seconds and GB/s,
medians, ratios) and ``<out-dir>/kv_transfer.md`` (the table). Progress goes to stderr.

The transfers themselves are in ``kv_transfer_bench.py``, the report in
``kv_transfer_report.py``; this file is the command line and the interleaved repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

from pdserve.benchmarks.kv_transfer_bench import (
    BLOCK,
    CASE_TIMING,
    CASES,
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    Bench,
)
from pdserve.benchmarks.kv_transfer_report import (
    checksum_cost,
    host_info,
    summarize,
    write_markdown,
)
from pdserve.cluster.cli.progress import bar, note

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
SIZES, QUICK_SIZES = (1024, 8192), (128, 512)


def log(msg: str) -> None:
    note(f"[kv_transfer] {msg}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reps", type=int, default=9, help="timed repetitions per case and size")
    p.add_argument("--out-dir", type=Path, default=None,
                   help=f"where results go (default {DEFAULT_OUT_DIR}; --quick: a temp dir)")
    p.add_argument("--quick", action="store_true", help="small sizes, 3 reps (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def measure(bench: Bench, sizes: tuple[int, ...], reps: int,
            rng: random.Random) -> dict[tuple[str, int], list[float]]:
    """Seconds per (case, size), one list entry per repetition. One warm-up repetition
    first (not recorded); every repetition runs every size and case, in a rotating order."""
    samples: dict[tuple[str, int], list[float]] = {(c, n): [] for c in CASES for n in sizes}
    for rep in bar(range(-1, reps), desc=f"[kv_transfer] warm-up + {reps} reps", unit="rep"):
        order = CASES[rep % len(CASES):] + CASES[:rep % len(CASES)]
        for tokens in sizes:
            dst_ids = rng.sample(range(bench.num_blocks), tokens // BLOCK)
            for case in order:
                seconds = bench.run(case, tokens, dst_ids)
                if rep >= 0:
                    samples[(case, tokens)].append(seconds)
    return samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    reps = 3 if args.quick and args.reps == 9 else args.reps
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="kv_transfer-")) if args.quick
                               else DEFAULT_OUT_DIR)
    torch.set_num_threads(args.threads)
    host = host_info(args.threads)
    rng = random.Random(args.seed)
    log(f"sizes {sizes} tokens, {reps} reps, {args.threads} thread(s); starting senders")
    bench = Bench(sizes, args.threads)
    try:
        samples = measure(bench, sizes, reps, rng)
    finally:
        bench.close()
    results = summarize(samples, sizes)
    host["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = {
        "host": host,
        "config": {"sizes": list(sizes), "reps": reps, "layers": LAYERS, "kv_heads": KV_HEADS,
                   "head_dim": HEAD_DIM, "block_size": BLOCK, "dtype": "bfloat16",
                   "decode_cache_blocks": bench.num_blocks, "seed": args.seed,
                   "timing": {c: CASE_TIMING[c] for c in CASES}},
        "results": results,
        "acceptance": {"shm_at_least_half_memcpy": {
            str(r["tokens"]): r["ratio_to_memcpy"] >= 0.5
            for r in results if r["case"] == "shm"}},
    }
    report.update(checksum_cost(results, sizes))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kv_transfer.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(out_dir / "kv_transfer.md", report)
    print((out_dir / "kv_transfer.md").read_text())
    log(f"results in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
