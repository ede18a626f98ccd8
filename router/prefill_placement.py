"""Where an attempt's prompt is prefilled: on the prefill pool, or on its decode worker.

Conditional disaggregation on the request path. ``PrefillPlacement.decide`` gathers the
live inputs of ``local_prefill.decide`` for one attempt and applies that rule (the one
the simulator judges):

- uncached tokens: the prompt minus the most tokens the KV-aware index expects a healthy
  prefill worker to hold (with KV-aware routing on; else the whole prompt);
- remote TTFT, only with ``wait_factor``: the best prediction over the healthy prefill
  workers (``policy_slo.predict_ttft_s`` through an ``SloAware`` policy: the router's own
  when it routes ``slo_aware``, which also knows each worker's arrival rate, else one
  built on the same profile), each counting only the tokens that worker must compute;
- local prefill time, only with ``wait_factor``: the profile's prefill time of the whole
  prompt at the decode pool's tensor-parallel degree (a decode worker has no prefix cache).

The attempt (``attempt.py``) carries the decision out and reports what happened through
``count``: a local decision that no decode worker could take (at ``max_num_seqs`` or out
of free blocks) is served on the prefill pool and counted as ``remote``/``decode_full``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pdserve.engine.latency_profile import InstanceModel, LatencyProfile
from pdserve.router.local_prefill import LOCAL, REMOTE, Decision, LocalPrefillConfig, decide
from pdserve.router.policy import RoutingPolicy, RoutingRequest, WorkerLoad
from pdserve.router.policy_kv import KvAware
from pdserve.router.policy_slo import SloAware

# the rule said local, and no decode worker took the request: it went to the prefill pool
DECODE_FULL = "decode_full"
# every (decision, reason) the metric can show
OUTCOMES: tuple[tuple[str, str], ...] = (
    (LOCAL, "short"),
    (LOCAL, "queue"),
    (REMOTE, "remote"),
    (REMOTE, "off"),
    (REMOTE, DECODE_FULL),
)


class PrefillPlacement:
    def __init__(
        self,
        config: LocalPrefillConfig | None = None,
        policy: RoutingPolicy | None = None,
        profile: LatencyProfile | None = None,
        decode_tp: int = 1,
        prefill_token_budget: int = 2048,
    ):
        """``policy``: the router's routing policy (its KV-aware index and TTFT prediction
        are reused); ``profile`` is required when ``config.wait_factor`` is set, and must
        have an entry for ``decode_tp``."""
        self.config = config = config or LocalPrefillConfig()
        self.on_decision: Callable[[str, str], None] | None = None  # metrics hook
        self._kv = policy if isinstance(policy, KvAware) else None
        self._remote: SloAware | None = None
        self._local: InstanceModel | None = None
        if not config.needs_profile:
            return
        if profile is None:
            raise ValueError(
                "local prefill with a wait factor (--local-prefill-wait-factor) "
                "compares predicted prefill times: it needs a latency profile "
                "(--profile)"
            )
        try:
            self._local = profile.instance(decode_tp)
        except ValueError as exc:
            raise ValueError(
                f"local prefill predicts the decode workers' prefill time at "
                f"their tp ({decode_tp}): {exc}"
            ) from None
        inner = self._kv.inner if self._kv is not None else policy
        self._remote = (
            inner if isinstance(inner, SloAware) else SloAware(profile, prefill_token_budget)
        )

    def decide(self, routing: RoutingRequest, prefills: list[WorkerLoad]) -> Decision:
        """Where ``routing``'s prompt should be prefilled, given the prefill workers' loads
        (every one of them, healthy or not)."""
        n = routing.num_prompt_tokens
        if not self.config.enabled:
            return decide(self.config, n, n, None, None)
        healthy = [w for w in prefills if w.healthy]
        cached = self._kv.cached_tokens(routing, prefills) if self._kv is not None else {}
        uncached = n - max((cached.get(w.worker_id, 0) for w in healthy), default=0)
        remote = local = None
        if self._remote is not None:
            remote = min((self._remote_ttft_s(routing, w, cached) for w in healthy), default=None)
            local = self._local.prefill_s([n])
        return decide(self.config, n, uncached, remote, local)

    def _remote_ttft_s(self, routing: RoutingRequest, w: WorkerLoad, cached: dict[str, int]):
        uncached = routing.num_prompt_tokens - cached.get(w.worker_id, 0)
        return self._remote.predict_ttft_s(
            dataclasses.replace(routing, num_prompt_tokens=uncached), w
        )

    def count(self, where: str, reason: str) -> None:
        """What happened to one attempt's prompt (the metric's labels)."""
        if self.on_decision is not None:
            self.on_decision(where, reason)
