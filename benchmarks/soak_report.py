"""The soak's report (benchmarks/soak.py): memory growth per process, requests by
outcome, leaked blocks, the plot and the Markdown.

``slope`` and ``growth`` are pure (tests/unit/test_soak_helpers.py). ``summarize`` reads
the samples up to the end of the load for growth, and the last sample (after the drain)
for what is left: ``leaked_blocks`` counts KV blocks still used anywhere, in blocks (a
reservation's blocks are among the decode worker's used ones).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pdserve.cluster.cli.replay.records import RunResult


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


def request_counts(run: RunResult, side: list[dict]) -> dict:
    """Requests by outcome (trace ok / rejected / failed, cancelled, invalid, client
    errors when any) with their gRPC status codes."""
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
    return requests


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
