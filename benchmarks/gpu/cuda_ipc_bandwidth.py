"""CUDA IPC KV transfer between two processes vs device copy bandwidth, Llama-3-8B KV.

    python benchmarks/gpu/cuda_ipc_bandwidth.py --out DIR              # 1k and 8k tokens
    python benchmarks/gpu/cuda_ipc_bandwidth.py --out DIR --dry-run    # CPU: shm backend

The transfer is measured with ``cluster.profiler.measure_transfer_bandwidth`` (what
``pdserve profile`` uses): the decode side's ``CudaIpcReceiver`` owns a cache in this
process; a spawned process opens its IPC handle, and for each repetition ships a
``tokens``-token KV (all 32 layers, [2, blocks, 16, 8, 128] bf16 per layer, already on
its GPU) into freshly sampled destination blocks with ``send_layer`` per layer and
``finish``; time = ``begin`` to ``finish`` returning, in the sender (the copies are done
when it returns). Bytes = the KV payload (128 KiB per token for this shape).

Ceilings, same run: a 2 GiB ``copy_`` (``copy_bytes_per_s``, bytes copied per second:
a transfer reads and writes each byte once, as a copy does), and the same per-layer
``index_copy_`` scatter done inside one process (what the sender's kernels cost with no
IPC and no cross-process synchronisation). Goal: transfer >= 60% of the copy bandwidth.

``--profile`` adds where the sender's time goes (``ipc_profile.py``): per transfer size,
``begin`` / sends / ``finish`` on the sender's clock for ``send_layer`` per layer and for
one stacked ``send_layers``, the copy launches and stream waits, and (CUDA) a
``torch.profiler`` table of host ops and device kernels of one transfer each way.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from gpu_common import common_args, copy_bandwidth, event_times, log, pick_device, write_result

TAG = "cuda_ipc_bandwidth"
GOAL = 0.60


def kv_spec(dry_run: bool):
    from pdserve.engine.kv_cache import KVCacheSpec

    if dry_run:
        return KVCacheSpec(num_layers=2, num_blocks=1, block_size=16, num_kv_heads=2,
                           head_dim=64, dtype=torch.bfloat16)
    return KVCacheSpec(num_layers=32, num_blocks=1, block_size=16, num_kv_heads=8, head_dim=128,
                       dtype=torch.bfloat16)


def local_scatter(spec, tokens: int, device: torch.device) -> dict:
    """The sender's copies (one scatter per layer) with no second process involved, device
    time: the writer ``cuda_ipc`` uses (wide-word ``index_copy_``), the generic
    ``BlockWriter`` (``index_copy_`` on the cache's own dtype), and a plain contiguous
    ``copy_`` of the same bytes per layer (no scatter at all)."""
    from dataclasses import replace

    from pdserve.kv_transfer.block_copy import BlockWriter

    n = -(-tokens // spec.block_size)
    dst_spec = replace(spec, num_blocks=2 * n)
    cache = torch.zeros(dst_spec.shape, dtype=spec.dtype, device=device)
    writers = {"generic_index_copy": BlockWriter(cache)}
    if device.type == "cuda":
        from pdserve.kv_transfer.cuda_ipc import _WideWriter

        writers["cuda_ipc_writer"] = _WideWriter(cache)
    payload = [torch.randn(2, n, spec.block_size, spec.num_kv_heads, spec.head_dim,
                           device=device).to(spec.dtype) for _ in range(spec.num_layers)]
    nbytes = spec.tokens_to_bytes(n * spec.block_size)
    out = {"tokens": tokens, "bytes": nbytes}
    for name, writer in writers.items():
        idx = writer.index(list(range(0, 2 * n, 2)))

        def run(writer=writer, idx=idx) -> None:
            for layer, kv in enumerate(payload):
                writer.write(layer, idx, kv)

        t = statistics.median(event_times(run, device, warmup=2, reps=10))
        out[name] = {"median_s": t, "bytes_per_s": nbytes / t,
                     "dtype": str(getattr(writer, "dtype", spec.dtype)).removeprefix("torch.")}
    dst = torch.empty_like(payload[0])

    def plain() -> None:
        for kv in payload:
            dst.copy_(kv)

    t = statistics.median(event_times(plain, device, warmup=2, reps=10))
    out["plain_copy_per_layer"] = {"median_s": t, "bytes_per_s": nbytes / t}
    best = out.get("cuda_ipc_writer", out["generic_index_copy"])
    out.update(median_s=best["median_s"], bytes_per_s=best["bytes_per_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--tokens", default="1024,8192")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--profile", action="store_true",
                    help="also time the sender's phases (per layer vs stacked; ipc_profile.py)")
    args = ap.parse_args(argv)
    device = pick_device(args.dry_run)
    spec = kv_spec(args.dry_run)
    tokens = [64, 256] if args.dry_run else sorted(int(t) for t in args.tokens.split(","))
    backend = "shm" if args.dry_run else "cuda_ipc"
    reps = 2 if args.dry_run else args.reps

    from pdserve.cluster.planning.profiler.bandwidth import measure_transfer_bandwidth

    bw = copy_bandwidth(device)
    log(TAG, f"copy bandwidth {bw['copy_bytes_per_s'] / 1e9:.0f} GB/s (bytes copied)")
    scatter = [local_scatter(spec, n, device) for n in tokens]
    result = measure_transfer_bandwidth(spec, [backend], tokens=tokens, reps=reps,
                                        device=device, progress=lambda m: log(TAG, m))[backend]
    rows = []
    for (n, nbytes, med, rate), sc in zip(result.sizes, scatter, strict=True):
        samples = dict(result.samples)[n]
        row = {"tokens": n, "bytes": nbytes, "median_s": med, "samples_s": list(samples),
               "bytes_per_s": rate, "fraction_of_copy": rate / bw["copy_bytes_per_s"],
               "in_process_scatter_bytes_per_s": sc["bytes_per_s"], "in_process": sc}
        rows.append(row)
        log(TAG, f"{n} tokens ({nbytes / 2**20:.0f} MiB): {rate / 1e9:.0f} GB/s = "
            f"{row['fraction_of_copy']:.1%} of copy; in-process scatter "
            f"{sc['bytes_per_s'] / 1e9:.0f} GB/s; " + ", ".join(
                f"{k} {v['bytes_per_s'] / 1e9:.0f} GB/s" for k, v in sc.items()
                if isinstance(v, dict)))
    profile = None
    if args.profile:
        from ipc_profile import profile_sender

        profile = profile_sender(spec, backend, tokens, reps, device, log=lambda m: log(TAG, m))
        for row in rows:
            for mode, p in profile[str(row["tokens"])].items():
                row[f"{mode}_sender_bytes_per_s"] = row["bytes"] / p["total_s"]
    write_result(args.out, TAG, device, {
        "dry_run": args.dry_run, "backend": backend, "sender_profile": profile,
        "kv_spec": {"layers": spec.num_layers, "block_size": spec.block_size,
                    "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                    "dtype": str(spec.dtype).removeprefix("torch."),
                    "bytes_per_token": spec.tokens_to_bytes(1)},
        "copy_bandwidth": bw, "rows": rows,
        "acceptance": {"goal": f"bytes_per_s >= {GOAL:.0%} of copy_bytes_per_s (1k and 8k)",
                       "fractions": {str(r["tokens"]): r["fraction_of_copy"] for r in rows},
                       "passed": all(r["fraction_of_copy"] >= GOAL for r in rows)},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
