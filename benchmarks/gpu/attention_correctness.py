"""FlashInfer paged attention (the engine's backend) against a float32 torch reference.

    python benchmarks/gpu/attention_correctness.py --out DIR
    python benchmarks/gpu/attention_correctness.py --out DIR --dry-run   # CPU smoke test

For each dtype (bf16, fp16), head layout (32 query / 8 KV heads at head_dim 128, the
Llama-3-8B layout, and at head_dim 64, the Llama-3.2-1B layout) and batch (64 decode rows
of mixed lengths; a mixed step of prefills, chunked prefills with history and decodes; one
2k prompt; a sliding window case), random paged inputs are built: a cache of shuffled
blocks, random q/k/v for ``--layers`` layers. Each backend is planned ONCE for the step
and then run for every layer (as the model does), so a plan that only holds for the
first layer would show. The reference is the engine's ``TorchAttention`` on float32
copies of the same inputs (METHOD.md: compare against higher precision). Reported per
case: worst relative error ||out - ref|| / ||ref|| over layers, max abs error, NaN
count, and whether the K/V written into the cache match. Acceptance: rel err < 1e-2
and no NaN everywhere. Fresh random inputs per case (seeded by case, so reruns agree).

With ``--dry-run`` the "candidate" is ``TorchAttention`` in bf16 on the CPU (no
FlashInfer there), which checks this script, not FlashInfer.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import dataclass

import torch
from gpu_common import event_times, log, pick_device, write_result

TAG = "attention_correctness"
REL_TOL = 1e-2


@dataclass(frozen=True)
class Case:
    name: str
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    window: int | None = None


def gpu_cases(rng: random.Random) -> list[Case]:
    dec = tuple(rng.randint(1, 2048) for _ in range(64))
    return [
        Case("decode_b64_mixed_len", (1,) * 64, dec),
        Case("mixed_prefill_chunk_decode", (37, 1, 512, 1, 200, 1), (37, 90, 700, 1, 1200, 4000)),
        Case("prefill_2k", (2048,), (2048,)),
        Case("mixed_window256", (300, 1, 1), (300, 1000, 17), window=256),
        Case("decode_window256", (1,) * 8, tuple(rng.randint(1, 1500) for _ in range(8)),
             window=256),
    ]


def cpu_cases() -> list[Case]:
    return [Case("decode_b4", (1, 1, 1, 1), (17, 40, 3, 64)),
            Case("mixed", (9, 1, 20), (9, 33, 50)),
            Case("mixed_window8", (12, 1), (12, 30), window=8)]


def model_config(heads: int, kv_heads: int, head_dim: int, layers: int, window: int | None):
    from pdserve.engine.model_config import ModelConfig, RopeConfig

    return ModelConfig("LlamaForCausalLM", 1000, heads * head_dim, 4 * heads * head_dim, layers,
                       heads, kv_heads, head_dim, 1e-5, 1 << 16, RopeConfig(theta=10000.0),
                       sliding_windows=(window,) * layers)


def metadata(case: Case, block_size: int, seed: int, device: torch.device):
    from pdserve.engine.attention.base import AttentionMetadata

    rng = random.Random(seed)
    need = sum(-(-kv // block_size) for kv in case.kv_lens)
    num_blocks = need + 16
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, slots = [], []
    for q, kv in zip(case.q_lens, case.kv_lens, strict=True):
        table = [free.pop() for _ in range(-(-kv // block_size))]
        tables.append(tuple(table))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(kv - q, kv)]
    meta = AttentionMetadata(case.q_lens, case.kv_lens, tuple(tables),
                             torch.tensor(slots, dtype=torch.long, device=device), block_size)
    return meta, num_blocks


def run_case(case: Case, layout: tuple[int, int, int], dtype: torch.dtype, layers: int,
             device: torch.device, candidate_cls, seed: int) -> dict:
    from pdserve.engine.attention.torch_ref import TorchAttention

    heads, kv_heads, head_dim = layout
    cfg = model_config(heads, kv_heads, head_dim, layers, case.window)
    bs = 16
    meta, nb = metadata(case, bs, seed, device)
    g = torch.Generator(device=device).manual_seed(seed)
    t = sum(case.q_lens)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    caches = [rand(2, nb, bs, kv_heads, head_dim) for _ in range(layers)]
    qkv = [(rand(t, heads, head_dim), rand(t, kv_heads, head_dim), rand(t, kv_heads, head_dim))
           for _ in range(layers)]
    cand = candidate_cls(cfg, device, dtype)
    ref = TorchAttention(cfg, device, torch.float32)
    cand.plan(meta)
    ref.plan(meta)
    rels, maxabs, nans, kv_ok = [], [], 0, True
    for i in range(layers):
        q, k, v = qkv[i]
        c_cache = caches[i].to(dtype)
        # The reference sees exactly the candidate's (rounded) inputs, in float32.
        r_cache = c_cache.float()
        out = cand.forward(i, q.to(dtype), k.to(dtype), v.to(dtype), (c_cache[0], c_cache[1]))
        want = ref.forward(i, q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(),
                           (r_cache[0], r_cache[1]))
        out = out.float()
        nans += int(torch.isnan(out).sum())
        rels.append(float((out - want).norm() / want.norm()))
        maxabs.append(float((out - want).abs().max()))
        kv_ok &= bool(torch.equal(c_cache.float(), r_cache))
    timing = {}
    if device.type == "cuda":
        q, k, v = (x.to(dtype) for x in qkv[0])
        c_cache = caches[0].to(dtype)
        timing["plan_ms"] = 1e3 * statistics.median(
            event_times(lambda: cand.plan(meta), device, warmup=2, reps=10))
        timing["forward_ms"] = 1e3 * statistics.median(event_times(
            lambda: cand.forward(0, q, k, v, (c_cache[0], c_cache[1])), device, warmup=2,
            reps=10))
    return {
        "case": case.name, "dtype": str(dtype).removeprefix("torch."),
        "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "window": case.window,
        "q_lens_total": t, "kv_lens_total": sum(case.kv_lens), "rows": len(case.q_lens),
        "layers_per_plan": layers, "rel_err_max": max(rels), "rel_err_per_layer": rels,
        "max_abs_err": max(maxabs), "nan_count": nans, "kv_written_equal": kv_ok,
        "passed": max(rels) < REL_TOL and nans == 0 and kv_ok, **timing,
    }


def main(argv: list[str] | None = None) -> int:
    from gpu_common import common_args

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--layers", type=int, default=4, help="layers run per plan()")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = pick_device(args.dry_run)
    if args.dry_run:
        from pdserve.engine.attention.torch_ref import TorchAttention as candidate_cls

        layouts, dtypes, cases = [(4, 2, 64)], [torch.bfloat16], cpu_cases()
        backend = "torch (dry run: checks the script, not FlashInfer)"
    else:
        from functools import partial

        from pdserve.engine.attention.flashinfer_backend import FlashInferAttention

        candidate_cls = partial(FlashInferAttention, prefill_backend=args.prefill_backend)
        layouts, dtypes = [(32, 8, 128), (32, 8, 64)], [torch.bfloat16, torch.float16]
        cases = gpu_cases(random.Random(args.seed))
        backend = f"flashinfer (prefill kernels: {args.prefill_backend})"
    rows = []
    for ci, case in enumerate(cases):
        for layout in layouts:
            for dtype in dtypes:
                row = run_case(case, layout, dtype, args.layers, device, candidate_cls,
                               seed=args.seed * 1000 + ci)
                rows.append(row)
                log(TAG, f"{case.name:28s} {row['dtype']:8s} H{layout[0]}/{layout[1]} "
                    f"D{layout[2]}: rel {row['rel_err_max']:.2e} nan {row['nan_count']} "
                    f"{'ok' if row['passed'] else 'FAIL'}")
    passed = all(r["passed"] for r in rows)
    write_result(args.out, TAG, device, {
        "backend": backend, "dry_run": args.dry_run, "reference": "TorchAttention, float32",
        "tolerance": {"rel_err": REL_TOL, "nan": 0}, "cases": rows,
        "acceptance": {"attention_rel_err_max": max(r["rel_err_max"] for r in rows),
                       "nan_total": sum(r["nan_count"] for r in rows), "passed": passed},
    })
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
