"""The synthetic prefix-sharing generator, its Mooncake writer and ``pdserve trace synth-prefix``."""

from __future__ import annotations

import json

import pytest

from pdserve.cluster.cli.main import main
from pdserve.workloads.formats import load_trace
from pdserve.workloads.mooncake import load_mooncake_jsonl, write_mooncake_jsonl
from pdserve.workloads.prefix_sharing import (
    PrefixSharingSpec,
    prefix_sharing_trace,
    reusable_share,
)

SPEC = PrefixSharingSpec(requests=3000, rate=20.0, num_prefixes=5, shared_share=0.7,
                         prefix_tokens=1024, suffix_tokens=(10, 700), output_tokens=(3, 9),
                         seed=7)


def test_same_seed_same_trace_and_another_seed_another():
    assert prefix_sharing_trace(SPEC) == prefix_sharing_trace(SPEC)
    other = PrefixSharingSpec(**{**SPEC.__dict__, "seed": 8})
    assert prefix_sharing_trace(other).requests != prefix_sharing_trace(SPEC).requests


def test_stated_shares_lengths_and_rate():
    tr = prefix_sharing_trace(SPEC)
    owned = SPEC.num_prefixes * SPEC.prefix_blocks  # ids below this belong to prefixes
    shared = [r for r in tr.requests if r.prefix_hashes[0] < owned]
    assert len(shared) / len(tr) == pytest.approx(0.7, abs=0.03)
    used = {r.prefix_hashes[0] for r in shared}
    assert used == {k * SPEC.prefix_blocks for k in range(SPEC.num_prefixes)}
    for r in tr.requests:
        assert 1024 + 10 <= r.prompt_len <= 1024 + 700 and 3 <= r.output_len <= 9
        assert len(r.prefix_hashes) == -(-r.prompt_len // 512)  # every block, partial too
    assert tr.rate == pytest.approx(20.0, rel=0.08)
    assert tr.requests[0].arrival_s == 0.0


def test_ids_are_chained_equal_id_means_equal_prefix():
    tr = prefix_sharing_trace(SPEC)
    pb = SPEC.prefix_blocks
    first_at: dict[int, tuple[int, tuple[int, ...]]] = {}
    for r in tr.requests:
        ids = r.prefix_hashes
        for i, h in enumerate(ids):
            # An id always sits at the same position after the same ids.
            pos, before = first_at.setdefault(h, (i, ids[:i]))
            assert (pos, before) == (i, ids[:i])
        if ids[0] < SPEC.num_prefixes * pb:  # a shared prefix: its block ids, in order
            assert ids[:pb] == tuple(range(ids[0], ids[0] + pb))
    # A request's own blocks are never seen elsewhere.
    own = [h for r in tr.requests for h in r.prefix_hashes if h >= SPEC.num_prefixes * pb]
    assert len(own) == len(set(own))


def test_skew_makes_the_first_prefix_most_popular():
    tr = prefix_sharing_trace(PrefixSharingSpec(**{**SPEC.__dict__, "popularity_skew": 1.5}))
    counts = [sum(1 for r in tr.requests if r.prefix_hashes[0] == k * SPEC.prefix_blocks)
              for k in range(SPEC.num_prefixes)]
    assert counts[0] > 2 * counts[1] > 0 and counts[0] == max(counts)


def test_reusable_share_counts_repeated_leading_blocks():
    tr = prefix_sharing_trace(PrefixSharingSpec(**{**SPEC.__dict__, "shared_share": 1.0,
                                                   "num_prefixes": 1, "requests": 50}))
    total = sum(r.prompt_len for r in tr.requests)
    assert reusable_share(tr) == pytest.approx(49 * 1024 / total)
    none = PrefixSharingSpec(**{**SPEC.__dict__, "shared_share": 0.0, "requests": 50})
    assert reusable_share(prefix_sharing_trace(none)) == 0.0


def test_round_trips_through_the_mooncake_loader(tmp_path):
    tr = prefix_sharing_trace(SPEC)
    path = tmp_path / "p.jsonl"
    write_mooncake_jsonl(tr, path)
    row = json.loads(path.read_text().splitlines()[1])
    assert set(row) == {"timestamp", "input_length", "output_length", "hash_ids"}
    assert isinstance(row["timestamp"], int)  # milliseconds, as Mooncake writes them
    assert load_mooncake_jsonl(path).requests == tr.requests
    assert load_trace(path).requests == tr.requests  # format detected from the content


@pytest.mark.parametrize("bad", [
    {"prefix_tokens": 1000},  # not whole blocks
    {"shared_share": 1.5}, {"num_prefixes": 0}, {"suffix_tokens": (5, 2)},
    {"rate": 0.0}, {"popularity_skew": -1.0},
])
def test_spec_validates(bad):
    with pytest.raises(ValueError):
        PrefixSharingSpec(**{**SPEC.__dict__, **bad})


def test_cli_writes_the_trace(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    rc = main(["trace", "synth-prefix", "--out", str(out), "--requests", "40", "--rate", "5",
               "--prefixes", "3", "--shared-share", "0.5", "--prefix-tokens", "1024",
               "--suffix-tokens", "10-20", "--output-tokens", "4-8", "--seed", "3"])
    assert rc == 0
    spec = PrefixSharingSpec(40, 5.0, 3, 0.5, 1024, (10, 20), (4, 8), 0.0, 512, 3)
    assert load_mooncake_jsonl(out).requests == prefix_sharing_trace(spec).requests
    assert "reusable prompt share" in capsys.readouterr().err
    assert main(["trace", "synth-prefix", "--out", str(out), "--prefix-tokens", "100"]) == 2
