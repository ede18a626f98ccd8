"""The router as a Ray actor: hosts the grpc.aio server in the actor's event loop.

``build_router`` wires everything from plain values (worker handles or in-process
hosts), so the same router runs as a Ray actor or inside a test / a Ray-less host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from pdserve.router.clients import DecodeClient, PrefillClient
from pdserve.router.metrics import RouterMetrics
from pdserve.router.metrics_server import MetricsAggregator
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.policy import create_policy
from pdserve.router.reliability import ReliabilityConfig
from pdserve.router.server import RouterServer, ServerConfig
from pdserve.router.slo import SloConfig
from pdserve.router.validation import ValidationLimits


@dataclass(frozen=True)
class RouterConfig:
    """``policy`` slo_aware needs ``profile`` (a ``pdserve profile`` JSON path);
    ``admission`` "reject" answers RESOURCE_EXHAUSTED at once when a request's TTFT
    target cannot be met, "best_effort" serves it anyway."""

    model: str
    server: ServerConfig = ServerConfig()
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

    def __post_init__(self) -> None:
        if self.admission not in ("reject", "best_effort"):
            raise ValueError(f"admission must be reject or best_effort, got {self.admission!r}")
        if self.policy == "slo_aware" and not self.profile:
            raise ValueError("policy slo_aware needs a latency profile (--profile)")


def build_router(config: RouterConfig, prefills: Sequence[tuple[str, Any]],
                 decodes: Sequence[tuple[str, Any]]) -> RouterServer:
    from pdserve.engine.loader import ensure_model_present, has_tokenizer
    from pdserve.engine.metrics import model_label
    from pdserve.engine.model_config import ModelConfig
    from pdserve.engine.tokenizer import Tokenizer

    ensure_model_present(config.model)
    mc = ModelConfig.from_pretrained(config.model)
    tokenizer = Tokenizer.from_pretrained(config.model) if has_tokenizer(config.model) else None
    vocab = max(mc.vocab_size, tokenizer.vocab_size if tokenizer else 0)
    limits = ValidationLimits(
        vocab_size=min(vocab, mc.vocab_size),
        max_model_len=config.max_model_len or mc.max_position_embeddings,
        max_tokens_limit=config.max_tokens_limit)
    profile = None
    if config.profile:
        from pdserve.engine.latency_profile import LatencyProfile

        profile = LatencyProfile.load(config.profile)
    policy = create_policy(config.policy, profile, config.prefill_token_budget)
    pclients = [PrefillClient(w, t) for w, t in prefills]
    dclients = [DecodeClient(w, t) for w, t in decodes]
    orch = Orchestrator(pclients, dclients, policy, config.slo, config.admission,
                        units=dict(config.units), reliability=config.reliability)
    metrics = RouterMetrics(model_label(config.model), config.slo)
    orch.on_retry = lambda cause: metrics.retries.labels(metrics.model, cause).inc()
    aggregator = MetricsAggregator({c.worker_id: c.metrics_text for c in (*pclients, *dclients)})
    return RouterServer(config.server, orch, tokenizer, limits, metrics, aggregator)


@ray.remote(max_concurrency=10000)
class RouterActor:
    def __init__(self, config: RouterConfig, prefills: list[tuple[str, Any]],
                 decodes: list[tuple[str, Any]]):
        self.server = build_router(config, prefills, decodes)

    async def start(self) -> str:
        return await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    async def metrics_address(self) -> str | None:
        return self.server.metrics_address

    async def in_flight(self) -> int:
        return self.server.orchestrator.in_flight()

    def pid(self) -> int:
        import os

        return os.getpid()

    async def reliability(self) -> dict:
        """Retries so far, requests failed after spending their retries, and each
        worker's health (alive, deaths seen)."""
        return self.server.orchestrator.reliability_report()
