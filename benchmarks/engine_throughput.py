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

The checkpoint and cases are made in ``engine_throughput_setup.py``, the two sides timed in
``engine_throughput_sides.py``, the report written by ``engine_throughput_report.py``;
this file is the command line and the interleaved repetitions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from pdserve.cluster.cli.progress import bar, is_terminal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not is_terminal():  # transformers' own bars (save, load) would put carriage returns in a log
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from pdserve.benchmarks.engine_throughput_report import machine_info, write_markdown  # noqa: E402
from pdserve.benchmarks.engine_throughput_setup import (  # noqa: E402
    QUICK_SHAPE,
    Case,
    Shape,
    log,
    make_cases,
    make_checkpoint,
    make_prompts,
    read_model_info,
)
from pdserve.benchmarks.engine_throughput_sides import (  # noqa: E402
    PAD_ID,
    EngineSide,
    HFSide,
    compare,
    profile_engine,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"


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


def run_case(case: Case, prompts: list[list[int]], engine: EngineSide, hf: HFSide, reps: int,
             profile: bool) -> dict:
    """Warm both sides up, then ``reps`` interleaved timed runs (engine, hf, engine, ...);
    the case's row of the report."""
    warm = min(case.new_tokens, 8)
    engine.run(prompts, warm)
    hf.run(prompts, warm)
    eng_s, hf_s = [], []
    eng_toks = hf_toks = None
    for r in bar(range(reps), desc=f"[engine_throughput] {case.name}", unit="rep"):
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
    if profile:
        log("  profiling one engine run (cProfile)")
        res["engine_profile"] = profile_engine(engine, prompts, case.new_tokens)
        for row in res["engine_profile"]["top_by_tottime"][:10]:
            log(f"    {row['tottime_s']:8.3f}s {row['calls']:7d}  {row['function']}")
    return res


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
        results.append(run_case(case, prompts, engine, hf, reps, args.profile))

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
