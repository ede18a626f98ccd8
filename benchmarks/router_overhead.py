"""Time the router and the prefill->decode handoff add to each request, at low load.

Sends requests one at a time (no queueing) to a running 1-prefill, 1-decode cluster
and, for each, takes the client-side time to first token minus the prefill worker's
own compute time for that request (``Usage.prefill_ms``, first chunk scheduled ->
first token sampled). What remains is the cost of the path itself: gRPC in and out,
validation and tokenization, the decode reservation round trip, dispatch to the
prefill worker, its queueing, the wait for the KV transfer to complete, and Ray's actor
calls. Reports percentiles of the overhead and its parts.

    python benchmarks/router_overhead.py                 # Ray cluster, shm transfer
    python benchmarks/router_overhead.py --no-ray        # same workers in one process
    python benchmarks/router_overhead.py --kv-backend tcp --requests 200
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.cli.progress import bar
from pdserve.engine.config import EngineConfig
from pdserve.engine.demo_model import create_demo_model
from pdserve.kv_transfer.backend_config import KVTransferConfig


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": statistics.fmean(xs),
            "min": xs[0], "max": xs[-1]}


def run(address: str, n: int, prompt_len: int, seed: int, what: str) -> list[dict[str, float]]:
    rng = random.Random(seed)
    rows = []
    with Client(address, timeout_s=120) as client:
        for _ in bar(range(n), desc=f"router_overhead {what}", unit="req"):
            prompt = [rng.randrange(3, 900) for _ in range(prompt_len)]
            t0 = time.perf_counter()
            ttft = None
            usage = None
            for msg in client.stream(build_request(prompt, max_tokens=2)):
                if ttft is None:
                    ttft = (time.perf_counter() - t0) * 1e3
                if msg.HasField("usage"):
                    usage = msg.usage
            rows.append({
                "client_ttft_ms": ttft, "router_ttft_ms": usage.ttft_ms,
                "prefill_ms": usage.prefill_ms, "prefill_queue_ms": usage.prefill_queue_ms,
                "kv_transfer_wait_ms": usage.kv_transfer_wait_ms,
                "overhead_ms": ttft - usage.prefill_ms,
            })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local HF checkpoint (default: demo model)")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--kv-backend", default="shm", choices=["shm", "tcp"])
    ap.add_argument("--no-ray", action="store_true", help="run the workers in this process")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    model = args.model or str(create_demo_model())
    engine = EngineConfig(model=model, device="cpu", num_kv_blocks=1024, max_num_seqs=16)
    kv = KVTransferConfig(backend=args.kv_backend)
    if args.no_ray:
        from pdserve.cluster.launch.local import LocalCluster

        ctx = LocalCluster(engine, kv=kv)
        cluster = ctx.__enter__()
        address, stop = cluster.address, lambda: ctx.__exit__(None, None, None)
        mode = "in-process"
    else:
        from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
        from pdserve.router.config import RouterConfig
        from pdserve.router.server import ServerConfig

        cluster = launch(ClusterSpec(engine=engine, prefill=PoolSpec(1), decode=PoolSpec(1), kv=kv,
                                     router=RouterConfig(model=model, server=ServerConfig(port=0, metrics_port=0))))
        address, stop = cluster.address, cluster.shutdown
        mode = "ray"
    try:
        run(address, args.warmup, args.prompt_len, seed=1, what="warm-up")
        rows = run(address, args.requests, args.prompt_len, seed=2, what="requests")
    finally:
        stop()

    summary = {k: percentiles([r[k] for r in rows]) for k in rows[0]}
    result = {
        "benchmark": "router_overhead", "mode": mode, "kv_backend": args.kv_backend,
        "model": model, "prompt_len": args.prompt_len, "requests": args.requests,
        "host": {"platform": platform.platform(), "python": platform.python_version(),
                 "torch": torch.__version__, "cpus": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "summary_ms": summary, "rows": rows,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"router_overhead_{mode.replace('-', '_')}_{args.kv_backend}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Router + handoff overhead ({mode}, {args.kv_backend}, prompt {args.prompt_len} "
             f"tokens, {args.requests} sequential requests)", "",
             "| ms | p50 | p90 | p99 | mean |", "|---|---|---|---|---|"]
    for k, s in summary.items():
        lines.append(f"| {k} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} | {s['mean']:.2f} |")
    lines += ["", "overhead_ms = client-side TTFT - prefill worker compute (prefill_ms)."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
