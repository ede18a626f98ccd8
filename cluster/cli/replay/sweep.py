"""Rate sweeps: replay one trace at several offered rates and find the goodput.

For each rate the (scaled) trace is re-timed with ``Trace.at_rate``, replayed by the
load generator and summarised; the points give an attainment-vs-rate curve whose
crossing of the attainment target is the configuration's goodput. Results go to
``<out>/<label>.json`` (reports plus per-request TTFT/TPOT samples, enough to redraw
every plot and to ``compare`` configurations measured in separate runs),
``<label>.md``, ``<label>_{ttft_cdf,tpot_cdf,attainment}.png`` and, optionally, the raw
per-request records under ``<out>/<label>_runs/``.

Order of trace shaping: lengths and time scaled first (``Trace.scaled``, to fit the
hardware), then the first ``num_requests`` kept, then re-timed to each rate, then cut to
the first ``duration_s`` seconds, so both bounds mean what they say at every rate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.loadgen import run_trace
from pdserve.cluster.cli.replay.plots import plot_attainment, plot_cdf, tpot_samples, ttft_samples
from pdserve.cluster.cli.replay.records import RunResult
from pdserve.cluster.cli.replay.report import (
    RunReport,
    goodput_from_sweep,
    markdown_report,
    summarize,
)
from pdserve.router.slo import SloConfig
from pdserve.workloads.trace import Trace

_FILE_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class SweepConfig:
    label: str = "default"
    rates: tuple[float, ...] | None = None  # None: one run at the scaled trace's own rate
    slo: SloConfig = field(default_factory=SloConfig)
    time_scale: float = 1.0
    length_scale: float = 1.0
    max_prompt_len: int | None = None
    max_output_len: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    loadgen: LoadGenConfig = field(default_factory=LoadGenConfig)
    save_runs: bool = True

    def __post_init__(self) -> None:
        if not self.label or _FILE_UNSAFE.sub("", self.label) != self.label:
            raise ValueError(f"label must be non-empty and use only [A-Za-z0-9._-]: "
                             f"{self.label!r}")
        if self.rates is not None and (not self.rates or any(not r > 0 for r in self.rates)):
            raise ValueError(f"rates must be positive, got {self.rates!r}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError("duration_s must be positive")


@dataclass(frozen=True)
class SweepPoint:
    rate: float  # offered rate of this run, req/s
    report: RunReport
    ttft_samples_s: tuple[float, ...]  # served requests, for CDFs
    tpot_samples_s: tuple[float, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepPoint:
        return cls(d["rate"], RunReport.from_dict(d["report"]), tuple(d["ttft_samples_s"]),
                   tuple(d["tpot_samples_s"]))


@dataclass(frozen=True)
class SweepResult:
    label: str
    trace: str
    slo: SloConfig
    points: tuple[SweepPoint, ...]
    goodput: float  # req/s; see report.goodput_from_sweep

    @property
    def curve(self) -> list[tuple[float, float]]:
        return [(p.rate, p.report.attainment) for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepResult:
        return cls(d["label"], d["trace"], SloConfig(**d["slo"]),
                   tuple(SweepPoint.from_dict(p) for p in d["points"]), d["goodput"])


def shape_trace(trace: Trace, cfg: SweepConfig) -> Trace:
    """The trace after length/time scaling and the request-count bound (rate-independent)."""
    base = trace.scaled(cfg.time_scale, cfg.length_scale, cfg.max_prompt_len,
                        cfg.max_output_len)
    return base.head(cfg.num_requests) if cfg.num_requests else base


def trace_at(base: Trace, rate: float | None, duration_s: float | None) -> Trace:
    t = base.at_rate(rate) if rate is not None else base
    return t.window(0.0, duration_s) if duration_s is not None else t


def run_point(address: str, base: Trace, rate: float | None, cfg: SweepConfig
              ) -> tuple[SweepPoint, RunResult]:
    t = trace_at(base, rate, cfg.duration_s)
    name = f"{cfg.label}@{rate:g}rps" if rate is not None else cfg.label
    run = run_trace(address, t, cfg.loadgen, run_name=name)
    offered = rate if rate is not None else t.rate
    report = summarize(run, cfg.slo, label=cfg.label)
    report = replace(report, offered_rate=offered)
    return SweepPoint(offered, report, tuple(ttft_samples(run)), tuple(tpot_samples(run))), run


def run_sweep(address: str, trace: Trace, cfg: SweepConfig,
              out_dir: str | Path | None = None) -> SweepResult:
    """Every rate in turn (each run drains before the next starts); files written when
    ``out_dir`` is given."""
    base = shape_trace(trace, cfg)
    points, runs = [], []
    for rate in cfg.rates or (None,):
        point, run = run_point(address, base, rate, cfg)
        points.append(point)
        runs.append(run)
    pts = tuple(sorted(points, key=lambda p: p.rate))
    result = SweepResult(cfg.label, trace.name, cfg.slo, pts,
                         goodput_from_sweep([(p.rate, p.report.attainment) for p in pts],
                                            cfg.slo.attainment))
    if out_dir is not None:
        write_sweep(result, out_dir)
        if cfg.save_runs:
            run_dir = Path(out_dir) / f"{cfg.label}_runs"
            run_dir.mkdir(parents=True, exist_ok=True)
            for p, run in zip(points, runs, strict=True):
                (run_dir / f"rate_{p.rate:g}.json").write_text(json.dumps(run.to_dict()))
    return result


def write_sweep(result: SweepResult, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label, slo = result.label, result.slo
    paths = {"json": out / f"{label}.json", "md": out / f"{label}.md"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    paths["md"].write_text(markdown_report(
        f"pdserve bench: {label} ({result.trace})", [p.report for p in result.points],
        result.goodput))
    by_rate = {f"{p.rate:.3g} req/s": p for p in result.points}
    paths["ttft_cdf"] = plot_cdf({k: p.ttft_samples_s for k, p in by_rate.items()}, slo.ttft_s,
                                 "TTFT (ms)", f"{label}: time to first token",
                                 out / f"{label}_ttft_cdf.png")
    paths["tpot_cdf"] = plot_cdf({k: p.tpot_samples_s for k, p in by_rate.items()}, slo.tpot_s,
                                 "TPOT (ms)", f"{label}: time per output token",
                                 out / f"{label}_tpot_cdf.png")
    paths["attainment"] = plot_attainment({label: result.curve}, slo.attainment,
                                          out / f"{label}_attainment.png",
                                          {label: result.goodput})
    return paths


def load_sweep(path: str | Path) -> SweepResult:
    return SweepResult.from_dict(json.loads(Path(path).read_text()))


def _point_near(result: SweepResult, rate: float) -> SweepPoint:
    return min(result.points, key=lambda p: abs(p.rate - rate))


def compare(results_by_label: Mapping[str, SweepResult], out_dir: str | Path,
            name: str = "compare", rate: float | None = None) -> dict[str, Path]:
    """One attainment-vs-rate plot over all configurations, TTFT/TPOT CDFs at one rate
    (``rate``, else the highest rate every configuration measured, else each one's
    highest), and a Markdown table with every point and each goodput."""
    if not results_by_label:
        raise ValueError("nothing to compare")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(results_by_label.values()))
    slo = first.slo
    if rate is None:
        common = set.intersection(*({p.rate for p in r.points} for r in
                                    results_by_label.values()))
        rate = max(common) if common else None
    at = {k: (_point_near(r, rate) if rate is not None else max(r.points, key=lambda p: p.rate))
          for k, r in results_by_label.items()}
    series = {f"{k} @ {p.rate:.3g} req/s": p for k, p in at.items()}
    paths = {
        "attainment": plot_attainment({k: r.curve for k, r in results_by_label.items()},
                                      slo.attainment, out / f"{name}_attainment.png",
                                      {k: r.goodput for k, r in results_by_label.items()}),
        "ttft_cdf": plot_cdf({k: p.ttft_samples_s for k, p in series.items()}, slo.ttft_s,
                             "TTFT (ms)", "Time to first token", out / f"{name}_ttft_cdf.png"),
        "tpot_cdf": plot_cdf({k: p.tpot_samples_s for k, p in series.items()}, slo.tpot_s,
                             "TPOT (ms)", "Time per output token", out / f"{name}_tpot_cdf.png"),
        "md": out / f"{name}.md",
    }
    goodputs = "\n".join(f"| {k} | {r.goodput:.3g} |" for k, r in results_by_label.items())
    doc = markdown_report(f"pdserve bench: {', '.join(results_by_label)}",
                          [p.report for r in results_by_label.values() for p in r.points])
    paths["md"].write_text(doc + "\n| label | goodput (req/s) |\n|---|---|\n" + goodputs + "\n")
    return paths
