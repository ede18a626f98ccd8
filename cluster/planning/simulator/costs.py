"""Step-time models the event loops call, derived from a profile's ``InstanceModel``.

Prefill (per pipeline stage, the profile's formula): ``(a + b*sum(l) + c*sum(l^2))/pp + pp``
ms. A chunk covering prompt positions ``[s, e)`` costs ``b*(e-s) + c*(e^2 - s^2)``: its
tokens attend to everything before them, so the chunks of one prompt add up to the
unchunked cost plus one fixed cost per extra step. With ``s = 0`` this is exactly
``InstanceModel.prefill_s``.

Pipeline parallelism. A ``pp``-stage instance passes a batch through ``pp`` stages of
``stage_s`` each, so one batch's latency is ``pp * stage_s`` (pipelining buys throughput,
not latency, as DistServe argues); a new batch may enter stage 0 as soon as it frees.
Prefill instances are simulated stage by stage (``disagg.py``). Decode and colocated
instances run continuous batching, where a request's next step needs its previous token,
so a ``pp``-stage instance is modelled as ``pp`` independent lanes (vLLM's virtual
engines), each holding its own micro-batch and ``1/pp`` of the KV: a lane's step over
its micro-batch takes ``pp`` stage times = the profile's unpipelined decode formula.
This assumes balanced micro-batches (no bubbles), which the dispatcher keeps roughly true.

Colocated (vLLM v1) mixed step: one forward pass over the decodes and the prefill chunks,
costing ``prefill_ms + decode_ms - min(a_prefill, a_decode)``: the two fits each contain
the fixed per-forward cost (weight streaming, launches) which a fused step pays once;
taking ``max`` instead would treat the decodes' attention over their contexts as free,
which it is not (it is memory-bound work added to the step).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.latency_profile import InstanceModel


@dataclass(frozen=True)
class PrefillCost:
    a: float
    b: float
    c: float
    pp: int

    @classmethod
    def of(cls, inst: InstanceModel) -> PrefillCost:
        f = inst.entry.prefill
        return cls(f.a, f.b, f.c, inst.pp)

    def stage_s(self, tokens: int, sq: int) -> float:
        """One pipeline stage over chunks with ``sum(e-s) = tokens``, ``sum(e^2-s^2) = sq``."""
        pp = self.pp
        return ((self.a + self.b * tokens + self.c * sq) / pp + (pp if pp > 1 else 0)) / 1e3

    def unpipelined_ms(self, tokens: int, sq: int) -> float:
        """``pp`` stage times, in ms (a colocated lane's prefill part)."""
        pp = self.pp
        return self.a + self.b * tokens + self.c * sq + (pp * pp if pp > 1 else 0)


@dataclass(frozen=True)
class DecodeCost:
    a: float
    b: float
    c: float
    large: tuple[float, float, float] | None
    large_batch: int

    @classmethod
    def of(cls, inst: InstanceModel) -> DecodeCost:
        f = inst.entry.decode
        return cls(f.a, f.b, f.c, tuple(f.large) if f.large is not None else None,
                   f.large_batch)

    def lane_ms(self, ctx_sum: int, n: int) -> float:
        """A lane's step over ``n`` requests whose contexts sum to ``ctx_sum`` (ms)."""
        if self.large is not None and n >= self.large_batch:
            a, b, c = self.large
        else:
            a, b, c = self.a, self.b, self.c
        return a + b * (ctx_sum + n) + c * n

    def fixed_ms(self, n: int) -> float:
        return self.large[0] if (self.large is not None and n >= self.large_batch) else self.a


def mixed_step_s(pc: PrefillCost, dc: DecodeCost, tokens: int, sq: int, ctx_sum: int,
                 n: int) -> float:
    """A colocated lane's step: prefill chunks (``tokens``, ``sq``) plus ``n`` decodes."""
    if n == 0:
        return pc.unpipelined_ms(tokens, sq) / 1e3
    if tokens == 0:
        return dc.lane_ms(ctx_sum, n) / 1e3
    shared = min(pc.a, dc.fixed_ms(n))
    return (pc.unpipelined_ms(tokens, sq) + dc.lane_ms(ctx_sum, n) - shared) / 1e3


def contended_s(dur: float, slow: float, other_busy_s: float) -> float:
    """A step of ``dur`` on a host shared with the other pool (``HostContention``):
    stretched by ``1 + (slow - 1) * f``, ``f`` the share of it the other pool stays busy."""
    share = min(1.0, other_busy_s / dur) if other_busy_s > 0 else 0.0
    return dur * (1 + (slow - 1) * share)
