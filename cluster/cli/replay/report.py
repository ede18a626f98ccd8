"""Summaries of a load-generator run: latency percentiles, SLO attainment, throughput.

Definitions (DESIGN):

* TTFT = first token - send (client side); TPOT = (last token - first token) /
  (tokens - 1), the ``router.slo.tpot`` definition, so single-token requests have no
  TPOT and meet that target trivially; e2e = stream end - send.
* A request meets the SLO when it was served (outcome "ok") and meets both targets.
  ``attainment`` is the share of *all sent* requests that do: a rejected or failed
  request is a miss, otherwise a server could look good by refusing work.
  ``attainment_admitted`` divides by the requests that were not rejected instead.
* Latency percentiles are over served requests only (linear interpolation between
  order statistics, numpy's default).
* ``goodput_from_sweep``: the highest offered rate whose attainment still meets the
  target, interpolated linearly where the attainment curve crosses it.

Everything here is a frozen dataclass that ``to_dict`` turns into plain JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pdserve.cluster.cli.replay.records import RequestRecord, RunResult
from pdserve.router.slo import SloConfig


@dataclass(frozen=True)
class Percentiles:
    n: int
    p50: float
    p90: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of(cls, xs: Iterable[float]) -> Percentiles | None:
        a = np.asarray(list(xs), dtype=float)
        if a.size == 0:
            return None
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(int(a.size), float(p50), float(p90), float(p99), float(a.mean()),
                   float(a.max()))


def meets_slo(r: RequestRecord, slo: SloConfig) -> bool:
    return r.outcome == "ok" and slo.met(r.ttft_s, r.tpot_s)


@dataclass(frozen=True)
class RunReport:
    label: str
    trace: str
    offered_rate: float  # req/s the trace offers
    slo: SloConfig
    wall_s: float
    num_sent: int
    num_ok: int
    num_rejected: int
    num_failed: int
    attainment: float  # met / sent
    attainment_admitted: float  # met / (sent - rejected)
    ttft_attainment: float  # met TTFT alone / sent
    tpot_attainment: float  # met TPOT alone / sent
    requests_per_s: float  # served requests / wall
    output_tokens_per_s: float  # every streamed token / wall
    total_tokens_per_s: float  # (prompt + output tokens of served requests) / wall
    ttft_s: Percentiles | None
    tpot_s: Percentiles | None
    e2e_s: Percentiles | None
    send_lag_s: Percentiles | None  # how late the client sent; large = generator overloaded
    status_counts: dict[str, int] = field(default_factory=dict)
    api: str = "grpc"  # the protocol the run spoke (LoadGenConfig.api)

    @property
    def meets_target(self) -> bool:
        return self.attainment >= self.slo.attainment

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunReport:
        d = dict(d)
        d["slo"] = SloConfig(**d["slo"])
        for k in ("ttft_s", "tpot_s", "e2e_s", "send_lag_s"):
            d[k] = Percentiles(**d[k]) if d.get(k) else None
        return cls(**d)


def summarize(run: RunResult, slo: SloConfig, label: str | None = None) -> RunReport:
    recs = run.records
    sent = len(recs)
    ok = [r for r in recs if r.outcome == "ok"]
    rejected = sum(r.outcome == "rejected" for r in recs)
    failed = sum(r.outcome == "failed" for r in recs)
    met = sum(meets_slo(r, slo) for r in recs)
    admitted = sent - rejected
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    statuses: dict[str, int] = {}
    for r in recs:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    wall = run.wall_s if run.wall_s > 0 else float("nan")
    prompt_tokens = sum(r.usage.prompt_tokens if r.usage else r.prompt_len for r in ok)
    output_ok = sum(r.num_tokens for r in ok)

    def share(n: int, d: int) -> float:
        return n / d if d else 0.0

    return RunReport(
        label=label if label is not None else run.trace_name,
        trace=run.trace_name,
        offered_rate=run.offered_rate,
        slo=slo,
        wall_s=run.wall_s,
        num_sent=sent,
        num_ok=len(ok),
        num_rejected=rejected,
        num_failed=failed,
        attainment=share(met, sent),
        attainment_admitted=share(met, admitted),
        ttft_attainment=share(sum(r.ttft_s <= slo.ttft_s for r in ok), sent),
        tpot_attainment=share(sum(r.tpot_s is None or r.tpot_s <= slo.tpot_s for r in ok), sent),
        requests_per_s=len(ok) / wall,
        output_tokens_per_s=sum(r.num_tokens for r in recs) / wall,
        total_tokens_per_s=(prompt_tokens + output_ok) / wall,
        ttft_s=Percentiles.of(r.ttft_s for r in ok),
        tpot_s=Percentiles.of(tpots),
        e2e_s=Percentiles.of(r.e2e_s for r in ok),
        send_lag_s=Percentiles.of(r.send_lag_s for r in recs),
        status_counts=statuses,
        api=run.config.api,
    )


def goodput_from_sweep(points: Sequence[tuple[float, float]], target: float) -> float:
    """Highest rate with attainment >= ``target`` on the piecewise-linear curve through
    ``(rate, attainment)`` points; 0.0 when even the lowest measured rate misses (nothing
    below it was measured), the highest rate when every point meets it."""
    if not points:
        return 0.0
    pts = sorted(points)
    best = -1
    for i, (_, att) in enumerate(pts):
        if att >= target:
            best = i
    if best < 0:
        return 0.0
    if best == len(pts) - 1:
        return float(pts[best][0])
    (r0, a0), (r1, a1) = pts[best], pts[best + 1]
    # a0 >= target > a1, so the line between them crosses the target exactly once.
    return float(r0 + (a0 - target) / (a0 - a1) * (r1 - r0))


def _ms(p: Percentiles | None, q: str) -> str:
    return "-" if p is None else f"{getattr(p, q) * 1e3:.1f}"


def markdown_table(reports: Sequence[RunReport]) -> str:
    head = ("| label | api | rate (req/s) | sent | ok | rejected | failed | TTFT p50/p90/p99 (ms) "
            "| TPOT p50/p90/p99 (ms) | e2e p50/p99 (s) | attainment | attainment (admitted) "
            "| req/s | out tok/s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in reports:
        e2e = "-" if r.e2e_s is None else f"{r.e2e_s.p50:.2f} / {r.e2e_s.p99:.2f}"
        lines.append(
            f"| {r.label} | {r.api} | {r.offered_rate:.3g} | {r.num_sent} | {r.num_ok} | {r.num_rejected} "
            f"| {r.num_failed} "
            f"| {_ms(r.ttft_s, 'p50')} / {_ms(r.ttft_s, 'p90')} / {_ms(r.ttft_s, 'p99')} "
            f"| {_ms(r.tpot_s, 'p50')} / {_ms(r.tpot_s, 'p90')} / {_ms(r.tpot_s, 'p99')} "
            f"| {e2e} | {r.attainment:.1%} | {r.attainment_admitted:.1%} "
            f"| {r.requests_per_s:.2f} | {r.output_tokens_per_s:.1f} |")
    return "\n".join(lines) + "\n"


def markdown_report(title: str, reports: Sequence[RunReport],
                    goodput: float | None = None) -> str:
    """A small Markdown document: SLO line, the table, and the goodput when known."""
    out = [f"# {title}", ""]
    if reports:
        s = reports[0].slo
        out += [f"SLO: TTFT <= {s.ttft_s * 1e3:g} ms, TPOT <= {s.tpot_s * 1e3:g} ms, "
                f"attainment target {s.attainment:.0%}. Attainment counts rejected and failed "
                "requests as misses; latencies are client-side, over served requests.", ""]
    out.append(markdown_table(reports))
    if goodput is not None:
        out += ["", f"Goodput (highest rate meeting the attainment target): "
                    f"**{goodput:.3g} req/s**", ""]
    return "\n".join(out)
