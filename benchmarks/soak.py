"""Soak: process memory and KV block counts of a real cluster under steady load, over minutes.

One run: launch a real 1-prefill + 1-decode cluster (Ray actors, shared-memory KV
transfer, one torch thread per worker, the demo model) and keep it under a steady open
loop for ``--minutes``: the Azure conversation trace (lengths x0.5, time-scaled to the
rate, looped as needed; a synthetic Poisson trace when the CSV is absent) replayed by the
gRPC load generator, plus failure paths on the side: a fraction of requests cancelled by
the client (half at a random moment right after sending, usually before the first token;
half after a few streamed tokens) and a fraction of invalid ones (empty prompt, a token id
outside the vocabulary). ``--rate`` is the total offered rate; the side requests take
their fractions of it.

Every ``--interval`` seconds a sampler thread records the RSS (and anonymous RSS, thread
and open-fd counts, from /proc) of the router, each worker and this driver/client
process; the decode workers' used / free / reserved blocks and running / waiting
sequences; the prefill workers' used blocks and running / waiting; the router's requests
in flight; and, filled in from the client-side records afterwards, the requests finished
so far by outcome. After the load stops and a short drain, a last sample must show no
KV block in use anywhere ("leaked blocks: 0": a decode worker's reserved blocks count as
used; prefill blocks the prefix cache keeps but nobody references count as free, as they
are), no reservation left and no sequence left.

Reported per process: RSS at start / end / max, growth, and growth per hour from a linear
fit over the second half of the load (after warm-up); requests by outcome with their gRPC
status codes; block counts at the end. Writes ``results/soak.{json,md,png}``.

    python benchmarks/soak.py                 # 10 minutes at 2 req/s (+ about 1 min setup)
    python benchmarks/soak.py --minutes 0.5   # quick smoke check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import ray

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.cli.replay.loadgen import FIRST_PROMPT_TOKEN_ID, LoadGenConfig, run_trace
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.cluster.planning.profiler.hostinfo import cpu_model
from pdserve.engine.config import EngineConfig
from pdserve.engine.demo_model import create_demo_model
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.actor import RouterConfig
from pdserve.router.server import ServerConfig
from pdserve.workloads.formats import load_azure_csv
from pdserve.workloads.synthetic import synthetic
from pdserve.workloads.trace import Trace

AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_conv.csv"
RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 900  # prompt ids are drawn from [3, VOCAB), as in the other demo-model benchmarks


# -- pure helpers (tests/unit/test_soak_helpers.py) ---------------------------------------
def soak_trace(base: Trace, rate: float, duration_s: float) -> Trace:
    """The first ``rate * duration_s`` requests of ``base`` (looped, one mean gap between
    copies, when it is shorter), rescaled to a mean of ``rate`` req/s over ``duration_s``."""
    n = max(2, math.ceil(rate * duration_s))
    gap = base.duration_s / max(1, len(base) - 1)
    reqs, offset = [], 0.0
    while len(reqs) < n:
        reqs += [replace(r, arrival_s=r.arrival_s + offset) for r in base.requests[:n - len(reqs)]]
        offset = reqs[-1].arrival_s + gap
    if reqs[-1].arrival_s == 0:  # all at once (a one-request base): spread them evenly
        reqs = [replace(r, arrival_s=float(i)) for i, r in enumerate(reqs)]
    return Trace(f"{base.name}-soak", tuple(reqs)).at_rate(rate)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (0 with fewer than two distinct xs)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0


def growth(ts: list[float], vs: list[float]) -> dict[str, float]:
    """Start / end / max of a series, end - start, and the growth per hour of a linear fit
    over its second half in time (warm-up excluded)."""
    half = ts[0] + (ts[-1] - ts[0]) / 2
    late = [(t, v) for t, v in zip(ts, vs, strict=True) if t >= half]
    per_s = slope([t for t, _ in late], [v for _, v in late])
    return {"start": vs[0], "end": vs[-1], "max": max(vs), "growth": vs[-1] - vs[0],
            "growth_per_hour": per_s * 3600}


# -- measuring ------------------------------------------------------------------------------
def _pid(_actor) -> int:
    return os.getpid()


def proc_status(pid: int) -> dict[str, float]:
    """RSS and anonymous RSS (MiB), threads and open fds of a local process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return {"rss_mib": int(fields["VmRSS"][0]) / 1024, "anon_mib": int(fields["RssAnon"][0]) / 1024,
            "threads": int(fields["Threads"][0]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def take_sample(cluster, pids: dict[str, int], t0: float) -> dict:
    row: dict = {"t_s": time.time() - t0, "procs": {}, "prefill": {}, "decode": {}}
    for name, pid in pids.items():
        try:
            row["procs"][name] = proc_status(pid)
        except (OSError, KeyError):
            row["procs"][name] = None  # the process is gone
    for wid, h in cluster.prefills:
        s = ray.get(h.stats.remote(), timeout=30)
        row["prefill"][wid] = {"used": s.num_blocks - s.num_free_blocks, "free": s.num_free_blocks,
                               "running": s.num_running, "waiting": s.num_waiting,
                               "completed": s.completed, "failed": s.failed}
    for wid, h in cluster.decodes:
        s = ray.get(h.stats.remote(), timeout=30)
        row["decode"][wid] = {"used": s.num_used_blocks, "free": s.num_free_blocks,
                              "reserved": s.num_reserved, "running": s.num_running,
                              "waiting": s.num_waiting}
    row["router_in_flight"] = ray.get(cluster.router.in_flight.remote(), timeout=30)
    return row


class Sampler(threading.Thread):
    def __init__(self, cluster, pids: dict[str, int], t0: float, interval_s: float):
        super().__init__(name="soak-sampler", daemon=True)
        self.cluster, self.pids, self.t0, self.interval_s = cluster, pids, t0, interval_s
        self.samples: list[dict] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.samples.append(take_sample(self.cluster, self.pids, self.t0))
            except Exception as exc:  # noqa: BLE001 - a slow stats call must not end the soak
                self.errors.append(f"{time.time() - self.t0:.1f} s: {exc!r}")
            if self.stop.wait(self.interval_s):
                return


# -- failure-path traffic -------------------------------------------------------------------
def cancelled_request(client: Client, i: int, prompt_len: int, rng: random.Random) -> dict:
    """Stream a long request and cancel it: half after a random 0-200 ms, half after 1-16
    tokens. Status CANCELLED is the expected outcome."""
    req = build_request([rng.randrange(FIRST_PROMPT_TOKEN_ID, VOCAB) for _ in range(prompt_len)],
                        max_tokens=256, request_id=f"soak-cancel-{i}")
    req.stop.ignore_eos = True
    after_tokens = rng.randint(1, 16) if rng.random() < 0.5 else None
    call = client.stream(req)
    timer = None
    if after_tokens is None:
        timer = threading.Timer(rng.uniform(0, 0.2), call.cancel)
        timer.start()
    tokens = 0
    try:
        for msg in call:
            tokens += len(msg.token_ids)
            if after_tokens is not None and tokens >= after_tokens:
                call.cancel()
                break
    except grpc.RpcError:
        pass
    if timer is not None:
        timer.cancel()
    return {"kind": "cancelled", "when": "after_tokens" if after_tokens else "after_delay",
            "status": call.code().name, "tokens": tokens, "end_unix": time.time()}


def invalid_request(client: Client, i: int) -> dict:
    """An empty prompt or an out-of-vocabulary token id: INVALID_ARGUMENT is expected."""
    what = ("empty_prompt", "bad_token_id")[i % 2]
    prompt = [] if what == "empty_prompt" else [5, 10**7]
    status = "OK"
    try:
        client.generate(build_request(prompt, max_tokens=8, request_id=f"soak-invalid-{i}"))
    except grpc.RpcError as exc:
        status = exc.code().name
    return {"kind": "invalid", "what": what, "status": status, "end_unix": time.time()}


def side_traffic(address: str, base: Trace, cancel_rate: float, invalid_rate: float,
                 duration_s: float, seed: int, out: list[dict]) -> None:
    """Open loop: Poisson arrivals of cancelled and invalid requests for ``duration_s``."""
    rate = cancel_rate + invalid_rate
    if rate <= 0:
        return
    rng = random.Random(seed)
    start = time.perf_counter()
    with Client(address, timeout_s=120) as client, ThreadPoolExecutor(16) as pool:
        futures, t, i = [], 0.0, 0
        while True:
            t += rng.expovariate(rate)
            if t >= duration_s:
                break
            time.sleep(max(0.0, t - (time.perf_counter() - start)))
            if rng.random() < cancel_rate / rate:
                plen = rng.choice(base.requests).prompt_len
                futures.append(pool.submit(cancelled_request, client, i, plen,
                                           random.Random(rng.random())))
            else:
                futures.append(pool.submit(invalid_request, client, i))
            i += 1
        for f in futures:
            try:
                out.append(f.result())
            except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                out.append({"kind": "client_error", "status": repr(exc), "end_unix": time.time()})


# -- report ---------------------------------------------------------------------------------
def fill_counts(samples: list[dict], t0: float, load_ends: list[tuple[float, str]],
                side: list[dict]) -> None:
    """Requests finished by each sample's time, by outcome (from client-side end times)."""
    ends = [(u - t0, o) for u, o in load_ends] + [(r["end_unix"] - t0, r["kind"]) for r in side]
    for s in samples:
        s["finished"] = dict(Counter(o for t, o in ends if t <= s["t_s"]))


def summarize(samples: list[dict], load_end_s: float) -> dict:
    during = [s for s in samples if s["t_s"] <= load_end_s + 1e-9]
    procs = {}
    for name in samples[0]["procs"]:
        pts = [(s["t_s"], s["procs"][name]) for s in during if s["procs"].get(name)]
        ts = [t for t, _ in pts]
        procs[name] = {
            "rss_mib": growth(ts, [p["rss_mib"] for _, p in pts]),
            "anon_mib": growth(ts, [p["anon_mib"] for _, p in pts]),
            "threads": {"start": pts[0][1]["threads"], "end": pts[-1][1]["threads"]},
            "fds": {"start": pts[0][1]["fds"], "end": pts[-1][1]["fds"]},
        }
    final = samples[-1]
    # Blocks only: a reservation's blocks are already among the decode worker's used ones
    # (adding the count of reservations to it, as an earlier version did, mixed units).
    leaked = (sum(d["used"] for d in final["decode"].values())
              + sum(p["used"] for p in final["prefill"].values()))
    reservations = sum(d["reserved"] for d in final["decode"].values())
    busy = (sum(d["running"] + d["waiting"] for d in final["decode"].values())
            + sum(p["running"] + p["waiting"] for p in final["prefill"].values()))
    return {"procs": procs, "final_blocks": {"prefill": final["prefill"],
                                             "decode": final["decode"]},
            "leaked_blocks": leaked, "reservations_left": reservations,
            "sequences_left": busy,
            "router_in_flight_end": final["router_in_flight"],
            "max_decode_used": max(sum(d["used"] for d in s["decode"].values()) for s in samples)}


def plot(samples: list[dict], load_end_s: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6.4))
    ax_mem, ax_blk = fig.subplots(2, 1, sharex=True)
    ts = [s["t_s"] / 60 for s in samples]
    for name in samples[0]["procs"]:
        ax_mem.plot(ts, [(s["procs"].get(name) or {}).get("rss_mib", float("nan"))
                         for s in samples], label=name)
    for pool, key in (("decode", "used"), ("decode", "reserved"), ("prefill", "used")):
        for wid in samples[0][pool]:
            ax_blk.plot(ts, [s[pool][wid][key] for s in samples], label=f"{wid} {key}")
    for ax in (ax_mem, ax_blk):
        ax.axvline(load_end_s / 60, color="grey", linestyle="--", linewidth=1, label="load stops")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    ax_mem.set_ylabel("RSS (MiB)")
    ax_mem.set_title("Soak: process memory and KV blocks over time")
    ax_blk.set_ylabel("KV blocks")
    ax_blk.set_xlabel("time (minutes)")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def markdown(result: dict) -> str:
    a, s = result["args"], result["summary"]
    lines = [f"# Soak: {a['minutes']:g} minutes at {a['rate']:g} req/s "
             "(1 prefill + 1 decode, shm, demo model)", "",
             f"{result['trace']}; {a['cancel_frac']:.0%} of requests cancelled by the client, "
             f"{a['invalid_frac']:.0%} invalid; sampled every {a['interval']:g} s "
             f"({len(result['samples'])} samples); {result['host']['cpu']}, "
             f"{result['host']['cores']} cores, shared with other work. {result['date']}.", "",
             "| process | RSS start (MiB) | end | max | growth (MiB) | "
             "growth/h, 2nd-half fit (MiB) | anon growth (MiB) | threads | fds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, p in s["procs"].items():
        r, an = p["rss_mib"], p["anon_mib"]
        lines.append(f"| {name} | {r['start']:.1f} | {r['end']:.1f} | {r['max']:.1f} | "
                     f"{r['growth']:+.1f} | {r['growth_per_hour']:+.1f} | {an['growth']:+.1f} | "
                     f"{p['threads']['start']} -> {p['threads']['end']} | "
                     f"{p['fds']['start']} -> {p['fds']['end']} |")
    lines += ["", "| requests | count | gRPC status codes |", "|---|---:|---|"]
    for kind, c in result["requests"].items():
        codes = ", ".join(f"{k} {v}" for k, v in c["status"].items()) or "-"
        lines.append(f"| {kind} | {c['count']} | {codes} |")
    blk = s["final_blocks"]
    lines += ["", f"After a {a['drain']:g} s drain: "
              + "; ".join(f"{w} used {d['used']}, reserved {d['reserved']}, running "
                          f"{d['running']}" for w, d in blk["decode"].items()) + "; "
              + "; ".join(f"{w} used {p['used']}, running {p['running']}, waiting {p['waiting']}"
                          for w, p in blk["prefill"].items())
              + f"; router in flight {s['router_in_flight_end']}. Peak decode blocks used "
              f"{s['max_decode_used']}.", "", f"**leaked blocks: {s['leaked_blocks']}** "
              f"(reservations left {s['reservations_left']}, sequences left "
              f"{s['sequences_left']})", "",
              "RSS counts the pages of the decode worker's shared-memory KV segment that a "
              "process has touched (both workers map it); anon is the process's own heap "
              "(RssAnon). Growth per hour is the slope of a linear fit over the second half "
              "of the load, after warm-up."]
    if result["sampler_errors"]:
        lines += ["", f"Sampler errors: {len(result['sampler_errors'])} (see the JSON)."]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=2.0, help="total offered load, req/s")
    ap.add_argument("--interval", type=float, default=5.0, help="sampling period, s")
    ap.add_argument("--cancel-frac", type=float, default=0.10)
    ap.add_argument("--invalid-frac", type=float, default=0.05)
    ap.add_argument("--drain", type=float, default=5.0, help="wait after the load, s")
    ap.add_argument("--model", default=None)
    ap.add_argument("--trace", default=str(AZURE))
    ap.add_argument("--length-scale", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    duration = args.minutes * 60
    load_rate = args.rate * (1 - args.cancel_frac - args.invalid_frac)
    if load_rate <= 0:
        ap.error("--cancel-frac + --invalid-frac must leave some regular load")

    if Path(args.trace).exists():
        base = load_azure_csv(args.trace).scaled(length_scale=args.length_scale,
                                                 max_prompt_len=2048, max_output_len=256)
        trace_desc = (f"Azure conversation trace, lengths x{args.length_scale:g}, "
                      "time-scaled to the rate")
    else:
        print(f"{args.trace} not found: synthetic Poisson trace", file=sys.stderr)
        base = synthetic(1000, 1.0, (32, 1024), (8, 256), seed=args.seed)
        trace_desc = "synthetic Poisson trace (prompts 32-1024, outputs 8-256 tokens)"
    trace = soak_trace(base, load_rate, duration)

    model = args.model or str(create_demo_model())
    engine = EngineConfig(model=model, device="cpu", num_kv_blocks=4096, max_num_seqs=64,
                          max_num_batched_tokens=2048)
    spec = ClusterSpec(engine=engine, prefill=PoolSpec(1), decode=PoolSpec(1),
                       kv=KVTransferConfig(backend="shm"),
                       router=RouterConfig(model=model, server=ServerConfig(
                           port=0, metrics_port=None)), torch_threads=1)
    cluster = launch(spec)
    side: list[dict] = []
    try:
        pids = {"router": ray.get(cluster.router.__ray_call__.remote(_pid))}
        for wid, h in (*cluster.prefills, *cluster.decodes):
            pids[wid] = ray.get(h.__ray_call__.remote(_pid))
        pids["driver"] = os.getpid()
        print(f"soak: {len(trace)} trace requests at {load_rate:.2f} req/s for "
              f"{args.minutes:g} min, pids {pids}", file=sys.stderr)
        t0 = time.time()
        sampler = Sampler(cluster, pids, t0, args.interval)
        sampler.start()
        sider = threading.Thread(target=side_traffic, daemon=True, args=(
            cluster.address, base, args.rate * args.cancel_frac, args.rate * args.invalid_frac,
            duration, args.seed + 1, side))
        sider.start()
        run = run_trace(cluster.address, trace, LoadGenConfig(
            vocab_size=VOCAB, seed=args.seed, progress_interval_s=5.0), run_name="soak")
        sider.join()
        load_end_s = time.time() - t0
        sampler.stop.set()
        sampler.join()
        time.sleep(args.drain)
        sampler.samples.append(take_sample(cluster, pids, t0))
    finally:
        cluster.shutdown()

    load_ends = [(run.started_unix + r.end_s, r.outcome) for r in run.records]
    fill_counts(sampler.samples, t0, load_ends, side)
    requests = {}
    for o in ("ok", "rejected", "failed"):
        codes = [r.status if r.status != "OK" else f"OK ({r.finish_reason or 'no tokens'})"
                 for r in run.records if r.outcome == o]
        requests[f"trace {o}"] = {"count": len(codes), "status": dict(Counter(codes))}
    for kind in ("cancelled", "invalid", "client_error"):
        codes = [r["status"] for r in side if r["kind"] == kind]
        if codes or kind != "client_error":
            requests[kind] = {"count": len(codes), "status": dict(Counter(codes))}
    cancelled = [r for r in side if r["kind"] == "cancelled"]
    requests["cancelled"]["before_first_token"] = sum(r["tokens"] == 0 for r in cancelled)
    summary = summarize(sampler.samples, load_end_s)
    result = {"benchmark": "soak", "args": vars(args), "model": model, "trace": trace_desc,
              "trace_requests": len(trace), "trace_rate": load_rate, "pids": pids,
              "host": {"cpu": cpu_model(), "cores": os.cpu_count()},
              "load_end_s": load_end_s, "wall_s": run.wall_s, "requests": requests,
              "summary": summary, "samples": sampler.samples,
              "sampler_errors": sampler.errors, "side_requests": side,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    plot(sampler.samples, load_end_s, out / "soak.png")
    text = markdown(result)
    (out / "soak.md").write_text(text)
    print(text)
    clean = not (summary["leaked_blocks"] or summary["reservations_left"]
                 or summary["sequences_left"])
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
