"""Does the planner's claimed goodput hold at 8 to 512 GPUs, and how long does planning take?

On DistServe's OPT-13B A100 latency model and the Azure LLM conversation trace (chat SLO:
TTFT 0.25 s, TPOT 0.1 s, 90% attainment; the trace's own arrival times), for each
cluster size (default 1x8, 2x8, 8x8 and 64x8 A100-80GB nodes, NVLink 300 GB/s, 25 GB/s
between nodes):

1. runs ``pdserve plan``'s planner (``affinity=auto``) and times it;
2. re-simulates the plan on the whole trace rescaled to the claimed rate, as a user
   checking the plan with ``pdserve simulate --plan plan.json --rate R`` would, and
   reports attainment there (acceptance: >= 0.88 against the 0.9 target) and the
   SLO-meeting requests per second per GPU (rate x attainment / GPUs). At 64x8 the
   whole trace lasts ~25 s at the claimed rate, less than one steady-state window, so it
   is also replayed cyclically to the planner's long-window length (what the planner's
   own check measured).

Writes ``benchmarks/results/planner_scale.{json,md,png}``. Timing figures are only
meaningful on an otherwise idle machine (run it under the shared lock on the 2-core host):

    flock /tmp/pdserve-ray.lock python benchmarks/planner_scale.py            # ~10 min
    python benchmarks/planner_scale.py --sizes 1x8 --workers 1                 # ~20 s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pdserve.cluster.planning.cluster_desc import a100_cluster
from pdserve.cluster.planning.planner import Planner, PlannerConfig
from pdserve.cluster.planning.simulator import Workload, simulate
from pdserve.engine.latency_profile import distserve_opt13b_a100
from pdserve.router.slo import SloConfig
from pdserve.workloads.formats import load_azure_csv

AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_conv.csv"
RESULTS = Path(__file__).resolve().parent / "results"
SLO = SloConfig(ttft_s=0.25, tpot_s=0.1, attainment=0.9)
ACCEPT = 0.88


def resimulate(plan, profile, workload: Workload, rate: float) -> dict:
    t0 = time.perf_counter()
    res = simulate(plan.spec(), profile, workload.at_rate(rate))
    att = res.attainment(SLO)
    return {"requests": len(workload), "attainment": att,
            "ttft_attainment": res.ttft_attainment(SLO),
            "tpot_attainment": res.tpot_attainment(SLO),
            "slo_met_per_gpu": rate * att / plan.num_gpus,
            "sim_s": time.perf_counter() - t0, **res.percentiles().as_dict()}


def run_size(nodes: int, gpn: int, trace, workers: int) -> dict:
    profile = distserve_opt13b_a100()
    planner = Planner(a100_cluster(nodes, gpn), profile, trace, SLO,
                      config=PlannerConfig(workers=workers))
    t0 = time.perf_counter()
    plan = planner.plan("auto")
    runtime = time.perf_counter() - t0
    c = plan.check
    what = (f"P={plan.prefill.label()} D={plan.decode.label()}"
            + (f" in {plan.units} units" if plan.units > 1 else "")
            if plan.mode == "disaggregated" else f"colocated {plan.colocated.label()}")
    row = {"cluster": f"{nodes}x{gpn}", "gpus": nodes * gpn, "plan": what,
           "affinity": plan.affinity, "plan_gpus": plan.num_gpus,
           "planner_s": runtime, "simulations": plan.search.simulations,
           "requests_simulated": plan.search.requests_simulated,
           "claimed_rps": plan.expected_rate, "claimed_per_gpu": plan.expected_per_gpu_goodput,
           "searched_rps": c.searched_rate, "backed_off": c.backed_off,
           "long_window_requests": c.long_requests, "long_window_attainment": c.long_attainment,
           "replicates": list(c.replicates), "replicate_mean": c.replicate_mean,
           "replicate_sd": c.replicate_sd,
           "replicates_passing": c.replicates_passing(SLO.attainment),
           "notes": plan.search.notes}
    whole = planner.workload
    row["whole_trace"] = resimulate(plan, profile, whole, plan.expected_rate)
    if c.long_requests > len(whole):
        row["long_window"] = resimulate(plan, profile, whole.cycle(0, c.long_requests),
                                        plan.expected_rate)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    out = ["# Planner at scale: claimed vs. re-simulated goodput (simulated)", "",
           f"{meta['date']} · Python {meta['python']} · {meta['cpus']} CPUs · "
           f"{meta['workers']} worker process(es)", "",
           "Profile: OPT-13B on A100-80GB (DistServe's published latency model). Trace: "
           f"{meta['trace']} ({meta['trace_requests']} requests, {meta['trace_rate']:.2f} "
           "req/s), its own arrival times rescaled to each rate. SLO: TTFT 0.25 s, TPOT "
           "0.1 s, 90% attainment. Nodes: 8 x A100-80GB, NVLink 300 GB/s, 25 GB/s between "
           "nodes. Planner: `pdserve plan` defaults (steady-state windows, 1% bisection "
           "precision, long-window check, 4 replicate windows).", "",
           "| cluster | plan | GPUs used | planner (s) | simulations | claimed req/s | "
           "claimed /GPU | whole-trace attainment | re-simulated /GPU | replicate windows "
           "(mean ± sd, passing) | accept |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        w = r["whole_trace"]
        ok = "PASS" if w["attainment"] >= ACCEPT else "FAIL"
        out.append(f"| {r['cluster']} | {r['plan']} ({r['affinity']}) | {r['plan_gpus']} | "
                   f"{r['planner_s']:.1f} | {r['simulations']} | {r['claimed_rps']:.2f} | "
                   f"{r['claimed_per_gpu']:.3f} | {w['attainment']:.3f} | "
                   f"{w['slo_met_per_gpu']:.3f} | {r['replicate_mean']:.3f} ± "
                   f"{r['replicate_sd']:.3f}, {r['replicates_passing']}/"
                   f"{len(r['replicates'])} | {ok} |")
    out += ["", "Re-simulated /GPU = claimed rate x whole-trace attainment / GPUs used: the "
            "SLO-meeting requests per second per GPU, as issue 15 measured them (a claim that "
            "holds exactly at 90% attainment shows 0.9 x the claimed figure). Accept: "
            f"whole-trace attainment >= {ACCEPT} at the claimed rate. Planner (s): wall time "
            "of `Planner.plan`, search, long-window check and replicate windows included; "
            "simulations: those of the search."]
    for r in rows:
        if "replicated" in r["notes"]:
            out.append(f"\nAt {r['cluster']} the planner searched one sub-cluster and "
                       f"replicated its plan ({r['notes'].rsplit('; ', 1)[-1]}), then searched "
                       "the whole cluster's long window upwards from the replicated rate "
                       f"({r['searched_rps']:.1f} req/s) to {r['claimed_rps']:.1f} req/s.")
    for r in rows:
        if "long_window" in r:
            lw = r["long_window"]
            out.append(f"\nAt {r['cluster']} the whole trace lasts "
                       f"{meta['trace_requests'] / r['claimed_rps']:.0f} s at the claimed rate "
                       "(shorter than one steady-state window); replayed cyclically to the "
                       f"planner's long window ({lw['requests']} requests) attainment is "
                       f"{lw['attainment']:.3f} ({lw['slo_met_per_gpu']:.3f} per GPU).")
    out += ["", "Before this change (issue 15): at 8x8 the planner claimed 178.2 req/s "
            "(2.78 per GPU) for P=12x(tp4) D=8x(tp2) and the whole trace gave 9% attainment "
            "at that rate; at 2x8 77.6%.", "",
            "![claimed vs re-simulated](planner_scale.png)", "",
            f"Generated by `python benchmarks/planner_scale.py` in {meta['total_s']:.0f} s; "
            "all numbers in `planner_scale.json`."]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = list(range(len(rows)))
    names = [r["cluster"] for r in rows]
    ax.bar(xs, [r["claimed_per_gpu"] for r in rows])
    ax.set_xticks(xs, names)
    ax.set_ylabel("claimed goodput (req/s per GPU)")
    ax.set_title("Planner's claim")
    bx.plot(xs, [r["whole_trace"]["attainment"] for r in rows], "o-",
            label="whole trace at the claimed rate")
    bx.plot(xs, [r["replicate_mean"] for r in rows], "s--", label="replicate windows (mean)")
    bx.axhline(SLO.attainment, color="green", lw=1, label="target")
    bx.axhline(ACCEPT, color="red", lw=1, ls=":", label="acceptance")
    bx.set_xticks(xs, names)
    bx.set_ylim(0.8, 1.0)
    bx.set_ylabel("SLO attainment")
    bx.set_title("Re-simulated at the claimed rate")
    bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1x8,2x8,8x8,64x8", help="NODESxGPUS, comma-separated")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--name", default="planner_scale")
    ap.add_argument("--from-json", action="store_true",
                    help="only re-render the Markdown and plot from the JSON")
    args = ap.parse_args()
    if args.from_json:
        data = json.loads((RESULTS / f"{args.name}.json").read_text())
        (RESULTS / f"{args.name}.md").write_text(markdown(data["rows"], data["meta"]))
        plot(data["rows"], RESULTS / f"{args.name}.png")
        return 0
    if not AZURE.is_file():
        print(f"trace not found: {AZURE}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    trace = load_azure_csv(AZURE)
    rows = []
    for size in args.sizes.split(","):
        nodes, gpn = (int(x) for x in size.split("x"))
        rows.append(run_size(nodes, gpn, trace, args.workers))
        r = rows[-1]
        print(f"{size}: {r['plan']} claimed {r['claimed_per_gpu']:.3f}/GPU in "
              f"{r['planner_s']:.1f} s; whole trace attainment "
              f"{r['whole_trace']['attainment']:.3f}", flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "workers": args.workers, "trace": AZURE.name, "trace_requests": len(trace),
            "trace_rate": trace.rate, "total_s": time.perf_counter() - t0}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                          indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, meta))
    plot(rows, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
