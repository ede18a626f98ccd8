"""The two sides benchmarks/engine_throughput.py compares, each timing one whole
``generate`` call: ``EngineSide`` (pdserve's ``LLMEngine``, float32, torch attention,
prefix caching off) and ``HFSide`` (``transformers`` ``generate`` on a left-padded batch,
EOS disabled); ``compare`` measures how far their greedy tokens agree, and
``profile_engine`` cProfiles one engine run.

Both ``run`` methods return ``(seconds, generated token ids per prompt)`` and run under
``torch.inference_mode``; loading time is kept apart in ``load_s``.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from pdserve.benchmarks.engine_throughput_setup import Case

PAD_ID = 0


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


# -- runners -----------------------------------------------------------------------------

class EngineSide:
    def __init__(self, model_path: Path, cases: list[Case], block_size: int = 16):
        from pdserve.engine.config import EngineConfig
        from pdserve.engine.llm_engine import LLMEngine

        max_seqs = max(16, max(c.batch for c in cases))
        blocks = max(sum(-(-(n + c.new_tokens + 1) // block_size) for n in c.prompt_lens)
                     for c in cases)
        batched = max(8192, max(sum(c.prompt_lens) + c.batch for c in cases))
        self.config = EngineConfig(
            model=str(model_path), device="cpu", dtype="float32", block_size=block_size,
            num_kv_blocks=blocks + 16, max_num_seqs=max_seqs, max_num_batched_tokens=batched,
            enable_prefix_caching=False, attention_backend="torch",
        )
        t0 = time.perf_counter()
        self.engine = LLMEngine.from_config(self.config)
        self.load_s = time.perf_counter() - t0

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        from pdserve.engine.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        with torch.inference_mode():
            t0 = time.perf_counter()
            outs = self.engine.generate(prompts, params)
            elapsed = time.perf_counter() - t0
        return elapsed, [list(o.token_ids) for o in outs]


class HFSide:
    def __init__(self, model_path: Path, attn: str):
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=torch.float32, attn_implementation=attn,
            local_files_only=True,
        ).eval()
        self.load_s = time.perf_counter() - t0
        gen = self.model.generation_config
        gen.eos_token_id = None  # ignore EOS, like SamplingParams(ignore_eos=True)
        gen.pad_token_id = PAD_ID
        gen.bos_token_id = None
        self.attn = attn

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        ids, mask = left_pad(prompts)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            )
            elapsed = time.perf_counter() - t0
        gen = out[:, ids.shape[1]:].tolist()
        return elapsed, gen


def compare(engine_toks: list[list[int]], hf_toks: list[list[int]]) -> dict:
    total = same = seq_same = 0
    first_div = []
    for e, h in zip(engine_toks, hf_toks, strict=True):
        n = max(len(e), len(h))
        total += n
        same += sum(1 for a, b in zip(e, h, strict=False) if a == b)
        seq_same += e == h
        div = next((i for i, (a, b) in enumerate(zip(e, h, strict=False)) if a != b), None)
        if div is None and len(e) != len(h):
            div = min(len(e), len(h))
        first_div.append(div)
    prefix = sum(d if d is not None else len(e) for d, e in zip(first_div, engine_toks,
                                                               strict=True))
    return {
        "exact": seq_same == len(engine_toks),
        "token_match_fraction": same / total if total else 1.0,
        "prefix_match_fraction": prefix / total if total else 1.0,
        "sequence_match_fraction": seq_same / len(engine_toks),
        "first_divergence": first_div,
    }


def profile_engine(side: EngineSide, prompts: list[list[int]], new_tokens: int,
                   top: int = 25) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    elapsed, _ = side.run(prompts, new_tokens)
    prof.disable()
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    stats.sort_stats("tottime").print_stats(top)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in sorted(
            stats.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc,
                     "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)})
    return {"wall_s_under_profiler": elapsed, "top_by_tottime": rows}
