"""pdserve.cluster.autoscale: resizing the prefill and decode pools as the load moves.

``config`` holds the bounds and knobs (``AutoscaleConfig``), ``capacity`` the per-instance
sustainable request rate of each pool from the latency profile, ``decide`` the rule
(``Autoscaler.decide(Observation) -> ScaleDecision | None``), and ``simulate`` runs it in
the loop of the disaggregated simulator (``simulate_autoscaled``). ``config``,
``capacity`` and ``decide`` import neither Ray nor the event loop's state: the cluster's
autoscaler actor builds an ``Observation`` from its metrics and applies the decision
through the launcher (add, drain, remove).
"""

from pdserve.cluster.autoscale.capacity import (
    CapacityModel,
    FixedCapacity,
    PoolRates,
    ProfileCapacity,
)
from pdserve.cluster.autoscale.config import AutoscaleConfig, PoolBounds
from pdserve.cluster.autoscale.decide import REASONS, Autoscaler, Observation, ScaleDecision

__all__ = [
    "REASONS",
    "AutoscaleConfig",
    "Autoscaler",
    "CapacityModel",
    "FixedCapacity",
    "Observation",
    "PoolBounds",
    "PoolRates",
    "ProfileCapacity",
    "ScaleDecision",
]
