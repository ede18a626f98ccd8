"""From the router's load report to the autoscaler's ``Observation`` (pure).

The router reports (``RouterActor.load_report``, ``router/load_window.py``) arrivals,
token means and SLO attainment over a window, and the pools' queues now; the autoscaler
needs them in its own terms. Two differences from the simulator's observation, both
because the cluster cannot know what the simulator knows:

- the means are over requests that *finished* in the window (an arriving request's output
  length is unknown); with none finished, the last known means are kept
  (``Observer.last_means``);
- TTFT attainment counts every finished request, including a prompt no instance could
  prefill within the target (the simulator leaves those out); refusals at admission
  count as misses.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.cluster.autoscale.decide import Observation


@dataclass
class Observer:
    """Keeps the last known token means between windows with no finished request
    (``default_means`` until the first one finishes)."""

    default_means: tuple[float, float] = (256.0, 128.0)

    def __post_init__(self) -> None:
        self.last_means = self.default_means

    def observe(self, report: dict, now: float, prefill: int, decode: int) -> Observation:
        """``prefill``/``decode``: instances each pool has, starting ones included and
        draining ones not (what the autoscaler asked for and still stands)."""
        prompt, output = report.get("mean_prompt_tokens"), report.get("mean_output_tokens")
        if prompt is not None and output is not None:
            self.last_means = (max(1.0, prompt), max(1.0, output))
        return Observation(
            now=now, arrival_rate=report["arrival_rate"],
            mean_prompt_tokens=self.last_means[0], mean_output_tokens=self.last_means[1],
            ttft_attainment=report.get("ttft_attainment"),
            tpot_attainment=report.get("tpot_attainment"),
            prefill_queue=int(report.get("prefill_queue_tokens", 0)),
            decode_load=min(1.0, max(0.0, report.get("decode_kv_usage", 0.0))),
            prefill=prefill, decode=decode)
