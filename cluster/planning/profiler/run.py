"""``profile_model``: load a model, time its steps, fit the latency model, time KV transfers.

What ``pdserve profile`` runs. It loads the model with the engine's own pieces
(``load_model`` + ``build_runner``), draws the batch shapes (``grids``), times them
(``timing``: ``torch.set_num_threads(threads)``, recorded, ``torch.inference_mode``, a
few warm-up steps, then interleaved passes, drift-corrected; decode points are timed
``decode_repeat`` times a pass, their steps being short and noisier), fits prefill and
decode (``fitting``) and measures transfer bandwidth (``bandwidth``).
``ProfileRun.to_profile()`` gives the ``LatencyProfile`` with the raw measurements,
options and fit details in its ``extra``.

At ``tensor_parallel_size`` > 1 the steps are timed on a whole instance: ranks 1 .. tp-1
run as local processes (``LocalTPInstance``, on CUDA one GPU each) and this process is
rank 0, driving them as a worker does; the profile's entry is for that tp. Its KV capacity
is the instance's (every rank holds its heads of the same tokens), and ``kv_bytes_per_token``
stays the model's (all ranks' shares: what a transfer moves).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pdserve.cluster.planning.profiler.bandwidth import (
    TransferBandwidth,
    default_backends,
    measure_transfer_bandwidth,
)
from pdserve.cluster.planning.profiler.fitting import (
    DecodeFitResult,
    ErrorStats,
    Measurement,
    PrefillFitResult,
    fit_decode,
    fit_prefill,
    relative_errors,
)
from pdserve.cluster.planning.profiler.grids import decode_grid, prefill_grid, wide_mix_grid
from pdserve.cluster.planning.profiler.options import ProfileOptions
from pdserve.cluster.planning.profiler.timing import (
    Progress,
    StepTimer,
    drift_corrected_medians,
    measure_points,
)
from pdserve.engine.config import EngineConfig
from pdserve.engine.latency_profile import LatencyProfile, ParallelEntry


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from pdserve.cluster.planning.profiler.hostinfo import cpu_model

    return cpu_model()


@dataclass(frozen=True)
class ProfileRun:
    """Everything one profiling run measured and fitted."""

    model: str
    hardware: str
    device: str
    dtype: str
    threads: int
    options: ProfileOptions
    kv_capacity_tokens: int
    kv_bytes_per_token: int
    prefill: tuple[Measurement, ...]
    decode: tuple[Measurement, ...]
    prefill_fit: PrefillFitResult
    decode_fit: DecodeFitResult
    wide_mix: tuple[Measurement, ...] = ()
    bandwidth: dict[str, TransferBandwidth] = field(default_factory=dict, compare=False)
    elapsed_s: float = 0.0
    info: dict = field(default_factory=dict, compare=False)
    tp: int = 1

    @property
    def wide_mix_error(self) -> ErrorStats:
        fit = self.decode_fit.fit
        return ErrorStats.of(relative_errors([fit.ms(m.lens) for m in self.wide_mix],
                                             [m.ms for m in self.wide_mix]))

    def to_profile(self) -> LatencyProfile:
        entry = ParallelEntry(self.tp, self.prefill_fit.fit, self.decode_fit.fit,
                              self.kv_capacity_tokens)
        pf, df = self.prefill_fit, self.decode_fit

        def points(ms: Sequence[Measurement], test: Sequence[int] = ()) -> list[dict]:
            held = set(test)
            return [{"lens": list(m.lens), "ms": m.ms, "samples_ms": list(m.samples),
                     "split": "test" if i in held else "train"} for i, m in enumerate(ms)]

        extra = {
            "profiler": {
                "tp": self.tp, "pp": 1, "device": self.device, "dtype": self.dtype, "torch_threads": self.threads,
                "torch": torch.__version__, "elapsed_s": round(self.elapsed_s, 1),
                "options": asdict(self.options), **self.info,
            },
            "fit_details": {
                "metric": "|predicted - measured| / measured on held-out points",
                "prefill": {"heldout": asdict(pf.heldout), "train": asdict(pf.train_error),
                            "nonneg": pf.nonneg},
                "decode": {"heldout": asdict(df.heldout), "train": asdict(df.train_error),
                           "single_heldout": asdict(df.single_heldout),
                           "two_regime_heldout": asdict(df.two_regime_heldout)
                           if df.two_regime_heldout else None,
                           "two_regime": df.two_regime, "threshold": df.threshold,
                           "cv_mean_error_by_threshold": {str(t): e for t, e in df.cv},
                           "nonneg": df.nonneg},
                "decode_wide_mix": asdict(self.wide_mix_error),
            },
            "measurements": {"prefill": points(self.prefill, pf.test),
                             "decode": points(self.decode, df.test),
                             "decode_wide_mix": points(self.wide_mix)},
            "transfer_details": {b: {"sizes": [dict(zip(("tokens", "bytes", "median_s",
                                                           "bytes_per_s"), r, strict=True))
                                               for r in bw.sizes]}
                                 for b, bw in self.bandwidth.items()},
        }
        notes = (f"measured by pdserve profile: worker step = runner.run + greedy sampling, "
                 f"{self.threads} torch thread(s), median of {self.options.reps} interleaved "
                 "reps; transfer_bandwidth is the largest transfer's median "
                 f"({max(self.options.transfer_tokens)} tokens)")
        return LatencyProfile(
            self.model, self.hardware, (entry,), self.kv_bytes_per_token,
            tuple((b, bw.bytes_per_s) for b, bw in self.bandwidth.items()),
            (("prefill", pf.heldout.median), ("decode", df.heldout.median)), notes, extra)


def _limits(options: ProfileOptions, config: EngineConfig, max_model_len: int) -> dict:
    max_prompt = options.max_prompt_len or min(2048, max_model_len)
    max_prompt = min(max_prompt, max_model_len)
    max_tokens = options.max_batch_tokens or max(config.max_num_batched_tokens, max_prompt)
    max_ctx = min(options.max_context or min(2048, max_model_len - 1), max_model_len - 1)
    max_batch = options.max_batch or min(64, config.max_num_seqs)
    return {"max_prompt_len": max_prompt, "max_batch_tokens": max_tokens,
            "max_context": max_ctx, "max_batch": max_batch}


@dataclass(frozen=True)
class _Shapes:
    """The batch shapes of one run, in timing order: prefill, decode, wide-mix decode."""

    prefill: list[tuple[int, ...]]
    decode: list[tuple[int, ...]]
    wide: list[tuple[int, ...]]

    @property
    def all(self) -> list[tuple[int, ...]]:
        return self.prefill + self.decode + self.wide


def _draw_shapes(options: ProfileOptions, lim: dict) -> _Shapes:
    rng = random.Random(options.seed)  # one stream for the three grids, in this order
    prefill = prefill_grid(options.prefill_points, rng, options.min_prompt_len,
                           lim["max_prompt_len"], options.max_prefill_seqs,
                           lim["max_batch_tokens"])
    decode = decode_grid(options.decode_points, rng, options.min_context, lim["max_context"],
                         lim["max_batch"], options.context_spread)
    wide = wide_mix_grid(options.wide_mix_points, rng, options.min_context,
                         lim["max_context"], lim["max_batch"])
    return _Shapes(prefill, decode, wide)


def _time_shapes(loaded, engine_config: EngineConfig, options: ProfileOptions, shapes: _Shapes,
                 say: Progress) -> list[tuple[int, int, float]]:
    """Timed steps ``(pass, point, ms)`` of every shape, on a runner with just enough KV
    blocks for the largest one. The runner is freed on return, before transfers are timed."""
    from pdserve.engine.loader import build_runner, kv_cache_spec

    bs = engine_config.block_size
    need = max([sum(-(-n // bs) for n in s) for s in shapes.prefill]
               + [sum(-(-(c + 1) // bs) for c in s) for s in shapes.decode + shapes.wide])
    runner = build_runner(loaded, kv_cache_spec(loaded, num_blocks=need + 1))
    if loaded.group is not None:  # rank 0 of an instance: its steps drive the other ranks
        from pdserve.engine.parallel.executor import DrivingRunner

        runner = DrivingRunner.wrap(runner, loaded.group)
    try:
        return _time_on(runner, loaded, engine_config, options, shapes, say)
    finally:
        runner.close()


def _time_on(runner, loaded, engine_config: EngineConfig, options: ProfileOptions,
             shapes: _Shapes, say: Progress) -> list[tuple[int, int, float]]:
    timer = StepTimer(runner, loaded.model_config.vocab_size, options.seed)
    inputs = ([timer.prefill_inputs(s) for s in shapes.prefill]
              + [timer.decode_inputs(s) for s in shapes.decode + shapes.wide])
    say(f"{Path(engine_config.model).name} on {loaded.device} ({loaded.dtype}), tp "
        f"{engine_config.tensor_parallel_size}, "
        f"{torch.get_num_threads()} thread(s): {len(shapes.prefill)} prefill + "
        f"{len(shapes.decode)} decode (+{len(shapes.wide)} wide-mix) points, "
        f"{options.reps} reps")
    # Warm-up: the longest prompt, a full decode batch and the shortest prompt, twice each.
    for inp in (inputs[1], inputs[len(shapes.prefill) + 3], inputs[0]):
        for _ in range(2):
            timer.time_ms(inp)
    repeat = [1] * len(shapes.prefill) + [options.decode_repeat] * (
        len(shapes.decode) + len(shapes.wide))
    return measure_points(timer, inputs, options.reps, options.warmup_passes,
                          random.Random(options.seed + 1), say, repeat)


def _measurements(log: Sequence[tuple[int, int, float]], shapes: _Shapes,
                  options: ProfileOptions) -> tuple[tuple[Measurement, ...],
                                                    tuple[Measurement, ...],
                                                    tuple[Measurement, ...], np.ndarray]:
    """Drift-corrected medians per shape, split into (prefill, decode, wide-mix), and the
    slowdown factor of every step of ``log``."""
    n = len(shapes.all)
    medians, drift = drift_corrected_medians([(i, t) for _, i, t in log], n,
                                             options.drift_window)
    raw: list[list[float]] = [[] for _ in range(n)]
    for _, i, t in log:
        raw[i].append(t)
    ms = [Measurement(s, m, t) for s, m, t in zip(shapes.all, medians, raw, strict=True)]
    n_pre, n_dec = len(shapes.prefill), len(shapes.decode)
    return tuple(ms[:n_pre]), tuple(ms[n_pre:n_pre + n_dec]), tuple(ms[n_pre + n_dec:]), drift


def _bandwidth(loaded, options: ProfileOptions, say: Progress) -> dict[str, TransferBandwidth]:
    from pdserve.engine.loader import kv_cache_spec

    backends = options.backends if options.backends is not None \
        else default_backends(loaded.device)
    if not backends:
        return {}
    say(f"KV transfer bandwidth: {', '.join(backends)}")
    return measure_transfer_bandwidth(
        kv_cache_spec(loaded, num_blocks=1), backends, tokens=options.transfer_tokens,
        reps=options.transfer_reps, threads=torch.get_num_threads(),
        seed=options.seed, device=loaded.device, progress=say)


def _run_info(engine_config: EngineConfig, loaded, lim: dict, options: ProfileOptions,
              log: Sequence[tuple[int, int, float]], drift: np.ndarray) -> dict:
    """Where and when the run happened, and how much the machine drifted per pass."""
    passes = np.array([p for p, _, _ in log])
    return {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "architecture": loaded.model_config.architecture,
            "model_path": str(engine_config.model), "block_size": engine_config.block_size,
            "engine_config": asdict(engine_config), "limits": lim,
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "drift": {"window": options.drift_window,
                      "p10": float(np.quantile(drift, 0.1)),
                      "p90": float(np.quantile(drift, 0.9)),
                      "per_pass_median": [float(np.median(drift[passes == p]))
                                          for p in range(options.reps)]}}


def profile_model(engine_config: EngineConfig, options: ProfileOptions | None = None,
                  progress: Progress | None = None) -> ProfileRun:
    """Measure, fit and (optionally) time KV transfers; see the module docstring."""
    from pdserve.engine.loader import load_model, num_kv_blocks

    options = options or ProfileOptions()
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    prev_threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    instance = None
    try:
        if engine_config.tensor_parallel_size > 1:
            from pdserve.engine.parallel.local_instance import LocalTPInstance, rank_config

            say(f"starting {engine_config.tensor_parallel_size - 1} more tensor-parallel ranks")
            instance = LocalTPInstance.start(engine_config, torch_threads=options.threads)
            loaded = load_model(rank_config(engine_config, 0), load_tokenizer=False,
                                group=instance.group)
        else:
            loaded = load_model(engine_config, load_tokenizer=False)
        # Sized before anything else is allocated: on CUDA it depends on free memory.
        # (At tp > 1 every rank agrees on it, as a worker's ranks do.)
        capacity = num_kv_blocks(loaded) * engine_config.block_size
        kv_bytes = loaded.model_config.kv_bytes_per_token(
            torch.empty((), dtype=loaded.dtype).element_size())
        lim = _limits(options, engine_config, loaded.max_model_len)
        shapes = _draw_shapes(options, lim)
        log = _time_shapes(loaded, engine_config, options, shapes, say)
        prefill, decode, wide, drift = _measurements(log, shapes, options)
        pf = fit_prefill(prefill, holdout=options.holdout, seed=options.seed)
        df = fit_decode(decode, holdout=options.holdout, seed=options.seed)
        bandwidth = _bandwidth(loaded, options, say)
        return ProfileRun(
            model=Path(engine_config.model).name, hardware=hardware_name(loaded.device),
            device=str(loaded.device), dtype=str(loaded.dtype).removeprefix("torch."),
            threads=torch.get_num_threads(), options=options, kv_capacity_tokens=capacity,
            kv_bytes_per_token=kv_bytes, prefill=prefill, decode=decode, prefill_fit=pf,
            decode_fit=df, wide_mix=wide, bandwidth=bandwidth,
            elapsed_s=time.perf_counter() - started,
            info=_run_info(engine_config, loaded, lim, options, log, drift),
            tp=engine_config.tensor_parallel_size)
    finally:
        if instance is not None:
            instance.close()
        torch.set_num_threads(prev_threads)
