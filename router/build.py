"""Wire a router from plain values, with no Ray involved.

``build_router`` takes worker handles (Ray actors) or in-process hosts alike, so the same
router runs inside its Ray actor (``actor.py``), a test, or a Ray-less GPU host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pdserve.router.clients import DecodeClient, PrefillClient
from pdserve.router.config import RouterConfig
from pdserve.router.membership import Membership
from pdserve.router.metrics import RouterMetrics
from pdserve.router.metrics_server import MetricsAggregator
from pdserve.router.orchestrator import Orchestrator
from pdserve.router.policies import create_policy
from pdserve.router.prefill_placement import PrefillPlacement
from pdserve.router.request_types import ValidationLimits
from pdserve.router.server import RouterServer


def _load_profile(config: RouterConfig):
    if not config.profile:
        return None
    from pdserve.engine.latency_profile import LatencyProfile

    return LatencyProfile.load(config.profile)


def check_profile(config: RouterConfig) -> None:
    """Refuse now what ``build_router`` would refuse about the latency profile (unreadable,
    or without the decode pool's tp for local prefill), so a launcher fails before any
    worker starts rather than in the router's actor."""
    PrefillPlacement(config.local_prefill, None, _load_profile(config), config.decode_tp)


def build_router(config: RouterConfig, prefills: Sequence[tuple[str, Any]],
                 decodes: Sequence[tuple[str, Any]]) -> RouterServer:
    from pdserve.engine.checkpoint import ensure_model_present, has_tokenizer
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
    profile = _load_profile(config)
    policy = create_policy(config.policy, profile, config.prefill_token_budget,
                           config.kv_aware_routing)
    placement = PrefillPlacement(config.local_prefill, policy, profile, config.decode_tp,
                                 config.prefill_token_budget)

    def make_prefill(worker_id: str, target: Any) -> PrefillClient:
        return PrefillClient(worker_id, target, direct=config.prefill_channel == "direct")

    pclients = [make_prefill(w, t) for w, t in prefills]
    dclients = [DecodeClient(w, t) for w, t in decodes]
    orch = Orchestrator(pclients, dclients, policy, config.slo, config.admission,
                        units=dict(config.units), reliability=config.reliability,
                        placement=placement)
    metrics = RouterMetrics(model_label(config.model), config.slo)
    orch.on_retry = lambda cause: metrics.retries.labels(metrics.model, cause).inc()
    placement.on_decision = lambda where, reason: metrics.prefill_decisions.labels(
        metrics.model, where, reason).inc()
    aggregator = MetricsAggregator({c.worker_id: c.metrics_text for c in (*pclients, *dclients)})
    server = RouterServer(config.server, orch, tokenizer, limits, metrics, aggregator,
                          model_name=config.served_model_name or model_label(config.model))
    server.membership = Membership(orch, make_prefill, aggregator, metrics)
    return server
