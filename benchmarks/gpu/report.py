"""Merge the GPU benchmarks' JSON files into one results JSON + Markdown, device named.

    python benchmarks/gpu/report.py --out "$OUT" /tmp/pdserve-gpu/results
    python benchmarks/gpu/report.py --out benchmarks/results --stem auto \
        call1/gpu_results.json call2/gpu_results.json       # several device calls

Inputs are directories (every ``*.json`` in them, plus ``pytest.xml`` if present) or
files: per-benchmark files (``{"benchmark": name, ...}``) or earlier merged
``gpu_results.json`` files (their ``benchmarks`` are taken over); a later input wins
for the same benchmark. Writes ``<stem>.json`` (every benchmark's full record under
``benchmarks``, the acceptance table under ``acceptance``) and ``<stem>.md``.
``--stem auto`` names them after the device (``gpu_nvidia_h100_80gb_hbm3``), which is
how results are committed under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def load_inputs(paths: list[Path]) -> dict[str, dict]:
    benches: dict[str, dict] = {}

    def take(doc: dict) -> None:
        if "benchmarks" in doc and isinstance(doc["benchmarks"], dict):
            benches.update(doc["benchmarks"])
        elif "benchmark" in doc:
            benches[doc["benchmark"]] = doc

    for p in paths:
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            try:
                take(json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                print(f"skipping {f}: {exc}", file=sys.stderr)
        xml = p / "pytest.xml" if p.is_dir() else None
        if xml is not None and xml.is_file():
            benches["gpu_tests"] = pytest_summary(xml)
    return benches


def pytest_summary(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                                 "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {"benchmark": "gpu_tests", **total,
            "passed": total["failures"] == 0 and total["errors"] == 0 and total["tests"] > 0,
            "failed_tests": failed}


def device_names(benches: dict[str, dict]) -> list[str]:
    names = []
    for b in benches.values():
        d = b.get("device", {})
        if isinstance(d, dict) and d.get("device") and d["device"] not in names:
            names.append(d["device"])
    return names


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def _get(d: dict | None, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _shape(rec: dict | None) -> str:
    return "not run" if not rec else str(rec.get("shape", "?"))


def _backend(rec: dict | None, key: str = "backend") -> str:
    return "cuda_ipc" if not rec else str(rec.get(key, "?"))


def _eager_pct(r: dict) -> str:
    """`` (eager X%)`` where a row has an eager comparison, else nothing."""
    e = r.get("eager")
    return f" (eager {_pct(e['fraction_of_floor'])})" if isinstance(e, dict) else ""


def _capture(rec: dict | None) -> str:
    c = (rec or {}).get("graph_capture") or _get(rec, "engine", "graph_capture")
    if not c:
        return "no CUDA graphs captured"
    return (f"{len(c['sizes'])} decode CUDA graphs (batch {c['sizes'][0]}..{c['sizes'][-1]}) "
            f"captured in {c['seconds']:.2f} s, {c['free_bytes_used'] / 2**20:.0f} MiB of device "
            f"memory ({c['torch_reserved_bytes'] / 2**20:.0f} MiB in torch's pool)")


def acceptance(b: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []

    def row(check: str, measured: str, goal: str, passed) -> None:
        rows.append({"check": check, "measured": measured, "goal": goal,
                     "result": "not run" if passed is None else ("pass" if passed else "FAIL")})

    t = b.get("gpu_tests")
    row("GPU tests (pytest -m gpu tests/gpu)",
        "-" if t is None else f"{t['tests']} tests, {t['failures'] + t['errors']} failed, "
                              f"{t['skipped']} skipped",
        "all pass", None if t is None else t["passed"])
    a = _get(b, "attention_correctness", "acceptance")
    row("FlashInfer vs torch reference (bf16/fp16, GQA, paged)",
        "-" if a is None else f"max rel err {a['attention_rel_err_max']:.2e}, NaN {a['nan_total']}",
        "rel err < 1e-2, no NaN", None if a is None else a["passed"])
    m = _get(b, "model_vs_hf", "acceptance")
    row(f"Whole-model logits + greedy vs transformers ({_shape(b.get('model_vs_hf'))})",
        "-" if m is None else (
            f"prefill rel vs HF bf16 {m['worst_prefill_rel_engine_vs_hf_bf16']:.2e}; "
            f"greedy {m['greedy_identical']}/{m['greedy_total']} identical, "
            f"{m['greedy_close']} close"),
        "within bf16 tolerance" if m is None else m["logits_criterion"],
        None if m is None else m["passed"])
    p = _get(b, "pd_vs_colocated", "acceptance")
    row(f"Disaggregated greedy (2 processes, {_backend(b.get('pd_vs_colocated'), 'kv_backend')}) "
        "== single-process engine",
        "-" if p is None else str(p["disaggregated_equals_single_process"]), "equal",
        None if p is None else p["passed"])
    d = b.get("decode_floor")
    ctx = d["rows"][0]["context"] if d and d.get("rows") else "?"
    row(f"Decode step vs bandwidth floor ({_shape(d)}, context {ctx})",
        "-" if not d else ", ".join(f"B{r['batch']}: {_pct(r['fraction_of_floor'])}"
                                    f"{_eager_pct(r)}" for r in d["rows"])
        + (f" (CUDA graphs: {d.get('cuda_graphs')})" if d else ""),
        ">= 70% at batch 64", None if not d else d["acceptance"]["passed"])
    f = b.get("prefill_flops")
    row(f"Prefill FLOP/s vs bf16 matmul ({_shape(f)})",
        "-" if not f else ", ".join(f"{k}: {_pct(v)}" for k, v in
                                    f["acceptance"]["fractions"].items()),
        ">= 50%", None if not f else f["acceptance"]["passed"])
    h = b.get("vs_hf_generate")
    row(f"Tokens/s vs transformers generate ({_shape(h)})",
        "-" if not h else ", ".join(
            f"B{r['batch']}: {r['ratio_engine_over_hf']:.2f}x"
            + (f" (eager {r['ratio_eager_over_hf']:.2f}x)" if "ratio_eager_over_hf" in r else "")
            for r in h["rows"]),
        ">= 3x at batch 32", None if not h else h["acceptance"]["passed"])
    c = b.get("cuda_ipc_bandwidth")
    row(f"KV transfer between processes vs device copy ({_backend(c)})",
        "-" if not c else ", ".join(f"{k} tok: {_pct(v)}" for k, v in
                                    c["acceptance"]["fractions"].items()),
        ">= 60%", None if not c else c["acceptance"]["passed"])
    return rows


def markdown(benches: dict[str, dict], accept: list[dict]) -> str:
    names = device_names(benches)
    dev = next((x.get("device") for x in benches.values() if isinstance(x.get("device"), dict)), {})
    out = [f"# pdserve GPU results: {', '.join(names) or 'no device recorded'}", ""]
    if dev:
        out += [f"{dev.get('date_utc', '')} · torch {dev.get('torch')} (CUDA {dev.get('torch_cuda')})"
                f" · transformers {dev.get('transformers')} · flashinfer {dev.get('flashinfer')}"
                f" · {dev.get('sm_count', '?')} SMs · {dev.get('memory_gib', '?')} GiB"
                f" · driver {_get(dev, 'nvidia_smi', 'driver_version', default='?')}", ""]
    if any(b.get("dry_run") for b in benches.values()):
        out += ["**Dry run on the CPU: these numbers check the scripts, they measure nothing "
                "about a GPU.**", ""]
    out += ["## Acceptance", "", "| check | measured | goal | result |", "|---|---|---|---|"]
    out += [f"| {r['check']} | {r['measured']} | {r['goal']} | {r['result']} |" for r in accept]
    d = benches.get("decode_floor")
    if d:
        bw = d["copy_bandwidth"]["rw_bytes_per_s"]
        out += ["", f"## Decode step ({d['shape']}, context {d['rows'][0]['context']}, "
                    f"{d['attention_backend']}, CUDA graphs: {d['cuda_graphs']})", "",
                f"Copy bandwidth (read+write) measured in the same run: {bw / 1e12:.2f} TB/s. "
                f"{_capture(d)}.", "",
                "| batch | graph (padded) | step ms (median) | host launch ms | floor ms | "
                "floor/step | achieved TB/s | tokens/s | eager step ms | eager launch ms | "
                "eager floor/step | graph speed-up | logits max abs diff vs eager |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            e = r.get("eager") or {}
            out.append(f"| {r['batch']} | {r.get('padded_batch') or '-'} | "
                       f"{r['step_s']['median'] * 1e3:.2f} | "
                       f"{r['host_launch_ms']:.2f} | {r['floor_s'] * 1e3:.2f} | "
                       f"{r['fraction_of_floor']:.1%} | {r['achieved_bytes_per_s'] / 1e12:.2f} | "
                       f"{r['tokens_per_s']:.0f} | "
                       + (f"{e['median_s'] * 1e3:.2f} | {e['host_launch_ms']:.2f} | "
                          f"{e['fraction_of_floor']:.1%} | {r['speedup_vs_eager']:.2f}x | "
                          f"{e['logits_max_abs_diff']:.2e} |" if e else "- | - | - | - | - |"))
    f = benches.get("prefill_flops")
    if f:
        peak = f["matmul_ceiling"]["flop_per_s"]
        out += ["", f"## Prefill ({f['shape']})", "",
                f"bf16 {f['matmul_ceiling']['n']}^3 matmul ceiling, same run: {peak / 1e12:.0f} "
                "TFLOP/s.", "",
                "| case | prefill kernels | tokens | step ms | TFLOP/s | of ceiling | tokens/s |",
                "|---|---|---:|---:|---:|---:|---:|"]
        main_backend = f.get("prefill_backend") or "?"
        for r in f["rows"] + f.get("comparison_rows", []):
            label = r.get("prefill_backend") or main_backend
            if r in f.get("comparison_rows", []):
                label += " (comparison, not in the acceptance)"
            out.append(f"| {r['case']} | {label} | {r['tokens']} | "
                       f"{r['step_s']['median'] * 1e3:.1f} | "
                       f"{r['achieved_flop_per_s'] / 1e12:.0f} | {r['fraction_of_matmul']:.1%} | "
                       f"{r['tokens_per_s']:.0f} |")
    h = benches.get("vs_hf_generate")
    if h:
        out += ["", f"## Engine vs transformers generate ({h['shape']}, bf16, greedy)", "",
                f"Engine: CUDA graphs {_get(h, 'engine', 'cuda_graphs')}; {_capture(h)}.", "",
                "| case | prompt | new | engine tok/s | HF tok/s | ratio | greedy token match | "
                "eager engine tok/s | eager ratio | graph vs eager tokens |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in h["rows"]:
            ge = r.get("greedy_match_graph_vs_eager")
            out.append(f"| {r['case']} | {r['prompt_len']} | {r['new_tokens']} | "
                       f"{r['engine_tok_s']:.0f} | {r['hf_tok_s']:.0f} | "
                       f"{r['ratio_engine_over_hf']:.2f}x | "
                       f"{r['greedy_match']['token_match_fraction']:.0%} | "
                       + (f"{r['engine_eager_tok_s']:.0f} | {r['ratio_eager_over_hf']:.2f}x | "
                          f"{ge['token_match_fraction']:.0%} |" if "engine_eager_tok_s" in r
                          else "- | - | - |"))
    c = benches.get("cuda_ipc_bandwidth")
    if c:
        cb = c["copy_bandwidth"]["copy_bytes_per_s"]
        out += ["", f"## KV transfer, {c['backend']}, two processes", "",
                f"Device copy (bytes copied per second), same run: {cb / 1e9:.0f} GB/s.", "",
                "| tokens | MiB | median ms | GB/s | of copy | in-process scatter GB/s |",
                "|---:|---:|---:|---:|---:|---:|"]
        for r in c["rows"]:
            out.append(f"| {r['tokens']} | {r['bytes'] / 2**20:.0f} | {r['median_s'] * 1e3:.2f} | "
                       f"{r['bytes_per_s'] / 1e9:.0f} | {r['fraction_of_copy']:.1%} | "
                       f"{r['in_process_scatter_bytes_per_s'] / 1e9:.0f} |")
        variants = [r for r in c["rows"] if isinstance(r.get("in_process"), dict)]
        if variants:
            names = [k for k, v in variants[0]["in_process"].items() if isinstance(v, dict)]
            out += ["", "The same per-layer copies inside one process (device time, GB/s):", "",
                    "| tokens | " + " | ".join(names) + " |",
                    "|---:|" + "---:|" * len(names)]
            for r in variants:
                ip = r["in_process"]
                out.append(f"| {r['tokens']} | " + " | ".join(
                    f"{ip[n]['bytes_per_s'] / 1e9:.0f}" + (f" ({ip[n]['dtype']})"
                                                            if ip[n].get("dtype") else "")
                    for n in names) + " |")
    prof = (c or {}).get("sender_profile")
    if prof:
        out += ["", "Where the sender's time goes (its host clock, medians; "
                    "`cuda_ipc_bandwidth.py --profile`):", "",
                "| tokens | sends | begin ms | sends ms | finish (wait) ms | total ms | "
                "copy launches | stream waits |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for n, modes in prof.items():
            for mode, s in modes.items():
                out.append(f"| {n} | {mode} | {s['begin_s'] * 1e3:.3f} | "
                           f"{s['send_s'] * 1e3:.3f} | {s['finish_s'] * 1e3:.3f} | "
                           f"{s['total_s'] * 1e3:.3f} | {s['copy_launches']} | "
                           f"{s['stream_waits']} |")
        for n, modes in prof.items():
            for mode, s in modes.items():
                tr = s.get("traced")
                if tr:
                    out += ["", f"<details><summary>torch.profiler, {n} tokens, {mode}</summary>",
                            "", "```", tr["host_ops"], tr["device_kernels"], "```", "",
                            "</details>"]
    p = benches.get("pd_vs_colocated")
    if p:
        tr = p["trace"]
        out += ["", f"## One GPU: prefill + decode processes vs one colocated process "
                    f"({p['shape']}, {p['kv_backend']})", "",
                f"Trace: {tr['source']}, {tr['requests']} requests at {tr['offered_rate']:.2f} "
                f"req/s, prompts <= {tr['max_prompt']}, outputs <= {tr['max_output']} tokens.", "",
                p["markdown_table"]]
    a = benches.get("attention_correctness")
    if a:
        out += ["", f"## Attention ({a['backend']} vs {a['reference']})", "",
                "| case | dtype | heads (q/kv) | head_dim | max rel err | NaN | plan ms | "
                "run ms |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in a["cases"]:
            out.append(f"| {r['case']} | {r['dtype']} | {r['heads']}/{r['kv_heads']} | "
                       f"{r['head_dim']} | {r['rel_err_max']:.2e} | {r['nan_count']} | "
                       f"{r.get('plan_ms', float('nan')):.3f} | "
                       f"{r.get('forward_ms', float('nan')):.3f} |")
    out += ["", "Full records: the JSON file of the same name. Methods: docs/performance.md.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stem", default="gpu_results", help="file name stem; 'auto' = by device")
    args = ap.parse_args(argv)
    benches = load_inputs(args.inputs)
    if not benches:
        print("no benchmark results found", file=sys.stderr)
        return 1
    names = device_names(benches)
    stem = args.stem if args.stem != "auto" else "gpu_" + slug(names[0] if names else "unknown")
    accept = acceptance(benches)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"devices": names, "acceptance": accept, "benchmarks": benches}
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = markdown(benches, accept)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
