"""KV-aware prefill routing vs least-loaded on a real CPU cluster, prefix-sharing workload.

One run launches the same cluster twice on Ray (2 prefill + 1 decode workers, the demo
model, shared-memory KV), once per routing, and replays the same Mooncake-format trace
with the gRPC load generator (prompts with equal leading ``hash_ids`` share that prefix
token for token). Reported side by side: the prefix-cache hit rate (prompt tokens the
prefill workers found cached / prompt tokens they were asked for, from their own
counters), TTFT p50/p90, and SLO attainment.

    flock /tmp/pdserve-ray.lock python benchmarks/kv_routing_cluster.py \\
        --trace prefix_sharing.jsonl --length-scale 0.25
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pdserve.cluster.cli.progress import note
from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.loadgen import run_trace
from pdserve.cluster.cli.replay.report import summarize
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.engine.config import EngineConfig
from pdserve.engine.demo_model import create_demo_model
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from pdserve.router.slo import SloConfig
from pdserve.workloads.formats import load_trace

RESULTS = Path(__file__).resolve().parent / "results"
ROUTINGS = ("least_loaded", "kv_aware")


def run_one(routing: str, model: str, engine: EngineConfig, trace, slo: SloConfig,
            num_prefill: int) -> dict:
    router = RouterConfig(model=model, slo=slo, kv_aware_routing=routing == "kv_aware",
                          server=ServerConfig(port=0, metrics_port=None))
    cluster = launch(ClusterSpec(engine=engine, prefill=PoolSpec(num_prefill),
                                 decode=PoolSpec(1), kv=KVTransferConfig(backend="shm"),
                                 router=router, torch_threads=1))
    try:
        run = run_trace(cluster.address, trace, LoadGenConfig(vocab_size=900, quiet=False))
        stats = cluster.stats()
    finally:
        cluster.shutdown()
    rep = summarize(run, slo, routing)
    prefill = [s for w, s in stats.items() if w.startswith("prefill")]
    hit = sum(s.prefix_hit_tokens for s in prefill)
    asked = sum(s.prefix_query_tokens for s in prefill)
    return {"routing": routing, "requests": rep.num_sent, "failed": rep.num_failed,
            "hit_rate": hit / asked if asked else 0.0, "hit_tokens": hit, "asked_tokens": asked,
            "per_worker_completed": {w: s.completed for w, s in stats.items()
                                     if w.startswith("prefill")},
            "attainment": rep.attainment,
            "ttft_p50": rep.ttft_s.p50 if rep.ttft_s else None,
            "ttft_p90": rep.ttft_s.p90 if rep.ttft_s else None,
            "tpot_p50": rep.tpot_s.p50 if rep.tpot_s else None}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# KV-aware routing vs least-loaded, real CPU cluster ({meta['cluster']})", "",
             f"Workload: {meta['workload']}", "",
             "| routing | requests | failed | prefix hit rate | TTFT p50 ms | TTFT p90 ms | "
             "TPOT p50 ms | SLO attainment | prompts per prefill worker |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['routing']} | {r['requests']} | {r['failed']} | {r['hit_rate']:.3f} | "
            f"{1e3 * r['ttft_p50']:.1f} | {1e3 * r['ttft_p90']:.1f} | "
            f"{1e3 * r['tpot_p50']:.1f} | {r['attainment']:.3f} | "
            f"{', '.join(str(v) for v in r['per_worker_completed'].values())} |")
    lines += ["", "Hit rate: prompt tokens the prefill workers found in their prefix caches / "
              "prompt tokens asked (their own counters). The two runs replay the same trace on "
              "fresh clusters, one after the other, on a shared 2-core host."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", required=True, help="Mooncake JSONL with hash_ids")
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--rate", type=float, default=None, help="re-time to this rate (req/s)")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--num-prefill", type=int, default=2)
    ap.add_argument("--slo-ttft", type=float, default=1.0)
    ap.add_argument("--slo-tpot", type=float, default=0.2)
    ap.add_argument("--out", default=str(RESULTS / "kv_routing_cluster"))
    args = ap.parse_args(argv)

    model = str(create_demo_model())
    engine = EngineConfig(model=model, device="cpu", num_kv_blocks=512,
                          max_num_batched_tokens=2048)
    trace = load_trace(args.trace).scaled(length_scale=args.length_scale,
                                          max_prompt_len=1536, max_output_len=64)
    if args.rate:
        trace = trace.at_rate(args.rate)
    if args.num_requests:
        trace = trace.head(args.num_requests)
    slo = SloConfig(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
    rows = []
    for routing in ROUTINGS:
        note(f"kv_routing_cluster: {routing}")
        t0 = time.monotonic()
        rows.append(run_one(routing, model, engine, trace, slo, args.num_prefill))
        rows[-1]["wall_s"] = round(time.monotonic() - t0, 1)
    meta = {"cluster": f"{args.num_prefill} prefill + 1 decode, demo model, shm, Ray",
            "workload": f"{args.trace} ({len(trace)} requests, length scale "
                        f"{args.length_scale}, {trace.duration_s:.1f} s)",
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
