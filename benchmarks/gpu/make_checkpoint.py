"""Create a random-weight bf16 Llama checkpoint of a real model's shape, on the device.

    python benchmarks/gpu/make_checkpoint.py --shape llama3-8b            # 16 GB, ~1 min
    python benchmarks/gpu/make_checkpoint.py --shape llama3.2-1b
    python benchmarks/gpu/make_checkpoint.py --shape tiny --dry-run      # CPU smoke test

The model is built directly on the GPU in bf16 (``torch.device`` context: no CPU copy,
no fp32 master), initialised the way transformers initialises Llama (normal, std
``initializer_range``), with the RMSNorm weights perturbed so that they matter to a
comparison, and saved with ``save_pretrained`` (safetensors) under
``<workdir>/ckpt/<shape>-bf16-s<seed>``. A finished checkpoint is reused (the directory
appears atomically, by rename, once complete). No tokenizer is written: the engine and
the router serve checkpoints without one on token ids, which is what the benchmarks send.
BOS/EOS/pad ids are unset, so no random token ends a benchmark's generation early.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpu_common import SHAPES, common_args, log, pick_device


def checkpoint_dir(workdir: Path, shape: str, seed: int = 0) -> Path:
    return workdir / "ckpt" / f"{shape}-bf16-s{seed}"


def make_checkpoint(workdir: Path, shape: str, device: torch.device, seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Return the checkpoint directory, creating it if needed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    target = checkpoint_dir(workdir, shape, seed)
    if (target / "config.json").is_file():
        log("make_checkpoint", f"reusing {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    log("make_checkpoint", f"built {shape} ({n_params / 1e9:.2f} B params) on {device} in "
        f"{time.perf_counter() - t0:.1f}s; saving")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log("make_checkpoint", f"saved {target} in {time.perf_counter() - t0:.1f}s")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shape = "tiny" if args.dry_run else args.shape
    print(make_checkpoint(args.workdir, shape, pick_device(args.dry_run), args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
