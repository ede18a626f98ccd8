"""The values edge validation produces, and the limits it validates against.

``ValidatedRequest`` is the trusted form of a client request that every front door
(gRPC today) hands to the orchestrator; ``validate_request`` in ``validation.py`` is its
only intended constructor, and these classes check only what holds whatever the limits.
Pure Python: no gRPC, no protobuf, no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pdserve.engine.sampling_params import SamplingParams

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]+")


class RequestValidationError(ValueError):
    """The request is malformed; ``str(err)`` is a user-facing message (INVALID_ARGUMENT)."""


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; True as a limit is always a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ValidationLimits:
    """Per-deployment limits. ``vocab_size`` and ``max_model_len`` come from the model.

    ``max_tokens_limit`` is the largest ``max_tokens`` a client may ask for and
    ``default_max_tokens`` what an unset ``max_tokens`` means (before clamping to the
    room left in the context). Count limits of 0 forbid the feature entirely.
    """

    vocab_size: int
    max_model_len: int
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_prompt_chars: int = 1_000_000
    max_stop_strings: int = 16
    max_stop_string_len: int = 256
    max_stop_token_ids: int = 64
    max_request_id_len: int = 128
    max_chat_messages: int = 256

    def __post_init__(self) -> None:
        _check_int("vocab_size", self.vocab_size, 1)
        # One prompt token plus one generated token is the smallest useful context.
        _check_int("max_model_len", self.max_model_len, 2)
        _check_int("max_tokens_limit", self.max_tokens_limit, 1)
        _check_int("default_max_tokens", self.default_max_tokens, 1)
        _check_int("max_prompt_chars", self.max_prompt_chars, 1)
        _check_int("max_stop_strings", self.max_stop_strings, 0)
        _check_int("max_stop_string_len", self.max_stop_string_len, 1)
        _check_int("max_stop_token_ids", self.max_stop_token_ids, 0)
        _check_int("max_request_id_len", self.max_request_id_len, 1)
        _check_int("max_chat_messages", self.max_chat_messages, 1)
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must not exceed "
                f"max_tokens_limit ({self.max_tokens_limit})"
            )


@dataclass(frozen=True)
class SloTargets:
    """Latency targets in seconds; ``None`` = no target (best effort)."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number or None, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive and finite, got {value!r}")


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that passed edge validation; see the module docstring for invariants.

    ``prompt_text`` is the text prompt as sent, or ``None`` for token-id and chat
    prompts (a chat prompt is rendered straight to ids by the chat template).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    slo: SloTargets
    prompt_text: str | None

    def __post_init__(self) -> None:
        # Limit-independent invariants only; the limit-dependent ones are enforced by
        # validate_request, the only intended constructor.
        if not isinstance(self.request_id, str) or not REQUEST_ID_RE.fullmatch(self.request_id):
            raise ValueError(f"invalid request_id {self.request_id!r}")
        if not isinstance(self.prompt_token_ids, tuple) or not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must be a non-empty tuple")
        if not all(isinstance(t, int) and t >= 0 for t in self.prompt_token_ids):
            raise ValueError("prompt_token_ids must be non-negative integers")
        if not isinstance(self.params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(self.params).__name__}")
        if not isinstance(self.slo, SloTargets):
            raise ValueError(f"slo must be a SloTargets, got {type(self.slo).__name__}")
        if self.prompt_text is not None and not isinstance(self.prompt_text, str):
            raise ValueError("prompt_text must be a str or None")
