"""Build FlashInfer's attention modules ahead of time, here, and carry them to the GPU host.

    # here (x86-64, nvcc 13.0 like the GPU host; no GPU needed), into wheels/flashinfer_aot/:
    python benchmarks/gpu/flashinfer_aot.py build --dest wheels/flashinfer_aot
    # on the GPU host (run.sh does this after installing the wheels):
    python benchmarks/gpu/flashinfer_aot.py install --src wheels/flashinfer_aot --site SITE

Why: FlashInfer compiles each kernel module on first use (nvcc through ninja) and the
device tool's machines start bare and are given back 30 s after a call, so every call
would pay the compilation again out of a 10-minute command limit. FlashInfer loads a
module without compiling it when ``flashinfer/data/aot/<name>/<name>.so`` exists
(``JitSpec.is_aot``), so ``install`` puts the carried ``.so`` files there.

What is built: the modules the engine's ``FlashInferAttention`` plans for every variant
the GPU tests and benchmarks use (``VARIANTS``; ``jit_warmup.py`` imports the same list):
the prefill wrapper's module with the backend FlashInfer picks on SM90 ("fa3") and the
tensor-core decode wrapper's, which is the "fa2" prefill module. Module names encode dtype, head_dim, sliding
window and backend, so a variant missing here is simply compiled on the device as before.

Requirements here: ``flashinfer`` (same version as the carried wheel) and ``apache-tvm-ffi``
importable (``PYTHONPATH``), ``FLASHINFER_CUDA_ARCH_LIST=9.0a``, ``CUDA_HOME`` with nvcc,
the CUDA headers (cuRAND's too: CUTLASS includes ``curand_kernel.h``) and
``lib64/stubs/libcuda.so`` (a stub is enough: the module does not keep it as a NEEDED
library). Built objects go to ``FLASHINFER_WORKSPACE_BASE`` (default a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

# (dtype, heads, kv_heads, head_dim, window): the GPU tests' and benchmarks' variants.
VARIANTS = [(dt, 32, 8, d, w) for dt in ("bfloat16", "float16") for d in (128, 64)
            for w in (None, 64)]
# Variants the benchmarks need (the rest only the correctness tests): built first.
ESSENTIAL = [("bfloat16", 32, 8, 128, None), ("bfloat16", 32, 8, 64, None)]


def module_specs(backends: list[str], variants=VARIANTS):
    import torch
    from flashinfer.prefill import gen_batch_prefill_module

    order = [v for v in ESSENTIAL if v in variants] + [v for v in variants if v not in ESSENTIAL]
    for dt, _h, _kvh, d, w in order:
        dtype = getattr(torch, dt)
        for backend in backends:
            # get_module_args of BatchPrefillWithPagedKVCacheWrapper.plan (and of the
            # tensor-core decode wrapper): q, kv, o dtypes, int32 indptr, head_dim qk/vo,
            # pos_encoding_mode NONE (0), use_sliding_window, no logits cap, no fp16 qk.
            yield (dt, d, w, backend), gen_batch_prefill_module(
                backend, dtype, dtype, dtype, torch.int32, d, d, 0, w is not None, False, False)


def build(args) -> int:
    if os.environ.get("FLASHINFER_CUDA_ARCH_LIST") != "9.0a":
        sys.exit("set FLASHINFER_CUDA_ARCH_LIST=9.0a (the H100/H200 target) first")
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/flashinfer-aot-build")
    args.dest.mkdir(parents=True, exist_ok=True)
    ok = True
    variants = ESSENTIAL if args.variants == "essential" else VARIANTS
    if args.variants == "llama3-8b":
        variants = ESSENTIAL[:1]
    for key, spec in module_specs(args.backends.split(","), variants):
        target = args.dest / f"{spec.name}.so"
        if target.exists() and not args.force:
            print(f"have   {key}: {target.name}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            spec.build(verbose=False)
        except Exception as exc:  # keep going: a missing module is compiled on the device
            ok = False
            print(f"FAILED {key}: {type(exc).__name__}: {str(exc)[-2000:]}", flush=True)
            continue
        shutil.copy2(spec.jit_library_path, target)
        print(f"built  {key} in {time.perf_counter() - t0:.0f}s: {target.name} "
              f"({target.stat().st_size / 2**20:.1f} MiB)", flush=True)
    return 0 if ok else 1


def install(args) -> int:
    """Put every carried module where FlashInfer looks for AOT modules."""
    aot = args.site / "flashinfer" / "data" / "aot"
    if not (args.site / "flashinfer").is_dir():
        sys.exit(f"no flashinfer package in {args.site}")
    n = 0
    for so in sorted(args.src.glob("*.so")):
        d = aot / so.stem
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy2(so, d / so.name)
        n += 1
    print(f"flashinfer AOT modules installed: {n} (from {args.src})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--dest", type=Path, required=True)
    b.add_argument("--backends", default="fa2,fa3")
    b.add_argument("--variants", choices=("all", "essential", "llama3-8b"), default="all",
                   help="all of VARIANTS, the benchmarks' two (ESSENTIAL), or the 8B one")
    b.add_argument("--force", action="store_true")
    i = sub.add_parser("install")
    i.add_argument("--src", type=Path, required=True)
    i.add_argument("--site", type=Path, required=True)
    args = ap.parse_args(argv)
    return build(args) if args.cmd == "build" else install(args)


if __name__ == "__main__":
    sys.exit(main())
