"""Weight memory of one tensor-parallel rank at tp 1, 2 and 4: tensor bytes and RSS.

Each rank's load runs in a fresh process (``--child``) that reads only its shard of a
random Llama-shaped checkpoint (hidden 1024, 16 heads, 8 KV heads, MLP 2816, 8 layers,
vocab 32000: 155 M parameters, 620 MB in float32, saved as several safetensors files)
through the engine's loader, and reports:

* ``tensor_bytes``: the bytes of the weight tensors the rank holds;
* ``rss_delta``: growth of the process's resident memory over the load, split into
  anonymous memory (copies: the fused q/k/v and gate/up, sliced reads) and file-backed
  pages (safetensors hands out tensors that are views of its memory map when no copy is
  needed; those stay mapped, and resident, for as long as the weights live);
* ``peak_delta``: growth of the high-water mark (``VmHWM``) over the load, which includes
  the transient copies made while fusing q/k/v and gate/up.

It also prices the alternative of replicating the embedding and LM head on every rank
(vLLM, and this engine, split them by vocabulary). No process group is needed: loading is
per rank. About a minute on 2 cores; run it under the shared lock:

    flock /tmp/pdserve-ray.lock python benchmarks/tp_weight_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
             tie_word_embeddings=False)
DEGREES = (1, 2, 4)


def status_kib() -> dict[str, int]:
    """The memory lines of /proc/self/status, in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def child(path: str, tp: int, rank: int) -> dict:
    import torch

    from pdserve.engine.model_config import ModelConfig
    from pdserve.engine.parallel.shard import TPShard
    from pdserve.engine.weights import load_weights

    config = ModelConfig.from_pretrained(path)
    shard = TPShard.for_rank(config, tp, rank)
    before = status_kib()
    weights = load_weights(path, config, torch.float32, shard=shard)
    after = status_kib()
    return {"tp": tp, "rank": rank, "tensor_bytes": weights.nbytes,
            "embed_and_head_bytes": weights.embed.nbytes + weights.lm_head.nbytes,
            "rss_delta": (after["VmRSS"] - before["VmRSS"]) * 1024,
            "rss_anon_delta": (after["RssAnon"] - before["RssAnon"]) * 1024,
            "rss_file_delta": (after["RssFile"] - before["RssFile"]) * 1024,
            "peak_delta": (after["VmHWM"] - before["VmRSS"]) * 1024}


def make_checkpoint(path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    model.save_pretrained(path, max_shard_size="200MB")


def run(path: Path) -> dict:
    ranks = []
    for tp in DEGREES:
        for rank in range(tp):
            out = subprocess.run([sys.executable, __file__, "--child", str(path), str(tp),
                                  str(rank)], check=True, capture_output=True, text=True)
            ranks.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"tp {tp} rank {rank}: {ranks[-1]['tensor_bytes'] / 2**20:.1f} MiB",
                  file=sys.stderr)
    full = next(r for r in ranks if r["tp"] == 1)
    rows = []
    for tp in DEGREES:
        mine = [r for r in ranks if r["tp"] == tp]
        worst = max(mine, key=lambda r: r["tensor_bytes"])
        # Replicating the embedding and LM head would put all of them on every rank.
        replicated = worst["tensor_bytes"] - worst["embed_and_head_bytes"] \
            + full["embed_and_head_bytes"]
        rows.append({
            "tp": tp,
            "tensor_bytes_max_rank": worst["tensor_bytes"],
            "share_of_tp1": worst["tensor_bytes"] / full["tensor_bytes"],
            "rss_delta_max_rank": max(r["rss_delta"] for r in mine),
            "rss_anon_delta_max_rank": max(r["rss_anon_delta"] for r in mine),
            "rss_file_delta_max_rank": max(r["rss_file_delta"] for r in mine),
            "peak_delta_max_rank": max(r["peak_delta"] for r in mine),
            "replicated_embed_head_bytes": replicated,
            "replicated_share_of_tp1": replicated / full["tensor_bytes"],
        })
    return {"model": SHAPE, "dtype": "float32", "ranks": ranks, "summary": rows}


def markdown(result: dict) -> str:
    mib = 2 ** 20
    lines = [
        "# Weight memory per tensor-parallel rank",
        "",
        "Random Llama-shaped checkpoint (hidden 1024, 16 heads, 8 KV heads, MLP 2816, 8 layers,",
        "vocab 32000; 155 M parameters, float32, 4 safetensors files), each rank loaded alone in",
        "a fresh process through `engine/weights.py` (sliced reads). Largest rank shown. Made by",
        "`benchmarks/tp_weight_memory.py`.",
        "",
        "| tp | tensors (MiB) | share of tp 1 | RSS growth (MiB) | of it anon / file-backed "
        "| peak growth (MiB) | with replicated embed + LM head (MiB, share of tp 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = result["summary"]
    full = next(r for r in result["ranks"] if r["tp"] == 1)
    vocab_share = full["embed_and_head_bytes"] / full["tensor_bytes"]
    for r in rows:
        lines.append(
            f"| {r['tp']} | {r['tensor_bytes_max_rank'] / mib:.1f} | {r['share_of_tp1']:.3f} "
            f"| {r['rss_delta_max_rank'] / mib:.1f} "
            f"| {r['rss_anon_delta_max_rank'] / mib:.1f} / {r['rss_file_delta_max_rank'] / mib:.1f} "
            f"| {r['peak_delta_max_rank'] / mib:.1f} "
            f"| {r['replicated_embed_head_bytes'] / mib:.1f} "
            f"({r['replicated_share_of_tp1']:.3f}) |")
    lines += [
        "",
        "- A rank's tensors are exactly 1/tp of the model's plus its copy of the norms (and",
        "  the zero rows padding the last vocabulary share, none here).",
        "- At tp 1 safetensors hands out views of its memory map (no copy); pages not yet",
        "  touched (most of the embedding) are not resident until used, hence RSS below the",
        "  tensor bytes. At tp > 1 a rank owns copies of its slices (a view would keep the file",
        "  mapped, and every page touched reading a column slice resident), so its RSS is its",
        "  tensor bytes plus allocator slack.",
        "- Peak growth includes the unfused q/k/v and gate/up, held until they are fused.",
        f"- Replicating the embedding and LM head (no vocabulary split) would leave rank memory "
        f"at {rows[-1]['replicated_share_of_tp1']:.0%} of tp 1 at tp {rows[-1]['tp']} instead "
        f"of {rows[-1]['share_of_tp1']:.0%}: embedding and LM head are {vocab_share:.0%} of this "
        "model's weights (Llama-3.2-1B: 21%, tied; Llama-3-8B: 13%, where replication would "
        "cost a tp 4 rank 1.6 GB in bf16 on top of its 4.0 GB).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=3, metavar=("PATH", "TP", "RANK"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "tp_weight_memory")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    with tempfile.TemporaryDirectory(prefix="tp-weight-memory-") as tmp:
        make_checkpoint(Path(tmp) / "llama")
        result = run(Path(tmp) / "llama")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
