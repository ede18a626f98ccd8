"""Simulator against reality: the same trace on the real CPU cluster and in the simulator.

One run: launch a real 1-prefill + 1-decode cluster (Ray actors, shared-memory KV
transfer, one torch thread per worker) on the model at hand (default: the demo model),
replay a time-scaled slice of the Azure conversation trace at two load levels with the
real gRPC client, and simulate the same plan on the same requests with the model's
latency profile (``pdserve profile``; measured first if none is given). Reports p50 and
p90 TTFT and TPOT of both and their relative differences (goal: within 25%).

Calibration, done before and apart from the replays (nothing is fitted to them):
- the per-request fixed cost outside the model (gRPC, router, Ray calls), from
  sequential requests: client TTFT minus the prefill worker's compute time;
- from the workers' step logs over a separate calibration replay (a different window of
  the trace, replayed at each load level just before that level's evaluation replay),
  ``cluster/planning/calibration.py`` measures per phase the ratio
  of logged to predicted step time for steps that ran alone (the profile's correction),
  and the extra slow-down of steps that ran while the other pool was busy
  (``HostContention``): the profiler times a step alone on an idle machine, while in this
  cluster the two workers, the router and the client share 2 cores.
Reported: the calibrated simulation (corrected profile plus contention), and, to show
what each part is worth, the uncorrected profile and the corrected one without
contention.

    python benchmarks/sim_vs_real.py                       # ~5 minutes on 2 cores
    python benchmarks/sim_vs_real.py --rates 2,6 --requests 200 --profile P.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import ray

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.cli.progress import note
from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.loadgen import run_trace
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.cluster.planning.calibration import calibrate, corrected
from pdserve.cluster.planning.simulator import DisaggPlanSpec, InstanceSpec, SimConfig, simulate
from pdserve.cluster.planning.simulator.workload import representative_slice
from pdserve.engine.config import EngineConfig
from pdserve.engine.demo_model import create_demo_model
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from pdserve.workloads.formats import load_azure_csv

AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_conv.csv"
RESULTS = Path(__file__).resolve().parent / "results"


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def calibrate_overhead(address: str, prompt_len: int, n: int = 30) -> float:
    """Median of (client TTFT - prefill compute) over sequential requests, seconds."""
    vals = []
    with Client(address, timeout_s=60) as c:
        for i in range(n):
            t0 = time.perf_counter()
            first = None
            usage = None
            for msg in c.stream(build_request([3 + (i * 7 + j) % 900 for j in range(prompt_len)],
                                              max_tokens=2)):
                if first is None:
                    first = time.perf_counter() - t0
                if msg.HasField("usage"):
                    usage = msg.usage
            if i >= 5:  # warm-up
                vals.append(first - usage.prefill_ms / 1e3)
    return statistics.median(vals)


def calibration_window(azure, args):
    """A different block of the same trace (requests 2000.., far from the evaluation
    slice), shaped the same way: same workload, different requests."""
    from pdserve.workloads.trace import Trace, TraceRequest

    sel = azure.requests[2000:2000 + args.requests]
    t0 = sel[0].arrival_s
    window = Trace("calibration", tuple(TraceRequest(r.arrival_s - t0, r.prompt_len,
                                                     r.output_len) for r in sel))
    return window.scaled(length_scale=args.length_scale, max_prompt_len=args.max_prompt_len,
                         max_output_len=args.max_output_len)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--profile", default=None, help="latency profile JSON (default: measure)")
    ap.add_argument("--trace", default=str(AZURE))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rates", default="2,4", help="two (or more) load levels, req/s")
    ap.add_argument("--length-scale", type=float, default=0.5)
    ap.add_argument("--max-prompt-len", type=int, default=2048)
    ap.add_argument("--max-output-len", type=int, default=256)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)

    model = args.model or str(create_demo_model())
    engine = EngineConfig(model=model, device="cpu", num_kv_blocks=4096, max_num_seqs=64,
                          max_num_batched_tokens=2048)
    if args.profile:
        profile = LatencyProfile.load(args.profile)
    else:
        from pdserve.cluster.planning.profiler.options import ProfileOptions
        from pdserve.cluster.planning.profiler.run import profile_model

        note("measuring the latency profile ...")
        profile = profile_model(engine, ProfileOptions(),
                                progress=lambda msg: note(f"[profile] {msg}")).to_profile()
        profile.save(Path(args.out_dir) / "profile_sim_vs_real.json")
    azure = load_azure_csv(args.trace)
    base = representative_slice(azure, args.requests).scaled(
        length_scale=args.length_scale, max_prompt_len=args.max_prompt_len,
        max_output_len=args.max_output_len)
    rates = [float(r) for r in args.rates.split(",")]
    mean_prompt = round(statistics.fmean(r.prompt_len for r in base.requests))

    spec = ClusterSpec(engine=engine, prefill=PoolSpec(1), decode=PoolSpec(1),
                       kv=KVTransferConfig(backend="shm"),
                       router=RouterConfig(model=model, server=ServerConfig(
                           port=0, metrics_port=None)), torch_threads=1)
    cluster = launch(spec)
    rows = []
    try:
        overhead = calibrate_overhead(cluster.address, mean_prompt)
        note(f"per-request overhead outside the model: {overhead * 1e3:.1f} ms")
        window = calibration_window(azure, args)

        def calibrate_at(rate: float):
            """Replay the calibration window at ``rate`` and calibrate on its steps only."""
            t_calib = time.time()
            run_trace(cluster.address, window.at_rate(rate),
                      LoadGenConfig(vocab_size=900, seed=1, quiet=True))

            def steps(pool):
                return [rec for _, h in pool for rec in ray.get(h.step_log.remote())
                        if rec.start_s >= t_calib]

            cal = calibrate(profile, steps(cluster.prefills), steps(cluster.decodes))
            note(f"calibration at {rate:g} req/s: {cal}")
            return cal

        for rate in rates:
            # Per load level: the router's and the client's share of the 2 cores grows
            # with the token rate, and so do both factors.
            cal = calibrate_at(rate)
            fixed = corrected(profile, cal.factors)
            trace = base.at_rate(rate)
            run = run_trace(cluster.address, trace, LoadGenConfig(vocab_size=900, quiet=False))
            ok = [r for r in run.records if r.outcome == "ok"]
            sim_cfg = SimConfig(prefill_token_budget=engine.max_num_batched_tokens,
                                chunked_prefill=True, max_decode_batch=engine.max_num_seqs,
                                request_overhead_s=overhead)
            shared_host = dataclasses.replace(sim_cfg, contention=cal.contention)
            bw = profile.bandwidth("shm") or 5e9
            plan = DisaggPlanSpec(InstanceSpec(), InstanceSpec(), bw)
            real = {"ttft": [r.ttft_s for r in ok], "tpot": [r.tpot_s for r in ok]}
            row = {"rate": rate, "requests": len(trace), "ok": len(ok),
                   "correction_factors": cal.factors,
                   "contention": dataclasses.asdict(cal.contention),
                   "calibration_steps": cal.steps}
            variants = (("sim", fixed, shared_host), ("sim_uncorrected", profile, sim_cfg),
                        ("sim_no_contention", fixed, sim_cfg))
            for tag, prof, cfg in variants:
                sim = simulate(plan, prof, trace, cfg)
                simd = {"ttft": list(sim.ttft), "tpot": list(sim.tpot)}
                for metric in ("ttft", "tpot"):
                    for q in (50, 90):
                        r_, s_ = pct(real[metric], q), pct(simd[metric], q)
                        row[f"{metric}_p{q}_real_ms"] = r_ * 1e3
                        row[f"{metric}_p{q}_{tag}_ms"] = s_ * 1e3
                        err = "rel_err" + tag.removeprefix("sim")
                        row[f"{metric}_p{q}_{err}"] = (s_ - r_) / r_
            rows.append(row)
            note(json.dumps(row))
    finally:
        cluster.shutdown()

    ok_all = all(abs(row[f"{m}_p{q}_rel_err"]) <= 0.25 for row in rows
                 for m in ("ttft", "tpot") for q in (50, 90))
    result = {"benchmark": "sim_vs_real", "model": model, "trace": args.trace,
              "requests": args.requests, "length_scale": args.length_scale,
              "request_overhead_s": overhead, "profile": profile.model,
              "profile_fit_error": dict(profile.fit_error), "rows": rows,
              "all_within_25pct": ok_all, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim_vs_real.json").write_text(json.dumps(result, indent=2))
    lines = ["# Simulator vs real CPU cluster (1 prefill + 1 decode, shm, demo model)", "",
             f"Azure conversation slice of {args.requests} requests, lengths x{args.length_scale}, "
             f"time-scaled to each rate; per-request overhead {overhead * 1e3:.1f} ms "
             "(measured in the same run).", "",
             "Calibrated just before each load level on a separate replay (another window of "
             "the trace, same rate): profile correction for steps run alone, and shared-host "
             "contention k while the other pool is busy:", "",
             *(f"- {r['rate']:g} req/s: alone x{r['correction_factors']['prefill']:.2f} "
               f"prefill, x{r['correction_factors']['decode']:.2f} decode; k "
               f"{r['contention']['prefill']:.2f} prefill, {r['contention']['decode']:.2f} "
               "decode" for r in rows),
             "",
             "| rate (req/s) | metric | real (ms) | simulated (ms) | difference | "
             "uncorrected profile | no contention |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        for m in ("ttft", "tpot"):
            for q in (50, 90):
                lines.append(f"| {row['rate']:g} | {m.upper()} p{q} | "
                             f"{row[f'{m}_p{q}_real_ms']:.1f} | {row[f'{m}_p{q}_sim_ms']:.1f} | "
                             f"{row[f'{m}_p{q}_rel_err'] * 100:+.1f}% | "
                             f"{row[f'{m}_p{q}_rel_err_uncorrected'] * 100:+.1f}% | "
                             f"{row[f'{m}_p{q}_rel_err_no_contention'] * 100:+.1f}% |")
    lines += ["", f"All within 25%: {'yes' if ok_all else 'NO'}."]
    (out / "sim_vs_real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
