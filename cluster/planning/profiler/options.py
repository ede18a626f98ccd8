"""What ``pdserve profile`` measures and how: ``ProfileOptions``.

Frozen and validated on construction. ``None`` limits are derived from the engine
config when the run starts (``run._limits``); ``ProfileOptions.quick`` is the ~30 s
variant with fewer points and repetitions over the same ranges.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProfileOptions:
    """What to measure and how. ``None`` limits are derived from the engine config."""

    prefill_points: int = 80
    decode_points: int = 120
    reps: int = 9
    decode_repeat: int = 3  # decode steps are short: time each this many times per pass
    warmup_passes: int = 1
    threads: int | None = 1  # torch intra-op threads; None leaves torch's setting alone
    min_prompt_len: int = 16
    max_prompt_len: int | None = None  # default min(2048, max_model_len)
    max_prefill_seqs: int = 8
    max_batch_tokens: int | None = None  # default max(max_num_batched_tokens, max_prompt_len)
    min_context: int = 16
    max_context: int | None = None  # default min(2048, max_model_len - 1)
    max_batch: int | None = None  # default min(64, max_num_seqs)
    context_spread: float = 4.0  # max/min context within one decode batch, at most
    wide_mix_points: int = 12  # decode diagnostics with unrelated contexts (not fitted)
    drift_window: int = 41  # steps per slowdown estimate (drift_corrected_medians); 0: off
    holdout: float = 0.25
    seed: int = 0
    backends: tuple[str, ...] | None = None  # None: inprocess, shm, tcp (+ cuda_ipc on CUDA)
    transfer_tokens: tuple[int, ...] = (512, 2048)
    transfer_reps: int = 7

    def __post_init__(self) -> None:
        if self.prefill_points < 8 or self.decode_points < 8:
            raise ValueError("prefill_points and decode_points must be >= 8")
        if min(self.reps, self.decode_repeat, self.transfer_reps) < 1 or self.warmup_passes < 0:
            raise ValueError("reps, decode_repeat and transfer_reps must be >= 1, "
                             "warmup_passes >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.min_prompt_len < 1 or self.min_context < 1:
            raise ValueError("min_prompt_len and min_context must be >= 1")
        for name in ("max_prompt_len", "max_batch_tokens", "max_context", "max_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_prefill_seqs < 1:
            raise ValueError("max_prefill_seqs must be >= 1")
        if self.context_spread < 1.0:
            raise ValueError("context_spread must be >= 1")
        if self.drift_window < 0:
            raise ValueError("drift_window must be >= 0")
        if self.wide_mix_points < 0:
            raise ValueError("wide_mix_points must be >= 0")
        if not 0.05 <= self.holdout <= 0.5:
            raise ValueError("holdout must be in [0.05, 0.5]")
        if any(t < 1 for t in self.transfer_tokens):
            raise ValueError("transfer_tokens must be >= 1")
        object.__setattr__(self, "transfer_tokens", tuple(self.transfer_tokens))
        if self.backends is not None:
            object.__setattr__(self, "backends", tuple(self.backends))

    @classmethod
    def quick(cls, **overrides) -> ProfileOptions:
        """A ~30 s run: fewer points and repetitions, same ranges."""
        base = dict(prefill_points=24, decode_points=36, reps=3, decode_repeat=2,
                    wide_mix_points=6, transfer_reps=3)
        return cls(**{**base, **overrides})
