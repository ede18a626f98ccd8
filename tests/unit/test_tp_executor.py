"""Rank 0 drives a tensor-parallel instance: the engine and workers at tp 2 and 4 on gloo.

The step messages' wire form on its own; then the real ``LLMEngine``, ``PrefillWorker``
and ``DecodeWorker`` on rank 0 of a group whose other ranks are processes running
``run_follower`` (``tests/tp_harness.py``), against the same engine at tp 1: greedy tokens
of concurrent requests of mixed lengths, with chunked prefill and (in a small cache)
preemption, must be equal (the decode worker's KV is computed in place by its own
runner, on every rank: the cross-degree transfer is ``test_kv_transfer_tp.py``'s). A failing follower or a departed rank 0 fails the others instead of hanging them.
"""

from __future__ import annotations

import random

import pytest

from pdserve.engine.demo_tp_model import create_tp_demo_model
from pdserve.engine.parallel.step_message import (
    StepInputs,
    StepKind,
    StepSequence,
    decode,
    encode,
)
from tests.tp_engine_scenario import (
    config,
    exchange,
    follower_leaves_when_idle,
    rank_fails,
    rank_main,
    serve_decode,
    serve_engine,
    serve_prefill,
)
from tests.tp_harness import run_ranks

PRELOAD = ("tests.tp_engine_scenario",)


# -- the wire form ------------------------------------------------------------------------
def _msg() -> StepInputs:
    return StepInputs(7, StepKind.RUN, (StepSequence((5, 6, 7), 0, (3, 1), False),
                                        StepSequence((9,), 12, (0, 2, 4, 8), True)), True)


def test_message_round_trips():
    assert decode(encode(_msg()), num_blocks=9, vocab_size=10) == _msg()
    idle = StepInputs(8, StepKind.IDLE)
    assert decode(encode(idle), 1, 1) == idle
    # the worker layer's bytes travel beside the integers; a reply is asked in the header
    run = StepInputs(9, StepKind.RUN, _msg().sequences, extra=b"\x00sends\xff", reply=3)
    assert decode(encode(run), 9, 10, run.extra) == run
    control = StepInputs(10, StepKind.CONTROL, extra=b"register", reply=1)
    assert decode(encode(control), 1, 1, control.extra) == control


def test_only_run_and_control_carry_worker_data():
    with pytest.raises(ValueError, match="carries no extra"):
        StepInputs(0, StepKind.IDLE, extra=b"x")
    with pytest.raises(ValueError, match="carries no extra"):
        StepInputs(0, StepKind.SHUTDOWN, reply=1)


@pytest.mark.parametrize("corrupt, why", [
    (lambda p: p[:-1], "counts say"),
    (lambda p: [*p, 0], "counts say"),
    (lambda p: p[:3], "shorter than its header"),
    (lambda p: [p[0], 99, *p[2:]], "unknown step kind"),
    (lambda p: [*p[:3], 1000, 0], "too short"),
    (lambda p: [*p[:6], -1, *p[7:]], "bad sequence header"),
    (lambda p: [*p[:4], -1, *p[5:]], "reply"),
])
def test_malformed_messages_are_refused(corrupt, why):
    with pytest.raises(ValueError, match=why):
        decode(corrupt(encode(_msg())), num_blocks=9, vocab_size=10)


def test_values_are_checked_against_the_receivers_limits():
    with pytest.raises(ValueError, match="block id"):
        decode(encode(_msg()), num_blocks=8, vocab_size=10)
    with pytest.raises(ValueError, match="vocabulary"):
        decode(encode(_msg()), num_blocks=9, vocab_size=9)
    with pytest.raises(ValueError, match="sequences"):
        StepInputs(0, StepKind.RUN)


# -- the engine and workers at tp 2 and 4 ----------------------------------------------------
@pytest.fixture(scope="module")
def tp_llama(tmp_path_factory) -> str:
    return str(create_tp_demo_model("llama", tmp_path_factory.mktemp("tp") / "llama"))


@pytest.fixture(scope="module")
def tp_qwen2(tmp_path_factory) -> str:
    return str(create_tp_demo_model("qwen2", tmp_path_factory.mktemp("tp") / "qwen2"))


def _requests(seed: int, n: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randint(2, 30))] for _ in range(n)]
    return prompts, [rng.randint(1, 10) for _ in range(n)]


@pytest.mark.parametrize("tp, arch, fields", [
    (2, "llama", {}),
    (4, "llama", {}),
    (2, "qwen2", {"num_kv_blocks": 24}),  # small cache: requests get preempted
])
def test_engine_at_tp_equals_tp1(tp, arch, fields, request):
    path = request.getfixturevalue(f"tp_{arch}")
    prompts, max_tokens = _requests(tp, 10)
    want = serve_engine(prompts, max_tokens, config(path, 1, **fields))
    got = run_ranks(rank_main, tp, "engine", config(path, tp, **fields), (prompts, max_tokens),
                    {}, preload=PRELOAD)
    assert got[0]["tokens"] == want["tokens"]
    assert got[0]["preempted"] == want["preempted"]
    if "num_kv_blocks" in fields:
        assert want["preempted"] > 0  # the case is what it says
    followers = got[1:]
    assert len(set(followers)) == 1 and followers[0] > 0  # every follower ran every step


def test_idle_rank0_keeps_its_followers(tp_llama):
    """Rank 0 idles for longer than the group's timeout between two batches: its
    keepalives hold the followers, which then run the second batch."""
    prompts, max_tokens = _requests(5, 4)
    want = serve_engine(prompts, max_tokens, config(tp_llama, 1))
    got = run_ranks(rank_main, 2, "engine", config(tp_llama, 2), (prompts, max_tokens),
                    {"idle_s": 6.0}, preload=PRELOAD, collective_timeout_s=5.0)
    assert got[0]["tokens"] == want["tokens"]


def test_prefill_worker_at_tp2_equals_tp1(tp_qwen2):
    prompts, _ = _requests(11, 6)
    want = serve_prefill(prompts, config(tp_qwen2, 1))
    got = run_ranks(rank_main, 2, "prefill", config(tp_qwen2, 2), (prompts,), {},
                    preload=PRELOAD)
    assert got[0] == want


@pytest.mark.parametrize("tp", [2, 4])
def test_decode_worker_at_tp_equals_tp1(tp, tp_llama):
    prompts, max_tokens = _requests(13, 6)
    max_tokens = [n + 2 for n in max_tokens]
    want = serve_engine(prompts, max_tokens, config(tp_llama, 1))["tokens"]
    first = [t[0] for t in want]
    # the tp 1 decode worker is the reference's own check
    assert serve_decode(prompts, first, max_tokens, config(tp_llama, 1)) == want
    got = run_ranks(rank_main, tp, "decode", config(tp_llama, tp), (prompts, first, max_tokens),
                    {}, preload=PRELOAD)
    assert got[0] == want


def test_decode_worker_prefills_locally_at_tp2_as_at_tp1(tp_llama):
    """Conditional disaggregation at tp 2: the followers run the prompts rank 0 prefills
    itself as they run every step (mixed here with disaggregated requests)."""
    prompts, max_tokens = _requests(17, 6)
    max_tokens = [n + 2 for n in max_tokens]
    want = serve_engine(prompts, max_tokens, config(tp_llama, 1))["tokens"]
    first = [t[0] for t in want]
    local = (0, 2, 3)
    assert serve_decode(prompts, first, max_tokens, config(tp_llama, 1), local=local) == want
    got = run_ranks(rank_main, 2, "decode", config(tp_llama, 2), (prompts, first, max_tokens),
                    {"local": local}, preload=PRELOAD)
    assert got[0] == want


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failed_rank_fails_the_others(failing, tp_llama):
    """A follower whose step raises leaves the group; rank 0's next step raises. Rank 0
    leaving (as if killed) makes the followers' wait for the next step raise. Neither waits
    for the collective timeout (60 s, the harness's own limit)."""
    prompts, _ = _requests(3, 3)
    got = run_ranks(rank_fails, 4, failing, 3, config(tp_llama, 4), prompts, preload=PRELOAD,
                    timeout_s=60, collective_timeout_s=300)
    assert got[failing] == ("left" if failing == 0 else "failed")
    assert all(g.startswith("raised") for r, g in enumerate(got) if r != failing), got


def test_a_rank_lost_while_idle_is_noticed_without_a_step(tp_llama):
    """The keepalive finds the broken group: the runner's error is set (what the worker
    host's health check reads) with no request in flight."""
    prompts, _ = _requests(4, 2)
    got = run_ranks(follower_leaves_when_idle, 2, config(tp_llama, 2), prompts,
                    preload=PRELOAD, collective_timeout_s=5.0, timeout_s=60)
    assert got[1] == "left"
    assert "Error" in got[0]


def test_worker_data_reaches_the_followers_and_their_answers_come_back(tp_llama):
    """A step's extra bytes reach every follower's hooks (with a layer hook per layer), a
    reply is the element-wise MIN over the ranks, a CONTROL runs no model, nothing else
    may be sent while answers are owed, and the ranks' bytes are gathered in order."""
    rank0, rank1 = run_ranks(exchange, 2, config(tp_llama, 2), preload=PRELOAD)
    assert rank0["gathered"] == rank1["gathered"] == [b"rank0", b"rank1"]
    assert rank0["early"] == "refused"
    assert rank0["after_run"] == [7, 11]  # MIN of [7, 30] and rank 1's [10, 11]
    assert rank0["after_control"] == [10]
    assert rank1["seen"] == [("RUN", b"ship these", 2), ("CONTROL", b"register", 1),
                             ("CONTROL", b"forget", 0)]
    assert rank1["layers"] == [0, 1]  # the TP demo model's two layers
