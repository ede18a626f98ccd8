"""Generated tokens/s of the pdserve engine vs. Hugging Face ``generate``, side by side.

What is measured
----------------
Both sides run the SAME local checkpoint on the SAME batch of token-id prompts, in one
process, on the CPU, with the same torch thread count and under ``torch.inference_mode``:

* **engine**: ``LLMEngine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))``
  (the whole batch is submitted, then the engine steps until every request is done);
  ``float32``, torch attention backend, prefix caching OFF (otherwise repetitions 2..N
  would reuse the KV of repetition 1 and the comparison would be unfair).
* **hf**: ``model.generate(input_ids, attention_mask, do_sample=False, max_new_tokens=n,
  min_new_tokens=n)`` with a left-padded batch (pad id 0) built without a tokenizer,
  ``float32``, ``attn_implementation="sdpa"`` (HF's default; ``--hf-attn eager`` too).
  EOS is disabled in the generation config so that, like ``ignore_eos`` in the engine,
  every row produces exactly ``n`` tokens and no EOS suppression alters greedy choices.

Throughput = total generated tokens / wall time (``time.perf_counter``) of the whole
call, prefill included. Each side is warmed up once per case (a short run), then the
repetitions are interleaved (engine, hf, engine, hf, ...) so that drifts in machine
load hit both sides alike; the median of the repetitions is reported together with the
ratio ``engine / hf`` of the medians.

Cases (defaults):

* ``batch1``: 1 prompt of 128 tokens, 128 new tokens.
* ``batch16_mixed``: 16 prompts with lengths spread uniformly over 16..256 tokens (fixed
  RNG seed), 64 new tokens each.

Greedy agreement is checked too: for ``batch1`` the engine's tokens must equal HF's; for
``batch16_mixed`` the token-level and sequence-level match fractions are reported
(informational: padding changes the float summation order in HF, and random weights give
near-tied logits, so a late divergence there is not an engine bug).

The checkpoint is a random-weight Llama (``LlamaConfig`` + ``LlamaForCausalLM``, float32,
``save_pretrained``) of a realistic-but-CPU-sized shape (hidden 512, 8 layers, 8 heads,
4 KV heads, intermediate 1408, vocab 8192 by default), created once and cached under
``--workdir``. ``--model PATH`` uses any local HF checkpoint directory instead (for
example the demo model from ``pdserve.engine.demo_model.create_demo_model()``).

Run
---
    python benchmarks/engine_throughput.py            # full run, writes benchmarks/results/
    python benchmarks/engine_throughput.py --quick    # tiny smoke test (results to a temp dir)
    python benchmarks/engine_throughput.py --profile  # also cProfile one engine run per case
    python benchmarks/engine_throughput.py --batch-new-tokens 192 --out-dir /tmp/x  # longer decode
    python benchmarks/engine_throughput.py --model ~/.cache/pdserve/demo-llama-v1

The machine should be otherwise idle: on a small shared CPU, other processes inflate single
repetitions badly (interleaving and the median limit, but do not remove, the damage).

Results go to ``<out-dir>/engine_throughput.json`` (machine info, config, per-rep timings,
medians, ratios, greedy agreement) and ``<out-dir>/engine_throughput.md`` (a short table).
Progress is printed to stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime as dt
import io
import json
import os
import platform
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pdserve.cluster.planning.profiler.hostinfo import cpu_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
PAD_ID = 0


def log(msg: str) -> None:
    print(f"[engine_throughput] {msg}", file=sys.stderr, flush=True)


# -- checkpoint ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 1408
    vocab: int = 8192
    max_pos: int = 2048
    seed: int = 0

    @property
    def dirname(self) -> str:
        return (f"llama-h{self.hidden}-l{self.layers}-a{self.heads}-kv{self.kv_heads}"
                f"-i{self.intermediate}-v{self.vocab}-p{self.max_pos}-s{self.seed}")


QUICK_SHAPE = Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=352, vocab=1024,
                    max_pos=512)


def make_checkpoint(workdir: Path, shape: Shape) -> Path:
    """Create (once) a random float32 Llama checkpoint; return its directory."""
    target = workdir / shape.dirname
    if (target / "config.json").is_file():
        log(f"using cached checkpoint {target}")
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    log(f"creating random checkpoint {target}")
    workdir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_pos,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=workdir))
    try:
        model.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic; loses the race gracefully
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_model_info(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings",
            "tie_word_embeddings", "torch_dtype", "dtype")
    return {k: cfg[k] for k in keys if k in cfg}


# -- cases -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    prompt_lens: tuple[int, ...]
    new_tokens: int

    @property
    def batch(self) -> int:
        return len(self.prompt_lens)

    @property
    def generated(self) -> int:
        return self.batch * self.new_tokens


def make_cases(quick: bool, seed: int, batch: int = 16, batch_new_tokens: int = 64,
               min_len: int = 16, max_len: int = 256) -> list[Case]:
    rng = random.Random(seed)
    if quick:
        b1 = Case("batch1", (32,), 16)
        lens = tuple(rng.randint(8, 48) for _ in range(4))
        return [b1, Case("batch4_mixed", lens, 8)]
    b1 = Case("batch1", (128,), 128)
    # Uniformly spread min_len..max_len, shuffled with the fixed seed (arrival order mixed).
    step = (max_len - min_len) / max(batch - 1, 1)
    lens = [round(min_len + i * step) for i in range(batch)]
    rng.shuffle(lens)
    return [b1, Case(f"batch{batch}_mixed", tuple(lens), batch_new_tokens)]


def make_prompts(case: Case, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Avoid id 0 (the pad id) and the first few ids (often special tokens).
    lo = min(4, vocab - 1)
    return [torch.randint(lo, vocab, (n,), generator=g).tolist() for n in case.prompt_lens]


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


# -- reporting ---------------------------------------------------------------------------



def machine_info() -> dict:
    import transformers

    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
    }


def write_markdown(path: Path, report: dict) -> None:
    m, cfg = report["machine"], report["config"]
    lines = [
        "# pdserve engine vs. transformers `generate` (CPU throughput)",
        "",
        f"{m['date_utc']} · torch {m['torch']} · transformers {m['transformers']} · "
        f"{m['cpu_model']} · {m['torch_threads']} threads · float32 · greedy · "
        f"HF attn `{cfg['hf_attn']}` · median of {cfg['reps']} interleaved reps",
        "",
        f"Model: `{cfg['model_label']}` ({cfg['model_info'].get('num_hidden_layers')} layers, "
        f"hidden {cfg['model_info'].get('hidden_size')}, vocab "
        f"{cfg['model_info'].get('vocab_size')})",
        "",
        "| case | batch | prompt lens | new tokens | engine tok/s | HF tok/s | ratio engine/HF "
        "| greedy match |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for c in report["cases"]:
        lens = c["prompt_lens"]
        lens_s = str(lens[0]) if len(set(lens)) == 1 else f"{min(lens)}..{max(lens)} (mixed)"
        mt = c["greedy_match"]
        match = ("exact" if mt["exact"] else
                 f"{mt['token_match_fraction']:.1%} tokens, "
                 f"{mt['sequence_match_fraction']:.0%} seqs")
        lines.append(
            f"| {c['name']} | {c['batch']} | {lens_s} | {c['new_tokens']} "
            f"| {c['engine_tok_s_median']:.1f} | {c['hf_tok_s_median']:.1f} "
            f"| {c['ratio_engine_over_hf']:.2f}x | {match} |")
    lines += ["", "Tokens/s = generated tokens / wall time of the whole call (prefill "
              "included). Generated by `python benchmarks/engine_throughput.py`; raw "
              "timings in `engine_throughput.json`.", ""]
    path.write_text("\n".join(lines))


# -- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Shape()
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per side (3; 1 "
                   "with --quick)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help=f"where results go ({DEFAULT_OUT_DIR}; a temp dir with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model and cases (smoke test)")
    p.add_argument("--model", type=Path, default=None,
                   help="local HF checkpoint dir (default: a generated random Llama)")
    p.add_argument("--workdir", type=Path,
                   default=Path(tempfile.gettempdir()) / "pdserve-bench",
                   help="cache dir for the generated checkpoint")
    p.add_argument("--hf-attn", choices=("sdpa", "eager"), default="sdpa",
                   help="attn_implementation of the HF model")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both sides (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompt lengths and ids")
    p.add_argument("--profile", action="store_true",
                   help="cProfile one extra engine run per case and record the top functions")
    p.add_argument("--batch", type=int, default=16, help="batch size of the mixed case")
    p.add_argument("--batch-new-tokens", type=int, default=64,
                   help="new tokens per request in the mixed case")
    p.add_argument("--min-len", type=int, default=16, help="shortest prompt of the mixed case")
    p.add_argument("--max-len", type=int, default=256, help="longest prompt of the mixed case")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--max-pos", type=int, default=d.max_pos)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    if reps < 1:
        raise SystemExit("--reps must be >= 1")
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="engine_throughput-"))
                               if args.quick else DEFAULT_OUT_DIR)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model is not None:
        model_path = args.model.expanduser().resolve()
        label = str(model_path)
    else:
        shape = QUICK_SHAPE if args.quick else Shape(
            args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab,
            args.max_pos)
        model_path = make_checkpoint(args.workdir, shape)
        label = f"random {shape.dirname}"
    info = read_model_info(model_path)
    vocab = int(info["vocab_size"])
    cases = make_cases(args.quick, args.seed, args.batch, args.batch_new_tokens, args.min_len,
                       args.max_len)

    log(f"loading engine and HF model from {model_path} "
        f"(threads={torch.get_num_threads()}, hf_attn={args.hf_attn})")
    engine = EngineSide(model_path, cases)
    hf = HFSide(model_path, args.hf_attn)
    log(f"loaded: engine {engine.load_s:.1f}s, hf {hf.load_s:.1f}s")

    results = []
    for ci, case in enumerate(cases):
        prompts = make_prompts(case, vocab, args.seed + 1000 + ci)
        log(f"case {case.name}: batch {case.batch}, prompt lens {list(case.prompt_lens)}, "
            f"{case.new_tokens} new tokens")
        warm = min(case.new_tokens, 8)
        engine.run(prompts, warm)
        hf.run(prompts, warm)
        eng_s, hf_s = [], []
        eng_toks = hf_toks = None
        for r in range(reps):
            t, toks = engine.run(prompts, case.new_tokens)
            assert sum(map(len, toks)) == case.generated, "engine produced a wrong token count"
            eng_s.append(t)
            eng_toks = eng_toks or toks
            t2, toks2 = hf.run(prompts, case.new_tokens)
            assert sum(map(len, toks2)) == case.generated, "HF produced a wrong token count"
            hf_s.append(t2)
            hf_toks = hf_toks or toks2
            log(f"  rep {r + 1}/{reps}: engine {t:.2f}s ({case.generated / t:.1f} tok/s), "
                f"hf {t2:.2f}s ({case.generated / t2:.1f} tok/s)")
        eng_tps = [case.generated / t for t in eng_s]
        hf_tps = [case.generated / t for t in hf_s]
        em, hm = statistics.median(eng_tps), statistics.median(hf_tps)
        match = compare(eng_toks, hf_toks)
        res = {
            "name": case.name, "batch": case.batch, "prompt_lens": list(case.prompt_lens),
            "new_tokens": case.new_tokens, "generated_tokens": case.generated,
            "engine_s": eng_s, "hf_s": hf_s, "engine_tok_s": eng_tps, "hf_tok_s": hf_tps,
            "engine_tok_s_median": em, "hf_tok_s_median": hm,
            "engine_tok_s_best": max(eng_tps), "hf_tok_s_best": max(hf_tps),
            "ratio_engine_over_hf": em / hm, "greedy_match": match,
        }
        log(f"  median: engine {em:.1f} tok/s, hf {hm:.1f} tok/s, ratio {em / hm:.2f}x; "
            f"greedy match: exact={match['exact']} tokens={match['token_match_fraction']:.1%}")
        if args.profile:
            log("  profiling one engine run (cProfile)")
            res["engine_profile"] = profile_engine(engine, prompts, case.new_tokens)
            for row in res["engine_profile"]["top_by_tottime"][:10]:
                log(f"    {row['tottime_s']:8.3f}s {row['calls']:7d}  {row['function']}")
        results.append(res)

    engine_cfg = dataclasses.asdict(engine.config)
    engine_cfg["model"] = str(engine_cfg["model"])
    report = {
        "benchmark": "engine_throughput",
        "machine": machine_info(),
        "config": {
            "model_path": str(model_path), "model_label": label, "model_info": info,
            "reps": reps, "quick": args.quick, "seed": args.seed, "hf_attn": args.hf_attn,
            "engine_config": engine_cfg, "pad_id": PAD_ID,
            "hf_generate": {"do_sample": False, "eos_token_id": None, "padding": "left",
                            "min_new_tokens": "= max_new_tokens"},
            "warmup": "one short run (min(new_tokens, 8)) per side per case",
            "load_s": {"engine": engine.load_s, "hf": hf.load_s},
        },
        "cases": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engine_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(out_dir / "engine_throughput.md", report)
    log(f"wrote {out_dir / 'engine_throughput.json'} and {out_dir / 'engine_throughput.md'}")
    print((out_dir / "engine_throughput.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
