"""Generated tokens/s: pdserve engine vs transformers ``generate``, same GPU and checkpoint.

    python benchmarks/gpu/vs_hf_generate.py --out DIR               # Llama-3-8B shape
    python benchmarks/gpu/vs_hf_generate.py --out DIR --dry-run     # CPU, tiny shape

The GPU counterpart of ``benchmarks/engine_throughput.py`` (whose prompt, padding and
comparison helpers it reuses): both sides in one process on one GPU, bf16, greedy, EOS
ignored so every row yields exactly ``new_tokens`` tokens.

* engine: ``LLMEngine.generate`` on the whole batch (FlashInfer attention, prefix caching
  off so repetitions cannot reuse each other's KV), decode steps replaying CUDA graphs
  (the engine's default; capture time and memory recorded); the same engine forced eager
  (``runner.graphs_active = False``) is timed in the same repetitions, so graph and eager
  throughput stand side by side (``--eager``: no graphs at all);
* hf: ``model.generate`` (sdpa attention, the default dynamic cache) on the same prompts;
  all prompts of a case have one length, so HF wastes nothing on padding.

Throughput = generated tokens / wall time of the whole call (prefill included), one
warm-up run per side and case, then ``--reps`` repetitions interleaved engine, hf,
engine, ...; medians and the ratio engine/hf are reported. Cases: batch 1 (128-token
prompt) and batch 32 (256-token prompts), 128 new tokens each. Goal: ratio >= 3 at
batch 32. Greedy agreement is reported too (informational: random weights give
near-ties, and batched bf16 matmuls round differently from unbatched ones).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from gpu_common import common_args, log, pick_device, sync, write_result
from make_checkpoint import make_checkpoint

from pdserve.benchmarks.engine_throughput_setup import Case, make_prompts
from pdserve.benchmarks.engine_throughput_sides import PAD_ID, compare, left_pad

TAG = "vs_hf_generate"
GOAL = 3.0
GOAL_BATCH = 32


class EngineSide:
    def __init__(self, ckpt, cases: list[Case], device: torch.device, backend: str,
                 prefill_backend: str, cuda_graphs: bool):
        from pdserve.engine.config import EngineConfig
        from pdserve.engine.llm_engine import LLMEngine

        blocks = max(sum(-(-(n + c.new_tokens + 1) // 16) for n in c.prompt_lens) for c in cases)
        self.config = EngineConfig(
            model=str(ckpt), device=device.type, dtype="bfloat16", block_size=16,
            num_kv_blocks=blocks + 64, max_num_seqs=max(c.batch for c in cases),
            max_num_batched_tokens=max(8192, max(sum(c.prompt_lens) + c.batch for c in cases)),
            enable_prefix_caching=False, attention_backend=backend,
            enforce_eager=not cuda_graphs, flashinfer_prefill_backend=prefill_backend)
        self.engine = LLMEngine.from_config(self.config)
        self.device = device
        graphs = self.engine.runner.graphs
        self.capture = graphs.stats.as_dict() if graphs is not None else None

    def run(self, prompts: list[list[int]], new_tokens: int,
            eager: bool = False) -> tuple[float, list[list[int]]]:
        from pdserve.engine.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        runner = self.engine.runner
        runner.graphs_active = not eager
        try:
            sync(self.device)
            t0 = time.perf_counter()
            outs = self.engine.generate(prompts, params)
            sync(self.device)
        finally:
            runner.graphs_active = True
        return time.perf_counter() - t0, [list(o.token_ids) for o in outs]


class HFSide:
    def __init__(self, ckpt, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            str(ckpt), dtype=torch.bfloat16, attn_implementation="sdpa",
            local_files_only=True).to(device).eval()
        gen = self.model.generation_config
        gen.eos_token_id, gen.bos_token_id, gen.pad_token_id = None, None, PAD_ID
        self.device = device

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        ids, mask = left_pad(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        sync(self.device)
        return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (eager engine only)")
    args = ap.parse_args(argv)
    device = pick_device(args.dry_run)
    shape = "tiny" if args.dry_run else args.shape
    if args.dry_run:
        cases = [Case("batch1", (16,), 8), Case("batch4", (24,) * 4, 8)]
    else:
        n = args.new_tokens
        cases = [Case("batch1", (128,), n), Case(f"batch{GOAL_BATCH}", (256,) * GOAL_BATCH, n)]
    reps = 1 if args.dry_run else args.reps
    ckpt = make_checkpoint(args.workdir, shape, device)
    engine = EngineSide(ckpt, cases, device, "torch" if args.dry_run else "flashinfer",
                        args.prefill_backend, cuda_graphs=not args.eager)
    graphs = engine.capture is not None
    if graphs:
        c = engine.capture
        log(TAG, f"engine captured {len(c['sizes'])} decode graphs in {c['seconds']:.2f} s, "
            f"{c['free_bytes_used'] / 2**20:.0f} MiB")
    hf = HFSide(ckpt, device)
    vocab = engine.engine.loaded.model_config.vocab_size
    rows = []
    for ci, case in enumerate(cases):
        prompts = make_prompts(case, vocab, 1000 + ci)
        engine.run(prompts, min(case.new_tokens, 8))
        if graphs:
            engine.run(prompts, min(case.new_tokens, 8), eager=True)
        hf.run(prompts, min(case.new_tokens, 8))
        eng_s, eager_s, hf_s, eng_toks, eager_toks, hf_toks = [], [], [], None, None, None
        for _ in range(reps):
            t, toks = engine.run(prompts, case.new_tokens)
            eng_s.append(t)
            eng_toks = eng_toks or toks
            if graphs:
                t, toks = engine.run(prompts, case.new_tokens, eager=True)
                eager_s.append(t)
                eager_toks = eager_toks or toks
            t, toks = hf.run(prompts, case.new_tokens)
            hf_s.append(t)
            hf_toks = hf_toks or toks
        em = case.generated / statistics.median(eng_s)
        hm = case.generated / statistics.median(hf_s)
        row = {"case": case.name, "batch": case.batch, "prompt_len": case.prompt_lens[0],
               "new_tokens": case.new_tokens, "engine_s": eng_s, "hf_s": hf_s,
               "engine_tok_s": em, "hf_tok_s": hm, "ratio_engine_over_hf": em / hm,
               "greedy_match": compare(eng_toks, hf_toks), "cuda_graphs": graphs}
        if graphs:
            xm = case.generated / statistics.median(eager_s)
            row.update(engine_eager_s=eager_s, engine_eager_tok_s=xm,
                       ratio_eager_over_hf=xm / hm, graph_speedup_over_eager=em / xm,
                       greedy_match_graph_vs_eager=compare(eng_toks, eager_toks))
        rows.append(row)
        log(TAG, f"{case.name}: engine {em:.0f} tok/s, hf {hm:.0f} tok/s, ratio {em / hm:.2f}x"
            + (f"; eager engine {row['engine_eager_tok_s']:.0f} tok/s "
               f"({row['ratio_eager_over_hf']:.2f}x)" if graphs else ""))
    at_goal = next((r for r in rows if r["batch"] == GOAL_BATCH), None)
    write_result(args.out, TAG, device, {
        "dry_run": args.dry_run, "shape": shape, "checkpoint": str(ckpt),
        "engine": {"attention_backend": engine.engine.runner.attn.name, "dtype": "bfloat16",
                   "cuda_graphs": graphs, "graph_capture": engine.capture,
                   "prefill_backend": args.prefill_backend},
        "hf": {"attn_implementation": "sdpa", "dtype": "bfloat16"}, "reps": reps, "rows": rows,
        "acceptance": {"goal": f"ratio >= {GOAL:g} at batch {GOAL_BATCH}",
                       "ratio_at_goal_batch": at_goal["ratio_engine_over_hf"] if at_goal else None,
                       "passed": bool(at_goal and at_goal["ratio_engine_over_hf"] >= GOAL)},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
