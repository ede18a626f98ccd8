"""The ``Trace`` type: requests with arrival times and prompt/output lengths.

A ``Trace`` is frozen, non-empty and sorted by arrival; arrival times start at 0 for
every loader (``formats``, ``synthetic``). ``Trace.scaled`` fits a trace to the hardware
at hand: time scaling changes the rate, length scaling shrinks prompts/outputs for a
small model on a CPU. ``at_rate``, ``head`` and ``window`` cut and re-time it.

A request may say more about its prompt than its length, for load generators that build
real prompts (the simulator reads only the lengths):

* ``prefix_hashes``: the prompt as consecutive blocks of ``prefix_block_size`` tokens, one
  id each (Mooncake traces). Requests with equal leading ids share that prompt prefix
  exactly, which is what a prefix cache can reuse. The ids need not cover the whole
  prompt; the rest is the request's own.
* ``prompt_text``: the prompt itself (ShareGPT), for replaying real text.

Scaling lengths keeps both meaningful: the block size scales with the prompt, so the
shared share of each prompt stays what it was, and the text is cut to the same share of
its characters (a text prompt's token count is the server's to tell anyway).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

DEFAULT_PREFIX_BLOCK_SIZE = 512  # tokens per hash id in Mooncake's published traces


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_len: int
    output_len: int
    prefix_hashes: tuple[int, ...] = ()  # one id per prompt block, in order; () = unknown
    prefix_block_size: int = DEFAULT_PREFIX_BLOCK_SIZE
    prompt_text: str | None = None  # the real prompt, when the trace has it

    def __post_init__(self) -> None:
        if self.arrival_s < 0 or self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"invalid trace request {self}")
        if self.prefix_block_size < 1:
            raise ValueError(f"prefix_block_size must be >= 1, got {self.prefix_block_size}")
        if not isinstance(self.prefix_hashes, tuple):
            raise ValueError("prefix_hashes must be a tuple of ints")

    def scaled(self, time_scale: float, length_scale: float, max_prompt_len: int | None,
               max_output_len: int | None) -> TraceRequest:
        """This request in a trace scaled by ``Trace.scaled``."""

        def length(n: int, cap: int | None) -> int:
            n = max(1, round(n * length_scale))
            return min(n, cap) if cap else n

        prompt_len = length(self.prompt_len, max_prompt_len)
        text = self.prompt_text
        if text is not None and prompt_len != self.prompt_len:
            text = text[:max(1, round(len(text) * prompt_len / self.prompt_len))]
        return replace(self, arrival_s=self.arrival_s * time_scale, prompt_len=prompt_len,
                       output_len=length(self.output_len, max_output_len), prompt_text=text,
                       prefix_block_size=max(1, round(self.prefix_block_size * length_scale)))


@dataclass(frozen=True)
class Trace:
    name: str
    requests: tuple[TraceRequest, ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError(f"trace {self.name!r} is empty")
        if any(b.arrival_s < a.arrival_s for a, b in zip(self.requests, self.requests[1:], strict=False)):
            raise ValueError(f"trace {self.name!r} is not sorted by arrival time")

    @classmethod
    def rebased(cls, name: str, requests: Iterable[TraceRequest]) -> Trace:
        """A trace of ``requests`` in any order and on any clock: sorted by arrival (ties
        by prompt, then output length, else in the order given) and shifted so the first
        arrives at 0. ``ValueError`` when there are none."""
        reqs = sorted(requests, key=lambda r: (r.arrival_s, r.prompt_len, r.output_len))
        if not reqs:
            raise ValueError(f"trace {name!r} has no usable rows")
        t0 = reqs[0].arrival_s
        return cls(name, tuple(replace(r, arrival_s=r.arrival_s - t0) for r in reqs))

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
        return Trace(self.name, tuple(
            r.scaled(time_scale, length_scale, max_prompt_len, max_output_len)
            for r in self.requests))

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
