"""The report of benchmarks/kv_transfer.py: host facts, per-case medians and bandwidth
against memcpy, what the KV checksum costs, and the Markdown table.

``summarize`` turns the per-repetition seconds into one row per (case, size);
``checksum_cost`` compares each backend's transfer with the checksum off, sampled and full
(sender plus decode-side verify); ``write_markdown`` renders the report dict that
kv_transfer.py also writes as JSON.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pdserve.benchmarks.kv_transfer_bench import CASES, CHECKSUM_BACKENDS, spec_for
from pdserve.cluster.planning.profiler.hostinfo import cpu_model


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
