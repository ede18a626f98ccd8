"""Shared pieces of the GPU benchmarks: model shapes, ceilings, timing, result files.

Every script in this folder is run as ``python benchmarks/gpu/<name>.py --out DIR`` (the
script's folder is then first on ``sys.path``, so ``import gpu_common`` finds this file)
and writes ``DIR/<name>.json``: ``{"benchmark": name, "device": {...}, ...}``.
``report.py`` merges those files. ``--dry-run`` runs the same code on the CPU with the
``tiny`` shape and small sizes, so the scripts can be checked where no GPU is lent.

Ceilings are measured in the same run as the thing they bound (METHOD.md): memory
bandwidth by a large device-to-device ``copy_`` and matrix throughput by a large bf16
matmul, both on random data, timed with CUDA events, median of repetitions.
Bandwidth is reported in two conventions and each figure says which it uses:
``rw_bytes_per_s`` counts bytes read plus bytes written (the HBM figure that bounds a
read-only stream such as a decode step), ``copy_bytes_per_s`` counts bytes copied (the
figure to hold a copy-like transfer, such as the KV transfer, against).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdserve.cluster.planning.profiler.hostinfo import cpu_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20

# Hugging Face LlamaConfig keyword arguments of the shapes the benchmarks use. Random
# weights: only the shapes (and so the bytes and FLOPs) are those of the real models.
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "default", "rope_theta": 500000.0}),
    "llama3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                      "rope_theta": 500000.0}),
    # CPU dry runs and quick GPU smoke tests; head_dim 64 is one FlashInfer supports.
    "tiny": dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "default", "rope_theta": 500000.0}),
}


def log(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def pick_device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible; use --dry-run to exercise this script on the CPU")
    return torch.device("cuda", torch.cuda.current_device())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the machine ------------------------------------------------------------------------

def _nvidia_smi() -> dict[str, str]:
    fields = "name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.max.memory"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    values = [v.strip() for v in out.splitlines()[0].split(",")] if out.strip() else []
    return dict(zip(fields.split(","), values, strict=False))




def device_info(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import flashinfer

        info["flashinfer"] = getattr(flashinfer, "__version__", "unknown")
    except Exception as exc:  # absent on CPU hosts; a broken install is worth recording
        info["flashinfer"] = f"unavailable ({type(exc).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "device": torch.cuda.get_device_name(device),
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / GiB, 1),
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / MiB, 1),
            "nvidia_smi": _nvidia_smi(),
        })
    else:
        info["device"] = f"CPU ({info['cpu_model']}) - dry run, not a GPU measurement"
    return info


# -- timing -----------------------------------------------------------------------------

def event_times(fn: Callable[[], Any], device: torch.device, warmup: int = 3,
                reps: int = 10) -> list[float]:
    """Seconds per call, device time between CUDA events (host clock on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def wall_times(fn: Callable[[], Any], device: torch.device, warmup: int = 3,
               reps: int = 10) -> list[float]:
    """Seconds per call on the host clock, the device drained before and after: what a
    caller waits, host-side work (Python, planning, launches) included."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "n": len(s)}


# -- ceilings measured in the same run ---------------------------------------------------

def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 20) -> dict:
    """A large device-to-device copy of random bytes (2 GiB on a GPU: far past L2)."""
    nbytes = nbytes or (2 * GiB if device.type == "cuda" else 64 * MiB)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = event_times(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    t = statistics.median(times)
    return {"bytes": nbytes, "median_s": t, "copy_bytes_per_s": nbytes / t,
            "rw_bytes_per_s": 2 * nbytes / t, "reps": reps,
            "method": "torch copy_ of a random uint8 tensor, CUDA events, median"}


def matmul_flops(device: torch.device, n: int | None = None, dtype: torch.dtype = torch.bfloat16,
                 reps: int = 20) -> dict:
    """FLOP/s of an n x n x n matmul on random data (three input sets, rotated)."""
    n = n or (8192 if device.type == "cuda" else 256)
    sets = [(torch.randn(n, n, device=device, dtype=dtype),
             torch.randn(n, n, device=device, dtype=dtype)) for _ in range(3)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    i = [0]

    def step() -> None:
        a, b = sets[i[0] % 3]
        i[0] += 1
        torch.matmul(a, b, out=out)

    times = event_times(step, device, warmup=3, reps=reps)
    t = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_s": t,
            "flop_per_s": 2 * n ** 3 / t, "reps": reps,
            "method": "torch.matmul n^3 on random data, 3 rotating input sets, CUDA events"}


# -- model arithmetic ---------------------------------------------------------------------

def weight_bytes_read_per_step(weights, batch: int) -> int:
    """Bytes of weights one forward step must read: every matrix and norm once, the
    lm_head once, and only ``batch`` rows of the embedding table (untied)."""
    total = 0
    for lw in weights.layers:
        for t in (lw.input_norm, lw.qkv, lw.qkv_bias, lw.o_proj, lw.o_bias, lw.post_norm,
                  lw.gate_up, lw.down):
            if t is not None:
                total += t.numel() * t.element_size()
    total += weights.norm.numel() * weights.norm.element_size()
    total += weights.lm_head.numel() * weights.lm_head.element_size()
    if weights.embed.data_ptr() != weights.lm_head.data_ptr():
        total += batch * weights.embed.shape[1] * weights.embed.element_size()
    return total


def matmul_params(mc) -> tuple[int, int]:
    """(parameters in the decoder layers' matmuls, lm_head parameters)."""
    per_layer = (mc.hidden_size * (mc.q_size + 2 * mc.kv_size) + mc.q_size * mc.hidden_size
                 + 3 * mc.hidden_size * mc.intermediate_size)
    return per_layer * mc.num_layers, mc.vocab_size * mc.hidden_size


# -- output ---------------------------------------------------------------------------------

def write_result(out_dir: Path, name: str, device: torch.device, payload: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "device": device_info(device), **payload}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    log(name, f"wrote {path}")
    return path


def common_args(parser, default_out: str = "gpu-results") -> None:
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", default_out)),
                        help="directory for <benchmark>.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="run on the CPU with the tiny shape and small sizes (a smoke test)")
    parser.add_argument("--workdir", type=Path,
                        default=Path(os.environ.get("PDSERVE_GPU_WORK", "/tmp/pdserve-gpu")),
                        help="where checkpoints are created and cached")
    parser.add_argument("--prefill-backend", default="auto", choices=("auto", "fa2", "fa3"),
                        help="FlashInfer's prefill kernel family, passed to the engine as "
                             "EngineConfig.flashinfer_prefill_backend (run.sh passes fa2: "
                             "its carried ahead-of-time modules are FA2)")
