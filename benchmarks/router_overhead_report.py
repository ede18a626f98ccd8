"""router_overhead's numbers: per-request rows, percentiles, the hop table, Markdown.

``rows`` flattens ``Sample``s into plain dicts (one per request, with its hops), which
``to_columns`` packs for the JSON; ``summarize`` gives percentiles of the headline figures and of every hop, in path
order; ``markdown`` renders one run and ``markdown_ab`` several labelled runs side by
side (an A/B of two code revisions measured back to back).
"""

from __future__ import annotations

import statistics

from pdserve.benchmarks.router_overhead_probe import Sample

HEADLINE = ("client_ttft_ms", "router_ttft_ms", "prefill_ms", "prefill_queue_ms",
            "kv_transfer_wait_ms", "overhead_ms", "router_added_ms")
COMPUTE_HOP = "prefill_compute"  # the one hop that is the model, not the path
BESIDE = "beside the path: "  # prefix of the hops that ran concurrently with it


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]

    out = {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": statistics.fmean(xs),
           "min": xs[0], "max": xs[-1]}
    return {**{k: round(v, 4) for k, v in out.items()}, "n": len(xs)}


def rows(samples: list[Sample]) -> list[dict]:
    out = []
    for s in samples:
        srv = s.server
        out.append({"client_ttft_ms": s.client_ttft_ms, "router_ttft_ms": srv.ttft_ms,
                    "prefill_ms": srv.prefill_ms, "prefill_queue_ms": srv.prefill_queue_ms,
                    "kv_transfer_wait_ms": srv.kv_transfer_wait_ms,
                    "overhead_ms": s.overhead_ms, "router_added_ms": s.router_added_ms,
                    "hops_ms": dict(s.hops_ms()),
                    "concurrent_ms": dict(srv.concurrent)})
    return out


def to_columns(table: list[dict]) -> dict:
    """``rows`` output as columns and rows of numbers rounded to the microsecond (compact
    JSON): headline figures, then ``hop:<name>`` and ``beside:<name>`` (null: not there)."""
    cols = list(HEADLINE)
    for r in table:
        cols += [c for c in (*(f"hop:{h}" for h in r["hops_ms"]),
                             *(f"beside:{h}" for h in r["concurrent_ms"])) if c not in cols]

    def cell(r: dict, c: str):
        kind, _, name = c.partition(":")
        v = (r[c] if not name else
             r["hops_ms" if kind == "hop" else "concurrent_ms"].get(name))
        return None if v is None else round(v, 3)

    return {"columns": cols, "rows": [[cell(r, c) for c in cols] for r in table]}


def from_columns(data: dict) -> list[dict]:
    """The inverse of ``to_columns`` (to summarize runs read back from JSON)."""
    out = []
    for values in data["rows"]:
        r: dict = {"hops_ms": {}, "concurrent_ms": {}}
        for c, v in zip(data["columns"], values, strict=True):
            kind, _, name = c.partition(":")
            if not name:
                r[c] = v
            elif v is not None:
                r["hops_ms" if kind == "hop" else "concurrent_ms"][name] = v
        out.append(r)
    return out


def summarize(table: list[dict]) -> dict:
    """Percentiles of the headline figures, and of each hop over the requests that
    reported it (hops in path order, as first seen)."""
    # (runs written before a figure existed lack it)
    headline = {k: percentiles([r[k] for r in table if r.get(k) is not None])
                for k in HEADLINE if any(r.get(k) is not None for r in table)}
    order: list[str] = []
    for r in table:
        order += [h for h in r["hops_ms"] if h not in order]
    hops = {h: percentiles([r["hops_ms"][h] for r in table if h in r["hops_ms"]])
            for h in order}
    with_hops = [r for r in table if r["hops_ms"]]
    if with_hops:  # everything but the model's own compute, per request
        hops["(all but prefill_compute)"] = percentiles(
            [sum(v for h, v in r["hops_ms"].items() if h != COMPUTE_HOP) for r in with_hops])
    beside: list[str] = []
    for r in table:
        beside += [h for h in r.get("concurrent_ms", {}) if h not in beside]
    for h in beside:  # not on the path: listed after it, apart
        hops[f"{BESIDE}{h}"] = percentiles([r["concurrent_ms"][h] for r in table
                                            if h in r.get("concurrent_ms", {})])
    return {"summary_ms": headline, "hops_ms": hops}


def markdown(title: str, summary: dict) -> list[str]:
    lines = [f"# {title}", "", "| ms | p50 | p90 | p99 | mean |", "|---|---|---|---|---|"]
    for k, s in summary["summary_ms"].items():
        lines.append(f"| {k} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} | "
                     f"{s['mean']:.2f} |")
    lines += ["", OVERHEAD_NOTE]
    if summary["hops_ms"]:
        lines += ["", "## Hops to the first token", "",
                  "| hop | p50 | p90 | mean |", "|---|---|---|---|"]
        for h, s in summary["hops_ms"].items():
            lines.append(f"| {h} | {s['p50']:.3f} | {s['p90']:.3f} | {s['mean']:.3f} |")
        lines += ["", HOPS_NOTE]
    return lines


OVERHEAD_NOTE = ("overhead_ms = client-side TTFT - prefill worker compute (prefill_ms): "
                 "the client's own transport (client_to_router, router_to_client) "
                 "included. router_added_ms = the router's TTFT (from receiving the request "
                 "to its first token leaving) - prefill_ms: what the router adds between "
                 "receiving a request and the first token.")

HOPS_NOTE = ("Hops in path order, ms (see router/hops.py). client_to_router and "
             "router_to_client compare the client's CLOCK_MONOTONIC with the router's, "
             "which is one clock on one host. Percentiles are per hop, so they do not add "
             "up; '(all but prefill_compute)' is the per-request sum of every hop but the "
             "model's compute. Rows 'beside the path' ran concurrently with it (the decode "
             "reservation overlapping the prefill) and add nothing to the time to first token.")


def markdown_ab(title: str, runs: dict[str, dict]) -> list[str]:
    """``runs``: label -> ``summarize`` output; one column pair (p50, p90) per label."""
    labels = list(runs)
    head = "| ms | " + " | ".join(f"{lb} p50 | {lb} p90" for lb in labels) + " |"
    rule = "|---|" + "---|---|" * len(labels)
    lines = [f"# {title}", "", head, rule]

    def row(name: str, per_label: list[dict | None]) -> str:
        cells = []
        for s in per_label:
            cells += [f"{s['p50']:.2f}", f"{s['p90']:.2f}"] if s else ["-", "-"]
        return f"| {name} | " + " | ".join(cells) + " |"

    for k in HEADLINE:
        lines.append(row(k, [runs[lb]["summary_ms"].get(k) for lb in labels]))
    hop_order: list[str] = []
    for lb in labels:
        hop_order += [h for h in runs[lb]["hops_ms"] if h not in hop_order]
    if hop_order:
        lines += ["", "## Hops to the first token", "", head.replace("| ms |", "| hop |"), rule]
        for h in hop_order:
            lines.append(row(h, [runs[lb]["hops_ms"].get(h) for lb in labels]))
        lines += ["", HOPS_NOTE + " A run whose server reports no hops shows '-'."]
    return [*lines, "", OVERHEAD_NOTE]
