"""The continuous-batching scheduler, driven by fake model steps (no torch, no model).

A small simulator plays the model: after ``schedule()`` it "writes" each chunk's KV into
a fake cache (slot -> digest of the token prefix that produced it), checks that every
position the chunk attends to holds the right KV, calls ``after_step()``, appends a fake
token for every sampling chunk and finishes requests after their output length.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import FinishReason, Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


def test_scheduler_import_does_not_import_torch():
    code = ("import sys, pdserve.engine.scheduler; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


class Sim:
    def __init__(self, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                 chunked=True, prefix=True):
        self.blocks = BlockManager(num_blocks, block_size, prefix)
        self.config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, chunked)
        self.sched = Scheduler(self.config, self.blocks)
        self.out_len: dict[str, int] = {}
        self.reqs: dict[str, Request] = {}
        self.kv: dict[int, int] = {}  # slot -> hash of the token prefix whose KV it holds
        self.history: list[SchedulerOutput] = []
        self.sampled: list[list[str]] = []
        # Per step: (request, start, num_tokens, samples) as scheduled, before new tokens.
        self.shapes: list[list[tuple[Request, int, int, bool]]] = []
        self.admitted_at: dict[str, list[int]] = {}

    def add(self, rid: str, prompt, out_len: int) -> Request:
        req = Request(rid, tuple(prompt), SamplingParams(max_tokens=out_len))
        self.out_len[rid] = out_len
        self.reqs[rid] = req
        self.sched.add(req)
        return req

    def fake_token(self, req: Request) -> int:
        return (sum(map(ord, req.request_id)) * 7 + 3 * len(req.output_token_ids)) % 50

    def slot(self, req: Request, pos: int) -> int:
        bs = self.blocks.block_size
        return self.blocks.block_table(req.request_id)[pos // bs] * bs + pos % bs

    def step(self) -> SchedulerOutput:
        sched, cfg = self.sched, self.config
        before_running = list(sched.running)
        before_waiting = list(sched.waiting)
        out = sched.schedule()
        self.history.append(out)
        chunks = out.chunks
        # -- budget and batch limits
        assert out.num_tokens <= cfg.max_num_batched_tokens
        assert len(sched.running) <= cfg.max_num_seqs
        assert len({id(c.request) for c in chunks}) == len(chunks)
        # -- preempted requests
        for p in out.preempted:
            assert p in before_running and p.status is RequestStatus.WAITING
            assert p.num_computed_tokens == 0 and not self.blocks.has(p.request_id)
            assert p not in sched.running and p in sched.waiting
        if out.preempted:
            assert list(sched.waiting)[: len(out.preempted)] == sorted(
                out.preempted, key=before_running.index)
        # -- running first, then admissions in FIFO order
        old = [c for c in chunks if c.request in before_running]
        new = [c for c in chunks if c.request not in before_running]
        assert chunks[: len(old)] == tuple(old)
        if new:
            still = [r for r in before_running if r not in out.preempted]
            assert {id(c.request) for c in old} == {id(r) for r in still}
            assert [c.request for c in new] == before_waiting[: len(new)]
            for c in new:
                assert c.request.num_cached_tokens == c.start
                self.admitted_at.setdefault(c.request.request_id, []).append(len(self.history))
        # -- each chunk
        for c in chunks:
            req = c.request
            assert req.status is RequestStatus.RUNNING and req in sched.running
            assert c.start == req.num_computed_tokens
            assert c.num_tokens >= 1 and c.start + c.num_tokens <= req.num_tokens
            assert len(self.blocks.block_table(req.request_id)) * self.blocks.block_size \
                >= c.start + c.num_tokens
            if not c.samples:  # a prompt is only cut short by the step's token budget
                assert cfg.enable_chunked_prefill
                assert out.num_tokens == cfg.max_num_batched_tokens
        # -- block accounting
        owners = {r.request_id for r in sched.running}
        assert set(self.blocks.owners()) == owners
        for r in sched.waiting:
            assert r.status is RequestStatus.WAITING and r.num_computed_tokens == 0
        used = {b for rid in owners for b in self.blocks.block_table(rid)}
        assert len(used) == self.blocks.stats().num_used_blocks
        # -- the "model": every attended position holds the right KV, then write this step's
        for c in chunks:
            toks = c.request.all_token_ids
            for pos in range(c.start):
                assert self.kv.get(self.slot(c.request, pos)) == hash(tuple(toks[: pos + 1])), \
                    f"{c.request.request_id}: stale KV at position {pos}"
        for c in chunks:
            toks = c.request.all_token_ids
            for pos in range(c.start, c.start + c.num_tokens):
                self.kv[self.slot(c.request, pos)] = hash(tuple(toks[: pos + 1]))
        sampling = [c.request for c in chunks if c.samples]
        self.shapes.append([(c.request, c.start, c.num_tokens, c.samples) for c in chunks])
        sched.after_step(out)
        for c in chunks:
            assert c.request.num_computed_tokens == c.start + c.num_tokens
        self.sampled.append([r.request_id for r in sampling])
        for req in sampling:
            req.output_token_ids.append(self.fake_token(req))
            if len(req.output_token_ids) >= self.out_len[req.request_id]:
                sched.finish(req, FinishReason.LENGTH)
                assert not self.blocks.has(req.request_id)
        return out

    def run(self, max_steps=10_000) -> int:
        steps = 0
        while self.sched.num_unfinished:
            self.step()
            steps += 1
            assert steps < max_steps, "scheduler made no progress"
        return steps

    def assert_all_done(self):
        for rid, req in self.reqs.items():
            assert req.status is RequestStatus.FINISHED_LENGTH, rid
            assert len(req.output_token_ids) == self.out_len[rid]
        assert self.blocks.stats().num_used_blocks == 0
        assert self.blocks.owners() == []
        assert not self.sched.running and not self.sched.waiting


def prompt_of(n: int, base: int = 0) -> list[int]:
    return [(base + 13 * i) % 97 + 1 for i in range(n)]


# -- budget, batch size, ordering, chunking -------------------------------------------------

def test_single_request_prefill_then_decodes():
    sim = Sim(max_num_batched_tokens=64)
    req = sim.add("a", prompt_of(10), 4)
    sim.step()
    assert sim.shapes[-1] == [(req, 0, 10, True)]
    assert req.status is RequestStatus.RUNNING
    for i in range(3):
        out = sim.step()
        assert [(c.start, c.num_tokens) for c in out.chunks] == [(10 + i, 1)]
    assert req.status is RequestStatus.FINISHED_LENGTH
    assert req.output_token_ids and len(req.output_token_ids) == 4
    sim.assert_all_done()


def test_token_budget_chunks_long_prompt():
    sim = Sim(max_num_batched_tokens=8)
    sim.add("a", prompt_of(21), 2)
    sim.run()
    shapes = [[s[1:] for s in step] for step in sim.shapes]
    assert shapes == [[(0, 8, False)], [(8, 8, False)], [(16, 5, True)], [(21, 1, True)]]
    sim.assert_all_done()


def test_decodes_go_before_new_prompt_and_prompt_gets_the_rest():
    sim = Sim(max_num_batched_tokens=8, max_num_seqs=8)
    a = sim.add("a", prompt_of(5), 10)
    b = sim.add("b", prompt_of(3, 1), 10)
    first = sim.step()
    assert [(c.request, c.num_tokens) for c in first.chunks] == [(a, 5), (b, 3)]
    c = sim.add("c", prompt_of(20, 2), 3)
    out = sim.step()
    assert [(ch.request, ch.start, ch.num_tokens) for ch in out.chunks] == [
        (a, 5, 1), (b, 3, 1), (c, 0, 6)]
    out = sim.step()
    assert [(ch.request, ch.num_tokens) for ch in out.chunks] == [(a, 1), (b, 1), (c, 6)]
    sim.run()
    sim.assert_all_done()


def test_max_num_seqs_limits_the_batch():
    sim = Sim(max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(5):
        sim.add(f"r{i}", prompt_of(4, i), 3)
    out = sim.step()
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1"]
    assert [r.request_id for r in sim.sched.waiting] == ["r2", "r3", "r4"]
    sim.run()
    sim.assert_all_done()
    # Never more than two running, and requests were admitted in arrival order.
    firsts = [sim.admitted_at[f"r{i}"][0] for i in range(5)]
    assert firsts == sorted(firsts)


def test_without_chunked_prefill_long_prompt_waits_for_budget():
    sim = Sim(max_num_batched_tokens=12, chunked=False, max_num_seqs=8)
    a = sim.add("a", prompt_of(4), 4)
    b = sim.add("b", prompt_of(4, 1), 4)
    sim.step()
    long = sim.add("long", prompt_of(11, 3), 2)
    out = sim.step()
    # 2 decodes leave 10 tokens: the 11-token prompt does not fit and is not cut.
    assert [c.request for c in out.chunks] == [a, b]
    assert long.status is RequestStatus.WAITING
    while long.status is RequestStatus.WAITING:
        sim.step()
    assert [s for s in sim.shapes[-1] if s[0] is long] == [(long, 0, 11, True)]
    sim.run()
    sim.assert_all_done()


def test_with_chunked_prefill_long_prompt_is_split_across_steps():
    sim = Sim(max_num_batched_tokens=12, chunked=True, max_num_seqs=8)
    a = sim.add("a", prompt_of(4), 6)
    b = sim.add("b", prompt_of(4, 1), 6)
    sim.step()
    long = sim.add("long", prompt_of(30, 3), 2)
    pieces = []
    while long.num_computed_tokens < 30 and not long.output_token_ids:
        sim.step()
        pieces += [s[1:] for s in sim.shapes[-1] if s[0] is long]
        scheduled = {s[0] for s in sim.shapes[-1]}
        assert (a in scheduled or a.is_finished) and (b in scheduled or b.is_finished)
    assert sum(n for _, n, _ in pieces) == 30
    assert [s for _, _, s in pieces] == [False] * (len(pieces) - 1) + [True]
    assert len(pieces) >= 3
    sim.run()
    sim.assert_all_done()


# -- preemption -----------------------------------------------------------------------------

def test_newest_running_request_is_preempted_and_requeued_first():
    # 4-token blocks, 7 blocks: a and b (8-token prompts) fit, then grow until one cannot.
    sim = Sim(num_blocks=7, block_size=4, max_num_batched_tokens=64, prefix=False)
    a = sim.add("a", prompt_of(8), 12)
    b = sim.add("b", prompt_of(8, 1), 12)
    c = sim.add("c", prompt_of(12, 2), 2)  # arrives later, while the cache is too full
    sim.sched.waiting.remove(c)
    preempted_step = None
    while sim.sched.num_unfinished:
        out = sim.step()
        if len(sim.history) == 2:
            sim.sched.add(c)
        if out.preempted and preempted_step is None:
            preempted_step = len(sim.history)
            assert out.preempted == (b,)
            assert list(sim.sched.waiting)[:2] == [b, c]
            assert b.num_computed_tokens == 0 and b.output_token_ids
            assert [ch.request for ch in out.chunks] == [a]
            # The preempted request's generated tokens are kept and recomputed later.
            kept = list(b.output_token_ids)
    assert preempted_step is not None
    assert b.output_token_ids[: len(kept)] == kept
    # b came back with one prefill chunk over its prompt plus the tokens it had generated.
    readmit = sim.admitted_at["b"][1]
    assert [s for s in sim.shapes[readmit - 1] if s[0] is b] == [(b, 0, 8 + len(kept), True)]
    sim.assert_all_done()


def test_a_request_that_preempts_itself_leaves_older_ones_running():
    sim = Sim(num_blocks=5, block_size=4, max_num_batched_tokens=64, prefix=False)
    a = sim.add("a", prompt_of(8), 10)   # 2 blocks, grows to 5 (18 tokens)
    b = sim.add("b", prompt_of(4, 1), 10)  # 1 block, grows to 4 (14 tokens)
    sim.run()
    preempted = [r.request_id for out in sim.history for r in out.preempted]
    assert preempted and set(preempted) == {"b"}
    assert a.output_token_ids and b.output_token_ids
    sim.assert_all_done()


def test_request_larger_than_the_cache_does_not_livelock():
    sim = Sim(num_blocks=2, block_size=4, max_num_batched_tokens=64)
    sim.add("a", prompt_of(3), 10)  # 13 tokens need 4 blocks; the cache has 2
    for _ in range(50):
        if not sim.sched.num_unfinished:
            break
        sim.step()
    assert sim.sched.num_unfinished == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(),
       block_size=st.sampled_from([1, 2, 4, 8]),
       chunked=st.booleans(),
       prefix=st.booleans(),
       max_num_seqs=st.integers(1, 6))
def test_random_workloads_finish_without_leaks(data, block_size, chunked, prefix, max_num_seqs):
    n = data.draw(st.integers(1, 8), label="num_requests")
    prompts = [data.draw(st.integers(1, 24)) for _ in range(n)]
    outs = [data.draw(st.integers(1, 12)) for _ in range(n)]
    arrivals = sorted(data.draw(st.integers(0, 15)) for _ in range(n))
    bases = [data.draw(st.integers(0, 2)) for _ in range(n)]  # shared prefixes are common
    longest = max(p + o for p, o in zip(prompts, outs, strict=True))
    need = -(-longest // block_size)
    num_blocks = data.draw(st.integers(need, need * 3), label="num_blocks")
    budget = data.draw(st.integers(longest if not chunked else 1, 64), label="budget")
    sim = Sim(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=budget, chunked=chunked, prefix=prefix)
    pending = list(range(n))
    step = 0
    while pending or sim.sched.num_unfinished:
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            sim.add(f"r{i}", prompt_of(prompts[i], bases[i]), outs[i])
        sim.step()
        step += 1
        assert step < 5000, "no progress"
    sim.assert_all_done()
    event(f"preempted={any(out.preempted for out in sim.history)}")
    event(f"prefix hit={any(r.num_cached_tokens for r in sim.reqs.values())}")
    if not prefix:
        assert all(r.num_cached_tokens == 0 for r in sim.reqs.values())


# -- prefix caching -------------------------------------------------------------------------

@pytest.mark.parametrize("first_still_running", [True, False])
def test_shared_prefix_is_reused_at_admission(first_still_running):
    sim = Sim(block_size=4, max_num_batched_tokens=64)
    shared = prompt_of(10)
    a = sim.add("a", shared + [5, 6], 20 if first_still_running else 1)
    sim.step()  # a's prompt is computed, its two full blocks... three full blocks registered
    assert a.is_finished is not first_still_running
    b = sim.add("b", shared + [7, 8, 9], 3)
    out = sim.step()
    (chunk,) = [c for c in out.chunks if c.request is b]
    assert b.num_cached_tokens == 8 and chunk.start == 8 and chunk.num_tokens == 5
    if first_still_running:
        assert sim.blocks.block_table("a")[:2] == sim.blocks.block_table("b")[:2]
    sim.run()
    sim.assert_all_done()


def test_identical_prompt_leaves_last_token_to_compute():
    sim = Sim(block_size=4, max_num_batched_tokens=64)
    p = prompt_of(12)
    sim.add("a", p, 1)
    sim.step()
    b = sim.add("b", p, 2)
    sim.step()
    assert b.num_cached_tokens == 8  # not 12: the last token's logits must be computed
    assert sim.shapes[-1] == [(b, 8, 4, True)]
    sim.run()
    sim.assert_all_done()


def test_no_prefix_reuse_when_disabled_or_prefix_differs():
    for prefix, second in ((False, prompt_of(12)), (True, [99] + prompt_of(12)[1:])):
        sim = Sim(block_size=4, max_num_batched_tokens=64, prefix=prefix)
        sim.add("a", prompt_of(12), 1)
        sim.step()
        b = sim.add("b", second, 1)
        sim.step()
        assert b.num_cached_tokens == 0
        sim.run()
        sim.assert_all_done()


def test_preempted_request_reuses_its_own_cached_prefix():
    sim = Sim(num_blocks=8, block_size=4, max_num_batched_tokens=64, prefix=True)
    a = sim.add("a", prompt_of(8), 16)
    b = sim.add("b", prompt_of(8, 1), 16)
    sim.run()
    preempted = [r for out in sim.history for r in out.preempted]
    assert preempted
    assert any(r.num_cached_tokens > 0 for r in (a, b))
    sim.assert_all_done()


# -- finish / abort ------------------------------------------------------------------------

def test_finish_waiting_request_frees_nothing():
    sim = Sim(max_num_seqs=1)
    sim.add("a", prompt_of(8), 5)
    w = sim.add("w", prompt_of(8, 1), 5)
    sim.step()
    used = sim.blocks.stats().num_used_blocks
    sim.sched.finish(w, FinishReason.ABORT)
    assert w.status is RequestStatus.FINISHED_ABORTED and w not in sim.sched.waiting
    assert sim.blocks.stats().num_used_blocks == used
    sim.sched.finish(w, FinishReason.ABORT)  # again: harmless
    assert sim.sched.find("w") is None and sim.sched.find("a") is not None
    assert sim.sched.num_unfinished == 1


@pytest.mark.parametrize("prefix", [True, False])
def test_abort_running_request_frees_its_blocks_once(prefix):
    sim = Sim(block_size=4, max_num_batched_tokens=64, prefix=prefix)
    a = sim.add("a", prompt_of(9), 20)
    b = sim.add("b", prompt_of(6, 1), 20)
    sim.step()
    sim.step()
    assert sim.blocks.stats().num_used_blocks == 3 + 2
    sim.sched.finish(a, FinishReason.ABORT)
    assert a.status is RequestStatus.FINISHED_ABORTED and a.finish_reason is FinishReason.ABORT
    assert not sim.blocks.has("a") and a not in sim.sched.running
    assert sim.blocks.stats().num_used_blocks == 2
    free_after = sim.blocks.stats().num_free_blocks
    sim.sched.finish(a)  # second call must not free (or raise) again
    sim.sched.finish(a, FinishReason.ABORT)
    assert sim.blocks.stats().num_free_blocks == free_after
    assert a.finish_reason is FinishReason.ABORT
    sim.out_len.pop("a")
    sim.reqs.pop("a")
    sim.run()
    assert b.status is RequestStatus.FINISHED_LENGTH
    sim.assert_all_done()


def test_finish_keeps_the_first_reason():
    sim = Sim()
    a = sim.add("a", prompt_of(4), 5)
    sim.step()
    sim.sched.finish(a, FinishReason.STOP)
    sim.sched.finish(a, FinishReason.ABORT)
    assert a.finish_reason is FinishReason.STOP and a.status is RequestStatus.FINISHED_STOPPED


def test_add_running_adopts_requests_with_blocks():
    blocks = BlockManager(8, 4)
    sched = Scheduler(SchedulerConfig(), blocks)
    req = Request("x", tuple(prompt_of(6)), SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="x"):
        sched.add_running(req)
    blocks.allocate("x", req.all_token_ids, num_tokens=7)
    req.output_token_ids.append(1)
    req.num_computed_tokens = 6
    sched.add_running(req)
    out = sched.schedule()
    assert [(c.request, c.start, c.num_tokens, c.samples) for c in out.chunks] == [(req, 6, 1, True)]


def test_a_request_larger_than_the_whole_cache_finishes_instead_of_crashing():
    """The waiting request the cache can never hold (a preempted one that grew past it;
    here one queued directly) ends with LENGTH; the rest are served."""
    sim = Sim(num_blocks=4, block_size=4)
    big = sim.add("big", range(1, 21), 2)  # 20 prompt tokens: 6 blocks with the next token
    small = sim.add("small", range(1, 6), 2)
    sim.sched.schedule()
    assert big.status is RequestStatus.FINISHED_LENGTH
    assert small.status is RequestStatus.RUNNING
