"""Trace file formats: the Azure LLM inference CSV and the BurstGPT CSV.

Azure (``TIMESTAMP,ContextTokens,GeneratedTokens``, wall-clock timestamps; Patel et al.,
Splitwise, ISCA 2024) and BurstGPT (``Timestamp,Model,Request tokens,Response tokens,
Total tokens,Log Type``, seconds; failed requests have 0 response tokens and are
dropped). Rows with a zero length are skipped, the rest sorted and re-based so the first
arrival is at 0; a malformed row raises ``ValueError`` naming its line. ``load_trace``
picks the loader from the header.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from pdserve.workloads.trace import Trace, TraceRequest


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
