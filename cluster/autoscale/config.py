"""What the SLO autoscaler may do: pool bounds, its pace, its margins and its targets.

``AutoscaleConfig`` is frozen and validated on construction, so a bad configuration (bounds
out of order, a headroom outside (0, 1], no latency profile) fails at start with a message
that names the knob, not minutes later in a decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.engine.latency_profile import LatencyProfile
from pdserve.router.slo import SloConfig


@dataclass(frozen=True)
class PoolBounds:
    """Instances one pool may have: ``min`` <= count <= ``max`` (``role`` names the pool
    in error messages)."""

    min: int
    max: int
    role: str = field(default="pool", compare=False)

    def __post_init__(self) -> None:
        if self.min < 0:
            raise ValueError(f"{self.role} pool bounds: min must be >= 0, got {self.min}")
        if self.max < 1:
            raise ValueError(f"{self.role} pool bounds: max must be >= 1, got {self.max}")
        if self.min > self.max:
            raise ValueError(
                f"{self.role} pool bounds out of order: min {self.min} > max {self.max}"
            )

    def clamp(self, n: int) -> int:
        return max(self.min, min(self.max, n))


def _non_negative(name: str, v: float) -> None:
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be finite and >= 0 seconds, got {v!r}")


@dataclass(frozen=True)
class AutoscaleConfig:
    """The autoscaler's knobs (``decide.py`` states the rule they drive).

    - ``prefill``/``decode``: each pool's bounds; ``prefill_tp``/``decode_tp`` the tensor
      parallelism of one instance (what ``capacity`` sizes), each in the profile;
    - ``interval_s``: at most one decision per interval (Dynamo's adjustment interval);
    - ``upscale_cooldown_s``: after a pool grew, it does not grow again for this long
      (the new instances need ``startup_s`` to take work, and then an interval to show in
      the attainment: keep it >= ``startup_s + interval_s``, or a pool overshoots); ``downscale_window_s``: a pool shrinks only after its target has
      stayed below its size for this long, and then to the highest target seen in that
      window (Kubernetes' stabilisation window);
    - ``headroom``: plan for this share of an instance's sustainable rate (0.8: an
      instance is given 80% of the load it can hold at the SLO);
    - ``slo``: TTFT and TPOT targets and the attainment the pools must keep;
    - ``startup_s``: time from adding an instance to its first request (the simulator
      uses it; the cluster's is what it is);
    - ``profile``: the latency profile capacities come from; required.
    """

    prefill: PoolBounds
    decode: PoolBounds
    profile: LatencyProfile | None = None
    slo: SloConfig = field(default_factory=SloConfig)
    interval_s: float = 30.0
    upscale_cooldown_s: float = 120.0
    downscale_window_s: float = 300.0
    headroom: float = 0.8
    startup_s: float = 60.0
    prefill_tp: int = 1
    decode_tp: int = 1

    def __post_init__(self) -> None:
        if self.profile is None:
            raise ValueError("the autoscaler needs a latency profile (--profile)")
        for role in ("prefill", "decode"):
            b = getattr(self, role)
            if not isinstance(b, PoolBounds):
                raise ValueError(f"{role} bounds must be a PoolBounds, got {b!r}")
            tp = getattr(self, f"{role}_tp")
            if tp not in self.profile.tp_degrees:
                raise ValueError(
                    f"{role}_tp {tp} is not in the profile (tp "
                    f"{', '.join(map(str, self.profile.tp_degrees))})"
                )
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ValueError(f"interval_s must be finite and > 0, got {self.interval_s!r}")
        _non_negative("upscale_cooldown_s", self.upscale_cooldown_s)
        _non_negative("downscale_window_s", self.downscale_window_s)
        _non_negative("startup_s", self.startup_s)
        if not (0.0 < self.headroom <= 1.0):
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom!r}")
