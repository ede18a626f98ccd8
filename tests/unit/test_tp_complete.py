"""``pdserve complete --tp N``: rank 0 in the CLI's process, the other ranks spawned on this
host (``engine/parallel/local_instance.py``); greedy output equals tp 1's, and the child
processes are gone afterwards. A hang is bounded by the instance's own timeouts (joining
and every collective: 120 s)."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from pdserve.cluster.cli.main import main
from pdserve.engine.demo_tp_model import create_tp_demo_model


@pytest.fixture(scope="module")
def tp_qwen2(tmp_path_factory) -> str:
    return str(create_tp_demo_model("qwen2", tmp_path_factory.mktemp("tp") / "qwen2"))


def _complete(capsys, path: str, tp: int) -> str:
    rc = main(["complete", "a b c", "--model", path, "--device", "cpu", "--max-tokens", "12",
               "--tp", str(tp)])
    assert rc == 0
    return capsys.readouterr().out


def test_complete_at_tp2_prints_what_tp1_prints(capsys, tp_qwen2):
    want = _complete(capsys, tp_qwen2, 1)
    assert "[12 tokens" in want
    assert _complete(capsys, tp_qwen2, 2) == want
    assert not mp.active_children()  # the follower was reaped
