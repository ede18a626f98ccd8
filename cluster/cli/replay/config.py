"""``LoadGenConfig``: how the load generator builds, sends and times its requests.

Frozen and validated here once; saved with every run's results (``RunResult.config``), so
it names files and environment variables but never holds a secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdserve.cluster.cli.client import ClientSecurity

# Ids 0..2 are the demo tokenizer's special tokens (<s>, </s>, <pad>); prompts avoid them
# so a random prompt never contains an end-of-sequence marker.
FIRST_PROMPT_TOKEN_ID = 3
APIS = ("grpc", "http")


@dataclass(frozen=True)
class LoadGenConfig:
    vocab_size: int = 512  # prompt ids are drawn from [3, vocab_size)
    seed: int = 0
    prompt_mode: Literal["tokens", "text"] = "tokens"
    slo_ttft_s: float | None = None  # sent as per-request SLO targets when set
    slo_tpot_s: float | None = None
    max_in_flight: int = 4096  # safety cap; sends past it wait (and show up as send lag)
    num_channels: int = 1  # gRPC channels (HTTP/2 connections); HTTP pools connections
    timeout_s: float | None = None  # per-request deadline
    quiet: bool = False
    progress_interval_s: float = 0.5  # least time between redraws (log: progress.LOG_INTERVAL_S)
    # TLS / token sources for a secured endpoint: paths and an env var name only, so the
    # config can be saved with the results without leaking a secret.
    security: ClientSecurity | None = None
    api: Literal["grpc", "http"] = "grpc"  # the endpoint's protocol (replay/driver.py)
    model: str | None = None  # HTTP only: the model to name; None asks GET /v1/models

    def __post_init__(self) -> None:
        if self.vocab_size <= FIRST_PROMPT_TOKEN_ID:
            raise ValueError(f"vocab_size must be > {FIRST_PROMPT_TOKEN_ID}, got {self.vocab_size}")
        if self.prompt_mode not in ("tokens", "text"):
            raise ValueError(f"prompt_mode must be 'tokens' or 'text', got {self.prompt_mode!r}")
        for name in ("slo_ttft_s", "slo_tpot_s", "timeout_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive when set, got {v!r}")
        if self.max_in_flight < 1 or self.num_channels < 1 or self.progress_interval_s <= 0:
            raise ValueError("max_in_flight, num_channels, progress_interval_s must be positive")
        if self.api not in APIS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, got {self.api!r}")
        if self.model is not None and not self.model:
            raise ValueError("model must be a non-empty name when set")
