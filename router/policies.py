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


def create_policy(name: str, profile=None, prefill_token_budget: int = 2048) -> RoutingPolicy:
    """``slo_aware`` needs ``profile`` (a ``LatencyProfile``) and uses the prefill token
    budget to predict queueing; the others take no arguments."""
    cls = POLICIES.get(name)
    if name == "slo_aware":
        if profile is None:
            raise ValueError("the slo_aware policy needs a latency profile (pdserve profile)")
        return cls(profile, prefill_token_budget)
    return cls()
