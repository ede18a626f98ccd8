"""Per-request sampling and stop settings.

A ``SamplingParams`` is created once at the edge (router or engine caller), validated
in ``__post_init__`` and never mutated: it travels unchanged from the router to the
prefill worker (first token) and the decode worker (the rest).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Upper bound on requested top log-probabilities per token; larger values cost a
# full-vocabulary sort per step for little use (vLLM caps at 20 by default too).
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature == 0 means greedy (argmax). ``top_k <= 0`` disables top-k;
    ``top_p == 1`` disables nucleus filtering. ``seed`` makes a request's random
    draws reproducible regardless of what else shares its batch. ``logprobs`` asks
    for the sampled token's log-probability plus that many top alternatives
    (0 = only the sampled token). ``stop`` strings end generation and are not
    included in the returned text; ``stop_token_ids`` end it and are included in
    the token ids (EOS too unless ``ignore_eos``). ``min_tokens`` keeps a request
    going that long: until it has that many output tokens, EOS and ``stop_token_ids``
    cannot be sampled and stop strings do not match (vLLM's semantics; benchmark tools
    send it with ``ignore_eos`` to fix output lengths).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    # Output tokens produced before this request began: a request resumed after a worker
    # failure has them at the end of its prompt. Per-token seeds are numbered from here,
    # so a resumed seeded request draws exactly what the uninterrupted one would have.
    output_offset: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.output_offset, int) or self.output_offset < 0:
            raise ValueError(f"output_offset must be an integer >= 0, got {self.output_offset!r}")
        # Counted over the whole request: a resumed one has fewer max_tokens left but the
        # same min_tokens (see below_min_tokens).
        limit = self.output_offset + self.max_tokens
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= limit:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={limit}], "
                             f"got {self.min_tokens!r}")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        # Lists are accepted for convenience but stored as tuples so the object stays hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def below_min_tokens(self, num_output_tokens: int) -> bool:
        """Whether a request with ``num_output_tokens`` outputs (this attempt's; a resumed
        request's earlier ones are counted through ``output_offset``) must not stop yet."""
        return self.output_offset + num_output_tokens < self.min_tokens
