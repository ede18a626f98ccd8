"""Mooncake trace JSONL (Qin et al., Mooncake, FAST 2025; also read by Dynamo and AIPerf).

One JSON object per line::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

``timestamp`` is the arrival in milliseconds (int or float), ``input_length`` and
``output_length`` are token counts, and ``hash_ids`` names the prompt's consecutive
blocks of ``block_size`` (512) tokens: requests with equal leading ids share that prefix.
The published traces have ``ceil(input_length / block_size)`` ids (the last block
partial); tools that synthesise traces sometimes write ``input_length // block_size``
(no id for the partial block), so either count is accepted and anything else is an
error. ``hash_ids`` may be missing (no prefix information); other keys are ignored.
``write_mooncake_jsonl`` writes a ``Trace`` in the same format.

Types are checked strictly (a length must be a JSON integer, not ``12.0`` or ``"12"``); a
bad line raises ``ValueError`` naming the file and line. As in the CSV loaders, rows with
a zero length are skipped and the rest sorted and re-based to start at 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pdserve.workloads.trace import DEFAULT_PREFIX_BLOCK_SIZE, Trace, TraceRequest

REQUIRED_KEYS = ("timestamp", "input_length", "output_length")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a count


def _count(row: dict, key: str) -> int:
    v = row[key]
    if not _is_int(v) or v < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {v!r}")
    return v


def _timestamp_s(row: dict) -> float:
    v = row["timestamp"]
    if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"timestamp must be a non-negative number of ms, got {v!r}")
    return v / 1e3


def _hash_ids(row: dict, input_length: int, block_size: int) -> tuple[int, ...]:
    ids = row.get("hash_ids")
    if ids is None:
        return ()
    if not isinstance(ids, list) or not all(_is_int(h) and h >= 0 for h in ids):
        raise ValueError("hash_ids must be a list of non-negative integers")
    full, ceil = input_length // block_size, -(-input_length // block_size)
    if len(ids) not in (full, ceil):
        raise ValueError(f"{len(ids)} hash_ids for input_length {input_length}: blocks of "
                         f"{block_size} tokens need {ceil}"
                         + (f" (or {full})" if full != ceil else ""))
    return tuple(ids)


def parse_row(row: Any, block_size: int = DEFAULT_PREFIX_BLOCK_SIZE) -> TraceRequest | None:
    """The request of one decoded line (arrival in seconds on the trace's clock), or None
    for a row with a zero length. Raises ``ValueError`` saying what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"missing keys {missing}")
    t = _timestamp_s(row)
    p, o = _count(row, "input_length"), _count(row, "output_length")
    hashes = _hash_ids(row, p, block_size)
    if p == 0 or o == 0:
        return None
    return TraceRequest(t, p, o, prefix_hashes=hashes, prefix_block_size=block_size)


def load_mooncake_jsonl(path: str | Path,
                        block_size: int = DEFAULT_PREFIX_BLOCK_SIZE) -> Trace:
    """A Mooncake trace; requests carry their ``hash_ids`` as ``prefix_hashes``."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    path = Path(path)
    rows = []
    with path.open() as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                req = parse_row(json.loads(line), block_size)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: bad Mooncake row: {exc}") from None
            if req is not None:
                rows.append(req)
    return Trace.rebased(path.stem, rows)


def mooncake_row(req: TraceRequest) -> dict:
    """``req`` as one Mooncake object (timestamp rounded to the format's milliseconds)."""
    row: dict = {"timestamp": round(req.arrival_s * 1e3), "input_length": req.prompt_len,
                 "output_length": req.output_len}
    if req.prefix_hashes:
        row["hash_ids"] = list(req.prefix_hashes)
    return row


def write_mooncake_jsonl(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` as Mooncake JSONL, one request a line, in arrival order.
    ``load_mooncake_jsonl`` reads it back (with the same ``block_size``)."""
    sizes = {r.prefix_block_size for r in trace.requests if r.prefix_hashes}
    if len(sizes) > 1:
        raise ValueError(f"a Mooncake file has one block size; trace has {sorted(sizes)}")
    with Path(path).open("w") as fh:
        for r in trace.requests:
            fh.write(json.dumps(mooncake_row(r)) + "\n")
