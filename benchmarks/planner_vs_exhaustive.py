"""Placement planner vs. exhaustive search, and disaggregated vs. colocated, in simulation.

On DistServe's OPT-13B A100 latency model and the Azure LLM conversation trace (TTFT
0.25 s, TPOT 0.1 s, 90% attainment; DistServe's OPT-13B chat SLOs), on a cluster of
A100-80GB nodes (default 2 x 8, NVLink 300 GB/s, 25 GB/s between nodes):

1. runs the planner (DistServe Alg. 1 high affinity, Alg. 2 low affinity, and "auto"),
2. simulates every disaggregated and colocated configuration that fits the cluster,
3. checks the plan's per-GPU goodput is within 5% of the best exhaustive disaggregated
   one, and compares the best disaggregated against the best colocated configuration,
4. explains the outcome (zero-load TTFT ceilings per tensor-parallel degree, which SLO
   binds at goodput) and repeats the comparison for shorter prompts / other SLOs (1 node).

Writes ``benchmarks/results/planner_vs_exhaustive.{json,md,png}``.

    python benchmarks/planner_vs_exhaustive.py                # 2x8, 1500 requests (~2 min)
    python benchmarks/planner_vs_exhaustive.py --quick        # 1x8, 600 requests, no sweep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pdserve.cluster.planning.cluster_desc import ClusterDesc
from pdserve.cluster.planning.planner import Planner, PlannerConfig
from pdserve.cluster.planning.simulator import SimConfig, simulate
from pdserve.cluster.planning.simulator.evaluator import Evaluation
from pdserve.engine.latency_profile import distserve_opt13b_a100
from pdserve.router.slo import SloConfig
from pdserve.workloads.formats import load_azure_csv
from pdserve.workloads.trace import Trace, TraceRequest

AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_conv.csv"
RESULTS = Path(__file__).resolve().parent / "results"
# (prompt length scale, TTFT s, TPOT s): when does disaggregation pay off in this model?
SWEEP = ((1.0, 0.25, 0.1), (0.25, 0.25, 0.1), (1.0, 0.25, 0.05), (0.25, 0.25, 0.03),
         (1.0, 1.0, 0.03))


def best(evals: list[Evaluation], mode: str) -> Evaluation:
    return next(e for e in evals if e.candidate.mode == mode)


def eval_row(e: Evaluation) -> dict:
    return {**e.candidate.as_dict(), "label": e.candidate.label(),
            "goodput_rps": e.goodput.rate, "per_gpu_goodput": e.per_gpu_goodput,
            "interpolated_rps": e.goodput.interpolated_rate, "sims": e.goodput.num_sims}


def scale_prompts(trace: Trace, k: float) -> Trace:
    return trace if k == 1.0 else Trace(f"{trace.name} prompts x{k:g}", tuple(
        TraceRequest(r.arrival_s, max(1, round(r.prompt_len * k)), r.output_len)
        for r in trace.requests))


def breakdown(planner: Planner, e: Evaluation) -> dict:
    """Which SLO binds at the goodput rate, and the latency percentiles there."""
    res = simulate(e.candidate.spec(), planner.profile, planner.workload.at_rate(e.goodput.rate),
                   planner.cfg)
    slo = planner.slo
    return {"rate": e.goodput.rate, "attainment": res.attainment(slo),
            "ttft_attainment": res.ttft_attainment(slo),
            "tpot_attainment": res.tpot_attainment(slo), **res.percentiles().as_dict()}


def curve(planner: Planner, e: Evaluation, per_gpu_rates: list[float]) -> list[list[float]]:
    spec = e.candidate.spec()
    out = []
    for r in per_gpu_rates:
        res = simulate(spec, planner.profile, planner.workload.at_rate(r * spec.num_gpus),
                       planner.cfg)
        out.append([r, res.attainment(planner.slo)])
    return out


def ttft_ceilings(planner: Planner) -> dict[str, float]:
    """Share of requests whose prefill alone (idle tp-instance) meets the TTFT target."""
    w, out = planner.workload, {}
    for tp in planner.profile.tp_degrees:
        inst = planner.profile.instance(tp, 1)
        out[f"tp{tp}"] = sum(inst.prefill_s([p]) + planner.cfg.request_overhead_s
                             <= planner.slo.ttft_s for p in w.prompt) / len(w)
    return out


def run_main(args, trace: Trace, cluster: ClusterDesc, slo: SloConfig) -> dict:
    profile, cfg = distserve_opt13b_a100(), SimConfig()
    pc = PlannerConfig(max_requests=args.max_requests)
    planner = Planner(cluster, profile, trace, slo, cfg, pc)
    plans = {}
    for affinity in ("high", "low", "auto"):
        # A fresh cache per algorithm, so its simulation count and runtime are its own.
        p = Planner(cluster, profile, trace, slo, cfg, pc)
        t0 = time.perf_counter()
        plan = p.plan(affinity)
        plans[affinity] = {"plan": plan.to_dict(), "runtime_s": time.perf_counter() - t0,
                           "sims": plan.search.simulations,
                           "label": plan.spec().label(), "num_gpus": plan.num_gpus,
                           "goodput_rps": plan.expected_rate,
                           "per_gpu_goodput": plan.expected_per_gpu_goodput}
        print(f"planner {affinity}: {plans[affinity]['label']} "
              f"{plan.expected_per_gpu_goodput:.3f} req/s/GPU "
              f"({plan.search.simulations} sims, {plans[affinity]['runtime_s']:.1f} s)", flush=True)
    t0 = time.perf_counter()
    p = Planner(cluster, profile, trace, slo, cfg,
                PlannerConfig(max_requests=args.max_requests, consider_colocated=True))
    plan_c = p.plan("auto")
    plans["auto+colocated"] = {"plan": plan_c.to_dict(), "runtime_s": time.perf_counter() - t0,
                               "sims": plan_c.search.simulations,
                               "label": plan_c.spec().label(), "num_gpus": plan_c.num_gpus,
                               "goodput_rps": plan_c.expected_rate,
                               "per_gpu_goodput": plan_c.expected_per_gpu_goodput}

    t0 = time.perf_counter()
    evals = planner.exhaustive(include_colocated=True, workers=args.workers)
    ex_time = time.perf_counter() - t0
    n_dis = sum(e.candidate.mode == "disaggregated" for e in evals)
    print(f"exhaustive: {len(evals)} candidates, {len(planner.ev.cache)} distinct searches, "
          f"{planner.ev.num_sims} sims, {ex_time:.1f} s", flush=True)
    bd, bc = best(evals, "disaggregated"), best(evals, "colocated")
    grid_max = 1.6 * max(bd.per_gpu_goodput, bc.per_gpu_goodput)
    grid = [grid_max * i / 24 for i in range(1, 25)]
    return {
        "planner": plans,
        "exhaustive": {"candidates": len(evals), "disaggregated": n_dis,
                       "colocated": len(evals) - n_dis, "distinct_searches": len(planner.ev.cache),
                       "sims": planner.ev.num_sims, "runtime_s": ex_time, "workers": args.workers,
                       "top_disaggregated": [eval_row(e) for e in evals
                                             if e.candidate.mode == "disaggregated"][:10],
                       "top_colocated": [eval_row(e) for e in evals
                                         if e.candidate.mode == "colocated"][:10]},
        "best_disaggregated": eval_row(bd), "best_colocated": eval_row(bc),
        "check": {"plan_per_gpu": plans["auto"]["per_gpu_goodput"],
                  "exhaustive_best_disagg_per_gpu": bd.per_gpu_goodput,
                  "ratio": plans["auto"]["per_gpu_goodput"] / bd.per_gpu_goodput,
                  "pass": plans["auto"]["per_gpu_goodput"] >= 0.95 * bd.per_gpu_goodput,
                  "plan_with_colocated_per_gpu": plans["auto+colocated"]["per_gpu_goodput"],
                  "exhaustive_best_overall_per_gpu": evals[0].per_gpu_goodput,
                  "ratio_overall": plans["auto+colocated"]["per_gpu_goodput"]
                  / evals[0].per_gpu_goodput},
        "breakdown": {"disaggregated": breakdown(planner, bd),
                      "colocated": breakdown(planner, bc)},
        "ttft_ceiling": ttft_ceilings(planner),
        "curves": {"disaggregated": curve(planner, bd, grid),
                   "colocated": curve(planner, bc, grid)},
        "slice": {"name": planner.trace.name, "requests": len(planner.workload),
                  "rate": planner.workload.rate,
                  "prompt_mean": statistics.fmean(planner.workload.prompt),
                  "output_mean": statistics.fmean(planner.workload.output)},
    }


def run_sweep(args, trace: Trace) -> list[dict]:
    rows = []
    cluster = ClusterDesc(1, 8, 80.0, 300e9, 25e9, "A100-80GB")
    for k, ttft, tpot in SWEEP:
        slo = SloConfig(ttft, tpot, 0.9)
        p = Planner(cluster, distserve_opt13b_a100(), scale_prompts(trace, k), slo,
                    config=PlannerConfig(max_requests=args.sweep_requests))
        t0 = time.perf_counter()
        evals = p.exhaustive(workers=args.workers)
        bd, bc = best(evals, "disaggregated"), best(evals, "colocated")
        rows.append({"prompt_scale": k, "ttft_s": ttft, "tpot_s": tpot,
                     "prompt_mean": statistics.fmean(p.workload.prompt),
                     "best_disaggregated": eval_row(bd), "best_colocated": eval_row(bc),
                     "disagg_over_colocated": bd.per_gpu_goodput / bc.per_gpu_goodput
                     if bc.per_gpu_goodput else None, "runtime_s": time.perf_counter() - t0})
        print(f"sweep prompts x{k:g} TTFT {ttft} TPOT {tpot}: disagg {bd.per_gpu_goodput:.3f} "
              f"vs colocated {bc.per_gpu_goodput:.3f} req/s/GPU", flush=True)
    return rows


def verdict(r: dict) -> list[str]:
    d, c = r["best_disaggregated"], r["best_colocated"]
    ratio = d["per_gpu_goodput"] / c["per_gpu_goodput"]
    ceil = r["ttft_ceiling"]
    bdd, bdc = r["breakdown"]["disaggregated"], r["breakdown"]["colocated"]
    lines = [
        f"Best disaggregated {d['label']}: {d['per_gpu_goodput']:.3f} req/s/GPU; best colocated "
        f"{c['label']}: {c['per_gpu_goodput']:.3f} req/s/GPU (disaggregated / colocated = "
        f"{ratio:.2f}).",
    ]
    if ratio > 1.05:
        lines.append("We reproduce DistServe's direction: disaggregation wins on this workload.")
        return lines
    lines += [
        "**We do not reproduce DistServe's advantage on this workload** (it reports "
        "disaggregation well ahead of vLLM on ShareGPT chat with the same SLOs). Why, in this "
        "model:",
        f"- Azure conversation prompts are long (mean {r['slice']['prompt_mean']:.0f} tokens "
        f"here). On an idle instance only "
        + ", ".join(f"{v:.0%} ({k})" for k, v in ceil.items())
        + f" of the prompts prefill within the {r['setup']['slo']['ttft_s']} s TTFT target, "
        f"against {r['setup']['slo']['attainment']:.0%} required: prefill needs the highest "
        "tensor parallelism and the TTFT budget is mostly prefill compute, so prefill GPUs must "
        "run far from saturation to keep queueing short (in both designs).",
        f"- At its goodput the colocated baseline is "
        f"{'TTFT' if bdc['ttft_attainment'] <= bdc['tpot_attainment'] else 'TPOT'}-bound "
        f"(TTFT attainment {bdc['ttft_attainment']:.3f}, TPOT attainment "
        f"{bdc['tpot_attainment']:.3f}, TPOT p90 "
        f"{bdc['tpot_p90'] * 1e3:.0f} ms against a 100 ms target): decoding on tp4 takes "
        "~15-30 ms a step, so even with prefill chunks of up to 4k tokens (~180 ms) in the "
        "same steps the mean TPOT stays well inside 0.1 s. Colocated instances put the slack "
        "that the TTFT target forces on the prefill GPUs to work on decodes, while a "
        "disaggregated plan pays for separate decode GPUs "
        f"(disaggregated at goodput: TTFT attainment {bdd['ttft_attainment']:.3f}, TPOT "
        f"attainment {bdd['tpot_attainment']:.3f}).",
        "- The baseline is vLLM v1-like (decodes and prefill chunks fused in one step, the fixed "
        "per-step cost paid once), stronger than the vLLM 0.2 scheduler DistServe compared "
        "against, and TPOT is a per-request mean, which amortises prefill stalls.",
        "- The sweep below shows where disaggregation pays off in this model: when the TPOT "
        "target is tight relative to prefill step times (e.g. 30 ms), colocated steps that "
        "carry prefill chunks break TPOT while dedicated decode instances do not.",
    ]
    return lines


def write_md(r: dict, path: Path) -> None:
    s, ex, chk = r["setup"], r["exhaustive"], r["check"]
    L = [
        "# Placement planner vs. exhaustive search (simulated)", "",
        f"{s['date']} · Python {s['python']} · {s['cpus']}", "",
        f"Profile: {s['profile']}. Trace: {s['trace']} — representative window "
        f"`{r['slice']['name']}` of {r['slice']['requests']} requests (prompt mean "
        f"{r['slice']['prompt_mean']:.0f}, output mean {r['slice']['output_mean']:.0f}), "
        "replayed at rescaled rates. SLO: TTFT "
        f"{s['slo']['ttft_s']} s, TPOT {s['slo']['tpot_s']} s, {s['slo']['attainment']:.0%} "
        f"attainment. Cluster: {s['cluster']}. Simulator: {s['sim_config']}. Goodput = highest "
        f"measured rate meeting the target (bisection, {s['tol']:.0%} precision).", "",
        "## Planner", "",
        "| algorithm | plan | GPUs | goodput (req/s) | per GPU | simulations | runtime (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, p in r["planner"].items():
        L.append(f"| {name} | {p['label']} | {p['num_gpus']} | {p['goodput_rps']:.2f} | "
                 f"{p['per_gpu_goodput']:.3f} | {p['sims']} | {p['runtime_s']:.1f} |")
    L += ["", "## Exhaustive search", "",
          f"{ex['candidates']} candidates ({ex['disaggregated']} disaggregated, "
          f"{ex['colocated']} colocated), {ex['distinct_searches']} distinct goodput searches "
          f"(equivalent configurations share one), {ex['sims']} simulations, "
          f"{ex['runtime_s']:.1f} s on {ex['workers']} worker(s).", "",
          "| rank | configuration | GPUs | goodput (req/s) | per GPU |",
          "|---:|---|---:|---:|---:|"]
    for mode in ("top_disaggregated", "top_colocated"):
        for i, e in enumerate(ex[mode][:5], 1):
            L.append(f"| {i} | {e['label']} | {e['num_gpus']} | {e['goodput_rps']:.2f} | "
                     f"{e['per_gpu_goodput']:.3f} |")
    L += ["", "## Acceptance", "",
          f"Planner (auto) {chk['plan_per_gpu']:.3f} req/s/GPU vs. best exhaustive "
          f"disaggregated {chk['exhaustive_best_disagg_per_gpu']:.3f}: ratio "
          f"{chk['ratio']:.3f} -> **{'PASS' if chk['pass'] else 'FAIL'}** (>= 0.95).", "",
          f"Planner with colocated candidates {chk['plan_with_colocated_per_gpu']:.3f} vs. best "
          f"exhaustive overall {chk['exhaustive_best_overall_per_gpu']:.3f}: ratio "
          f"{chk['ratio_overall']:.3f}.", "",
          "## Disaggregated vs. colocated", ""]
    L += verdict(r)
    b = r["breakdown"]
    L += ["", "| at goodput | rate | attainment | TTFT att. | TPOT att. | TTFT p50/p90 (s) | "
          "TPOT p50/p90 (ms) |", "|---|---:|---:|---:|---:|---|---|"]
    for mode in ("disaggregated", "colocated"):
        x = b[mode]
        L.append(f"| {mode} | {x['rate']:.2f} | {x['attainment']:.3f} | "
                 f"{x['ttft_attainment']:.3f} | {x['tpot_attainment']:.3f} | "
                 f"{x['ttft_p50']:.3f}/{x['ttft_p90']:.3f} | "
                 f"{x['tpot_p50'] * 1e3:.1f}/{x['tpot_p90'] * 1e3:.1f} |")
    if r.get("sweep"):
        L += ["", "## Sweep (1 x 8 GPUs, exhaustive search each)", "",
              "| prompts | prompt mean | TTFT (s) | TPOT (s) | best disaggregated | per GPU | "
              "best colocated | per GPU | disagg / colocated |",
              "|---|---:|---:|---:|---|---:|---|---:|---:|"]
        for w in r["sweep"]:
            d, c = w["best_disaggregated"], w["best_colocated"]
            ratio = w["disagg_over_colocated"]
            ratio_s = f"{ratio:.2f}" if ratio else "n/a"
            L.append(f"| x{w['prompt_scale']:g} | {w['prompt_mean']:.0f} | {w['ttft_s']} | "
                     f"{w['tpot_s']} | {d['label']} | {d['per_gpu_goodput']:.3f} | "
                     f"{c['label']} | {c['per_gpu_goodput']:.3f} | {ratio_s} |")
    cmd = f"python benchmarks/planner_vs_exhaustive.py {s['argv']}".strip()
    L += ["", "![attainment vs per-GPU rate](planner_vs_exhaustive.png)", "",
          f"Generated by `{cmd}` in {s['runtime_s']:.0f} s; all numbers in "
          "`planner_vs_exhaustive.json`."]
    path.write_text("\n".join(L) + "\n")


def write_png(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, style in (("disaggregated", "o-"), ("colocated", "s-")):
        xs, ys = zip(*r["curves"][mode], strict=True)
        e = r[f"best_{mode}"]
        ax.plot(xs, ys, style, ms=3, label=f"{e['label']} (goodput {e['per_gpu_goodput']:.2f})")
        ax.axvline(e["per_gpu_goodput"], color=ax.lines[-1].get_color(), ls=":", lw=1)
    ax.axhline(r["setup"]["slo"]["attainment"], color="k", ls="--", lw=1, label="target")
    ax.set_xlabel("request rate per GPU (req/s/GPU)")
    ax.set_ylabel("SLO attainment (TTFT and TPOT)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"OPT-13B (DistServe A100 model), Azure conv, {r['setup']['gpus']} A100 GPUs, "
                 f"SLO {r['setup']['slo']['ttft_s']}/{r['setup']['slo']['tpot_s']} s",
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(AZURE))
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--max-requests", type=int, default=1500)
    ap.add_argument("--sweep-requests", type=int, default=1000)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 x 8 GPUs, 600 requests, no sweep")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slo-ttft", type=float, default=0.25)
    ap.add_argument("--slo-tpot", type=float, default=0.1)
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.nodes, args.max_requests, args.no_sweep = 1, 600, True
    if not Path(args.trace).exists():
        print(f"trace {args.trace} not found", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    trace = load_azure_csv(args.trace)
    cluster = ClusterDesc(args.nodes, args.gpus_per_node, 80.0, 300e9, 25e9, "A100-80GB")
    slo = SloConfig(args.slo_ttft, args.slo_tpot, args.attainment)
    r = run_main(args, trace, cluster, slo)
    r["sweep"] = [] if args.no_sweep else run_sweep(args, trace)
    r["setup"] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "cpus": f"{os.cpu_count()} CPUs",
        "gpus": f"{args.nodes}x{args.gpus_per_node}",
        "profile": "OPT-13B on A100-80GB (DistServe published latency model)",
        "trace": f"{Path(args.trace).name} ({len(trace)} requests, {trace.rate:.2f} req/s)",
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": slo.attainment},
        "cluster": f"{args.nodes} x {args.gpus_per_node} A100-80GB (NVLink 300 GB/s, "
                   "inter-node 25 GB/s)",
        "sim_config": "prefill token budget 4096, no chunking, decode batch <= 256",
        "tol": PlannerConfig().tol, "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "runtime_s": time.perf_counter() - t_start,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "planner_vs_exhaustive.json").write_text(json.dumps(r, indent=2) + "\n")
    write_md(r, out / "planner_vs_exhaustive.md")
    write_png(r, out / "planner_vs_exhaustive.png")
    chk = r["check"]
    print("\n".join(verdict(r)))
    print(f"planner/exhaustive = {chk['ratio']:.3f} -> {'PASS' if chk['pass'] else 'FAIL'}; "
          f"wrote {out}/planner_vs_exhaustive.{{json,md,png}} "
          f"({r['setup']['runtime_s']:.0f} s)")
    return 0 if chk["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
