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
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pdserve.cluster.planning.profiler.hostinfo import cpu_model
from pdserve.engine.kv_cache import KVCacheSpec
from pdserve.kv_transfer.base import KVDestination, KVEndpoint, TransferState
from pdserve.kv_transfer.checksum import checksum_blocks
from pdserve.kv_transfer.registry import create_receiver, create_sender

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
LAYERS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE = 16, 8, 64, 16, torch.bfloat16  # Llama-3.2-1B
SIZES, QUICK_SIZES = (1024, 8192), (128, 512)
CASES = ("memcpy", "index_copy_", "inprocess", "shm", "shm+sample", "shm+full", "tcp",
         "tcp+full", "verify:sample", "verify:full")
CHILD_BACKENDS = ("shm", "tcp")
CHECKSUM_BACKENDS = ("shm", "tcp")  # each has "<backend>+full" (and maybe "+sample") cases


def log(msg: str) -> None:
    print(f"[kv_transfer] {msg}", file=sys.stderr, flush=True)


def spec_for(num_blocks: int) -> KVCacheSpec:
    return KVCacheSpec(LAYERS, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, DTYPE)


def make_layers(tokens: int) -> list[torch.Tensor]:
    """One prefill's K/V per layer, [2, n_blocks, P, H, D]; same values in every process."""
    g = torch.Generator().manual_seed(tokens)
    shape = (2, tokens // BLOCK, BLOCK, KV_HEADS, HEAD_DIM)
    return [torch.randn(shape, generator=g).to(DTYPE) for _ in range(LAYERS)]


# -- the sender child ---------------------------------------------------------------------

def sender_child(backend: str, conn, threads: int) -> None:
    """Spawned: sends a transfer per command, answers (t_begin, t_finished)."""
    torch.set_num_threads(threads)
    sender = create_sender(backend)
    layers: dict[int, list[torch.Tensor]] = {}
    try:
        while (cmd := conn.recv()) is not None:
            endpoint, tid, dst_ids, tokens, checksum = cmd
            kv = layers.get(tokens) or layers.setdefault(tokens, make_layers(tokens))
            dest = KVDestination(tid, endpoint, tuple(dst_ids), tokens)
            t0 = time.perf_counter()
            t = sender.begin(dest, endpoint.spec.to_spec(), checksum)
            for layer, x in enumerate(kv):
                sender.send_layer(t, layer, x)
            sender.finish(t, timeout=120)
            conn.send((t0, time.perf_counter()))
    finally:
        sender.close()


class Child:
    def __init__(self, backend: str, threads: int):
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=sender_child, args=(backend, child_conn, threads),
                                daemon=True)
        self.proc.start()

    def send(self, endpoint: KVEndpoint, tid: str, dst_ids: list[int], tokens: int,
             checksum: str) -> None:
        self.conn.send((endpoint, tid, dst_ids, tokens, checksum))

    def result(self, timeout: float = 300) -> tuple[float, float]:
        if not self.conn.poll(timeout):
            raise RuntimeError("sender child did not answer")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)


# -- one measurement -----------------------------------------------------------------------

class Bench:
    def __init__(self, sizes: tuple[int, ...], threads: int):
        self.sizes = sizes
        self.num_blocks = 2 * max(sizes) // BLOCK
        spec = spec_for(self.num_blocks)
        self.layers = {n: make_layers(n) for n in sizes}
        self.flat = {n: (torch.randn(n * spec.tokens_to_bytes(1) // 2).to(DTYPE),
                         torch.empty(n * spec.tokens_to_bytes(1) // 2, dtype=DTYPE))
                     for n in sizes}
        self.local = torch.zeros(spec.shape, dtype=DTYPE)  # index_copy_ baseline target
        self.receivers = {b: create_receiver(b, spec, f"bench-{b}") for b in
                          ("inprocess", *CHILD_BACKENDS)}
        self.inprocess_sender = create_sender("inprocess")
        self.children = {b: Child(b, threads) for b in CHILD_BACKENDS}
        self._ids = 0

    def close(self) -> None:
        for child in self.children.values():
            child.close()
        self.inprocess_sender.close()
        for receiver, _ in self.receivers.values():
            receiver.close()

    def run(self, case: str, tokens: int, dst_ids: list[int]) -> float:
        layers = self.layers[tokens]
        if case == "memcpy":
            src, dst = self.flat[tokens]
            t0 = time.perf_counter()
            dst.copy_(src)
            return time.perf_counter() - t0
        if case == "index_copy_":
            idx = torch.tensor(dst_ids)
            t0 = time.perf_counter()
            for layer, kv in enumerate(layers):
                self.local[layer].index_copy_(1, idx, kv)
            return time.perf_counter() - t0
        if case.startswith("verify:"):
            _, cache = self.receivers["shm"]
            t0 = time.perf_counter()
            checksum_blocks(cache.data, dst_ids, case.split(":")[1])
            return time.perf_counter() - t0
        backend, _, checksum = case.partition("+")
        receiver, cache = self.receivers[backend]
        self._ids += 1
        tid = f"{case}-{tokens}-{self._ids}"
        receiver.expect(tid, dst_ids)
        if backend == "inprocess":
            dest = KVDestination(tid, receiver.endpoint, tuple(dst_ids), tokens)
            t0 = time.perf_counter()
            t = self.inprocess_sender.begin(dest, cache.spec)
            for layer, kv in enumerate(layers):
                self.inprocess_sender.send_layer(t, layer, kv)
            self.inprocess_sender.finish(t)
            seconds = time.perf_counter() - t0
            receiver.mark_delivered(tid)
        else:
            child = self.children[backend]
            child.send(receiver.endpoint, tid, dst_ids, tokens, checksum or "off")
            if backend == "tcp":
                state = receiver.wait(tid, 300)
                t_done = time.perf_counter()
                t0, _ = child.result()
            else:
                t0, t_done = child.result()
                receiver.mark_delivered(tid)
                state = receiver.state(tid)
            if state is not TransferState.DONE:
                raise RuntimeError(f"{tid} ended {state}")
            seconds = t_done - t0
        self._check(cache.data, dst_ids, layers, tid)
        # Back to zeros, so no later check can pass on stale data. Done here rather than
        # just before the next transfer, which would find those lines hot in this core's
        # cache (an advantage the in-process case would get and the others would not).
        cache.data[:, :, dst_ids] = 0
        receiver.forget(tid)
        return seconds

    @staticmethod
    def _check(data: torch.Tensor, dst_ids: list[int], layers, tid: str) -> None:
        idx = torch.tensor(dst_ids)
        for layer, kv in enumerate(layers):
            if not torch.equal(data[layer].index_select(1, idx), kv):
                raise RuntimeError(f"{tid}: layer {layer} landed wrong")


# -- report --------------------------------------------------------------------------------

def host_info(threads: int) -> dict:
    clock = time.get_clock_info("perf_counter")
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": threads,
        "perf_counter": clock.implementation,
        "dev_shm_bytes": shm.f_blocks * shm.f_frsize if shm else None,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }




def summarize(samples: dict[tuple[str, int], list[float]], sizes) -> list[dict]:
    rows = []
    for tokens in sizes:
        nbytes = tokens * spec_for(1).tokens_to_bytes(1)
        memcpy = nbytes / statistics.median(samples[("memcpy", tokens)]) / 1e9
        for case in CASES:
            secs = samples[(case, tokens)]
            gbps = [nbytes / s / 1e9 for s in secs]
            median = nbytes / statistics.median(secs) / 1e9
            rows.append({"case": case, "tokens": tokens, "bytes": nbytes, "seconds": secs,
                         "gbps": gbps, "median_seconds": statistics.median(secs),
                         "median_gbps": median, "ratio_to_memcpy": median / memcpy})
    return rows


def checksum_cost(results: list[dict], sizes) -> dict:
    """Per backend and size: transfer ms with the checksum off/sample/full, and the total
    (sender + decode verify) relative to the transfer with it off."""
    ms = {(r["case"], r["tokens"]): r["median_seconds"] * 1e3 for r in results}
    verify = {str(n): {m: ms[(f"verify:{m}", n)] for m in ("sample", "full")} for n in sizes}
    rows = []
    for off_case in CHECKSUM_BACKENDS:
        for n in sizes:
            off = ms[(off_case, n)]
            sample = ms.get((f"{off_case}+sample", n))
            full = ms[(f"{off_case}+full", n)]
            rows.append({
                "backend": off_case, "tokens": n, "off_ms": off, "sample_ms": sample,
                "full_ms": full,
                "sample_total_ratio": (sample + verify[str(n)]["sample"]) / off
                if sample is not None else None,
                "full_total_ratio": (full + verify[str(n)]["full"]) / off})
    return {"checksum_cost": rows, "verify_ms": verify}


def write_markdown(path: Path, report: dict) -> None:
    h, rows, sizes = report["host"], report["results"], report["config"]["sizes"]
    head = " | ".join(f"{n} tok ({n * 32 // 1024} MiB) GB/s | x memcpy" for n in sizes)
    lines = [
        "# KV transfer bandwidth (CPU backends vs. memcpy)",
        "",
        f"{h['date_utc']} · torch {h['torch']} · {h['cpu_model']} ({h['cpu_count']} CPUs) · "
        f"{h['torch_threads']} torch thread(s) · median of {report['config']['reps']} "
        "interleaved reps",
        "",
        "Llama-3.2-1B KV (16 layers, 8 KV heads, head_dim 64, bf16 = 32 KiB/token), "
        "block_size 16, scattered destination blocks. shm/tcp: sender in a spawned "
        "process, receiver in the benchmark process.",
        "",
        f"| case | {head} |",
        "|---|" + "---:|---:|" * len(sizes),
    ]
    for case in CASES:
        cells = []
        for n in sizes:
            r = next(r for r in rows if r["case"] == case and r["tokens"] == n)
            cells.append(f"{r['median_gbps']:.2f} | {r['ratio_to_memcpy']:.2f}")
        lines.append(f"| {case} | {' | '.join(cells)} |")
    ok = report["acceptance"]["shm_at_least_half_memcpy"]
    lines += ["", "Acceptance (shm >= 0.5 x memcpy): " + ", ".join(
        f"{n} tokens {'PASS' if v else 'FAIL'}" for n, v in ok.items())]
    lines += ["", "## What the end-to-end KV checksum costs per request (same run)", "",
              "Sender: its transfer with the checksum on, against the same transfer with it "
              "off; decode: recomputing the digest over the request's blocks before "
              "admitting it. Milliseconds (median).", "",
              "| transfer | tokens | off ms | sample ms | full ms | sample + verify, "
              "x off | full + verify, x off |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["checksum_cost"]:
        sample = f"{row['sample_ms']:.2f}" if row["sample_ms"] is not None else "-"
        sx = f"{row['sample_total_ratio']:.2f}" if row["sample_ms"] is not None else "-"
        lines.append(f"| {row['backend']} | {row['tokens']} | {row['off_ms']:.2f} | {sample} | "
                     f"{row['full_ms']:.2f} | {sx} | {row['full_total_ratio']:.2f} |")
    lines += ["", "Decode-side verify alone: " + "; ".join(
        f"{n} tokens sample {report['verify_ms'][str(n)]['sample']:.2f} ms, full "
        f"{report['verify_ms'][str(n)]['full']:.2f} ms" for n in sizes) + ".",
        "", "Generated by `python benchmarks/kv_transfer.py`; per-rep numbers in "
        "`kv_transfer.json`.", ""]
    path.write_text("\n".join(lines))


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
    samples: dict[tuple[str, int], list[float]] = {(c, n): [] for c in CASES for n in sizes}
    try:
        for rep in range(-1, reps):  # rep -1 is the warm-up
            order = CASES[rep % len(CASES):] + CASES[:rep % len(CASES)]
            for tokens in sizes:
                dst_ids = rng.sample(range(bench.num_blocks), tokens // BLOCK)
                for case in order:
                    seconds = bench.run(case, tokens, dst_ids)
                    if rep >= 0:
                        samples[(case, tokens)].append(seconds)
            log(f"rep {rep + 1}/{reps} done" if rep >= 0 else "warm-up done")
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


CASE_TIMING = {
    "memcpy": "dst.copy_(src), same bytes, this process",
    "index_copy_": "per-layer cache[layer].index_copy_(1, idx, kv), this process",
    "inprocess": "begin..finish of the inprocess backend, this process",
    "shm": "child sender's begin..finish (synchronous copies into the shared segment)",
    "tcp": "child sender's begin .. receiver.wait()==DONE in this process",
    "shm+sample": "as shm, sender checksum in sample mode",
    "shm+full": "as shm, sender checksum in full mode",
    "tcp+full": "as tcp, sender checksum in full mode",
    "verify:sample": "checksum_blocks(cache, dst blocks, 'sample'), this process",
    "verify:full": "checksum_blocks(cache, dst blocks, 'full'), this process",
}

if __name__ == "__main__":
    sys.exit(main())
