"""SLO-aware routing with admission control vs least-loaded, at a load that breaks the SLO.

One run does both halves on the same requests (a time-scaled Azure conversation slice
driven past what the cluster sustains):
- simulator: the 1-prefill + 1-decode demo-model plan with the measured CPU profile
  (``dispatch`` least_loaded vs slo_aware with admission), plus a 3-prefill + 2-decode
  OPT-13B plan on DistServe's A100 profile, where the prefill choice matters too;
- real CPU cluster: the same 1+1 plan launched twice on Ray, once per policy, replayed by
  the gRPC client.
For each: attainment over all requests, attainment among admitted requests, requests
rejected at admission, and goodput (SLO-meeting requests per second). The claim under
test: SLO-aware + admission reaches higher attainment of the requests it admits and no
lower goodput.

    python benchmarks/slo_routing.py --profile benchmarks/results/profile_sim_vs_real.json
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
from pdserve.cluster.planning.simulator import DisaggPlanSpec, InstanceSpec, SimConfig, simulate
from pdserve.cluster.planning.simulator.workload import representative_slice
from pdserve.engine.config import EngineConfig
from pdserve.engine.demo_model import create_demo_model
from pdserve.engine.latency_profile import LatencyProfile, distserve_opt13b_a100
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from pdserve.router.slo import SloConfig
from pdserve.workloads.formats import load_azure_csv

AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_conv.csv"
RESULTS = Path(__file__).resolve().parent / "results"


def sim_row(label, plan, profile, trace, slo, cfg):
    res = simulate(plan, profile, trace, cfg)
    return {"where": "simulator", "label": label, "policy": cfg.dispatch,
            "requests": len(res), "rejected": sum(res.admission_rejected),
            "attainment": res.attainment(slo), "attainment_admitted": res.attainment_admitted(slo),
            "goodput_rps": res.goodput_rps(slo), **{k: v for k, v in res.percentiles()
                                                   .as_dict().items()}}


def real_row(label, model, engine, trace, slo, policy, profile_path):
    router = RouterConfig(model=model, policy=policy, slo=slo,
                          profile=profile_path if policy == "slo_aware" else None,
                          prefill_token_budget=engine.max_num_batched_tokens,
                          server=ServerConfig(port=0, metrics_port=None))
    cluster = launch(ClusterSpec(engine=engine, prefill=PoolSpec(1), decode=PoolSpec(1),
                                 kv=KVTransferConfig(backend="shm"), router=router,
                                 torch_threads=1))
    try:
        run = run_trace(cluster.address, trace, LoadGenConfig(vocab_size=900, quiet=False))
    finally:
        cluster.shutdown()
    rep = summarize(run, slo, label)
    span = trace.duration_s or 1.0
    met = rep.attainment * rep.num_sent
    return {"where": "real", "label": label, "policy": policy, "requests": rep.num_sent,
            "rejected": rep.num_rejected, "failed": rep.num_failed,
            "attainment": rep.attainment, "attainment_admitted": rep.attainment_admitted,
            "goodput_rps": met / span,
            "ttft_p50": rep.ttft_s.p50 if rep.ttft_s else None,
            "ttft_p90": rep.ttft_s.p90 if rep.ttft_s else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="the demo model's CPU profile JSON")
    ap.add_argument("--model", default=None)
    ap.add_argument("--trace", default=str(AZURE))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=14.0, help="overload rate for the 1+1 plan")
    ap.add_argument("--length-scale", type=float, default=0.5)
    ap.add_argument("--slo-ttft", type=float, default=0.5)
    ap.add_argument("--slo-tpot", type=float, default=0.1)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)

    model = args.model or str(create_demo_model())
    profile = LatencyProfile.load(args.profile)
    engine = EngineConfig(model=model, device="cpu", num_kv_blocks=4096, max_num_seqs=64,
                          max_num_batched_tokens=2048)
    azure = load_azure_csv(args.trace)
    trace = representative_slice(azure, args.requests).scaled(
        length_scale=args.length_scale, max_prompt_len=2048, max_output_len=256
    ).at_rate(args.rate)
    slo = SloConfig(args.slo_ttft, args.slo_tpot)
    rows = []
    base = SimConfig(prefill_token_budget=2048, chunked_prefill=True, max_decode_batch=64,
                     request_overhead_s=0.007)
    plan = DisaggPlanSpec(InstanceSpec(), InstanceSpec(), profile.bandwidth("shm") or 5e9)
    for dispatch, adm in (("least_loaded", None), ("slo_aware", slo.ttft_s)):
        cfg = SimConfig(**{**base.__dict__, "dispatch": dispatch, "admission_ttft_s": adm})
        rows.append(sim_row("demo 1P+1D (CPU profile)", plan, profile, trace, slo, cfg))
    # A larger plan on DistServe's published model, where the prefill choice matters too.
    opt = distserve_opt13b_a100()
    big = representative_slice(azure, 1500).at_rate(9.0)
    slo13 = SloConfig(0.25, 0.1)
    plan13 = DisaggPlanSpec(InstanceSpec(1, 1, 3), InstanceSpec(1, 1, 2), 25e9)
    for dispatch, adm in (("least_loaded", None), ("slo_aware", slo13.ttft_s)):
        cfg = SimConfig(prefill_token_budget=4096, dispatch=dispatch, admission_ttft_s=adm)
        rows.append(sim_row("OPT-13B 3P+2D (DistServe A100 model)", plan13, opt, big, slo13, cfg))
    if not args.skip_real:
        for policy in ("least_loaded", "slo_aware"):
            note(f"real cluster: {policy} ...")
            rows.append(real_row("demo 1P+1D (real CPU cluster)", model, engine, trace, slo,
                                 policy, args.profile))

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slo_routing.json").write_text(json.dumps({
        "benchmark": "slo_routing", "rate": args.rate, "requests": args.requests,
        "slo_demo": slo.__dict__, "slo_opt13b": slo13.__dict__, "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2, default=str))
    lines = ["# SLO-aware routing + admission control vs least-loaded", "",
             f"Azure conversation slice, overload: demo 1P+1D at {args.rate:g} req/s "
             f"(TTFT {slo.ttft_s:g} s, TPOT {slo.tpot_s:g} s); OPT-13B 3P+2D at 9 req/s "
             "(TTFT 0.25 s, TPOT 0.1 s). Goodput = requests meeting both SLOs per second.", "",
             "| where | configuration | policy | rejected | attainment (all) | "
             "attainment (admitted) | goodput (req/s) |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['where']} | {r['label']} | {r['policy']} | {r['rejected']} | "
                     f"{r['attainment']:.1%} | {r['attainment_admitted']:.1%} | "
                     f"{r['goodput_rps']:.2f} |")
    (out / "slo_routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
