"""Mooncake JSONL and ShareGPT JSON loaders, their validation, and format detection.

The published files are not here: each test writes the few rows it needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.workloads.formats import detect_format, load_trace
from pdserve.workloads.mooncake import load_mooncake_jsonl
from pdserve.workloads.sharegpt import ShareGPTOptions, load_sharegpt_json
from pdserve.workloads.synthetic import arrival_times
from pdserve.workloads.trace import Trace, TraceRequest


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def mooncake_file(tmp_path: Path) -> Path:
    # Out of order in time, two rows at the same instant, one with no output.
    return write_jsonl(tmp_path / "mooncake.jsonl", [
        {"timestamp": 3052, "input_length": 2287, "output_length": 316,
         "hash_ids": [0, 42, 43, 44, 45]},
        {"timestamp": 1000, "input_length": 6755, "output_length": 500,
         "hash_ids": list(range(14))},
        {"timestamp": 1000, "input_length": 7319, "output_length": 490,
         "hash_ids": [0, *range(14, 28)]},
        {"timestamp": 2000.5, "input_length": 512, "output_length": 0, "hash_ids": [99]},
        "",
        {"timestamp": 4000, "input_length": 100, "output_length": 7},  # no hash_ids
    ])


def test_mooncake_loader_keeps_hashes_and_rebases(tmp_path):
    t = load_mooncake_jsonl(mooncake_file(tmp_path))
    assert t.name == "mooncake"
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in t.requests] == [
        (0.0, 6755, 500), (0.0, 7319, 490), (2.052, 2287, 316), (3.0, 100, 7)]
    assert t.requests[0].prefix_hashes == tuple(range(14))
    assert t.requests[1].prefix_hashes[:2] == (0, 14)
    assert t.requests[2].prefix_hashes == (0, 42, 43, 44, 45)
    assert t.requests[3].prefix_hashes == ()
    assert {r.prefix_block_size for r in t.requests} == {512}
    assert all(r.prompt_text is None for r in t.requests)


def test_mooncake_accepts_either_block_count_convention(tmp_path):
    # 1000 tokens are one full block of 512 and a partial one: 2 ids (the published traces)
    # or 1 (input_length // block_size, as some synthesisers write).
    for ids in ([1, 2], [1]):
        path = write_jsonl(tmp_path / "c.jsonl", [
            {"timestamp": 0, "input_length": 1000, "output_length": 4, "hash_ids": ids}])
        assert load_mooncake_jsonl(path).requests[0].prefix_hashes == tuple(ids)
    small = write_jsonl(tmp_path / "s.jsonl", [
        {"timestamp": 0, "input_length": 40, "output_length": 4, "hash_ids": [5, 6, 7]}])
    assert len(load_mooncake_jsonl(small, block_size=16).requests[0].prefix_hashes) == 3


@pytest.mark.parametrize(("row", "message"), [
    ({"timestamp": 0, "input_length": 1000, "output_length": 4, "hash_ids": [1, 2, 3]},
     "3 hash_ids for input_length 1000: blocks of 512 tokens need 2 \\(or 1\\)"),
    ({"timestamp": 0, "input_length": 1024, "output_length": 4, "hash_ids": [1]},
     "1 hash_ids for input_length 1024: blocks of 512 tokens need 2$"),
    ({"timestamp": 0, "input_length": 12.0, "output_length": 4}, "input_length must be"),
    ({"timestamp": 0, "input_length": "12", "output_length": 4}, "input_length must be"),
    ({"timestamp": 0, "input_length": 12, "output_length": True}, "output_length must be"),
    ({"timestamp": "0", "input_length": 12, "output_length": 4}, "timestamp must be"),
    ({"timestamp": -5, "input_length": 12, "output_length": 4}, "timestamp must be"),
    ({"timestamp": 0, "input_length": 12, "output_length": 4, "hash_ids": [1.0]},
     "hash_ids must be a list of non-negative integers"),
    ({"timestamp": 0, "input_length": 12, "output_length": 4, "hash_ids": 1},
     "hash_ids must be a list"),
    ({"timestamp": 0, "input_length": 12}, "missing keys \\['output_length'\\]"),
    ([0, 12, 4], "expected a JSON object, got list"),
    ("{not json", "not JSON"),
])
def test_mooncake_bad_rows_name_file_and_line(tmp_path, row, message):
    good = {"timestamp": 0, "input_length": 12, "output_length": 4, "hash_ids": [0]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ValueError, match="bad.jsonl:2: ") as err:
        load_mooncake_jsonl(path)
    assert err.match(message)


def sharegpt_entries() -> list[dict]:
    def turn(who: str, text: str) -> dict:
        return {"from": who, "value": text}

    return [
        {"id": "a", "conversations": [turn("human", "one two three"), turn("gpt", "four five"),
                                      turn("human", "ignored"), turn("gpt", "ignored too")]},
        {"id": "b", "conversations": [turn("human", "only a question")]},  # < 2 turns
        {"id": "c", "conversations": []},
        # A leading system turn is passed over; the first human turn and its reply count.
        {"id": "d", "conversations": [turn("system", "be brief"), turn("human", "hi there"),
                                      turn("gpt", "hello")]},
        {"id": "e", "conversations": [turn("gpt", "a reply first"), turn("human", "q"),
                                      turn("human", "q again")]},  # no reply to the question
        {"id": "f", "conversations": [turn("human", "empty answer"), turn("gpt", "")]},
        {"id": "g", "conversations": [turn("user", "six words in this prompt here"),
                                      turn("chatgpt", "three more words")]},
    ]


def words(text: str) -> int:
    return len(text.split())


def test_sharegpt_takes_the_first_exchange_with_poisson_arrivals(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(sharegpt_entries(), indent=2))
    t = load_sharegpt_json(path, ShareGPTOptions(words, rate=4.0, seed=11))
    assert t.name == "sharegpt"
    assert [(r.prompt_text, r.prompt_len, r.output_len) for r in t.requests] == [
        ("one two three", 3, 2), ("hi there", 2, 1), ("six words in this prompt here", 6, 3)]
    assert [r.arrival_s for r in t.requests] == arrival_times(3, 4.0, seed=11)
    assert t.requests[0].arrival_s == 0.0
    # Another seed, other arrivals; the same seed, the same trace.
    assert load_sharegpt_json(path, ShareGPTOptions(words, rate=4.0, seed=12)) != t
    assert load_sharegpt_json(path, ShareGPTOptions(words, rate=4.0, seed=11)) == t
    assert len(load_sharegpt_json(path, ShareGPTOptions(words, max_requests=2))) == 2


def test_sharegpt_arrivals_are_poisson_at_the_rate():
    times = arrival_times(20000, 5.0, seed=3)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    std = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert mean == pytest.approx(0.2, rel=0.05)
    assert std / mean == pytest.approx(1.0, abs=0.05)  # exponential gaps: cv 1


@pytest.mark.parametrize(("content", "message"), [
    ({"conversations": []}, "not a ShareGPT file: expected a JSON list"),
    ([{"id": "x", "turns": []}], "entry 0 \\(id 'x'\\): not a ShareGPT conversation"),
    ([{"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}],
     "entry 0: turn 0 must be an object with string 'from' and 'value'"),
    ([{"conversations": "hi"}], "entry 0: 'conversations' must be a list"),
    ([{"conversations": [{"from": "human", "value": "hi"}]}], "has no usable rows"),
])
def test_sharegpt_validation(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_sharegpt_json(path, ShareGPTOptions(words))


def test_sharegpt_options_validation():
    with pytest.raises(ValueError, match="rate"):
        ShareGPTOptions(words, rate=0)
    with pytest.raises(ValueError, match="max_requests"):
        ShareGPTOptions(words, max_requests=0)


def test_load_trace_detects_json_formats(tmp_path):
    mooncake = mooncake_file(tmp_path)
    assert detect_format(mooncake) == "mooncake"
    assert load_trace(mooncake) == load_mooncake_jsonl(mooncake)
    sharegpt = tmp_path / "conversations.json"
    sharegpt.write_text(json.dumps(sharegpt_entries()))  # one line, as json.dump writes it
    assert detect_format(sharegpt) == "sharegpt"
    opts = ShareGPTOptions(words)
    assert load_trace(sharegpt, opts) == load_sharegpt_json(sharegpt, opts)
    with pytest.raises(ValueError, match="needs? a tokenizer"):
        load_trace(sharegpt)


def test_unknown_format_error_is_short(tmp_path):
    # A JSONL of another shape: its first line is long, the message shows only its start.
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x" * 5000, "n": 1}])
    with pytest.raises(ValueError, match="unknown trace format") as err:
        load_trace(other)
    assert len(str(err.value)) < 300 and "xxxx..." in str(err.value)
    text = tmp_path / "notes.txt"
    text.write_text("just some words\nand more\n")
    with pytest.raises(ValueError, match="unknown trace format \\(starts 'just some words'\\)"):
        load_trace(text)


def test_binary_file_and_long_bad_rows_give_short_errors(tmp_path):
    binary = tmp_path / "trace.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff" * 1000)
    with pytest.raises(ValueError, match="a binary file") as err:
        load_trace(binary)
    assert len(str(err.value)) < 300
    csv = tmp_path / "azure.csv"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                   f"2023-11-16 18:15:46.6805900,{'9' * 5000}x,5\n")
    with pytest.raises(ValueError, match="azure.csv:2: bad row") as err:
        load_trace(csv)
    assert len(str(err.value)) < 400 and "chars)" in str(err.value)


def test_trace_rebased_sorts_stably_and_starts_at_zero():
    reqs = [TraceRequest(5.0, 10, 2, prefix_hashes=(1,)), TraceRequest(3.0, 10, 2),
            TraceRequest(5.0, 10, 2, prefix_hashes=(2,))]
    t = Trace.rebased("r", reqs)
    assert [(r.arrival_s, r.prefix_hashes) for r in t.requests] == [(0.0, ()), (2.0, (1,)),
                                                                    (2.0, (2,))]
    with pytest.raises(ValueError, match="no usable rows"):
        Trace.rebased("r", [])
