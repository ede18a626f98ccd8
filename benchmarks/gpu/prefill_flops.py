"""Prefill throughput of the engine in FLOP/s vs a large bf16 matmul, Llama-3-8B shape.

    python benchmarks/gpu/prefill_flops.py --out DIR              # 1 x 4096 and 8 x 1024
    python benchmarks/gpu/prefill_flops.py --out DIR --dry-run    # CPU, tiny shape

Timed: one prefill step (``ModelRunner.run`` + greedy sampling of each prompt's first
token, host clock, device drained before and after; ``cluster.profiler.StepTimer``) for
one 4096-token prompt and for eight 1024-token prompts in one batch. Median of
``--reps`` after ``--warmup``.

FLOPs of the step, counted from the shapes: 2 x (decoder matmul parameters) x tokens +
2 x (lm_head parameters) x prompts (logits only for each prompt's last token) + causal
attention 2 x 2 x heads x head_dim x L(L+1)/2 per layer and prompt (QK^T and PV over the
keys each query sees). Ceiling: an 8192^3 bf16 ``torch.matmul`` on random data measured
in the same run. Reported: achieved FLOP/s and its fraction of the ceiling (goal >= 50%).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from gpu_common import (
    common_args,
    log,
    matmul_flops,
    matmul_params,
    pick_device,
    summary,
    write_result,
)
from make_checkpoint import make_checkpoint

TAG = "prefill_flops"
GOAL = 0.50


def step_flops(mc, lens: list[int]) -> dict[str, float]:
    layer_params, head_params = matmul_params(mc)
    tokens = sum(lens)
    dense = 2 * layer_params * tokens + 2 * head_params * len(lens)
    attn = sum(mc.num_layers * 2 * 2 * mc.num_heads * mc.head_dim * n * (n + 1) / 2 for n in lens)
    return {"dense": float(dense), "attention": float(attn), "total": float(dense + attn)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compare-backends", default="",
                    help="also time FlashInfer prefill kernel families (e.g. 'fa3'), reported "
                         "beside the main rows (not in the acceptance)")
    args = ap.parse_args(argv)
    device = pick_device(args.dry_run)
    shape = "tiny" if args.dry_run else args.shape
    cases = {"1x64": [64], "4x16": [16] * 4} if args.dry_run else \
        {"1x4096": [4096], "8x1024": [1024] * 8}
    reps = 2 if args.dry_run else args.reps
    ckpt = make_checkpoint(args.workdir, shape, device)

    from decode_floor import load_runner

    from pdserve.cluster.planning.profiler.timing import StepTimer

    blocks = max(sum(-(-n // 16) for n in lens) for lens in cases.values()) + 64
    # Prefill steps never replay a graph: no capture (saves device time).
    loaded, runner = load_runner(ckpt, device, blocks, "torch" if args.dry_run else "flashinfer",
                                 args.prefill_backend, cuda_graphs=False)
    mc = loaded.model_config
    peak = matmul_flops(device)
    log(TAG, f"bf16 matmul ceiling {peak['flop_per_s'] / 1e12:.1f} TFLOP/s")
    timer = StepTimer(runner, mc.vocab_size, seed=0)

    def measure(label: str) -> list[dict]:
        out = []
        for name, lens in cases.items():
            inputs = timer.prefill_inputs(lens)
            for _ in range(args.warmup):
                timer.time_ms(inputs)
            step_s = [timer.time_ms(inputs) / 1e3 for _ in range(reps)]
            t = statistics.median(step_s)
            fl = step_flops(mc, lens)
            row = {"case": name, "prompt_lens": lens, "tokens": sum(lens),
                   "prefill_backend": getattr(runner.attn, "prefill_backend", None),
                   "step_s": summary(step_s), "flops": fl, "achieved_flop_per_s": fl["total"] / t,
                   "fraction_of_matmul": fl["total"] / t / peak["flop_per_s"],
                   "tokens_per_s": sum(lens) / t}
            out.append(row)
            log(TAG, f"{label}{name}: {t * 1e3:.1f} ms, {row['achieved_flop_per_s'] / 1e12:.1f} "
                f"TFLOP/s = {row['fraction_of_matmul']:.1%} of the matmul ceiling")
        return out

    rows = measure("")
    comparison = []
    if args.compare_backends and not args.dry_run:
        from pdserve.engine.attention import flashinfer_backend as fb

        main_attn = runner.attn
        try:
            for b in args.compare_backends.split(","):
                runner.attn = fb.FlashInferAttention(mc, loaded.device, loaded.dtype,
                                                     prefill_backend=b)
                comparison += measure(f"[prefill kernels {b}] ")
        finally:
            runner.attn = main_attn
    write_result(args.out, TAG, device, {
        "dry_run": args.dry_run, "shape": shape, "checkpoint": str(ckpt),
        "attention_backend": runner.attn.name,
        "prefill_backend": getattr(runner.attn, "prefill_backend", None), "matmul_ceiling": peak, "rows": rows,
        "comparison_rows": comparison,
        "acceptance": {"goal": f"fraction_of_matmul >= {GOAL:.0%} for each case",
                       "fractions": {r["case"]: r["fraction_of_matmul"] for r in rows},
                       "passed": all(r["fraction_of_matmul"] >= GOAL for r in rows)},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
