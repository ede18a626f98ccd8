"""Trace file formats: the Azure and BurstGPT CSVs here, and ``load_trace``, which tells
every format the package reads from the file's content.

Azure (``TIMESTAMP,ContextTokens,GeneratedTokens``, wall-clock timestamps; Patel et al.,
Splitwise, ISCA 2024) and BurstGPT (``Timestamp,Model,Request tokens,Response tokens,
Total tokens,Log Type``, seconds; failed requests have 0 response tokens and are
dropped). Rows with a zero length are skipped, the rest sorted and re-based so the first
arrival is at 0; a malformed row raises ``ValueError`` naming its line. Mooncake JSONL
and ShareGPT JSON have their own modules.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

from pdserve.workloads.mooncake import load_mooncake_jsonl
from pdserve.workloads.sharegpt import ShareGPTOptions, load_sharegpt_json
from pdserve.workloads.trace import Trace, TraceRequest


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
                raise ValueError(f"{path}:{line}: bad row {_shown(str(row))}: "
                                 f"{_shown(str(exc))}") from exc
            if p > 0 and o > 0:
                rows.append(TraceRequest(t, p, o))
    return Trace.rebased(path.stem, rows)


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
                raise ValueError(f"{path}:{line}: bad row {_shown(str(row))}: "
                                 f"{_shown(str(exc))}") from exc
            if p > 0 and o > 0:
                rows.append(TraceRequest(t, p, o))
    return Trace.rebased(path.stem, rows)


# A single-line JSON file can be hundreds of MB: detection reads at most this much of it.
_HEAD_CHARS = 1 << 16
_SHOWN_CHARS = 80


def _shown(text: str) -> str:
    """``text`` cut to ``_SHOWN_CHARS`` for an error message (a row or a first line may be
    megabytes long)."""
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + f"... ({len(text)} chars)"


def detect_format(path: str | Path) -> str:
    """"azure", "burstgpt", "mooncake" or "sharegpt", from the start of the file: a JSON
    list is ShareGPT (its loader checks the entries), a first line that is a JSON object
    with Mooncake's keys is Mooncake, else the CSV header decides."""
    with Path(path).open(newline="", errors="replace") as fh:
        head = fh.read(_HEAD_CHARS)
    if "\x00" in head or "\ufffd" in head[:1024]:
        raise ValueError(f"{path}: unknown trace format (a binary file, not text); expected an "
                         "Azure or BurstGPT CSV, Mooncake JSONL or ShareGPT JSON")
    text = head.lstrip("\ufeff \t\r\n")
    first = text.split("\n", 1)[0].strip()
    if text.startswith("["):
        return "sharegpt"
    if text.startswith("{"):
        try:
            row = json.loads(first)
        except ValueError:
            row = None
        if isinstance(row, dict) and {"timestamp", "input_length"} <= row.keys():
            return "mooncake"
    else:
        header = next(csv.reader([first]), [])
        if "TIMESTAMP" in header:
            return "azure"
        if "Timestamp" in header and "Request tokens" in header:
            return "burstgpt"
    raise ValueError(f"{path}: unknown trace format (starts {_shown(first)!r}); expected an Azure or "
                     "BurstGPT CSV, Mooncake JSONL or ShareGPT JSON")


def load_trace(path: str | Path, sharegpt: ShareGPTOptions | None = None) -> Trace:
    """Load a trace in any known format (``detect_format``). ShareGPT has only text, so
    it needs ``sharegpt`` (a token counter and the arrival process)."""
    kind = detect_format(path)
    if kind == "azure":
        return load_azure_csv(path)
    if kind == "burstgpt":
        return load_burstgpt_csv(path)
    if kind == "mooncake":
        return load_mooncake_jsonl(path)
    if sharegpt is None:
        raise ValueError(f"{path} is a ShareGPT file: its lengths need a tokenizer "
                         "(ShareGPTOptions)")
    return load_sharegpt_json(path, sharegpt)
