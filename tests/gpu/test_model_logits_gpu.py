"""The whole model on the GPU (bf16, FlashInfer) against transformers on the same checkpoint.

Prefill logits at every position, then teacher-forced paged decode steps, compared with
HF in float32: the engine's error must be no worse than HF's own bf16 error (x1.5, plus
1e-3). Greedy generation must match HF bf16 token for token or, at the first
difference, each side's token must be in the other's top 5 (random weights have ties).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                       reason="needs the flashinfer package"),
]

STEPS = 12


def _engine(ckpt, prefill_backend):
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine

    return LLMEngine.from_config(EngineConfig(
        model=str(ckpt), device="cuda", dtype="bfloat16", num_kv_blocks=256, max_num_seqs=8,
        max_model_len=1024, enable_prefix_caching=False, attention_backend="flashinfer",
        flashinfer_prefill_backend=prefill_backend))


def _hf(ckpt, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype, attn_implementation="sdpa",
                                                 local_files_only=True).cuda().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.inference_mode()
def test_prefill_and_paged_decode_logits_match_transformers(gpu_checkpoint, prefill_backend):
    from pdserve.engine.model_runner import ModelInput

    engine = _engine(gpu_checkpoint, prefill_backend)
    hf16, hf32 = _hf(gpu_checkpoint, torch.bfloat16), _hf(gpu_checkpoint, torch.float32)
    g = torch.Generator().manual_seed(0)
    for n in (3, 77, 300):
        prompt = torch.randint(3, 512, (n,), generator=g).tolist()
        table = list(range(2 * (-(-(n + STEPS + 1) // 16)), 0, -2))  # scattered, descending
        pre = engine.runner.run([ModelInput(prompt, 0, table)], all_logits=True)
        toks, dec = [int(pre[-1].argmax())], []
        for _ in range(STEPS):
            out = engine.runner.run([ModelInput([toks[-1]], n + len(toks) - 1, table)])[0]
            dec.append(out)
            toks.append(int(out.argmax()))
        seq = torch.tensor([prompt + toks[:-1]], device="cuda")
        ref32, ref16 = hf32(input_ids=seq).logits[0].float(), hf16(input_ids=seq).logits[0].float()
        eng = torch.cat([pre, torch.stack(dec)])
        assert not torch.isnan(eng).any()
        assert _rel(eng, ref32) <= 1.5 * _rel(ref16, ref32) + 1e-3, (n, _rel(eng, ref32),
                                                                    _rel(ref16, ref32))


def test_greedy_generation_matches_transformers(gpu_checkpoint, prefill_backend):
    from pdserve.engine.sampling_params import SamplingParams

    engine = _engine(gpu_checkpoint, prefill_backend)
    hf16 = _hf(gpu_checkpoint, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 64, 250)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, logprobs=5))
    for p, o in zip(prompts, outs, strict=True):
        x = torch.tensor([p], device="cuda")
        with torch.inference_mode():
            r = hf16.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=16, min_new_tokens=16, output_scores=True,
                              return_dict_in_generate=True)
        want = r.sequences[0, len(p):].tolist()
        got = list(o.token_ids)
        div = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        if div is not None:
            hf_top = set(r.scores[div][0].topk(5).indices.tolist())
            eng_top = {t for t, _ in o.logprobs[div].top_logprobs}
            assert got[div] in hf_top and want[div] in eng_top, (len(p), div, got, want)
