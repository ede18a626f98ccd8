"""The SLO autoscaler on a real CPU cluster: a load step low -> high -> low, with the
simulator's prediction of the same run beside it.

One run launches a Ray cluster (the demo model, shared-memory KV, one torch thread per
worker) at 1 prefill + 1 decode worker with the autoscaler on (bounds 1..2 per pool,
capacities from the demo model's measured CPU profile, ``--profile``), and replays a
Mooncake-style trace whose rate steps 4x: ``--low`` req/s, then 4x that, then ``--low``
again (Poisson; prompts 1024-2048 tokens, outputs 16-32, the lengths at which one prefill
instance sustains about 2.6 req/s by the profile, so the high step needs a second one).
The autoscaler decides every ``--interval`` seconds on that window; cooldown and down
window are short so the run fits minutes, not an hour.

Reported: the autoscaler's timeline (pool sizes, decisions and their reasons, arrival
rate, attainment, prefill queue), each worker's start / join / drain / leave times,
client-side TTFT/TPOT and attainment per 10 s, failed requests (must be 0) and the KV
blocks, reservations and requests every remaining worker holds at the end (must be 0);
beside them ``simulate_autoscaled`` on the same trace, profile and configuration (its
start-up time set to the one measured here).

    flock /tmp/pdserve-ray.lock python benchmarks/autoscale_cluster.py \\
        --profile benchmarks/results/profile_sim_vs_real.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pdserve.cluster.autoscale import AutoscaleConfig, PoolBounds
from pdserve.cluster.autoscale.simulate import simulate_autoscaled
from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.loadgen import run_trace
from pdserve.cluster.cli.replay.report import summarize
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.cluster.planning.simulator import SimConfig
from pdserve.engine.config import EngineConfig
from pdserve.engine.demo_model import create_demo_model
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.drain import work_held
from pdserve.router.server import ServerConfig
from pdserve.router.slo import SloConfig
from pdserve.workloads.rate_steps import RateStepsSpec, rate_steps_trace

RESULTS = Path(__file__).resolve().parent / "results"
SLO = SloConfig(ttft_s=2.0, tpot_s=0.1, attainment=0.9)
BIN_S = 10.0


def config(profile: LatencyProfile, args, startup_s: float) -> AutoscaleConfig:
    return AutoscaleConfig(
        PoolBounds(1, 2, "prefill"), PoolBounds(1, 2, "decode"), profile, SLO,
        interval_s=args.interval, upscale_cooldown_s=args.cooldown,
        downscale_window_s=args.down_window, headroom=0.8, startup_s=startup_s)


def client_bins(run, duration_s: float) -> list[dict]:
    """Per ``BIN_S`` of arrival time: requests, failures, TTFT p50 and SLO attainment."""
    bins = []
    for k in range(int(duration_s // BIN_S) + 1):
        recs = [r for r in run.records if k * BIN_S <= r.arrival_s < (k + 1) * BIN_S]
        ok = [r for r in recs if r.status == "OK" and r.first_token_s is not None]
        ttfts = sorted(r.first_token_s - r.send_s for r in ok)

        def met(r) -> bool:
            ttft = r.first_token_s - r.send_s
            n = r.num_tokens
            tpot = (r.end_s - r.first_token_s) / (n - 1) if n > 1 else 0.0
            return ttft <= SLO.ttft_s and tpot <= SLO.tpot_s

        bins.append({"t": k * BIN_S, "requests": len(recs), "failed": len(recs) - len(ok),
                     "ttft_p50": ttfts[len(ttfts) // 2] if ttfts else None,
                     "attainment": sum(map(met, ok)) / len(recs) if recs else None})
    return bins


def run_real(args, profile: LatencyProfile, trace) -> dict:
    model = str(create_demo_model())
    engine = EngineConfig(model=model, device="cpu", max_num_seqs=32,
                          max_num_batched_tokens=2048, num_kv_blocks=4096)
    spec = ClusterSpec(engine=engine, prefill=PoolSpec(1), decode=PoolSpec(1),
                       kv=KVTransferConfig(backend="shm"), torch_threads=1,
                       router=RouterConfig(model=model, slo=SLO,
                                           server=ServerConfig(port=0, metrics_port=None)),
                       autoscale=config(profile, args, startup_s=10.0))
    cluster = launch(spec)
    import ray

    try:
        t_start = time.monotonic()
        run = run_trace(cluster.address, trace, LoadGenConfig(vocab_size=900, quiet=True))
        # The low tail: let the down window pass with no load, so the pools shrink back.
        time.sleep(args.down_window + 2 * args.interval)
        ray.get(cluster.autoscaler.settle.remote(120))
        hist = ray.get(cluster.autoscaler.history.remote())
        pools = ray.get(cluster.autoscaler.stop.remote())
        cluster.prefills, cluster.decodes = pools["prefill"], pools["decode"]
        stats = cluster.stats()
        held = {w: work_held(s) for w, s in stats.items()}
        final = {p: [w for w, _ in ws] for p, ws in pools.items()}
    finally:
        cluster.shutdown()
    offset = t_start - hist["rows"][0]["t_monotonic"] + hist["rows"][0]["t"] if hist["rows"] \
        else 0.0
    rows = [{**r, "t": r["t"] - offset} for r in hist["rows"]]
    events = [{**e, "t": e["t"] - offset} for e in hist["events"]]
    joined = {e["worker"]: e["t"] for e in events if e["event"] == "joined"}
    started = {e["worker"]: e["t"] for e in events if e["event"] == "starting"}
    startup = [joined[w] - started[w] for w in joined if w in started]
    rep = summarize(run, SLO, "autoscaled (real)")
    return {"rows": rows, "events": events, "bins": client_bins(run, trace.duration_s),
            "requests": rep.num_sent, "failed": rep.num_failed, "rejected": rep.num_rejected,
            "attainment": rep.attainment,
            "ttft_p50": rep.ttft_s.p50 if rep.ttft_s else None,
            "ttft_p90": rep.ttft_s.p90 if rep.ttft_s else None,
            "held_at_end": held, "final_pools": final,
            "startup_s": sum(startup) / len(startup) if startup else None}


def run_sim(args, profile: LatencyProfile, trace, startup_s: float) -> dict:
    cfg = config(profile, args, startup_s)
    out = simulate_autoscaled(trace, cfg, (1, 1), SimConfig(),
                              transfer_bandwidth=profile.bandwidth("shm") or 5e9)
    res = out.result
    return {"timeline": [p.__dict__ for p in out.timeline],
            "decisions": [{"t": t, "prefill": d.prefill, "decode": d.decode,
                           "reason": d.reason} for t, d in out.decisions],
            "attainment": res.attainment(SLO) if hasattr(res, "attainment") else None,
            "mean_instances": out.mean_gpus, "startup_s": startup_s}


def plot(real: dict, sim: dict, trace_rate, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    t_end = max([r["t"] for r in real["rows"]] + [p["t"] for p in sim["timeline"]])
    ts = [i * 1.0 for i in range(int(t_end) + 1)]
    ax[0].plot(ts, [trace_rate(t) for t in ts], "k--", label="offered rate (trace)")
    ax[0].plot([r["t"] for r in real["rows"]], [r["arrival_rate"] for r in real["rows"]],
               label="observed by the router")
    ax[0].set_ylabel("req/s")
    ax[0].legend()
    for pool, style in (("prefill", "-"), ("decode", ":")):
        ax[1].step([r["t"] for r in real["rows"]], [r[pool] for r in real["rows"]], style,
                   where="post", label=f"{pool}, real")
        ax[1].step([p["t"] for p in sim["timeline"]], [p[pool] for p in sim["timeline"]],
                   style, where="post", alpha=0.6, label=f"{pool}, simulator")
    ax[1].set_ylabel("workers")
    ax[1].legend()
    b = [x for x in real["bins"] if x["attainment"] is not None]
    ax[2].plot([x["t"] + BIN_S / 2 for x in b], [x["attainment"] for x in b], "o-",
               label="attainment, real (client, per 10 s)")
    s = [p for p in sim["timeline"] if p["slo_attainment"] is not None]
    ax[2].plot([p["t"] for p in s], [p["slo_attainment"] for p in s], alpha=0.6,
               label="attainment, simulator (window)")
    q = ax[2].twinx()
    q.plot([r["t"] for r in real["rows"]], [r["prefill_queue_tokens"] for r in real["rows"]],
           "r:", label="prefill queue, real (tokens)")
    q.set_ylabel("queued prompt tokens")
    ax[2].set_ylabel("SLO attainment")
    ax[2].set_xlabel("seconds")
    ax[2].legend(loc="lower left")
    fig.suptitle("Autoscaler on a CPU cluster: load step low -> 4x -> low")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def markdown(res: dict) -> str:
    real, sim = res["real"], res["sim"]
    lines = ["# SLO autoscaler on a real CPU cluster (demo model) vs the simulator", "",
             f"Trace: {res['trace']}. SLO: TTFT {SLO.ttft_s}s, TPOT {SLO.tpot_s}s. "
             f"Autoscaler: {res['autoscaler']}.", "",
             "| | requests | failed | rejected | attainment | TTFT p50 / p90 (s) | "
             "blocks+requests held at end | final pools |",
             "|---|---:|---:|---:|---:|---|---:|---|",
             f"| real | {real['requests']} | {real['failed']} | {real['rejected']} | "
             f"{real['attainment']:.1%} | {real['ttft_p50']:.3f} / {real['ttft_p90']:.3f} | "
             f"{sum(real['held_at_end'].values())} | {real['final_pools']} |", "",
             f"Mean worker start-up (decision to joining the router): {real['startup_s']}", "",
             "Decisions, real (t: seconds from the trace's start):", ""]
    for r in real["rows"]:
        if r["decision"]:
            d = r["decision"]
            lines.append(f"- t={r['t']:.0f}s {d['reason']}: prefill {r['prefill']}->"
                         f"{d['prefill']}, decode {r['decode']}->{d['decode']} ({d['detail']})")
    lines += ["", "Worker events, real:", ""]
    lines += [f"- t={e['t']:.1f}s {e['worker']} {e['event']}" for e in real["events"]]
    lines += ["", "Decisions, simulator:", ""]
    lines += [f"- t={d['t']:.0f}s {d['reason']}: prefill {d['prefill']}, decode {d['decode']}"
              for d in sim["decisions"]]
    lines += ["", "Plot: `autoscale_cluster.png`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="the demo model's CPU latency profile")
    ap.add_argument("--low", type=float, default=0.75, help="low rate, req/s (high: 4x)")
    ap.add_argument("--steps", default="40,60,50", help="seconds of low, high, low")
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--cooldown", type=float, default=15.0)
    ap.add_argument("--down-window", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    profile = LatencyProfile.load(args.profile)
    d = [float(x) for x in args.steps.split(",")]
    spec = RateStepsSpec(steps=((d[0], args.low), (d[1], 4 * args.low), (d[2], args.low)),
                         prompt_tokens=(1024, 2048), output_tokens=(16, 32), seed=args.seed)
    trace = rate_steps_trace(spec)
    real = run_real(args, profile, trace)
    sim = run_sim(args, profile, trace, real["startup_s"] or 10.0)
    res = {"trace": f"{len(trace)} requests, {d[0]:.0f}s at {args.low} req/s, {d[1]:.0f}s at "
                    f"{4 * args.low} req/s, {d[2]:.0f}s at {args.low} req/s; prompts 1024-2048, "
                    "outputs 16-32 tokens",
           "autoscaler": f"bounds 1..2 per pool, interval {args.interval}s, cooldown "
                         f"{args.cooldown}s, down window {args.down_window}s, headroom 0.8",
           "profile": args.profile, "real": real, "sim": sim}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autoscale_cluster.json").write_text(json.dumps(res, indent=1, default=str))
    (args.out / "autoscale_cluster.md").write_text(markdown(res))
    plot(real, sim, spec.rate_at, args.out / "autoscale_cluster.png")
    print(markdown(res))
    return 0 if real["failed"] == 0 and sum(real["held_at_end"].values()) == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
