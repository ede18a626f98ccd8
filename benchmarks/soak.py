"""Soak: process memory and KV block counts of a real cluster under steady load, over minutes.

One run: launch a real 1-prefill + 1-decode cluster (Ray actors, shared-memory KV
transfer, one torch thread per worker, the demo model) and keep it under a steady open
loop for ``--minutes``: the Azure conversation trace (lengths x0.5, time-scaled to the
rate, looped as needed; a synthetic Poisson trace when the CSV is absent) replayed by the
gRPC load generator, plus failure paths on the side: a fraction of requests cancelled by
the client (half at a random moment right after sending, usually before the first token;
half after a few streamed tokens) and a fraction of invalid ones (empty prompt, a token id
outside the vocabulary). ``--rate`` is the total offered rate; the side requests take
their fractions of it.

Every ``--interval`` seconds a sampler thread records the RSS (and anonymous RSS, thread
and open-fd counts, from /proc) of the router, each worker and this driver/client
process; the decode workers' used / free / reserved blocks and running / waiting
sequences; the prefill workers' used blocks and running / waiting; the router's requests
in flight; and, filled in from the client-side records afterwards, the requests finished
so far by outcome. After the load stops and a short drain, a last sample must show no
KV block in use anywhere ("leaked blocks: 0": a decode worker's reserved blocks count as
used; prefill blocks the prefix cache keeps but nobody references count as free, as they
are), no reservation left and no sequence left.

Reported per process: RSS at start / end / max, growth, and growth per hour from a linear
fit over the second half of the load (after warm-up); requests by outcome with their gRPC
status codes; block counts at the end. Writes ``results/soak.{json,md,png}``.

    python benchmarks/soak.py                 # 10 minutes at 2 req/s (+ about 1 min setup)
    python benchmarks/soak.py --minutes 0.5   # quick smoke check

The traffic is made in ``soak_load.py``, the samples taken by ``soak_probe.py``, the
report written by ``soak_report.py``; this file launches the cluster and runs one soak.
``soak_trace``, ``slope`` and ``growth`` are importable from here too (the unit tests').
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import ray

from pdserve.benchmarks.soak_load import VOCAB, side_traffic, soak_trace
from pdserve.benchmarks.soak_probe import Sampler, actor_pid, take_sample
from pdserve.benchmarks.soak_report import (
    fill_counts,
    growth,
    markdown,
    plot,
    request_counts,
    slope,
    summarize,
)
from pdserve.cluster.cli.progress import note
from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.loadgen import run_trace
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.cluster.planning.profiler.hostinfo import cpu_model
from pdserve.engine.config import EngineConfig
from pdserve.engine.demo_model import create_demo_model
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from pdserve.workloads.formats import load_azure_csv
from pdserve.workloads.synthetic import synthetic
from pdserve.workloads.trace import Trace

__all__ = ["growth", "main", "slope", "soak_trace"]

AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_conv.csv"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=2.0, help="total offered load, req/s")
    ap.add_argument("--interval", type=float, default=5.0, help="sampling period, s")
    ap.add_argument("--cancel-frac", type=float, default=0.10)
    ap.add_argument("--invalid-frac", type=float, default=0.05)
    ap.add_argument("--drain", type=float, default=5.0, help="wait after the load, s")
    ap.add_argument("--model", default=None)
    ap.add_argument("--trace", default=str(AZURE))
    ap.add_argument("--length-scale", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.rate * (1 - args.cancel_frac - args.invalid_frac) <= 0:
        ap.error("--cancel-frac + --invalid-frac must leave some regular load")
    return args


def base_trace(args: argparse.Namespace) -> tuple[Trace, str]:
    """The trace to loop (Azure, or synthetic Poisson without the CSV) and its description."""
    if Path(args.trace).exists():
        base = load_azure_csv(args.trace).scaled(length_scale=args.length_scale,
                                                 max_prompt_len=2048, max_output_len=256)
        trace_desc = (f"Azure conversation trace, lengths x{args.length_scale:g}, "
                      "time-scaled to the rate")
    else:
        note(f"{args.trace} not found: synthetic Poisson trace")
        base = synthetic(1000, 1.0, (32, 1024), (8, 256), seed=args.seed)
        trace_desc = "synthetic Poisson trace (prompts 32-1024, outputs 8-256 tokens)"
    return base, trace_desc


def cluster_spec(model: str) -> ClusterSpec:
    """1 prefill + 1 decode, shm KV transfer, one torch thread per worker."""
    engine = EngineConfig(model=model, device="cpu", num_kv_blocks=4096, max_num_seqs=64,
                          max_num_batched_tokens=2048)
    spec = ClusterSpec(engine=engine, prefill=PoolSpec(1), decode=PoolSpec(1),
                       kv=KVTransferConfig(backend="shm"),
                       router=RouterConfig(model=model, server=ServerConfig(
                           port=0, metrics_port=None)), torch_threads=1)
    return spec


def process_ids(cluster) -> dict[str, int]:
    """Router, each worker and this driver (the client), by name."""
    pids = {"router": ray.get(cluster.router.__ray_call__.remote(actor_pid))}
    for wid, h in (*cluster.prefills, *cluster.decodes):
        pids[wid] = ray.get(h.__ray_call__.remote(actor_pid))
    pids["driver"] = os.getpid()
    return pids


def write_results(result: dict, out_dir: str) -> str:
    """soak.json, soak.png and soak.md; returns the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    plot(result["samples"], result["load_end_s"], out / "soak.png")
    text = markdown(result)
    (out / "soak.md").write_text(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    duration = args.minutes * 60
    load_rate = args.rate * (1 - args.cancel_frac - args.invalid_frac)
    base, trace_desc = base_trace(args)
    trace = soak_trace(base, load_rate, duration)

    model = args.model or str(create_demo_model())
    cluster = launch(cluster_spec(model))
    side: list[dict] = []
    try:
        pids = process_ids(cluster)
        note(f"soak: {len(trace)} trace requests at {load_rate:.2f} req/s for "
             f"{args.minutes:g} min, pids {pids}")
        t0 = time.time()
        sampler = Sampler(cluster, pids, t0, args.interval)
        sampler.start()
        sider = threading.Thread(target=side_traffic, daemon=True, args=(
            cluster.address, base, args.rate * args.cancel_frac, args.rate * args.invalid_frac,
            duration, args.seed + 1, side))
        sider.start()
        run = run_trace(cluster.address, trace, LoadGenConfig(
            vocab_size=VOCAB, seed=args.seed, progress_interval_s=5.0), run_name="soak")
        sider.join()
        load_end_s = time.time() - t0
        sampler.stop.set()
        sampler.join()
        time.sleep(args.drain)
        sampler.samples.append(take_sample(cluster, pids, t0))
    finally:
        cluster.shutdown()

    load_ends = [(run.started_unix + r.end_s, r.outcome) for r in run.records]
    fill_counts(sampler.samples, t0, load_ends, side)
    summary = summarize(sampler.samples, load_end_s)
    result = {"benchmark": "soak", "args": vars(args), "model": model, "trace": trace_desc,
              "trace_requests": len(trace), "trace_rate": load_rate, "pids": pids,
              "host": {"cpu": cpu_model(), "cores": os.cpu_count()},
              "load_end_s": load_end_s, "wall_s": run.wall_s,
              "requests": request_counts(run, side),
              "summary": summary, "samples": sampler.samples,
              "sampler_errors": sampler.errors, "side_requests": side,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(write_results(result, args.out_dir))
    clean = not (summary["leaked_blocks"] or summary["reservations_left"]
                 or summary["sequences_left"])
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
