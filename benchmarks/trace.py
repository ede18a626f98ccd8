"""Request traces: what arrives when, with how many prompt and output tokens.

Loaders for the Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,
GeneratedTokens``, wall-clock timestamps; Patel et al., Splitwise, ISCA 2024), the
BurstGPT CSV (``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``,
seconds; failed requests have 0 response tokens and are dropped), and synthetic
Poisson or Gamma (bursty) arrivals. ``Trace.scaled`` fits a trace to the hardware at
hand: time scaling changes the rate, length scaling shrinks prompts/outputs for a small
model on a CPU. Arrival times always start at 0.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.arrival_s < 0 or self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"invalid trace request {self}")


@dataclass(frozen=True)
class Trace:
    name: str
    requests: tuple[TraceRequest, ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError(f"trace {self.name!r} is empty")
        if any(b.arrival_s < a.arrival_s for a, b in zip(self.requests, self.requests[1:], strict=False)):
            raise ValueError(f"trace {self.name!r} is not sorted by arrival time")

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    @property
    def rate(self) -> float:
        """Mean arrival rate (requests/s)."""
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else float("inf")

    def scaled(self, time_scale: float = 1.0, length_scale: float = 1.0,
               max_prompt_len: int | None = None, max_output_len: int | None = None) -> Trace:
        """Arrival times multiplied by ``time_scale`` (< 1 = faster); lengths multiplied by
        ``length_scale`` (at least 1 token) and clipped to the maxima."""
        if time_scale <= 0 or length_scale <= 0:
            raise ValueError("scales must be positive")

        def length(n: int, cap: int | None) -> int:
            n = max(1, round(n * length_scale))
            return min(n, cap) if cap else n

        return Trace(f"{self.name}", tuple(
            TraceRequest(r.arrival_s * time_scale, length(r.prompt_len, max_prompt_len),
                         length(r.output_len, max_output_len)) for r in self.requests))

    def at_rate(self, rate: float) -> Trace:
        """The same requests with arrivals rescaled to a mean rate of ``rate`` req/s."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        return self.scaled(time_scale=self.rate / rate) if math.isfinite(self.rate) else self

    def head(self, n: int) -> Trace:
        return Trace(self.name, self.requests[:n])

    def window(self, start_s: float, duration_s: float) -> Trace:
        """Requests arriving in [start_s, start_s + duration_s), re-based to start at 0."""
        sel = [r for r in self.requests if start_s <= r.arrival_s < start_s + duration_s]
        t0 = sel[0].arrival_s if sel else 0.0
        return Trace(self.name, tuple(replace(r, arrival_s=r.arrival_s - t0) for r in sel))


def _rebase(name: str, rows: Iterable[tuple[float, int, int]]) -> Trace:
    rows = sorted(rows)
    if not rows:
        raise ValueError(f"trace {name!r} has no usable rows")
    t0 = rows[0][0]
    return Trace(name, tuple(TraceRequest(t - t0, p, o) for t, p, o in rows))


def _azure_time(text: str) -> float:
    """Seconds since the epoch of '2023-11-16 18:15:46.6805900' (7 fractional digits, which
    Python 3.10's fromisoformat rejects: keep microseconds)."""
    head, _, frac = text.strip().partition(".")
    micros = (frac + "000000")[:6] if frac else "0"
    return datetime.fromisoformat(head).timestamp() + int(micros) / 1e6


def load_azure_csv(path: str | Path) -> Trace:
    """Azure LLM inference trace (conversation or code)."""
    path = Path(path)
    rows = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not an Azure trace CSV: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                t = _azure_time(row["TIMESTAMP"])
                p, o = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{line}: bad row {row}: {exc}") from exc
            if p > 0 and o > 0:
                rows.append((t, p, o))
    return _rebase(path.stem, rows)


BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens",
                    "Log Type")


def load_burstgpt_csv(path: str | Path, model: str | None = None) -> Trace:
    """BurstGPT trace; failed requests (0 response tokens) are dropped; ``model`` filters."""
    path = Path(path)
    rows = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(BURSTGPT_COLUMNS[:4]) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not a BurstGPT CSV: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            if model is not None and row["Model"] != model:
                continue
            try:
                t = float(row["Timestamp"])
                p, o = int(float(row["Request tokens"])), int(float(row["Response tokens"]))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{line}: bad row {row}: {exc}") from exc
            if p > 0 and o > 0:
                rows.append((t, p, o))
    return _rebase(path.stem, rows)


def load_trace(path: str | Path) -> Trace:
    """Detect the CSV format from its header."""
    with Path(path).open(newline="") as fh:
        header = next(csv.reader(fh), [])
    if "TIMESTAMP" in header:
        return load_azure_csv(path)
    if "Timestamp" in header and "Request tokens" in header:
        return load_burstgpt_csv(path)
    raise ValueError(f"{path}: unknown trace format (header {header})")


def synthetic(n: int, rate: float, prompt_lens: Sequence[int] | tuple[int, int],
              output_lens: Sequence[int] | tuple[int, int], cv: float = 1.0,
              seed: int = 0, name: str | None = None) -> Trace:
    """``n`` requests at mean ``rate`` req/s. ``cv`` = 1 is Poisson; ``cv`` > 1 draws Gamma
    inter-arrivals with that coefficient of variation (bursty). Lengths are drawn
    uniformly from ``(lo, hi)`` when given a pair, else sampled from the given list."""
    if n < 1 or rate <= 0 or cv <= 0:
        raise ValueError("need n >= 1, rate > 0, cv > 0")
    rng = random.Random(seed)
    shape = 1.0 / (cv * cv)

    def draw(spec) -> int:
        if isinstance(spec, tuple) and len(spec) == 2:
            return rng.randint(spec[0], spec[1])
        return rng.choice(list(spec))

    t, reqs = 0.0, []
    for _ in range(n):
        reqs.append(TraceRequest(t, draw(prompt_lens), draw(output_lens)))
        t += rng.gammavariate(shape, 1.0 / (shape * rate))
    kind = "poisson" if cv == 1.0 else f"gamma-cv{cv:g}"
    return Trace(name or f"{kind}-{rate:g}rps", tuple(reqs))
