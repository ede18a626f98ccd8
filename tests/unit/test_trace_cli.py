"""``pdserve simulate`` and ``pdserve bench`` read Mooncake and ShareGPT files through the
same trace-spec path as the CSVs; ShareGPT lengths come from the named tokenizer."""

from __future__ import annotations

import json

import pytest

from pdserve.cluster.cli import bench_commands, sim_commands
from pdserve.cluster.cli.main import main
from pdserve.engine.tokenizer import Tokenizer

PROMPTS = ("The weather today is fine and the cache is warm",
           "How does a prefill worker hand its KV cache to a decode worker?")
REPLIES = ("Good to hear", "It writes the blocks the decode worker reserved, layer by layer")


@pytest.fixture
def sharegpt(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([
        {"id": str(i), "conversations": [{"from": "human", "value": p},
                                         {"from": "gpt", "value": r}]}
        for i, (p, r) in enumerate(zip(PROMPTS, REPLIES, strict=True))]))
    return path


@pytest.fixture
def mooncake(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(
        {"timestamp": 500 * i, "input_length": 600 + i, "output_length": 20,
         "hash_ids": [0, 1 + i]}) for i in range(6)) + "\n")
    return path


def test_bench_spec_counts_sharegpt_tokens_with_the_tokenizer(sharegpt, demo_model_dir):
    tok = Tokenizer.from_pretrained(demo_model_dir)
    t = bench_commands.load_trace_spec(str(sharegpt), (1, 1), (1, 1), seed=4,
                                       tokenizer=str(demo_model_dir), trace_rate=3.0)
    assert [r.prompt_len for r in t.requests] == [
        len(tok.encode(p, add_special_tokens=False)) for p in PROMPTS]
    assert [r.output_len for r in t.requests] == [
        len(tok.encode(r, add_special_tokens=False)) for r in REPLIES]
    assert [r.prompt_text for r in t.requests] == list(PROMPTS)
    again = bench_commands.load_trace_spec(str(sharegpt), (1, 1), (1, 1), seed=5,
                                           tokenizer=str(demo_model_dir), trace_rate=3.0)
    assert again.requests[1].arrival_s != t.requests[1].arrival_s  # the seed draws arrivals
    one = bench_commands.load_trace_spec(str(sharegpt), (1, 1), (1, 1),
                                         tokenizer=str(demo_model_dir), max_requests=1)
    assert len(one) == 1


def test_bench_spec_reads_mooncake(mooncake):
    t = bench_commands.load_trace_spec(str(mooncake), (1, 1), (1, 1))
    assert len(t) == 6 and t.duration_s == pytest.approx(2.5)
    assert t.requests[3].prefix_hashes == (0, 4)


def test_simulate_reads_both_formats(mooncake, sharegpt, demo_model_dir, capsys, tmp_path):
    common = ["--slo-ttft", "1", "--slo-tpot", "0.2", "--rate", "2"]
    assert main(["simulate", "--trace", str(mooncake), *common,
                 "--out", str(tmp_path / "mc.json")]) == 0
    assert json.loads((tmp_path / "mc.json").read_text())["requests"] == 6
    assert main(["simulate", "--trace", str(sharegpt), "--tokenizer", str(demo_model_dir),
                 "--trace-rate", "5", *common, "--out", str(tmp_path / "sg.json")]) == 0
    out = json.loads((tmp_path / "sg.json").read_text())
    assert (out["trace"], out["requests"]) == ("sg", 2)
    assert sim_commands.load_trace_spec(str(mooncake), 3).requests[0].prefix_hashes


def test_unknown_trace_file_is_a_short_cli_error(tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "y" * 10_000}) + "\n")
    assert main(["simulate", "--trace", str(other), "--rate", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown trace format" in err and len(err) < 400
    assert main(["simulate", "--trace", str(tmp_path / "missing.jsonl"), "--rate", "1"]) == 2
    assert "not found" in capsys.readouterr().err
