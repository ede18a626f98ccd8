"""benchmarks/gpu/report.py renders the CUDA-graph and CUDA IPC profile fields: graph and
eager side by side for the decode step and tokens/s, capture time and memory, the sender's
phases; and names the report after the device."""

from __future__ import annotations

import json

from pdserve.benchmarks.gpu import report

DEVICE = {"device": "NVIDIA H200", "torch": "2.11"}
CAPTURE = {"sizes": [1, 2, 4, 8, 16, 32, 64, 128], "seconds": 4.25,
           "free_bytes_used": 300 << 20, "torch_reserved_bytes": 200 << 20}


def decode_row(batch, frac, eager_frac):
    return {"batch": batch, "context": 1024, "step_s": {"median": 0.008}, "host_launch_ms": 0.9,
            "floor_s": 0.0056, "fraction_of_floor": frac, "achieved_bytes_per_s": 3e12,
            "tokens_per_s": batch / 0.008, "cuda_graph": True, "padded_batch": batch,
            "speedup_vs_eager": 2.5,
            "eager": {"median_s": 0.02, "host_launch_ms": 19.0, "fraction_of_floor": eager_frac,
                      "logits_max_abs_diff": 0.03125, "argmax_equal": 1.0,
                      "step_s": {"median": 0.02}}}


def records():
    return {
        "decode_floor": {
            "benchmark": "decode_floor", "device": DEVICE, "shape": "llama3-8b",
            "attention_backend": "flashinfer", "cuda_graphs": True, "graph_capture": CAPTURE,
            "copy_bandwidth": {"rw_bytes_per_s": 4.3e12},
            "rows": [decode_row(1, 0.6, 0.25), decode_row(64, 0.75, 0.32)],
            "acceptance": {"passed": True}},
        "vs_hf_generate": {
            "benchmark": "vs_hf_generate", "device": DEVICE, "shape": "llama3-8b",
            "engine": {"cuda_graphs": True, "graph_capture": CAPTURE},
            "rows": [{"case": "batch32", "batch": 32, "prompt_len": 256, "new_tokens": 128,
                      "engine_tok_s": 3100.0, "hf_tok_s": 1000.0, "ratio_engine_over_hf": 3.1,
                      "greedy_match": {"token_match_fraction": 0.5},
                      "engine_eager_tok_s": 1700.0, "ratio_eager_over_hf": 1.7,
                      "greedy_match_graph_vs_eager": {"token_match_fraction": 0.9}}],
            "acceptance": {"passed": True}},
        "cuda_ipc_bandwidth": {
            "benchmark": "cuda_ipc_bandwidth", "device": DEVICE, "backend": "cuda_ipc",
            "copy_bandwidth": {"copy_bytes_per_s": 2.1e12},
            "rows": [{"tokens": 1024, "bytes": 128 << 20, "median_s": 2e-4,
                      "bytes_per_s": 6.7e11, "fraction_of_copy": 0.32,
                      "in_process_scatter_bytes_per_s": 1.5e12}],
            "sender_profile": {"1024": {
                "per_layer": {"begin_s": 1e-4, "send_s": 3e-4, "finish_s": 1.5e-3,
                              "total_s": 1.9e-3, "copy_launches": 32, "stream_waits": 4,
                              "traced": {"host_ops": "HOST-TABLE", "device_kernels": "KERNELS"}},
                "stacked": {"begin_s": 1e-4, "send_s": 5e-5, "finish_s": 1.2e-3,
                            "total_s": 1.35e-3, "copy_launches": 1, "stream_waits": 1}}},
            "acceptance": {"fractions": {"1024": 0.32}, "passed": False}},
    }


def test_acceptance_shows_graph_and_eager_side_by_side():
    rows = {r["check"].split(" (")[0]: r for r in report.acceptance(records())}
    decode = rows["Decode step vs bandwidth floor"]
    assert "B64: 75.0% (eager 32.0%)" in decode["measured"]
    assert "CUDA graphs: True" in decode["measured"] and decode["result"] == "pass"
    hf = rows["Tokens/s vs transformers generate"]
    assert "B32: 3.10x (eager 1.70x)" in hf["measured"]


def test_markdown_renders_capture_eager_columns_and_the_sender_profile():
    md = report.markdown(records(), report.acceptance(records()))
    assert "8 decode CUDA graphs (batch 1..128) captured in 4.25 s, 300 MiB" in md
    assert "| 64 | 64 | 8.00 | 0.90 | 5.60 | 75.0% |" in md
    assert "| 20.00 | 19.00 | 32.0% | 2.50x | 3.12e-02 |" in md
    assert "| 3100 | 1000 | 3.10x | 50% | 1700 | 1.70x | 90% |" in md
    assert "| 1024 | per_layer | 0.100 | 0.300 | 1.500 | 1.900 | 32 | 4 |" in md
    assert "| 1024 | stacked | 0.100 | 0.050 | 1.200 | 1.350 | 1 | 1 |" in md
    assert "HOST-TABLE" in md and "KERNELS" in md


def test_records_without_graphs_still_render():
    recs = records()
    d = recs["decode_floor"]
    d.update(cuda_graphs=False, graph_capture=None)
    for r in d["rows"]:
        del r["eager"], r["speedup_vs_eager"]
    md = report.markdown(recs, report.acceptance(recs))
    assert "no CUDA graphs captured" in md and "| - | - | - | - | - |" in md


def test_the_report_is_named_after_the_device(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name, rec in records().items():
        (src / f"{name}.json").write_text(json.dumps(rec))
    assert report.main(["--out", str(tmp_path / "out"), "--stem", "auto", str(src)]) == 0
    assert (tmp_path / "out" / "gpu_nvidia_h200.md").is_file()
    assert json.loads((tmp_path / "out" / "gpu_nvidia_h200.json").read_text())["devices"] == \
        ["NVIDIA H200"]
