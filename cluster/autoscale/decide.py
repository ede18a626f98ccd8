"""The SLO autoscaler's rule: from what the cluster observed to pool sizes (pure, no Ray).

Lifecycle: the caller (the cluster's autoscaler actor, or ``simulate_autoscaled``) builds
an ``Observation`` every so often and calls ``Autoscaler.decide``; it answers None (no
change, or called again within ``interval_s`` of its last evaluation: at most one
decision per interval) or a ``ScaleDecision`` with each pool's new size, which the caller
applies (add instances; drain and remove: a removed instance takes no new work and
leaves once its requests are done). The caller reports the sizes it has, starting
instances included, in the next ``Observation``.

The rule, per pool, with ``rate`` the arrival rate and ``cap`` one instance's sustainable
rate at the observed mean lengths (``capacity.py``):

1. ``target = ceil(rate / (cap * headroom))``, clamped to the pool's bounds (Dynamo's SLA
   planner sizes pools the same way from its profiled throughput per GPU);
2. *up*, at once unless the pool grew less than ``upscale_cooldown_s`` ago: to the target
   when it is above the size (``rate_up``); to at least size + 1 when the pool's SLO
   misses its attainment (``ttft_miss`` for prefill, ``tpot_miss`` for decode) or when a
   leading signal says it soon will: the prefill queue would take longer than the TTFT
   target to drain (``prefill_queue``), or the decode pool's KV use exceeds the headroom
   (``kv_load``);
3. *down*, only after the target has stayed below the size for the whole
   ``downscale_window_s``, to the highest target seen in that window (``rate_down``):
   hysteresis, so a dip does not remove what the next minute needs. Never below what the
   decode pool's KV in use needs at the headroom. Any up signal restarts the window;
4. a size outside the bounds is brought inside at once (``bounds``).

``ScaleDecision.reason`` is the most urgent of the pools' reasons (``REASONS`` order);
``detail`` says what each pool did and why, for the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.cluster.autoscale.capacity import CapacityModel, PoolRates
from pdserve.cluster.autoscale.config import AutoscaleConfig, PoolBounds
from pdserve.router.metrics import AUTOSCALER_REASONS

# Decision reasons, most urgent first (the metric's ``reason`` label, declared with the
# metric so that the router creates each series at zero).
REASONS = AUTOSCALER_REASONS


def _fraction(name: str, v: float | None) -> None:
    if v is not None and not (0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be in [0, 1] or None, got {v!r}")


@dataclass(frozen=True)
class Observation:
    """The cluster over the last interval, as the autoscaler needs it.

    ``now``: seconds on the caller's clock (monotonic); ``arrival_rate``: requests/s
    arrived over the last interval; ``mean_prompt_tokens``/``mean_output_tokens``: their
    mean lengths (the last known when none arrived); ``ttft_attainment``: share of the
    requests whose TTFT was decided in the interval that met the target, among those the
    profile says an idle prefill instance could serve in time (a prompt too long for the
    target on any instance is no reason to add one),
    ``tpot_attainment`` the same for TPOT over requests that finished (None: no such
    request); ``prefill_queue``: prompt tokens routed to the prefill pool and not yet
    started; ``decode_load``: KV tokens the decode pool holds or has promised, as a share
    of its capacity; ``prefill``/``decode``: instances each pool has, starting ones
    included, draining ones not."""

    now: float
    arrival_rate: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    ttft_attainment: float | None
    tpot_attainment: float | None
    prefill_queue: int
    decode_load: float
    prefill: int
    decode: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_rate) and self.arrival_rate >= 0):
            raise ValueError(f"arrival_rate must be finite and >= 0, got {self.arrival_rate!r}")
        if self.mean_prompt_tokens < 0 or self.mean_output_tokens < 0:
            raise ValueError("mean token counts must be >= 0")
        _fraction("ttft_attainment", self.ttft_attainment)
        _fraction("tpot_attainment", self.tpot_attainment)
        if self.prefill_queue < 0 or not (self.decode_load >= 0):
            raise ValueError("prefill_queue and decode_load must be >= 0")
        if self.prefill < 0 or self.decode < 0:
            raise ValueError("instance counts must be >= 0")


@dataclass(frozen=True)
class ScaleDecision:
    """New pool sizes; ``reason`` one of ``REASONS``; ``detail`` for humans."""

    prefill: int
    decode: int
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason {self.reason!r}; one of {', '.join(REASONS)}")
        if self.prefill < 0 or self.decode < 0:
            raise ValueError("pool sizes must be >= 0")


class _Pool:
    """One pool's memory between decisions: last growth, and the down window."""

    __slots__ = ("role", "bounds", "last_up", "below_since", "peak")

    def __init__(self, role: str, bounds: PoolBounds) -> None:
        self.role, self.bounds = role, bounds
        self.last_up: float | None = None
        self.below_since: float | None = None  # target < size continuously since
        self.peak = 0  # highest target since then

    def next(
        self,
        cfg: AutoscaleConfig,
        now: float,
        size: int,
        target: int,
        pressure: str | None,
        floor: int,
    ) -> tuple[int, str | None, str]:
        """(new size, reason or None, why) for this pool. ``pressure``: an up reason
        from attainment or a leading signal; ``floor``: never shrink below this."""
        b = self.bounds
        if b.clamp(size) != size:
            self.below_since = None
            return b.clamp(size), "bounds", f"size {size} outside [{b.min}, {b.max}]"
        if pressure is not None or target > size:
            self.below_since = None
            new = b.clamp(max(target, size + 1 if pressure is not None else size))
            if new <= size:
                return size, None, f"{pressure or 'rate'} but at max {b.max}"
            if self.last_up is not None and now - self.last_up < cfg.upscale_cooldown_s:
                return size, None, f"wants {new} ({pressure or 'rate_up'}), cooling down"
            self.last_up = now
            return new, pressure or "rate_up", f"target {target}"
        if target < size:
            if self.below_since is None:
                self.below_since, self.peak = now, target
            else:
                self.peak = max(self.peak, target)
            if now - self.below_since < cfg.downscale_window_s:
                return size, None, (f"target {target} below size for "
                                    f"{now - self.below_since:.0f} of "
                                    f"{cfg.downscale_window_s:g} s")
            new = b.clamp(max(self.peak, floor))
            self.below_since = None
            if new >= size:
                return size, None, f"held at {size} by the KV in use"
            return new, "rate_down", f"target <= {self.peak} for {cfg.downscale_window_s:g} s"
        self.below_since = None
        return size, None, "on target"


class Autoscaler:
    """Stateful: remembers its last evaluation, each pool's last growth and down window.
    ``decide`` never blocks and touches nothing but its own state (module docstring)."""

    def __init__(self, config: AutoscaleConfig, capacity: CapacityModel) -> None:
        self.cfg, self.capacity = config, capacity
        self._pools = (_Pool("prefill", config.prefill), _Pool("decode", config.decode))
        self._last_eval: float | None = None
        self.last_rates: PoolRates | None = None
        self.last_targets: tuple[int, int] | None = None

    def targets(self, obs: Observation) -> tuple[int, int]:
        """Each pool's size for the observed rate and lengths, within its bounds."""
        rates = self.capacity.rates(obs.mean_prompt_tokens, obs.mean_output_tokens)
        self.last_rates = rates
        out = []
        for pool, cap in zip(self._pools, (rates.prefill, rates.decode), strict=True):
            b = pool.bounds
            if obs.arrival_rate <= 0:
                out.append(b.min)
            elif cap <= 0:  # the SLO is out of reach at these lengths: all we may have
                out.append(b.max)
            else:
                out.append(b.clamp(math.ceil(obs.arrival_rate / (cap * self.cfg.headroom) - 1e-9)))
        return out[0], out[1]

    def decide(self, obs: Observation) -> ScaleDecision | None:
        cfg = self.cfg
        if self._last_eval is not None and obs.now - self._last_eval < cfg.interval_s:
            return None
        self._last_eval = obs.now
        t_pre, t_dec = self.last_targets = self.targets(obs)
        want = cfg.slo.attainment
        pre_pressure = dec_pressure = None
        if obs.ttft_attainment is not None and obs.ttft_attainment < want:
            pre_pressure = "ttft_miss"
        elif self._queue_s(obs) > cfg.slo.ttft_s:
            pre_pressure = "prefill_queue"
        if obs.tpot_attainment is not None and obs.tpot_attainment < want:
            dec_pressure = "tpot_miss"
        elif obs.decode_load > cfg.headroom:
            dec_pressure = "kv_load"
        # Shrinking decode must leave its KV in use within the headroom.
        kv_floor = math.ceil(obs.decode_load * obs.decode / cfg.headroom - 1e-9)
        pre, dec = self._pools
        p_new, p_reason, p_why = pre.next(cfg, obs.now, obs.prefill, t_pre, pre_pressure, 0)
        d_new, d_reason, d_why = dec.next(cfg, obs.now, obs.decode, t_dec, dec_pressure, kv_floor)
        reasons = [r for r in (p_reason, d_reason) if r is not None]
        if not reasons:
            return None
        return ScaleDecision(
            p_new,
            d_new,
            min(reasons, key=REASONS.index),
            f"prefill {obs.prefill}->{p_new} ({p_reason or '-'}: {p_why}); "
            f"decode {obs.decode}->{d_new} ({d_reason or '-'}: {d_why}); "
            f"rate {obs.arrival_rate:.2f}/s",
        )

    def _queue_s(self, obs: Observation) -> float:
        """Seconds the prefill pool needs to clear its queue at its sustainable rate."""
        rates = self.last_rates
        if obs.prefill_queue <= 0 or rates is None:
            return 0.0
        per_s = obs.prefill * rates.prefill * max(1.0, obs.mean_prompt_tokens)
        return math.inf if per_s <= 0 else obs.prefill_queue / per_s
