"""One GPU: prefill and decode in separate processes (CUDA IPC) vs one process doing both.

    python benchmarks/gpu/pd_vs_colocated.py --out DIR                 # Llama-3-8B shape
    python benchmarks/gpu/pd_vs_colocated.py --out DIR --dry-run       # CPU, tiny, shm

Two clusters, each behind the real router and gRPC server (``proc_hosts.ProcCluster``:
the workers run in child processes, the router in this one, no Ray):

* ``disaggregated``: one prefill process and one decode process on the same GPU; KV goes
  prefill -> decode by CUDA IPC, layer by layer, into blocks the decode worker reserved;
* ``colocated``: one process running the single-process engine (continuous batching
  with chunked prefill: vLLM's architecture), the baseline.

Both get the same ``EngineConfig`` (budgets, block size, max sequences); the decode and
the colocated processes get the same KV cache size, the prefill process a smaller one.
Note the disaggregated pair holds the weights twice and time-slices one GPU between
two CUDA contexts (no MPS here): this is the same-GPU case, not a two-GPU deployment.

1. Correctness: ``--check-prompts`` random prompts are sent one at a time (identical
   batch shapes in both modes), greedy, ``--check-tokens`` tokens each; the disaggregated
   tokens must equal the colocated (single-process engine) tokens exactly.
2. Load: the first ``--num-requests`` requests of the Azure LLM conversation trace
   (Patel et al., Splitwise, ISCA 2024; CC-BY 4.0), lengths clipped to
   ``--max-prompt``/``--max-output``, arrivals time-scaled to ``--rate`` req/s, replayed
   open-loop by ``cluster/cli/replay/loadgen.py`` (random token-id prompts of the traced lengths,
   greedy, EOS ignored). TTFT, TPOT, e2e percentiles and SLO attainment
   (``cluster/cli/replay/report.py``) are reported side by side. Without the trace file a
   Poisson trace with the same clipping is used and the report says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
from gpu_common import GiB, common_args, log, pick_device, write_result
from make_checkpoint import make_checkpoint

TAG = "pd_vs_colocated"
REPO = Path(__file__).resolve().parents[2]
TRACE_NAME = "azure_llm_2023_conv.csv"


def find_trace(explicit: str | None) -> Path | None:
    for cand in (explicit, os.environ.get("PDSERVE_TRACE"),
                 REPO.parent / "shared" / "data" / TRACE_NAME, REPO / "wheels" / "data" / TRACE_NAME):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def build_trace(args, max_prompt: int, max_output: int):
    from pdserve.workloads.formats import load_azure_csv
    from pdserve.workloads.synthetic import synthetic

    path = find_trace(args.trace)
    if path is not None:
        base = load_azure_csv(path).head(args.num_requests)
        source = f"{path.name} (first {len(base)} requests)"
    else:
        base = synthetic(args.num_requests, args.rate, (64, max_prompt), (16, max_output), seed=0)
        source = "synthetic Poisson (trace file not found)"
    trace = base.scaled(max_prompt_len=max_prompt, max_output_len=max_output).at_rate(args.rate)
    return trace, source


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--trace", default=None, help=f"path of {TRACE_NAME}")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=4.0, help="offered req/s after time scaling")
    ap.add_argument("--max-prompt", type=int, default=2048)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--kv-gib-decode", type=float, default=16.0)
    ap.add_argument("--kv-gib-prefill", type=float, default=4.0)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    ap.add_argument("--check-prompts", type=int, default=4)
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--slo-ttft", type=float, default=1.0)
    ap.add_argument("--slo-tpot", type=float, default=0.1)
    ap.add_argument("--modes", default="disaggregated,colocated")
    args = ap.parse_args(argv)
    device = pick_device(args.dry_run)
    shape = "tiny" if args.dry_run else args.shape
    if args.dry_run:
        args.num_requests, args.rate, args.check_prompts, args.check_tokens = 6, 3.0, 2, 6
        args.kv_gib_decode = args.kv_gib_prefill = 0.0625
        args.max_num_seqs, args.max_batched_tokens = 8, 256
    max_prompt, max_output = (64, 8) if args.dry_run else (args.max_prompt, args.max_output)
    ckpt = make_checkpoint(args.workdir, shape, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    from proc_hosts import ProcCluster, sequential_greedy

    from pdserve.cluster.cli.replay.config import LoadGenConfig
    from pdserve.cluster.cli.replay.loadgen import run_trace
    from pdserve.cluster.cli.replay.report import markdown_table, summarize
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.model_config import ModelConfig
    from pdserve.kv_transfer.backend_config import KVTransferConfig
    from pdserve.router.slo import SloConfig

    mc = ModelConfig.from_pretrained(ckpt)
    base = EngineConfig(
        model=str(ckpt), device=device.type, dtype="bfloat16", block_size=16,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
        max_model_len=min(mc.max_position_embeddings, max_prompt + max_output + 64),
        attention_backend="torch" if args.dry_run else "flashinfer",
        flashinfer_prefill_backend=args.prefill_backend)
    decode_cfg = dataclasses.replace(base, kv_cache_memory_bytes=int(args.kv_gib_decode * GiB))
    # A prefill worker's steps are prompts, run eagerly (each layer ships its KV): its
    # decode graphs would never replay, so it captures none.
    prefill_cfg = dataclasses.replace(base, kv_cache_memory_bytes=int(args.kv_gib_prefill * GiB),
                                      enforce_eager=True)
    kv = KVTransferConfig(backend="shm" if args.dry_run else "cuda_ipc", timeout_s=120.0)
    trace, source = build_trace(args, max_prompt, max_output)
    g = torch.Generator().manual_seed(7)
    check_prompts = [torch.randint(3, mc.vocab_size, (n,), generator=g).tolist()
                     for n in ([5, 40] if args.dry_run else [17, 300, 1000, 1900])[:args.check_prompts]]
    slo = SloConfig(args.slo_ttft, args.slo_tpot)
    loadcfg = LoadGenConfig(vocab_size=mc.vocab_size, seed=0, quiet=True, timeout_s=600.0)
    threads = 1 if args.dry_run else None

    modes, reports, tokens, extra = args.modes.split(","), {}, {}, {}
    for mode in modes:
        colocated = mode == "colocated"
        t0 = time.perf_counter()
        cluster = ProcCluster(str(ckpt), prefill_cfg, decode_cfg, None if colocated else kv,
                              colocated=colocated, torch_threads=threads)
        with cluster:
            started = time.perf_counter() - t0
            log(TAG, f"{mode}: cluster up in {started:.0f}s at {cluster.address}")
            tokens[mode] = sequential_greedy(cluster.address, check_prompts, args.check_tokens)
            warm = trace.head(min(4, len(trace)))
            # Another seed: warm-up prompts must not seed the prefix cache for the run.
            run_trace(cluster.address, warm, dataclasses.replace(loadcfg, seed=99),
                      run_name=f"{mode}-warmup")
            result = run_trace(cluster.address, trace, loadcfg, run_name=mode)
            reports[mode] = summarize(result, slo, label=mode)
            extra[mode] = {"startup_s": started, "worker_stats": [
                dataclasses.asdict(s) for s in cluster.stats()]}
        r = reports[mode]
        log(TAG, f"{mode}: ok {r.num_ok}/{r.num_sent}, TTFT p50 "
            f"{r.ttft_s.p50 * 1e3 if r.ttft_s else float('nan'):.0f} ms, TPOT p50 "
            f"{r.tpot_s.p50 * 1e3 if r.tpot_s else float('nan'):.1f} ms")
    same = None
    if {"disaggregated", "colocated"} <= set(tokens):
        same = tokens["disaggregated"] == tokens["colocated"]
    table = markdown_table(list(reports.values()))
    print(table)
    write_result(args.out, TAG, device, {
        "dry_run": args.dry_run, "shape": shape, "checkpoint": str(ckpt),
        "kv_backend": kv.backend, "trace": {"source": source, "requests": len(trace),
                                            "offered_rate": trace.rate,
                                            "max_prompt": max_prompt, "max_output": max_output},
        "engine_config": {k: str(v) for k, v in dataclasses.asdict(base).items()},
        "kv_cache_gib": {"decode_and_colocated": args.kv_gib_decode,
                         "prefill": args.kv_gib_prefill},
        "slo": dataclasses.asdict(slo),
        "reports": {m: dataclasses.asdict(r) for m, r in reports.items()},
        "markdown_table": table, "modes_extra": extra,
        "greedy_check": {"prompt_lens": [len(p) for p in check_prompts],
                         "tokens": tokens, "disaggregated_equals_single_process": same},
        "acceptance": {"disaggregated_equals_single_process": same, "passed": bool(same)},
    })
    return 0 if same is not False else 1


if __name__ == "__main__":
    sys.exit(main())
