"""PNG plots for benchmark runs: latency CDFs with the SLO line, attainment vs rate.

Figures are built on matplotlib's object API with the Agg canvas directly (no pyplot),
so importing this module never changes the process-wide backend and it works on
headless hosts and from threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pdserve.cluster.cli.replay.records import RunResult


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_cdf(series: Mapping[str, Sequence[float]], slo_s: float | None, xlabel: str,
             title: str, path: str | Path) -> Path:
    """One empirical CDF per series (values in seconds, drawn in ms) and a vertical SLO line."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for name, values in series.items():
        xs = np.sort(np.asarray(values, dtype=float)) * 1e3
        if xs.size == 0:
            continue
        ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=f"{name} (n={xs.size})")
    if slo_s is not None:
        ax.axvline(slo_s * 1e3, color="red", linestyle="--", linewidth=1,
                   label=f"SLO {slo_s * 1e3:g} ms")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def ttft_samples(run: RunResult) -> list[float]:
    return [r.ttft_s for r in run.records if r.outcome == "ok"]


def tpot_samples(run: RunResult) -> list[float]:
    return [t for r in run.records if r.outcome == "ok" and (t := r.tpot_s) is not None]


def plot_ttft_cdf(runs: Mapping[str, RunResult], slo_ttft_s: float | None,
                  path: str | Path, title: str = "Time to first token") -> Path:
    return plot_cdf({k: ttft_samples(v) for k, v in runs.items()}, slo_ttft_s, "TTFT (ms)",
                    title, path)


def plot_tpot_cdf(runs: Mapping[str, RunResult], slo_tpot_s: float | None,
                  path: str | Path, title: str = "Time per output token") -> Path:
    return plot_cdf({k: tpot_samples(v) for k, v in runs.items()}, slo_tpot_s, "TPOT (ms)",
                    title, path)


def plot_attainment(curves: Mapping[str, Sequence[tuple[float, float]]], target: float,
                    path: str | Path, goodputs: Mapping[str, float] | None = None,
                    title: str = "SLO attainment vs offered rate") -> Path:
    """Attainment (0..1) against rate, one line per configuration; the target as a dashed
    line and, when given, each configuration's goodput as a marker on it."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for name, pts in curves.items():
        pts = sorted(pts)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if goodputs and goodputs.get(name):
            ax.plot([goodputs[name]], [target], marker="*", markersize=12,
                    color=line.get_color(), linestyle="none")
    ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    return _save(fig, path)
