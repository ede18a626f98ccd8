"""The router's configuration: one frozen, validated value, handed to ``build_router``."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.router.local_prefill import LocalPrefillConfig
from pdserve.router.reliability import ReliabilityConfig
from pdserve.router.server import ServerConfig
from pdserve.router.slo import SloConfig


@dataclass(frozen=True)
class RouterConfig:
    """``policy`` slo_aware needs ``profile`` (a ``pdserve profile`` JSON path);
    ``admission`` "reject" answers RESOURCE_EXHAUSTED at once when a request's TTFT
    target cannot be met, "best_effort" serves it anyway."""

    model: str
    server: ServerConfig = ServerConfig()
    # The model's name in the OpenAI API (``model`` field, /v1/models); default: the
    # checkpoint directory's name.
    served_model_name: str | None = None
    policy: str = "least_loaded"
    max_model_len: int | None = None
    max_tokens_limit: int = 4096
    slo: SloConfig = SloConfig()
    admission: str = "reject"
    profile: str | None = None
    prefill_token_budget: int = 2048
    # (worker id, unit) pairs: a request's prefill and decode workers share a unit
    # (low node-affinity plans); empty = any pair.
    units: tuple[tuple[str, int], ...] = ()
    reliability: ReliabilityConfig = ReliabilityConfig()
    # How the request path's calls reach a prefill worker's Ray actor on the router's node:
    # "direct" = a Unix socket to it (router/prefill_direct.py), "ray" = Ray actor calls.
    # Workers on other nodes, and every other call, always go over Ray.
    prefill_channel: str = "direct"
    # Prefer the prefill worker that probably holds the prompt's prefix (router/policy_kv.py),
    # scored with ``policy``'s load or TTFT prediction.
    kv_aware_routing: bool = False
    # Conditional disaggregation (router/local_prefill.py): prefill short prompts, or all
    # prompts while the prefill pool is backed up, on the decode worker. Off by default.
    local_prefill: LocalPrefillConfig = LocalPrefillConfig()
    # The decode workers' tensor-parallel degree: the profile entry that predicts a local
    # prefill's time (the launcher sets it from the decode pool).
    decode_tp: int = 1

    def __post_init__(self) -> None:
        if self.decode_tp < 1:
            raise ValueError(f"decode_tp must be >= 1, got {self.decode_tp}")
        if self.local_prefill.needs_profile and not self.profile:
            raise ValueError(
                "--local-prefill-wait-factor compares predicted prefill times: "
                "it needs a latency profile (--profile)"
            )
        if self.prefill_channel not in ("direct", "ray"):
            raise ValueError(f"prefill_channel must be direct or ray, got {self.prefill_channel!r}")
        if self.admission not in ("reject", "best_effort"):
            raise ValueError(f"admission must be reject or best_effort, got {self.admission!r}")
        if self.policy == "slo_aware" and not self.profile:
            raise ValueError("policy slo_aware needs a latency profile (--profile)")
