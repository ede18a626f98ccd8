"""ShareGPT conversations JSON (``ShareGPT_V3_unfiltered_cleaned_split.json``), as read by
``vllm bench serve`` and ``sglang.bench_serving``.

The file is a JSON list of ``{"id": ..., "conversations": [{"from": "human", "value":
"..."}, {"from": "gpt", "value": "..."}, ...]}``. Each conversation gives one request:
its first human turn (``from`` "human" or "user") is the prompt and the turn right after
it, when that is the model's (any other speaker but "system"), is the reference output.
Conversations with fewer than two turns or no such pair are skipped, as vLLM's benchmark
skips conversations of fewer than two turns (it takes turns 0 and 1 whatever their
speakers; here a leading system or model turn is passed over instead).

Lengths are the token counts of the prompt and output text, from ``count_tokens`` (the
served model's tokenizer, without special tokens); pairs where either is empty are
skipped. The prompt text travels on the request (``TraceRequest.prompt_text``).

ShareGPT has no timestamps: arrivals are Poisson at ``rate`` req/s drawn with ``seed``
(``synthetic.arrival_times``, the generator ``synthetic`` uses), in file order.
``max_requests`` stops after that many usable conversations, which saves tokenizing the
whole file (about 94k conversations) for a short run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.workloads.synthetic import arrival_times
from pdserve.workloads.trace import Trace, TraceRequest

HUMAN = frozenset({"human", "user"})
NOT_A_REPLY = HUMAN | {"system"}


@dataclass(frozen=True)
class ShareGPTOptions:
    """How to turn a ShareGPT file into a trace: the token counter and the arrivals."""

    count_tokens: Callable[[str], int]
    rate: float = 1.0  # req/s, Poisson
    seed: int = 0
    max_requests: int | None = None

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"ShareGPT arrival rate must be positive, got {self.rate!r}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")


def first_exchange(turns: Any) -> tuple[str, str] | None:
    """(prompt, reply) of a ``conversations`` list, or None when it has none. Raises
    ``ValueError`` on a malformed turn."""
    if not isinstance(turns, list):
        raise ValueError(f"'conversations' must be a list, got {type(turns).__name__}")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                and isinstance(turn.get("value"), str)):
            raise ValueError(f"turn {i} must be an object with string 'from' and 'value'")
    for prompt, reply in zip(turns, turns[1:], strict=False):
        if prompt["from"] in HUMAN:
            return (prompt["value"], reply["value"]) if reply["from"] not in NOT_A_REPLY else None
    return None


def load_sharegpt_json(path: str | Path, options: ShareGPTOptions) -> Trace:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a ShareGPT file: expected a JSON list of "
                         f"conversations, got {type(data).__name__}")
    rows: list[TraceRequest] = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}" + (f" (id {entry['id']!r})" if isinstance(entry, dict)
                                        and "id" in entry else "")
        if not isinstance(entry, dict) or "conversations" not in entry:
            raise ValueError(f"{where}: not a ShareGPT conversation (no 'conversations')")
        try:
            pair = first_exchange(entry["conversations"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if pair is None:
            continue
        p, o = options.count_tokens(pair[0]), options.count_tokens(pair[1])
        if p > 0 and o > 0:
            rows.append(TraceRequest(0.0, p, o, prompt_text=pair[0]))
            if len(rows) == options.max_requests:
                break
    if not rows:
        raise ValueError(f"trace {path.stem!r} has no usable rows")
    times = arrival_times(len(rows), options.rate, seed=options.seed)
    return Trace(path.stem, tuple(replace(r, arrival_s=t) for r, t in zip(rows, times,
                                                                           strict=True)))
