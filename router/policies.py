"""Routing policies by name, and how to build one from the router's configuration."""

from __future__ import annotations

from pdserve.engine.registry import Registry
from pdserve.router.policy import LeastLoaded, RoundRobin, RoutingPolicy


def _slo_aware():
    from pdserve.router.policy_slo import SloAware

    return SloAware


POLICIES: Registry[type[RoutingPolicy]] = Registry("routing policy", {
    "least_loaded": lambda: LeastLoaded,
    "round_robin": lambda: RoundRobin,
    "slo_aware": _slo_aware,
})


def create_policy(name: str, profile=None, prefill_token_budget: int = 2048,
                  kv_aware: bool = False) -> RoutingPolicy:
    """``slo_aware`` needs ``profile`` (a ``LatencyProfile``) and uses the prefill token
    budget to predict queueing; the others take no arguments. ``kv_aware`` wraps the
    policy in KV-aware prefill routing (``policy_kv.py``)."""
    cls = POLICIES.get(name)
    if name == "slo_aware":
        if profile is None:
            raise ValueError("the slo_aware policy needs a latency profile (pdserve profile)")
        policy = cls(profile, prefill_token_budget)
    else:
        policy = cls()
    if kv_aware:
        from pdserve.router.policy_kv import KvAware

        policy = KvAware(policy)
    return policy
