"""SLO autoscaling in the simulator: autoscaled pools against the best fixed plan of the same GPUs.

One hour whose request rate steps 4x (20 minutes at 5 req/s, 20 at 20, 20 at 5; Poisson,
``workloads/rate_steps.py``), with the Azure conversation trace's (prompt, output) length
pairs (``../shared/data``; uniform 64-2048 / 16-512 tokens when absent), at DistServe's
OPT-13B A100 profile with TTFT 0.25 s, TPOT 0.1 s at 90% attainment. Instances: prefill
tp4 (4 GPUs), decode tp2 (2 GPUs), the shapes the planner picks for the Azure trace;
``slo_aware`` prefill dispatch.

- *autoscaled*: ``simulate_autoscaled`` from 1 prefill + 1 decode instance, bounds
  prefill 1-4, decode 1-8, a decision at most every 30 s, up-scale cooldown 120 s, down
  window 300 s, headroom 0.8, 60 s for a new instance to start (its GPUs count from the
  decision), capacities from the profile (``ProfileCapacity``);
- *fixed*: every (prefill, decode) split of a total GPU count simulated on the same
  trace; the best (attainment) per total, from the total nearest the autoscaled run's
  mean GPU count (*same GPUs*) up to its peak.

Reported: SLO attainment (both targets, all requests), goodput per GPU (requests meeting
both targets per second of the run, per mean GPU in use), GPU-hours; plots of the rate,
pool sizes and attainment over time, and attainment against GPU-hours.

    python benchmarks/autoscale_sim.py          # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from pdserve.cluster.autoscale import AutoscaleConfig, PoolBounds
from pdserve.cluster.autoscale.simulate import AutoscaledRun, simulate_autoscaled
from pdserve.cluster.planning.simulator import (
    DisaggPlanSpec,
    InstanceSpec,
    SimConfig,
    SimResult,
    simulate,
)
from pdserve.engine.latency_profile import distserve_opt13b_a100
from pdserve.router.slo import SloConfig
from pdserve.workloads.formats import load_azure_csv
from pdserve.workloads.rate_steps import RateStepsSpec, rate_steps_trace

AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_conv.csv"
RESULTS = Path(__file__).resolve().parent / "results"
SLO = SloConfig(0.25, 0.1, 0.9)
STEPS = ((1200.0, 5.0), (1200.0, 20.0), (1200.0, 5.0))
PREFILL_TP, DECODE_TP = 4, 2
SIM = SimConfig(dispatch="slo_aware")


def autoscale_config(profile) -> AutoscaleConfig:
    return AutoscaleConfig(
        PoolBounds(1, 4, "prefill"),
        PoolBounds(1, 8, "decode"),
        profile,
        SLO,
        interval_s=30.0,
        upscale_cooldown_s=120.0,
        downscale_window_s=300.0,
        headroom=0.8,
        startup_s=60.0,
        prefill_tp=PREFILL_TP,
        decode_tp=DECODE_TP,
    )


def splits(gpus: int, cfg: AutoscaleConfig) -> list[tuple[int, int]]:
    """(prefill, decode) instance counts within the bounds using exactly ``gpus`` GPUs."""
    return [
        (p, d)
        for p in range(1, cfg.prefill.max + 1)
        for d in range(1, cfg.decode.max + 1)
        if p * PREFILL_TP + d * DECODE_TP == gpus
    ]


def summary(res: SimResult, gpu_s: float, duration_s: float) -> dict:
    met = res.attainment(SLO) * len(res)
    mean_gpus = gpu_s / duration_s
    pct = res.percentiles()
    return {
        "attainment": res.attainment(SLO),
        "ttft_attainment": res.ttft_attainment(SLO),
        "tpot_attainment": res.tpot_attainment(SLO),
        "mean_gpus": mean_gpus,
        "gpu_hours": gpu_s / 3600,
        "goodput_per_gpu": met / duration_s / mean_gpus,
        "ttft_p90": pct.ttft_p90,
        "tpot_p90": pct.tpot_p90,
    }


def over_time(res: SimResult, step_s: float, end_s: float) -> list[float | None]:
    """SLO attainment of the requests finishing in each ``step_s`` bin (as the timeline)."""
    bins = int(end_s // step_s) + 1
    met, done = [0] * bins, [0] * bins
    for f, p, last in zip(res.ttft, res.tpot, res.last_token, strict=True):
        if last == last:
            k = min(bins - 1, int(last // step_s))
            done[k] += 1
            met[k] += SLO.met(f, p)
    return [m / n if n else None for m, n in zip(met, done, strict=True)]


def fixed_plans(trace, profile, cfg: AutoscaleConfig, totals: list[int]) -> dict[int, dict]:
    out = {}
    for g in totals:
        rows = []
        for p, d in splits(g, cfg):
            plan = DisaggPlanSpec(InstanceSpec(PREFILL_TP, 1, p), InstanceSpec(DECODE_TP, 1, d))
            res = simulate(plan, profile, trace, SIM)
            end = max([trace.duration_s, *(t for t in res.last_token if t == t)])
            rows.append((res.attainment(SLO), p, d, res, end))
        if rows:
            att, p, d, res, end = max(rows, key=lambda r: r[0])
            out[g] = {
                "prefill": p,
                "decode": d,
                "gpus": g,
                "tried": [[r[1], r[2], r[0]] for r in rows],
                **summary(res, g * end, end),
                "result": res,
                "end_s": end,
            }
    return out


def markdown(
    spec: RateStepsSpec, auto: dict, fixed: dict[int, dict], same: int, decisions: list
) -> str:
    def row(name: str, s: dict) -> str:
        return (
            f"| {name} | {s['attainment']:.1%} | {s['ttft_attainment']:.1%} | "
            f"{s['tpot_attainment']:.1%} | {s['mean_gpus']:.1f} | {s['gpu_hours']:.2f} | "
            f"{s['goodput_per_gpu']:.3f} | {s['ttft_p90']:.3f} | {s['tpot_p90']:.3f} |"
        )

    cfg = auto["config"]
    lines = [
        "# SLO autoscaling in the simulator",
        "",
        f"`benchmarks/autoscale_sim.py`: {spec.describe()}. DistServe OPT-13B A100 "
        f"profile; SLO TTFT {SLO.ttft_s:g} s / TPOT {SLO.tpot_s:g} s at "
        f"{SLO.attainment:.0%} attainment; prefill instances tp{PREFILL_TP}, decode "
        f"tp{DECODE_TP}; `slo_aware` dispatch. Autoscaler: prefill "
        f"{cfg['prefill']['min']}-{cfg['prefill']['max']}, decode "
        f"{cfg['decode']['min']}-{cfg['decode']['max']} instances, interval "
        f"{cfg['interval_s']:g} s, up cooldown {cfg['upscale_cooldown_s']:g} s, down "
        f"window {cfg['downscale_window_s']:g} s, headroom {cfg['headroom']:g}, "
        f"startup {cfg['startup_s']:g} s, from 1+1 instances. Goodput per GPU = "
        "requests meeting both targets per second of the run / mean GPUs.",
        "",
        "| pools | attainment | TTFT att. | TPOT att. | mean GPUs | GPU-hours | "
        "goodput per GPU | TTFT p90 (s) | TPOT p90 (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        row("autoscaled", auto["summary"]),
    ]
    for g, f in sorted(fixed.items()):
        tag = " (same GPUs)" if g == same else ""
        lines.append(row(f"fixed {f['prefill']}P+{f['decode']}D = {g} GPUs{tag}", f))
    lines += ["", f"Decisions ({len(decisions)}):", ""]
    lines += [
        f"- {t:.0f} s: {d['reason']} -> {d['prefill']}P+{d['decode']}D ({d['detail']})"
        for t, d in decisions
    ]
    lines += ["", "![rate, pools and attainment over time](autoscale_sim.png)", ""]
    return "\n".join(lines)


def plot(run: AutoscaledRun, fixed: dict[int, dict], same: int, auto: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = run.timeline
    mins = [p.t / 60 for p in tl]
    fig, axes = plt.subplots(3, 1, figsize=(9, 10))
    ax = axes[0]
    ax.plot(mins, [p.arrival_rate for p in tl], color="grey", lw=1, label="arrival rate")
    ax.set_ylabel("req/s")
    ax.set_xlabel("minutes")
    ax2 = ax.twinx()
    ax2.step(mins, [p.prefill * PREFILL_TP for p in tl], where="post", label="prefill GPUs")
    ax2.step(mins, [p.decode * DECODE_TP for p in tl], where="post", label="decode GPUs")
    ax2.step(
        mins,
        [p.prefill * PREFILL_TP + p.decode * DECODE_TP for p in tl],
        where="post",
        color="black",
        label="all GPUs",
    )
    ax2.axhline(same, color="tab:red", ls=":", lw=1, label=f"fixed plan ({same} GPUs)")
    ax2.set_ylabel("GPUs (provisioned)")
    ax.set_title("autoscaled pools following the rate")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    ax = axes[1]
    step = tl[1].t - tl[0].t if len(tl) > 1 else 30.0
    ax.plot(mins, [p.slo_attainment for p in tl], label="autoscaled")
    for g, style in ((same, "--"), (max(fixed), ":")):
        f = fixed[g]
        series = over_time(f["result"], step, f["end_s"])
        ax.plot(
            [(k + 1) * step / 60 for k in range(len(series))],
            series,
            style,
            label=f"fixed {f['prefill']}P+{f['decode']}D ({g} GPUs)",
        )
    ax.axhline(SLO.attainment, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("minutes")
    ax.set_ylabel(f"SLO attainment per {step:g} s")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[2]
    gs = sorted(fixed)
    ax.plot(
        [fixed[g]["gpu_hours"] for g in gs],
        [fixed[g]["attainment"] for g in gs],
        "s-",
        label="best fixed plan per GPU count",
    )
    for g in gs:
        ax.annotate(f"{g}", (fixed[g]["gpu_hours"], fixed[g]["attainment"]), fontsize=7)
    s = auto["summary"]
    ax.plot([s["gpu_hours"]], [s["attainment"]], "r*", ms=12, label="autoscaled")
    ax.axhline(SLO.attainment, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("GPU-hours")
    ax.set_ylabel("SLO attainment (whole run)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(AZURE), help="the Azure conversation CSV (lengths)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    profile = distserve_opt13b_a100()
    pairs = ()
    if Path(args.trace).exists():
        pairs = tuple((r.prompt_len, r.output_len) for r in load_azure_csv(args.trace).requests)
    else:
        print(f"{args.trace} not found: uniform lengths")
    spec = RateStepsSpec(steps=STEPS, lengths=pairs, seed=0)
    trace = rate_steps_trace(spec, "rate-steps-5-20-5")
    cfg = autoscale_config(profile)
    run = simulate_autoscaled(trace, cfg, (1, 1), SIM)
    auto_s = summary(run.result, run.gpu_seconds, run.duration_s)
    peak = max(p.prefill * PREFILL_TP + p.decode * DECODE_TP for p in run.timeline)
    totals = sorted({g for g in range(2, peak + 1) if splits(g, cfg)})
    same = min(totals, key=lambda g: (abs(g - auto_s["mean_gpus"]), g))
    fixed = fixed_plans(trace, profile, cfg, [g for g in totals if g >= same])
    print(
        f"autoscaled: attainment {auto_s['attainment']:.1%}, mean GPUs "
        f"{auto_s['mean_gpus']:.2f}; "
        + ", ".join(f"fixed {g}: {f['attainment']:.1%}" for g, f in sorted(fixed.items()))
    )
    cfg_d = {k: v for k, v in asdict(cfg).items() if k != "profile"}
    auto = {
        "config": cfg_d,
        "summary": auto_s,
        "peak_gpus": peak,
        "timeline": [asdict(p) for p in run.timeline],
    }
    decisions = [(t, asdict(d)) for t, d in run.decisions]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoscale_sim.json").write_text(
        json.dumps(
            {
                "benchmark": "autoscale_sim",
                "profile": "distserve-opt13b",
                "slo": asdict(SLO),
                "trace": spec.describe(),
                "requests": len(trace),
                "same_gpus": same,
                "autoscaled": auto,
                "decisions": decisions,
                "fixed": {
                    g: {k: v for k, v in f.items() if k not in ("result",)}
                    for g, f in fixed.items()
                },
                "runtime_s": round(time.monotonic() - t0, 1),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    md = markdown(spec, auto, fixed, same, decisions)
    (out / "autoscale_sim.md").write_text(md)
    plot(run, fixed, same, auto, out / "autoscale_sim.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
