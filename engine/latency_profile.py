"""Latency profiles: how long prefill and decode steps take on given hardware.

Times are in milliseconds, as DistServe publishes them. For a prefill batch with prompt
lengths ``l``: ``(a + b*sum(l) + c*sum(l^2)) / pp + pp``; for a decode step over
contexts ``ctx`` with batch size ``B``: ``(a + b*sum(ctx + 1) + c*B) / pp``, with a second
coefficient set for ``B >= large_batch`` where the data calls for one. A profile holds
one entry per tensor-parallel degree (pipeline parallelism is applied by the formula),
the KV capacity in tokens, the KV bytes per token and measured transfer bandwidths. It
is written as JSON by ``pdserve profile`` and read by the simulator, the planner and the
SLO-aware router. ``distserve_opt13b_a100()`` is DistServe's published model, the
reference for testing the planner. Pure Python with no torch, kept in ``engine/`` so the
router and ``cluster/`` both read profiles without importing the planner.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class PrefillFit:
    a: float
    b: float
    c: float = 0.0

    def ms(self, prompt_lens: Sequence[int]) -> float:
        s = sum(prompt_lens)
        s2 = sum(x * x for x in prompt_lens)
        return self.a + self.b * s + self.c * s2


@dataclass(frozen=True)
class DecodeFit:
    a: float
    b: float
    c: float
    # Coefficients for batches of at least ``large_batch`` (None: one fit for all sizes).
    large: tuple[float, float, float] | None = None
    large_batch: int = 95

    def ms(self, context_lens: Sequence[int]) -> float:
        n = len(context_lens)
        a, b, c = self.large if (self.large is not None and n >= self.large_batch) else \
            (self.a, self.b, self.c)
        return a + b * (sum(context_lens) + n) + c * n


@dataclass(frozen=True)
class ParallelEntry:
    tp: int
    prefill: PrefillFit
    decode: DecodeFit
    kv_capacity_tokens: int  # per instance at pp = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.kv_capacity_tokens < 1:
            raise ValueError("tp and kv_capacity_tokens must be >= 1")


@dataclass(frozen=True)
class InstanceModel:
    """One instance's latency model at a given (tp, pp); times in seconds."""

    tp: int
    pp: int
    entry: ParallelEntry

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp

    @property
    def kv_capacity_tokens(self) -> int:
        # Pipeline stages each hold their layers' share of the KV: capacity grows with pp.
        return self.entry.kv_capacity_tokens * self.pp

    def prefill_s(self, prompt_lens: Sequence[int]) -> float:
        return (self.entry.prefill.ms(prompt_lens) / self.pp + (self.pp if self.pp > 1 else 0)) / 1e3

    def decode_s(self, context_lens: Sequence[int]) -> float:
        return self.entry.decode.ms(context_lens) / self.pp / 1e3


@dataclass(frozen=True)
class LatencyProfile:
    model: str
    hardware: str
    entries: tuple[ParallelEntry, ...]
    kv_bytes_per_token: int
    # Measured KV transfer bandwidth by backend name, bytes/s.
    transfer_bandwidth: tuple[tuple[str, float], ...] = ()
    # Fit quality on held-out points: name -> median absolute relative error.
    fit_error: tuple[tuple[str, float], ...] = ()
    notes: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("a profile needs at least one parallelism entry")
        if len({e.tp for e in self.entries}) != len(self.entries):
            raise ValueError("duplicate tp entries in profile")
        if self.kv_bytes_per_token < 1:
            raise ValueError("kv_bytes_per_token must be >= 1")

    @property
    def tp_degrees(self) -> tuple[int, ...]:
        return tuple(sorted(e.tp for e in self.entries))

    def instance(self, tp: int = 1, pp: int = 1) -> InstanceModel:
        for e in self.entries:
            if e.tp == tp:
                return InstanceModel(tp, pp, e)
        raise ValueError(f"profile {self.model!r} has no entry for tp={tp} (has {self.tp_degrees})")

    def bandwidth(self, backend: str) -> float | None:
        return dict(self.transfer_bandwidth).get(backend)

    # -- JSON -------------------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        d.pop("extra")
        d["transfer_bandwidth"] = dict(self.transfer_bandwidth)
        d["fit_error"] = dict(self.fit_error)
        return json.dumps({"format": "pdserve-profile-v1", **d, **self.extra}, indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> LatencyProfile:
        if d.get("format") != "pdserve-profile-v1":
            raise ValueError("not a pdserve profile (format must be pdserve-profile-v1)")
        try:
            entries = tuple(
                ParallelEntry(e["tp"], PrefillFit(**e["prefill"]),
                              DecodeFit(**{**e["decode"], "large": tuple(e["decode"]["large"])
                                           if e["decode"].get("large") else None}),
                              e["kv_capacity_tokens"])
                for e in d["entries"])
            known = {"format", "model", "hardware", "entries", "kv_bytes_per_token",
                     "transfer_bandwidth", "fit_error", "notes"}
            return cls(d["model"], d["hardware"], entries, int(d["kv_bytes_per_token"]),
                       tuple(d.get("transfer_bandwidth", {}).items()),
                       tuple(d.get("fit_error", {}).items()), d.get("notes", ""),
                       {k: v for k, v in d.items() if k not in known})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed profile: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from exc


def distserve_opt13b_a100() -> LatencyProfile:
    """DistServe's published latency model for OPT-13B on A100-80GB (see DESIGN.md)."""
    rows = {
        1: ((18.10, 0.1019, 7.12e-6), (19.93, 6.27e-4, 0.0385), (7.17, 5.80e-4, 0.1583), 66_144),
        2: ((14.74, 0.0686, 2.45e-6), (13.29, 3.41e-4, 0.0630), (10.64, 3.12e-4, 0.0856), 163_008),
        4: ((12.06, 0.0381, 5.23e-7), (10.26, 1.88e-4, 0.0327), (10.48, 1.71e-4, 0.0457), 356_736),
    }
    entries = tuple(ParallelEntry(tp, PrefillFit(*p), DecodeFit(*d, large=big, large_batch=95), cap)
                    for tp, (p, d, big, cap) in rows.items())
    # OPT-13B: 40 layers x hidden 5120 x (K+V) x fp16.
    return LatencyProfile("OPT-13B", "A100-80GB (DistServe published model)", entries,
                          kv_bytes_per_token=2 * 40 * 5120 * 2,
                          transfer_bandwidth=(("nvlink", 300e9), ("infiniband", 25e9)),
                          notes="DistServe simdistserve estimator coefficients")
