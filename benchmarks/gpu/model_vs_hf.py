"""Whole-model logits and greedy tokens: the pdserve engine vs transformers, same checkpoint.

    python benchmarks/gpu/model_vs_hf.py --out DIR                      # Llama-3.2-1B shape
    python benchmarks/gpu/model_vs_hf.py --out DIR --shape llama3-8b
    python benchmarks/gpu/model_vs_hf.py --out DIR --dry-run            # CPU, tiny shape

Three checks on one random-weight bf16 checkpoint (``make_checkpoint.py``):

1. Prefill logits. Each prompt alone through the engine's model runner (FlashInfer
   prefill, paged cache with a scattered block table) with logits for every position,
   and through ``transformers`` (``LlamaForCausalLM``, sdpa) in bf16 and, when the GPU
   has room, in float32 as the reference.
2. Decode logits, teacher-forced: after the prefill, ``--decode-steps`` single-token
   steps through the runner (FlashInfer decode) feeding the engine's own greedy tokens;
   HF then scores prompt + those tokens in one forward, and the logits at the same
   positions are compared. This checks paged decode numerically, free of the near-ties
   that make token comparisons of random-weight models fragile.
3. Greedy generation: ``LLMEngine.generate`` on all prompts at once (continuous batching)
   vs HF ``generate`` per prompt; tokens compared the way vLLM's model tests do
   (identical, or at the first difference each side's token is in the other's top-5).

Error measure: rel = ||a - b|| / ||b|| over all logits. Pass: the engine's error
against float32 is at most 1.5x HF-bf16's own error against float32 (+1e-3), i.e. the
engine is as accurate as transformers in the same precision; without a float32
reference, engine vs HF bf16 must be < 3e-2. Greedy: every sequence identical or close.
"""

from __future__ import annotations

import argparse
import sys

import torch
from gpu_common import common_args, log, pick_device, write_result
from make_checkpoint import make_checkpoint

TAG = "model_vs_hf"
TOPK = 5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def top1_agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def load_hf(path, dtype, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa",
                                                 local_files_only=True).to(device).eval()
    gen = model.generation_config
    gen.eos_token_id, gen.bos_token_id, gen.pad_token_id = None, None, 0
    return model


@torch.inference_mode()
def hf_logits(model, ids: list[int], device) -> torch.Tensor:
    x = torch.tensor([ids], device=device)
    return model(input_ids=x).logits[0].float()


def engine_prefill_decode(runner, prompt: list[int], steps: int) -> tuple[torch.Tensor, list[int],
                                                                          torch.Tensor]:
    """All-position prefill logits, then ``steps`` greedy decode steps' logits."""
    from pdserve.engine.model_runner import ModelInput

    bs = runner.block_size
    n_blocks = -(-(len(prompt) + steps + 1) // bs)
    # A scattered table (reversed, odd blocks first) so paging is really exercised.
    table = list(range(1, 2 * n_blocks, 2))[::-1]
    pre = runner.run([ModelInput(prompt, 0, table)], all_logits=True)
    tokens, dec = [int(pre[-1].argmax())], []
    for _ in range(steps):
        pos = len(prompt) + len(tokens) - 1
        logits = runner.run([ModelInput([tokens[-1]], pos, table)])
        dec.append(logits[0])
        tokens.append(int(logits[0].argmax()))
    return pre, tokens, torch.stack(dec) if dec else pre[:0]


def compare_greedy(eng: list[int], eng_top: list[set[int]], hf: list[int],
                   hf_top: list[set[int]]) -> dict:
    div = next((i for i, (a, b) in enumerate(zip(eng, hf, strict=False)) if a != b), None)
    if div is None:
        return {"identical": True, "close": True, "first_divergence": None}
    close = eng[div] in hf_top[div] and hf[div] in eng_top[div]
    return {"identical": False, "close": close, "first_divergence": div}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hf-fp32", choices=("auto", "yes", "no"), default="auto")
    args = ap.parse_args(argv)
    device = pick_device(args.dry_run)
    shape = "tiny" if args.dry_run else args.shape
    ckpt = make_checkpoint(args.workdir, shape, device)

    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    lens = (5, 33, 200) if args.dry_run else (7, 128, 511, 1000)
    g = torch.Generator().manual_seed(1)
    engine = LLMEngine.from_config(EngineConfig(
        model=str(ckpt), device=device.type, dtype="bfloat16", block_size=16,
        num_kv_blocks=2 * sum(-(-(n + args.new_tokens + args.decode_steps + 2) // 16)
                              for n in lens) + 64,
        max_num_seqs=len(lens), max_num_batched_tokens=8192, max_model_len=4096,
        enable_prefix_caching=False, flashinfer_prefill_backend=args.prefill_backend,
        attention_backend="torch" if args.dry_run else "flashinfer"))
    vocab = engine.loaded.model_config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]

    # 1 + 2: logits, one prompt at a time through the runner.
    eng_runs = [engine_prefill_decode(engine.runner, p, args.decode_steps) for p in prompts]
    hf16 = load_hf(ckpt, torch.bfloat16, device)
    ref_seqs = [p + toks[:-1] for p, (_, toks, _) in zip(prompts, eng_runs, strict=True)]
    hf16_logits = [hf_logits(hf16, s, device) for s in ref_seqs]

    # 3: greedy generation (engine batched; HF one prompt at a time, no padding).
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, logprobs=TOPK)
    outs = engine.generate(prompts, params)
    greedy = []
    for p, o in zip(prompts, outs, strict=True):
        x = torch.tensor([p], device=device)
        with torch.inference_mode():
            r = hf16.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              output_scores=True, return_dict_in_generate=True)
        hf_toks = r.sequences[0, len(p):].tolist()
        hf_top = [set(s[0].topk(TOPK).indices.tolist()) for s in r.scores]
        eng_top = [{t for t, _ in tok.top_logprobs} for tok in o.logprobs]
        greedy.append({"prompt_len": len(p), **compare_greedy(list(o.token_ids), eng_top,
                                                              hf_toks, hf_top)})
    del hf16
    if device.type == "cuda":
        torch.cuda.empty_cache()

    fp32_ok = args.hf_fp32 == "yes" or (args.hf_fp32 == "auto" and (
        device.type == "cpu" or torch.cuda.mem_get_info(device)[0] > 2.5 * 4 * sum(
            f.stat().st_size / 2 for f in ckpt.glob("*.safetensors"))))
    hf32_logits = None
    if fp32_ok:
        hf32 = load_hf(ckpt, torch.float32, device)
        hf32_logits = [hf_logits(hf32, s, device) for s in ref_seqs]
        del hf32

    rows = []
    for i, (p, (pre, _toks, dec)) in enumerate(zip(prompts, eng_runs, strict=True)):
        n = len(p)
        h16 = hf16_logits[i]
        row = {"prompt_len": n, "decode_steps": args.decode_steps,
               "prefill_rel_engine_vs_hf_bf16": rel(pre, h16[:n]),
               "prefill_top1_agree_vs_hf_bf16": top1_agree(pre, h16[:n])}
        if args.decode_steps:
            row["decode_rel_engine_vs_hf_bf16"] = rel(dec, h16[n:])
            row["decode_top1_agree_vs_hf_bf16"] = top1_agree(dec, h16[n:])
        if hf32_logits is not None:
            h32 = hf32_logits[i]
            row["prefill_rel_engine_vs_fp32"] = rel(pre, h32[:n])
            row["prefill_rel_hf_bf16_vs_fp32"] = rel(h16[:n], h32[:n])
            if args.decode_steps:
                row["decode_rel_engine_vs_fp32"] = rel(dec, h32[n:])
                row["decode_rel_hf_bf16_vs_fp32"] = rel(h16[n:], h32[n:])
        rows.append(row)
        log(TAG, " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items()))

    def worst(key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return max(vals) if vals else None

    if hf32_logits is not None:
        checks = [(worst(f"{ph}_rel_engine_vs_fp32"), worst(f"{ph}_rel_hf_bf16_vs_fp32"))
                  for ph in ("prefill", "decode") if worst(f"{ph}_rel_engine_vs_fp32") is not None]
        logits_pass = all(e <= 1.5 * h + 1e-3 for e, h in checks)
        criterion = "engine-vs-fp32 <= 1.5 x HF-bf16-vs-fp32 + 1e-3 (prefill and decode)"
    else:
        logits_pass = all(v < 3e-2 for v in (worst("prefill_rel_engine_vs_hf_bf16"),
                                              worst("decode_rel_engine_vs_hf_bf16"))
                          if v is not None)
        criterion = "engine-vs-HF-bf16 < 3e-2 (no float32 reference: not enough memory)"
    greedy_pass = all(gr["close"] for gr in greedy)
    write_result(args.out, TAG, device, {
        "dry_run": args.dry_run, "shape": shape, "checkpoint": str(ckpt),
        "engine": {"dtype": "bfloat16", "attention_backend": engine.runner.attn.name},
        "hf": {"dtype": "bfloat16", "attn_implementation": "sdpa",
               "fp32_reference": hf32_logits is not None},
        "logits": rows, "greedy": greedy,
        "acceptance": {
            "logits_criterion": criterion, "logits_passed": logits_pass,
            "worst_prefill_rel_engine_vs_hf_bf16": worst("prefill_rel_engine_vs_hf_bf16"),
            "worst_decode_rel_engine_vs_hf_bf16": worst("decode_rel_engine_vs_hf_bf16"),
            "worst_prefill_rel_engine_vs_fp32": worst("prefill_rel_engine_vs_fp32"),
            "worst_prefill_rel_hf_bf16_vs_fp32": worst("prefill_rel_hf_bf16_vs_fp32"),
            "greedy_identical": sum(gr["identical"] for gr in greedy),
            "greedy_close": sum(gr["close"] for gr in greedy), "greedy_total": len(greedy),
            "greedy_passed": greedy_pass, "passed": logits_pass and greedy_pass},
    })
    return 0 if logits_pass and greedy_pass else 1


if __name__ == "__main__":
    sys.exit(main())
