"""Conditional disaggregation in the simulator: goodput per GPU with and without local prefill.

Every case is one fixed plan at DistServe's OPT-13B A100 profile (TTFT 0.25 s, TPOT 0.1 s,
90% attainment) with ``slo_aware`` prefill dispatch (its TTFT prediction is what the
``wait_factor`` test reads), run under several local-prefill rules
(``router.local_prefill``, ``SimConfig.local_prefill``), in one run:

- ``off``: every request is disaggregated (the default);
- ``short<=N``: a prompt of at most N uncached tokens prefills on its decode instance
  (N = 64, 128, 256, 512);
- ``wait x2``: a prompt (up to 2048 tokens) prefills locally when the best predicted TTFT
  on the prefill pool exceeds twice its local prefill time;
- ``short<=128 + wait x2``: both tests.

A local prefill is a step of its own on the decode lane: the requests decoding there gain
no token meanwhile (``simulator/disagg.py``), so the rule trades prefill-pool queueing
and KV transfer for decode interference. Cases: a synthetic chat workload with short
prompts (16-512 tokens, outputs 32-512) on its best fixed plan of 6 GPUs and on a plan
short of prefill (1 prefill, 6 decode); the Azure conversation trace (``../shared/data``;
skipped with a message when absent) on the plan the planner picks for it on 2x8 GPUs and
on a plan with one prefill instance fewer.

Goodput is ``GoodputSearch`` (bisection to 2%) replaying each whole trace rescaled to each
rate; latencies, local share and decisions are reported at one fixed rate per case: the
goodput of ``off``.

    python benchmarks/cond_disagg_sim.py          # ~1 min on 2 cores
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
from pdserve.router.local_prefill import LocalPrefillConfig
from pdserve.router.slo import SloConfig
from pdserve.workloads.formats import load_azure_csv
from pdserve.workloads.synthetic import synthetic

AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_conv.csv"
RESULTS = Path(__file__).resolve().parent / "results"
SLO = SloConfig(0.25, 0.1, 0.9)
DISPATCH = "slo_aware"
RULES: dict[str, LocalPrefillConfig] = {
    "off": LocalPrefillConfig(),
    **{f"short<={n}": LocalPrefillConfig(max_local_tokens=n) for n in (64, 128, 256, 512)},
    "wait x2": LocalPrefillConfig(wait_factor=2.0),
    "short<=128 + wait x2": LocalPrefillConfig(max_local_tokens=128, wait_factor=2.0),
}
GRID = (0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4)  # x the best rule's goodput


def plan(p: tuple[int, int], d: tuple[int, int]) -> DisaggPlanSpec:
    """``p``/``d``: (tp, count) of each pool."""
    return DisaggPlanSpec(InstanceSpec(p[0], 1, p[1]), InstanceSpec(d[0], 1, d[1]))


def synth_cases(requests: int) -> list[Case]:
    t = synthetic(requests, 10.0, (16, 512), (32, 512), seed=0, name="short-chat")
    about = (
        f"{requests} requests, Poisson, prompts uniform 16-512 tokens, outputs "
        "uniform 32-512, seed 0"
    )
    return [
        Case(
            "short_balanced",
            "synthetic short prompts: best fixed plan",
            t,
            plan((1, 2), (1, 4)),
            about + "; the best per-GPU goodput of the tp1 "
            "splits 1/3, 1/4, 2/4 and 1/6 (prefill/decode) tried with the rule off",
        ),
        Case(
            "short_prefill_light",
            "synthetic short prompts: prefill-light plan",
            t,
            plan((1, 1), (1, 6)),
            about + "; one prefill instance for six decode",
        ),
    ]


def azure_cases(path: str, requests: int) -> list[Case]:
    t = representative_slice(load_azure_csv(path), requests)
    about = f"representative slice of {requests} requests (prompt mean ~1.2k tokens)"
    return [
        Case(
            "azure_planned",
            "Azure conversation trace: planner's plan",
            t,
            plan((4, 2), (2, 3)),
            about + "; planner_scale's 2x8-GPU plan",
        ),
        Case(
            "azure_prefill_light",
            "Azure conversation trace: one prefill fewer",
            t,
            plan((4, 1), (2, 3)),
            about + "; the planner's plan less one prefill instance",
        ),
    ]


def run_case(case: Case, profile) -> dict:
    def at_fixed(res) -> dict:
        pct = res.percentiles()
        return {
            "attainment": res.attainment(SLO),
            "ttft_attainment": res.ttft_attainment(SLO),
            "tpot_attainment": res.tpot_attainment(SLO),
            "local_share": res.num_local_prefills / len(res),
            "decisions": dict(res.prefill_decisions),
            "kv_transfers": res.num_kv_transfers,
            "ttft_p50": pct.ttft_p50,
            "ttft_p90": pct.ttft_p90,
            "tpot_p50": pct.tpot_p50,
            "tpot_p90": pct.tpot_p90,
        }

    out = compare(case, profile, SLO,
                  {k: SimConfig(dispatch=DISPATCH, local_prefill=rule) for k, rule in RULES.items()},
                  "off", GRID, "rules", at_fixed)
    for k, row in out["rules"].items():
        out["rules"][k] = {"rule": asdict(RULES[k]), **row}
    return out


def markdown(cases: list[dict], skipped: str | None) -> str:
    lines = [
        "# Conditional disaggregation in the simulator",
        "",
        "`benchmarks/cond_disagg_sim.py`: DistServe OPT-13B A100 profile, SLO TTFT "
        f"{SLO.ttft_s:g} s / TPOT {SLO.tpot_s:g} s at {SLO.attainment:.0%} attainment, "
        f"`{DISPATCH}` prefill dispatch. A local prefill runs as a step on the decode "
        "lane (its running requests stall for it) and moves no KV. Goodput: "
        "`GoodputSearch` to 2% on the whole trace rescaled to each rate. The columns "
        "after it are measured at one rate per case: the goodput with the rule off.",
        "",
    ]
    for c in cases:
        rows = c["rules"]
        lines += [
            f"## {c['title']}",
            "",
            f"Plan {c['plan']} ({c['gpus']} GPUs), {c['requests']} requests: {c['about']}.",
            "",
            f"| rule | goodput per GPU | vs off | at {c['fixed_rate']:.2f} req/s: "
            "attainment | local | TTFT p90 (s) | TPOT p90 (s) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for k in RULES:
            r, f = rows[k], rows[k]["at_fixed_rate"]
            lines.append(
                f"| {k} | {r['goodput_per_gpu']:.3f} | {gain(rows, k, 'off')} | "
                f"{f['attainment']:.1%} | {f['local_share']:.1%} | "
                f"{f['ttft_p90']:.3f} | {f['tpot_p90']:.3f} |"
            )
        best = max(RULES, key=lambda k: rows[k]["goodput_per_gpu"])
        lines += ["", f"Best rule: {best} ({gain(rows, best, 'off')} goodput per GPU vs off).", ""]
    if skipped:
        lines += [f"Azure conversation trace: skipped ({skipped}).", ""]
    lines += ["![goodput per GPU by rule, attainment vs rate](cond_disagg_sim.png)", ""]
    return "\n".join(lines)


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cases)
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n, 7.6), squeeze=False)
    shown = ("off", "short<=128", "short<=512", "wait x2")
    for col, c in enumerate(cases):
        rows = c["rules"]
        ax = axes[0][col]
        vals = [rows[k]["goodput_per_gpu"] for k in RULES]
        ax.bar(
            range(len(RULES)), vals, color=["grey"] + ["tab:blue"] * 4 + ["tab:orange", "tab:green"]
        )
        ax.set_xticks(range(len(RULES)), list(RULES), rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("goodput per GPU (req/s)")
        ax.set_title(f"{c['title']}\n{c['plan']}", fontsize=8)
        ax = axes[1][col]
        for k, style in zip(shown, ("o-", "s--", "v--", "^-"), strict=True):
            xs = [x / c["gpus"] for x, _ in rows[k]["curve"]]
            ax.plot(xs, [y for _, y in rows[k]["curve"]], style, label=k)
        ax.axhline(SLO.attainment, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("rate per GPU (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="synthetic trace length")
    ap.add_argument(
        "--azure-requests", type=int, default=2000, help="representative slice of the Azure trace"
    )
    ap.add_argument("--trace", default=str(AZURE), help="the Azure conversation CSV")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)

    profile = distserve_opt13b_a100()
    cases = synth_cases(args.requests)
    skipped = None
    if Path(args.trace).exists():
        cases += azure_cases(args.trace, args.azure_requests)
    else:
        skipped = f"{args.trace} not found"
        print(f"Azure conversation trace: skipped, {skipped}")
    t0 = time.monotonic()
    results = []
    for case in cases:
        results.append(run_case(case, profile))
        rows = results[-1]["rules"]
        print(
            f"{case.title}: "
            + ", ".join(f"{k} {rows[k]['goodput_per_gpu']:.3f}" for k in RULES)
            + f" /GPU ({results[-1]['runtime_s']} s)",
            flush=True,
        )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cond_disagg_sim.json").write_text(
        json.dumps(
            {
                "benchmark": "cond_disagg_sim",
                "profile": "distserve-opt13b",
                "slo": asdict(SLO),
                "dispatch": DISPATCH,
                "rules": {k: asdict(v) for k, v in RULES.items()},
                "cases": results,
                "azure_skipped": skipped,
                "runtime_s": round(time.monotonic() - t0, 1),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    md = markdown(results, skipped)
    (out / "cond_disagg_sim.md").write_text(md)
    plot(results, out / "cond_disagg_sim.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
