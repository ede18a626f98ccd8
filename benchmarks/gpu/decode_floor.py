"""Decode step time of the engine vs the memory-bandwidth floor, Llama-3-8B shape.

    python benchmarks/gpu/decode_floor.py --out DIR              # batch 1,16,64,128 x 1k ctx
    python benchmarks/gpu/decode_floor.py --out DIR --dry-run    # CPU, tiny shape

What is timed is what a decode worker pays per step: ``ModelRunner.run`` on a prepared
batch (every sequence has ``--context`` tokens already in the paged cache, scattered
over random blocks, and decodes one more) followed by the greedy ``Sampler`` call, host
clock, device drained before and after (``cluster.profiler.StepTimer``: the same timer
``pdserve profile`` uses). Median of ``--reps`` steps after ``--warmup``.

Floor = bytes a step must read / memory bandwidth, where the bytes are every weight
matrix and norm once (the lm_head once, only B rows of the embedding table) plus the KV
of every sequence (B x (context + 1) tokens x 2 x layers x KV heads x head_dim x 2 B),
and the bandwidth is a 2 GiB device-to-device ``copy_`` measured in the same run,
counting bytes read + written (``rw_bytes_per_s``: what HBM sustains). Reported:
``floor / measured`` (goal >= 70% at batch 64) and the achieved bandwidth. Also
``host_launch_ms``: how long ``runner.run`` takes to return without waiting for the
device; when it is close to the step time the step is bound by the host (Python and
kernel launches), which is what CUDA graphs remove.

The engine runs as configured by default: decode steps replay CUDA graphs (captured
when the runner is built; capture time and memory recorded). Every batch is also timed
with the same runner forced eager (``runner.graphs_active = False``), so the result
shows graph and eager side by side, with how far their logits differ (the padded graph
batch and FlashInfer's graph-mode plan may round differently; the exact check is the
GPU test ``tests/gpu/test_decode_cuda_graphs.py``). ``--eager`` captures nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from gpu_common import (
    common_args,
    copy_bandwidth,
    log,
    pick_device,
    summary,
    sync,
    weight_bytes_read_per_step,
    write_result,
)
from make_checkpoint import make_checkpoint

TAG = "decode_floor"
GOAL = 0.70
GOAL_BATCH = 64


def load_runner(ckpt, device: torch.device, num_blocks: int, backend: str,
                prefill_backend: str = "auto", cuda_graphs: bool = True, max_num_seqs: int = 64):
    """A runner as the engine builds it: decode graphs captured for batch sizes up to
    ``max_num_seqs`` where the config allows them (CUDA, FlashInfer) and ``cuda_graphs``."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.loader import build_runner, load_model

    loaded = load_model(EngineConfig(model=str(ckpt), device=device.type, dtype="bfloat16",
                                     block_size=16, num_kv_blocks=num_blocks,
                                     attention_backend=backend, max_num_seqs=max_num_seqs,
                                     enforce_eager=not cuda_graphs,
                                     flashinfer_prefill_backend=prefill_backend),
                        load_tokenizer=False)
    return loaded, build_runner(loaded)


def time_steps(runner, timer, inputs, device, warmup: int, reps: int) -> tuple[list, list]:
    """Step times (s, device drained around each) and host launch times (s) of ``inputs``."""
    for _ in range(warmup):
        timer.time_ms(inputs)
    step_s = [timer.time_ms(inputs) / 1e3 for _ in range(reps)]
    launch_s = []
    for _ in range(min(reps, 10)):
        sync(device)
        t0 = time.perf_counter()
        runner.run(inputs)
        launch_s.append(time.perf_counter() - t0)
        sync(device)
    return step_s, launch_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (eager rows only)")
    args = ap.parse_args(argv)
    device = pick_device(args.dry_run)
    shape = "tiny" if args.dry_run else args.shape
    batches = [1, 4] if args.dry_run else [int(b) for b in args.batches.split(",")]
    context = 64 if args.dry_run else args.context
    reps = 3 if args.dry_run else args.reps
    ckpt = make_checkpoint(args.workdir, shape, device)

    from pdserve.cluster.planning.profiler.timing import StepTimer

    blocks = max(batches) * -(-(context + 1) // 16) + 64
    loaded, runner = load_runner(ckpt, device, blocks, "torch" if args.dry_run else "flashinfer",
                                 args.prefill_backend, cuda_graphs=not args.eager,
                                 max_num_seqs=max(batches))
    graphs = runner.graphs
    capture = graphs.stats.as_dict() if graphs is not None else None
    if capture:
        log(TAG, f"captured {len(capture['sizes'])} decode graphs in {capture['seconds']:.2f} s, "
            f"{capture['free_bytes_used'] / 2**20:.0f} MiB")
    mc = loaded.model_config
    kv_per_token = mc.kv_bytes_per_token(torch.empty((), dtype=loaded.dtype).element_size())
    bw = copy_bandwidth(device)
    log(TAG, f"copy bandwidth {bw['rw_bytes_per_s'] / 1e12:.3f} TB/s (read+write)")
    timer = StepTimer(runner, mc.vocab_size, seed=0)
    rows = []
    for b in batches:
        inputs = timer.decode_inputs([context] * b)
        runner.graphs_active = True
        step_s, launch_s = time_steps(runner, timer, inputs, device, args.warmup, reps)
        eager = None
        if graphs is not None:
            graph_logits = runner.run(inputs)
            runner.graphs_active = False
            eager_logits = runner.run(inputs)
            e_step, e_launch = time_steps(runner, timer, inputs, device, args.warmup, reps)
            runner.graphs_active = True
            eager = {"step_s": summary(e_step), "host_launch_ms": 1e3 * statistics.median(e_launch),
                     "median_s": statistics.median(e_step),
                     "logits_max_abs_diff": float((graph_logits - eager_logits).abs().max()),
                     "argmax_equal": float((graph_logits.argmax(-1)
                                            == eager_logits.argmax(-1)).float().mean())}
        w = weight_bytes_read_per_step(loaded.model.w, b)
        kv = b * (context + 1) * kv_per_token
        t = statistics.median(step_s)
        floor = (w + kv) / bw["rw_bytes_per_s"]
        row = {"batch": b, "context": context, "step_s": summary(step_s),
               "host_launch_ms": 1e3 * statistics.median(launch_s),
               "weight_bytes": w, "kv_bytes": kv, "floor_s": floor,
               "fraction_of_floor": floor / t, "achieved_bytes_per_s": (w + kv) / t,
               "tokens_per_s": b / t, "cuda_graph": graphs is not None,
               "padded_batch": graphs.padded_size(b) if graphs is not None else None}
        if eager is not None:
            eager["fraction_of_floor"] = floor / eager["median_s"]
            row["eager"] = eager
            row["speedup_vs_eager"] = eager["median_s"] / t
        rows.append(row)
        log(TAG, f"batch {b:4d}: step {t * 1e3:.2f} ms (launch {row['host_launch_ms']:.2f} ms), "
            f"floor {floor * 1e3:.2f} ms -> {row['fraction_of_floor']:.1%}" + (
                f"; eager {eager['median_s'] * 1e3:.2f} ms -> {eager['fraction_of_floor']:.1%}, "
                f"logits max |diff| {eager['logits_max_abs_diff']:.2e}" if eager else ""))
    at_goal = next((r for r in rows if r["batch"] == GOAL_BATCH), None)
    write_result(args.out, TAG, device, {
        "dry_run": args.dry_run, "shape": shape, "checkpoint": str(ckpt),
        "attention_backend": runner.attn.name, "cuda_graphs": graphs is not None,
        "graph_capture": capture,
        "prefill_backend": getattr(runner.attn, "prefill_backend", None),
        "kv_bytes_per_token": kv_per_token, "copy_bandwidth": bw, "rows": rows,
        "acceptance": {
            "goal": f"fraction_of_floor >= {GOAL:.0%} at batch {GOAL_BATCH}, context {context}",
            "fraction_at_goal_batch": at_goal["fraction_of_floor"] if at_goal else None,
            "passed": bool(at_goal and at_goal["fraction_of_floor"] >= GOAL)},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
