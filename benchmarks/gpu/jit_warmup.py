"""Compile, in parallel, the FlashInfer kernels the GPU tests and benchmarks will use.

    python benchmarks/gpu/jit_warmup.py --out DIR

FlashInfer compiles each kernel module (one per dtype x head_dim x sliding-window
variant, for the prefill wrapper and for the tensor-core decode wrapper) the first time
it is planned, with nvcc through ninja, and caches it (``FLASHINFER_WORKSPACE_BASE``).
One at a time that is minutes; this script plans and runs the engine's own
``FlashInferAttention`` for every variant from a thread pool, so the compilations
overlap (each is a separate ninja process; the GIL is released while they run). Only
public entry points are used: whatever modules a variant needs are the ones its plan
asks for. Reports seconds per variant; a failure is reported, not hidden.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from attention_correctness import Case, metadata, model_config
from flashinfer_aot import VARIANTS as AOT_VARIANTS
from gpu_common import common_args, log, pick_device, write_result

TAG = "jit_warmup"
# (dtype, heads, kv_heads, head_dim, window): the tests' and benchmarks' variants, the
# same list flashinfer_aot.py builds ahead of time (carried modules load in a second).
VARIANTS = [(getattr(torch, dt), h, kvh, d, w) for dt, h, kvh, d, w in AOT_VARIANTS]


def warm(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, window: int | None,
         device: torch.device, prefill_backend: str) -> float:
    from pdserve.engine.attention.flashinfer_backend import FlashInferAttention

    t0 = time.perf_counter()
    cfg = model_config(heads, kv_heads, head_dim, 1, window)
    attn = FlashInferAttention(cfg, device, dtype, prefill_backend=prefill_backend)
    for case in (Case("mixed", (20, 1), (20, 40)), Case("decode", (1, 1), (30, 5))):
        meta, nb = metadata(case, 16, 0, device)
        t = sum(case.q_lens)
        cache = torch.randn(2, nb, 16, kv_heads, head_dim, device=device, dtype=dtype)
        q = torch.randn(t, heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(t, kv_heads, head_dim, device=device, dtype=dtype)
        attn.plan(meta)
        attn.forward(0, q, k, torch.randn_like(k), (cache[0], cache[1]))
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--threads", type=int, default=len(VARIANTS))
    args = ap.parse_args(argv)
    device = pick_device(args.dry_run)
    if args.dry_run:
        log(TAG, "dry run: nothing to compile on the CPU")
        return 0
    import pdserve.engine.attention.flashinfer_backend  # noqa: F401  (imported once, not per thread)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        futures = {v: pool.submit(warm, *v, device, args.prefill_backend) for v in VARIANTS}
    rows, ok = [], True
    for (dt, h, kvh, d, w), fut in futures.items():
        row = {"dtype": str(dt).removeprefix("torch."), "heads": h, "kv_heads": kvh,
               "head_dim": d, "window": w}
        try:
            row["seconds"] = fut.result()
        except Exception as exc:  # reported: the tests will then show the same failure
            row["error"] = f"{type(exc).__name__}: {exc}"
            ok = False
        rows.append(row)
        log(TAG, str(row))
    total = time.perf_counter() - t0
    log(TAG, f"all variants in {total:.0f}s")
    write_result(args.out, TAG, device, {"variants": rows, "total_s": total, "passed": ok,
                                         "prefill_backend": args.prefill_backend})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
