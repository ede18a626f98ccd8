"""KV-aware prefill routing in the simulator: goodput per GPU with and without it.

Every workload is simulated on one fixed plan at DistServe's OPT-13B A100 profile (TTFT
0.25 s, TPOT 0.1 s, 90% attainment), with a prefix cache on every prefill instance
(``SimConfig.prefix_caching``: the workers cache whatever the router does) and three
prefill routings side by side, in one run:

- ``least_loaded``: the default, fewest queued prompt tokens;
- ``slo_aware``: lowest predicted TTFT (the router's ``predict_ttft_s``);
- ``kv_aware``: ``slo_aware`` where a prompt counts only the tokens the router's own
  record (``router.prefix_index``) does not expect that instance to hold.

``kv_aware`` against ``slo_aware`` isolates what knowing the caches adds; against
``least_loaded`` it is the whole change from the default. Workloads:

- two synthetic prefix-sharing traces (``workloads/prefix_sharing.py``, Mooncake format):
  ``system prompts`` (few shared prefixes: every instance's cache holds them all) and
  ``documents`` (more shared prefixes than one instance's cache holds, fewer than the
  pool's);
- the Azure conversation trace (``../shared/data``; no prefix hashes, so no hits:
  ``kv_aware`` must equal ``slo_aware``), on the plan the planner picks for it on 2x8
  GPUs. Skipped with a message when the data is absent.

Goodput is ``GoodputSearch`` (bisection to 2%) replaying each whole trace rescaled to each
rate (not steady-state windows: they wrap a trace around, which would replay its unique
prompts and fake cache hits). Attainment is also measured on a grid of rates for the plot,
and hit rate and TTFT p50/p90 at one fixed rate per workload: ``slo_aware``'s goodput, the
load where the policy ``kv_aware`` extends just holds its target.

    python benchmarks/kv_routing_sim.py          # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from pdserve.benchmarks.sim_variants import Case, compare, gain
from pdserve.cluster.planning.simulator import (
    DisaggPlanSpec,
    InstanceSpec,
    SimConfig,
    representative_slice,
)
from pdserve.engine.latency_profile import distserve_opt13b_a100
from pdserve.router.slo import SloConfig
from pdserve.workloads.formats import load_azure_csv
from pdserve.workloads.prefix_sharing import (
    PrefixSharingSpec,
    prefix_sharing_trace,
    reusable_share,
)

AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_conv.csv"
RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("least_loaded", "slo_aware", "kv_aware")
SLO = SloConfig(0.25, 0.1, 0.9)
SYNTH_PLAN = DisaggPlanSpec(InstanceSpec(1, 1, 3), InstanceSpec(1, 1, 4))
AZURE_PLAN = DisaggPlanSpec(InstanceSpec(4, 1, 2), InstanceSpec(2, 1, 3))  # planner_scale 2x8
GRID = (0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4)  # x the best policy's goodput


def synth_cases(requests: int) -> list[Case]:
    base = dict(requests=requests, rate=10.0, shared_share=0.8, prefix_tokens=1024,
                suffix_tokens=(32, 512), output_tokens=(16, 128), seed=0)
    cases = []
    for key, title, n in (("system_prompts", "synthetic: 8 shared system prompts", 8),
                          ("documents", "synthetic: 100 shared documents", 100)):
        spec = PrefixSharingSpec(num_prefixes=n, **base)
        trace = prefix_sharing_trace(spec)
        cases.append(Case(key, title, trace, SYNTH_PLAN,
                          f"{spec.describe()}; an unbounded cache would reuse "
                          f"{reusable_share(trace):.1%} of prompt tokens"))
    return cases


def run_case(case: Case, profile) -> dict:
    def at_fixed(res) -> dict:
        pct = res.percentiles()
        return {"attainment": res.attainment(SLO), "hit_rate": res.prefix_hit_rate,
                "ttft_p50": pct.ttft_p50, "ttft_p90": pct.ttft_p90, "tpot_p90": pct.tpot_p90}

    return compare(case, profile, SLO,
                   {d: SimConfig(dispatch=d, prefix_caching=True) for d in POLICIES},
                   "slo_aware", GRID, "policies", at_fixed)


def markdown(cases: list[dict], skipped: str | None) -> str:
    lines = ["# KV-aware prefill routing in the simulator", "",
             "`benchmarks/kv_routing_sim.py`: DistServe OPT-13B A100 profile, SLO TTFT "
             f"{SLO.ttft_s:g} s / TPOT {SLO.tpot_s:g} s at {SLO.attainment:.0%} attainment. "
             "Every prefill instance has a prefix cache (LRU of 512-token blocks, capacity = its "
             "KV capacity: 129 blocks at tp1, 696 at tp4); the three policies differ only in "
             "where they send prompts. Goodput: `GoodputSearch` to 2% on the whole trace "
             "rescaled to each rate. Hit rate = cached prompt tokens / prompt tokens.", ""]
    for c in cases:
        rows = c["policies"]
        lines += [f"## {c['title']}", "", f"Plan {c['plan']} ({c['gpus']} GPUs), "
                  f"{c['requests']} requests. {c['about']}.", "",
                  f"| policy | goodput (req/s) | per GPU | per GPU (interpolated) | at "
                  f"{c['fixed_rate']:.2f} req/s: attainment | hit rate | TTFT p50 (s) | "
                  "TTFT p90 (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for d in POLICIES:
            r, f = rows[d], rows[d]["at_fixed_rate"]
            hit = f"{f['hit_rate']:.1%}" if f["hit_rate"] is not None else "-"
            lines.append(f"| {d} | {r['goodput_rps']:.2f} | {r['goodput_per_gpu']:.3f} | "
                         f"{r['interpolated_per_gpu']:.3f} | {f['attainment']:.1%} | {hit} | "
                         f"{f['ttft_p50']:.3f} | {f['ttft_p90']:.3f} |")
        lines += ["", f"kv_aware vs slo_aware: {gain(rows, 'kv_aware', 'slo_aware')} goodput "
                  f"per GPU; vs least_loaded: {gain(rows, 'kv_aware', 'least_loaded')}.", ""]
    if skipped:
        lines += [f"Azure conversation trace: skipped ({skipped}).", ""]
    lines += ["![attainment vs rate](kv_routing_sim.png)", ""]
    return "\n".join(lines)


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(5.2 * len(cases), 4.2), squeeze=False)
    for ax, c in zip(axes[0], cases, strict=True):
        for d, style in zip(POLICIES, ("o-", "s--", "^-"), strict=True):
            r = c["policies"][d]
            xs = [x / c["gpus"] for x, _ in r["curve"]]
            ax.plot(xs, [y for _, y in r["curve"]], style,
                    label=f"{d} (goodput {r['goodput_per_gpu']:.2f}/GPU)")
        ax.axhline(SLO.attainment, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{c['title']}\n{c['plan']}", fontsize=9)
        ax.set_xlabel("rate per GPU (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000, help="synthetic trace length")
    ap.add_argument("--azure-requests", type=int, default=2000,
                    help="representative slice of the Azure trace")
    ap.add_argument("--trace", default=str(AZURE), help="the Azure conversation CSV")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)

    profile = distserve_opt13b_a100()
    cases = synth_cases(args.requests)
    skipped = None
    if Path(args.trace).exists():
        azure = representative_slice(load_azure_csv(args.trace), args.azure_requests)
        cases.append(Case("azure", "Azure conversation trace (no prefix hashes)", azure,
                          AZURE_PLAN, f"representative slice of {args.azure_requests} "
                          "requests; no prefix information, so no cache hits"))
    else:
        skipped = f"{args.trace} not found"
        print(f"Azure conversation trace: skipped, {skipped}")
    t0 = time.monotonic()
    results = []
    for case in cases:
        results.append(run_case(case, profile))
        print(f"{case.title}: " + ", ".join(
            f"{d} {results[-1]['policies'][d]['goodput_per_gpu']:.3f}/GPU" for d in POLICIES)
            + f" ({results[-1]['runtime_s']} s)", flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_routing_sim.json").write_text(json.dumps({
        "benchmark": "kv_routing_sim", "profile": "distserve-opt13b", "slo": asdict(SLO),
        "policies": POLICIES, "cases": results, "azure_skipped": skipped,
        "runtime_s": round(time.monotonic() - t0, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    md = markdown(results, skipped)
    (out / "kv_routing_sim.md").write_text(md)
    plot(results, out / "kv_routing_sim.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
