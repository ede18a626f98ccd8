"""Synthetic prefix-sharing traces: requests that share long prompt prefixes, Mooncake-style.

Real traffic repeats long prefixes (system prompts, few-shot examples, a document asked
about several times); the Mooncake format records them as ``hash_ids``, one id per block of
``block_size`` (512) prompt tokens. This generator (seeded: the same spec gives the same
trace) draws ``requests`` requests with Poisson arrivals at ``rate`` req/s:

- a share ``shared_share`` of them opens with one of ``num_prefixes`` shared prefixes of
  ``prefix_tokens`` tokens (whole blocks), prefix ``k`` chosen with weight
  ``1 / (k + 1) ** popularity_skew`` (0: uniform; ~1: Zipf, a few prompts dominate);
- every prompt then has a unique suffix of ``suffix_tokens`` tokens (uniform in the
  range). Requests without a shared prefix have a unique prompt of the same length
  distribution (``prefix_tokens`` + suffix), so sharing alone separates the two groups;
- outputs are uniform in ``output_tokens``.

Ids: prefix ``k`` owns ids ``k * P .. k * P + P - 1`` (``P`` = its blocks), always at the
same positions, and every other block (the partial last one included) gets a fresh id
never used again. Equal ids at position ``i`` therefore mean equal prompts up to block
``i``, as Mooncake's chained hashes do. ``write_mooncake_jsonl`` writes the trace.
Arrivals are kept on a millisecond grid, the format's resolution, so a written trace
loads back equal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pdserve.workloads.synthetic import arrival_times
from pdserve.workloads.trace import DEFAULT_PREFIX_BLOCK_SIZE, Trace, TraceRequest


@dataclass(frozen=True)
class PrefixSharingSpec:
    """The generator's parameters (see the module docstring); validated on construction."""

    requests: int = 2000
    rate: float = 10.0
    num_prefixes: int = 8
    shared_share: float = 0.8
    prefix_tokens: int = 2048
    suffix_tokens: tuple[int, int] = (64, 512)
    output_tokens: tuple[int, int] = (16, 256)
    popularity_skew: float = 0.0
    block_size: int = DEFAULT_PREFIX_BLOCK_SIZE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or not self.rate > 0:
            raise ValueError(f"need requests >= 1 and rate > 0, got {self.requests}, {self.rate}")
        if self.num_prefixes < 1 or not (0.0 <= self.shared_share <= 1.0):
            raise ValueError("need num_prefixes >= 1 and 0 <= shared_share <= 1")
        if self.block_size < 1 or self.prefix_tokens < self.block_size \
                or self.prefix_tokens % self.block_size:
            raise ValueError(f"prefix_tokens ({self.prefix_tokens}) must be a positive "
                             f"multiple of block_size ({self.block_size})")
        for name in ("suffix_tokens", "output_tokens"):
            lo, hi = getattr(self, name)
            if not (1 <= lo <= hi):
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
        if not self.popularity_skew >= 0:
            raise ValueError("popularity_skew must be >= 0")

    @property
    def prefix_blocks(self) -> int:
        return self.prefix_tokens // self.block_size

    def describe(self) -> str:
        return (f"{self.requests} requests, Poisson {self.rate:g} req/s; "
                f"{self.shared_share:.0%} open with one of {self.num_prefixes} shared "
                f"{self.prefix_tokens}-token prefixes (popularity skew "
                f"{self.popularity_skew:g}), the rest a unique prompt of the same length; "
                f"unique suffix {self.suffix_tokens[0]}-{self.suffix_tokens[1]} tokens, "
                f"output {self.output_tokens[0]}-{self.output_tokens[1]} tokens; "
                f"{self.block_size}-token blocks, seed {self.seed}")


def prefix_sharing_trace(spec: PrefixSharingSpec, name: str | None = None) -> Trace:
    """The trace ``spec`` describes; requests carry their ``prefix_hashes``."""
    rng = random.Random(spec.seed)
    times = arrival_times(spec.requests, spec.rate, seed=spec.seed + 1)
    weights = [1.0 / (k + 1) ** spec.popularity_skew for k in range(spec.num_prefixes)]
    bs, pb = spec.block_size, spec.prefix_blocks
    fresh = spec.num_prefixes * pb  # the first id no prefix owns
    reqs = []
    for t in times:
        suffix = rng.randint(*spec.suffix_tokens)
        output = rng.randint(*spec.output_tokens)
        prompt = spec.prefix_tokens + suffix
        blocks = -(-prompt // bs)
        if rng.random() < spec.shared_share:
            k = rng.choices(range(spec.num_prefixes), weights)[0]
            ids = list(range(k * pb, (k + 1) * pb))
        else:
            ids = []
        new = blocks - len(ids)
        ids.extend(range(fresh, fresh + new))
        fresh += new
        reqs.append(TraceRequest(round(t, 3), prompt, output, prefix_hashes=tuple(ids),
                                 prefix_block_size=bs))
    return Trace.rebased(name or f"prefix-sharing-{spec.num_prefixes}x{spec.prefix_tokens}"
                         f"-{spec.shared_share:g}-seed{spec.seed}", reqs)


def reusable_share(trace: Trace) -> float:
    """Prompt tokens an unbounded cache seeing every request would reuse / prompt tokens:
    each request's leading full blocks already seen (the last token always computed).
    The ceiling of any routing's hit rate on this trace."""
    seen: set[int] = set()
    reused = total = 0
    for r in trace.requests:
        keys = r.prefix_hashes[:r.prompt_len // r.prefix_block_size]
        n = 0
        for k in keys:
            if k not in seen:
                break
            n += 1
        reused += min(n * r.prefix_block_size, r.prompt_len - 1)
        total += r.prompt_len
        seen.update(keys)
    return reused / total
