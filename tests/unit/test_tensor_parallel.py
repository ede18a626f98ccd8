"""Tensor parallelism on CPU: tp 2 and tp 4 against tp 1 and ``transformers``.

Each group of rank processes (gloo, ``tests/tp_harness.py``) runs ``tests/tp_scenario.py``
on every checkpoint: a prefill with logits at every position, then a mixed batch of decodes
and a chunked prefill for ten steps, KV scattered over non-contiguous blocks. The logits of
every step must match tp 1 within 1e-4 (float32), the tokens must be those of
``transformers`` ``generate``, and each rank's cache must hold exactly its KV heads, equal
to that slice of the tp 1 cache. The checkpoints: the TP demo models (4 KV heads, sharded
files), the tiny test checkpoints (2 KV heads, one file), which at tp 4 replicate each KV
head on two ranks, and a tiny Llama with attention biases (o_proj's is added once, after
the all-reduce). Two groups are started for the whole file (tp 2, tp 4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from pdserve.engine.demo_tp_model import TP_DEMO_ARCHS, create_tp_demo_model
from pdserve.engine.parallel.group import TPGroup
from pdserve.engine.parallel.shard import kv_head_range
from tests.conftest import ARCHS, save_tiny_checkpoint
from tests.tp_harness import run_ranks
from tests.tp_scenario import DECODE_STEPS, scenario

ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory) -> dict[str, str]:
    """name -> path: ``tp-<arch>`` (4 KV heads) and ``tiny-<arch>`` (2 KV heads)."""
    root = tmp_path_factory.mktemp("tp-demo")
    out = {f"tp-{a}": str(create_tp_demo_model(a, root / a)) for a in TP_DEMO_ARCHS}
    out |= {f"tiny-{a}": str(tiny_checkpoints[a]) for a in ARCHS}
    out["bias-llama"] = str(save_tiny_checkpoint("llama", root / "bias", attention_bias=True))
    return out


@pytest.fixture(scope="module")
def runs(checkpoints) -> dict[int, list[dict]]:
    """tp -> every rank's results (tp 1 in this process)."""
    paths = list(checkpoints.values())
    out = {1: [scenario(None, paths)]}
    for tp in (2, 4):
        out[tp] = run_ranks(scenario, tp, paths)
    return out


NAMES = [f"{kind}-{a}" for kind in ("tp", "tiny") for a in ARCHS] + ["bias-llama"]
CASES = [(name, tp) for name in NAMES for tp in (2, 4)]


@pytest.mark.parametrize("name, tp", CASES)
def test_every_step_matches_tp1(name, tp, runs, checkpoints):
    path = checkpoints[name]
    want, got = runs[1][0][path], runs[tp][0][path]
    assert got["generated"] == want["generated"]
    assert len(got["steps"]) == len(want["steps"]) == DECODE_STEPS + 2
    for i, (g, w) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        assert g.shape == w.shape, i
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=0, err_msg=f"step {i}")
    assert all(not r[path]["got_logits"] for r in runs[tp][1:])  # only rank 0 has logits


@pytest.mark.parametrize("name, tp", CASES)
def test_each_rank_caches_only_its_kv_heads(name, tp, runs, checkpoints):
    path = checkpoints[name]
    whole = runs[1][0][path]["kv_a"]  # [k/v, blocks, block_size, heads, head_dim]
    heads = whole.shape[3]
    for rank, result in enumerate(runs[tp]):
        mine = kv_head_range(heads, tp, rank)
        assert result[path]["kv_heads"] == (mine.start, mine.stop)
        assert result[path]["cache_heads"] == len(mine)
        np.testing.assert_allclose(result[path]["kv_a"], whole[:, :, :, mine.start:mine.stop],
                                   atol=ATOL, rtol=0)
    if name.startswith(("tiny", "bias")) and tp == 4:  # 2 KV heads over 4 ranks: each held twice
        assert [r[path]["kv_heads"] for r in runs[tp]] == [(0, 1), (0, 1), (1, 2), (1, 2)]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_equal_transformers_generate(name, runs, checkpoints):
    path = checkpoints[name]
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, local_files_only=True).eval()
    result = runs[1][0][path]
    for seq, prompt in result["prompts"].items():
        new = len(result["generated"][seq])
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False)[0, len(prompt):].tolist()
        for tp in (2, 4):
            assert runs[tp][0][path]["generated"][seq] == want, (seq, tp)


def _all_reduce_outcome(group: TPGroup) -> str:
    try:
        group.all_reduce_(torch.ones(4))
    except RuntimeError as exc:
        return f"raised {type(exc).__name__}"
    return "no error"


def _dies(group: TPGroup, rank_to_die: int) -> str:
    import os

    if group.rank == rank_to_die:
        os._exit(3)
    return _all_reduce_outcome(group)


def test_a_rank_that_dies_fails_the_group_instead_of_hanging():
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] died"):
        run_ranks(_dies, 2, 1, timeout_s=60, collective_timeout_s=10, preload=(__name__,))


def _peer_leaves(group: TPGroup) -> str:
    import time

    if group.rank == 1:
        group.close()  # what a dead rank's sockets do: closed by the kernel
        return "left"
    time.sleep(0.5)
    return _all_reduce_outcome(group)


def test_a_collective_with_a_departed_rank_raises():
    """What restarting an instance as a group relies on: a survivor's next collective
    raises rather than hangs (a closed peer is seen at once; ``timeout_s`` bounds the rest)."""
    assert run_ranks(_peer_leaves, 2, timeout_s=60, collective_timeout_s=30,
                     preload=(__name__,)) == ["raised RuntimeError", "left"]
