"""What each rank runs in the executor tests (``tests/unit/test_tp_executor.py``).

Rank 0 builds the real engine or worker on its ``TPGroup`` (its runner then drives the
others) and serves a batch of requests; the other ranks ``run_follower`` until rank 0
closes. Rank 0 returns what it served, a follower the number of steps it ran. The failure
scenarios make one rank fail mid-run and return what the others saw.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.loader import load_model
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.parallel import executor
from pdserve.engine.parallel.group import TPGroup
from pdserve.engine.sampling_params import SamplingParams
from pdserve.prefill_worker.messages import PrefillRequest
from pdserve.prefill_worker.worker import PrefillWorker


def config(path: str, tp: int, **fields: Any) -> EngineConfig:
    base = dict(model=path, device="cpu", block_size=4, num_kv_blocks=64,
                max_num_batched_tokens=24, tensor_parallel_size=tp)
    return EngineConfig(**(base | fields))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def serve_engine(prompts: list[list[int]], max_tokens: list[int], cfg: EngineConfig,
                 group: TPGroup | None = None, idle_s: float = 0.0) -> dict:
    """The engine's greedy tokens for ``prompts`` (served together), and how many requests
    it preempted. ``idle_s``: rank 0 idles that long between two halves of the batch (the
    followers must stay in the group meanwhile)."""
    engine = LLMEngine.from_config(cfg, load_model(cfg, load_tokenizer=False, group=group))
    preempted = 0
    step = engine.model_step.schedule

    def counting_schedule():
        nonlocal preempted
        out = step()
        preempted += len(out.preempted)
        return out

    engine.model_step.schedule = counting_schedule
    half = len(prompts) // 2 if idle_s else len(prompts)
    try:
        done = engine.generate(prompts[:half], [greedy(n) for n in max_tokens[:half]])
        if idle_s:
            time.sleep(idle_s)
            done += engine.generate(prompts[half:], [greedy(n) for n in max_tokens[half:]])
    finally:
        engine.runner.close()
    return {"tokens": [list(c.token_ids) for c in done], "preempted": preempted}


def serve_prefill(prompts: list[list[int]], cfg: EngineConfig, group: TPGroup | None = None
                  ) -> list[int]:
    """A prefill worker's first tokens (no destination: nothing decodes afterwards)."""
    worker = PrefillWorker.from_config("p0", cfg, None,
                                       load_model(cfg, load_tokenizer=False, group=group))
    try:
        for i, p in enumerate(prompts):
            worker.add(PrefillRequest(f"r{i}", tuple(p), greedy(4), None))
        results = []
        while worker.has_work():
            results += worker.step()
            worker.after_step()
    finally:
        worker.runner.close()
    by_id = {r.request_id: r for r in results}
    assert all(r.ok for r in results), [r.error for r in results]
    return [by_id[f"r{i}"].token.token_id for i in range(len(prompts))]


def serve_decode(prompts: list[list[int]], first: list[int], max_tokens: list[int],
                 cfg: EngineConfig, group: TPGroup | None = None,
                 local: tuple[int, ...] = ()) -> list[list[int]]:
    """A decode worker's tokens after ``first`` (each request's first token, from a tp 1
    prefill), all requests decoding together. Each prompt's KV is computed into the
    reserved blocks by running the prompt through the worker's own runner: at tp > 1 every
    rank then holds its heads, as a same-degree transfer would leave them. The prompts at
    ``local`` are prefilled by the worker itself (``prefill_local``): all their tokens,
    the first included, come from its steps."""
    from pdserve.decode_worker.messages import LocalPrefillRequest, ReserveRequest, StartDecode
    from pdserve.decode_worker.worker import DecodeWorker
    from pdserve.engine.messages import SampledToken
    from pdserve.engine.model_runner import ModelInput
    from pdserve.kv_transfer.registry import create_receiver

    worker = DecodeWorker.from_config(
        "d0", cfg, lambda spec: create_receiver("inprocess", spec, f"d0-{os.getpid()}"),
        load_model(cfg, load_tokenizer=False, group=group))
    out: dict[str, list[int]] = {}
    try:
        for i, prompt in enumerate(prompts):
            rid = f"r{i}"
            if i in local:
                worker.prefill_local(LocalPrefillRequest(rid, tuple(prompt),
                                                         greedy(max_tokens[i])))
                out[rid] = []
                continue
            dest = worker.reserve(ReserveRequest(rid, len(prompt))).destination
            worker.runner.run([ModelInput(prompt, 0, dest.block_ids, sample=False)])
            worker.start(StartDecode(rid, tuple(prompt), greedy(max_tokens[i]),
                                     SampledToken(first[i], None, ())))
            out[rid] = [first[i]]
        while worker.has_work():
            batch = worker.step()
            for delta in () if batch is None else batch.deltas:
                assert delta.error is None, delta.error
                out[delta.request_id] += delta.token_ids
    finally:
        worker.runner.close()
        worker.receiver.close()
    return [out[f"r{i}"] for i in range(len(prompts))]


def rank_main(group: TPGroup, what: str, cfg: EngineConfig, args: tuple, kwargs: dict) -> Any:
    """Rank 0 serves ``what`` (``serve_<what>(*args, cfg, group, **kwargs)``); the others
    follow it."""
    torch.set_num_threads(1)  # several ranks share two cores
    if not group.is_first and what == "decode":  # a decode rank has its own KV receiver
        from pdserve.decode_worker.follower import run_decode_follower
        from pdserve.kv_transfer.registry import create_receiver

        return run_decode_follower(cfg, group, lambda spec: create_receiver(
            "inprocess", spec, f"d0-rank{group.rank}-{os.getpid()}"))
    if not group.is_first:
        return executor.run_follower(cfg, group)
    serve = {"engine": serve_engine, "prefill": serve_prefill, "decode": serve_decode}[what]
    return serve(*args, cfg, group, **kwargs)


class _FailingRunner(ModelRunner):
    def __init__(self, runner: ModelRunner, fail_at: int):
        super().__init__(runner.model, runner.kv_cache, runner.attn, runner.device)
        self.fail_at = fail_at
        self.steps = 0

    def run(self, *args, **kwargs):
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("injected failure")
        return super().run(*args, **kwargs)


def rank_fails(group: TPGroup, failing: int, fail_at: int, cfg: EngineConfig,
               prompts: list[list[int]]) -> str:
    """Rank ``failing`` fails at its ``fail_at``-th step (a follower's step raises and it
    leaves the group; rank 0 leaves without telling anyone). What each rank saw."""
    torch.set_num_threads(1)
    from pdserve.engine.loader import build_runner, kv_cache_spec

    try:
        if group.is_first:
            engine = LLMEngine.from_config(cfg, load_model(cfg, load_tokenizer=False,
                                                           group=group))
            steps = 0
            while True:
                if failing == 0 and steps == fail_at:
                    group.close()  # gone, as if killed: no SHUTDOWN
                    return "left"
                engine.add_request(prompts[steps % len(prompts)], greedy(2))
                engine.step()
                steps += 1
        loaded = load_model(cfg, load_tokenizer=False, group=group)
        runner = build_runner(loaded, kv_cache_spec(loaded))
        if group.rank == failing:
            runner = _FailingRunner(runner, fail_at)
        executor.follow(runner, group, loaded.model_config.vocab_size)
        return "shut down"
    except Exception as exc:
        if group.rank == failing:
            group.close()  # what a dying follower does: leave
            return "failed"
        return f"raised {type(exc).__name__}"


def follower_leaves_when_idle(group: TPGroup, cfg: EngineConfig, prompts: list[list[int]]
                              ) -> str:
    """Rank 0 serves ``prompts`` then idles; the follower runs the steps and leaves the
    group at rank 0's first keepalive. Rank 0 returns its runner's error once the
    keepalive noticed (the harness's timeout bounds the wait)."""
    torch.set_num_threads(1)
    from pdserve.engine.loader import build_runner, kv_cache_spec
    from pdserve.engine.model_runner import ModelInput
    from pdserve.engine.parallel.step_channel import StepChannel
    from pdserve.engine.parallel.step_message import StepKind

    loaded = load_model(cfg, load_tokenizer=False, group=group)
    if group.is_first:
        engine = LLMEngine.from_config(cfg, loaded)
        engine.generate(prompts, greedy(3))
        while engine.runner.error is None:
            time.sleep(0.05)
        return type(engine.runner.error).__name__
    runner = build_runner(loaded, kv_cache_spec(loaded))
    channel = StepChannel(group)
    while True:
        msg = channel.recv(runner.kv_cache.spec.num_blocks, loaded.model_config.vocab_size)
        if msg.kind == StepKind.IDLE:
            group.close()
            return "left"
        runner.run([ModelInput(s.token_ids, s.start, s.block_table, s.sample)
                    for s in msg.sequences], msg.all_logits)


class _RecordingHooks(executor.RankHooks):
    """A follower's hooks that record what reached them and answer ``rank * 10 + i``."""

    def __init__(self, rank: int):
        self.rank = rank
        self.seen: list[tuple[str, bytes, int]] = []
        self.layers: list[int] = []

    def layer_hook(self, extra: bytes):
        return self.layers.append

    def answer(self, kind, extra: bytes, reply: int):
        self.seen.append((kind.name, extra, reply))
        return [self.rank * 10 + i for i in range(reply)]


def exchange(group: TPGroup, cfg: EngineConfig) -> Any:
    """Rank 0 runs a step with worker data and a reply, then a CONTROL message, and gathers
    every rank's bytes once; what each side saw."""
    torch.set_num_threads(1)
    from pdserve.engine.loader import build_runner, kv_cache_spec
    from pdserve.engine.model_runner import ModelInput

    loaded = load_model(cfg, load_tokenizer=False, group=group)
    runner = build_runner(loaded, kv_cache_spec(loaded))
    if not group.is_first:
        gathered = group.all_gather_bytes(f"rank{group.rank}".encode())
        hooks = _RecordingHooks(group.rank)
        executor.follow(runner, group, loaded.model_config.vocab_size, hooks)
        return {"gathered": gathered, "seen": hooks.seen, "layers": hooks.layers}
    driver = executor.DrivingRunner.wrap(runner, group)
    gathered = driver.all_gather_bytes(b"rank0")
    driver.run([ModelInput([5, 6, 7], 0, [0])], extra=b"ship these", reply=2)
    try:
        driver.control(b"too early")  # the step's answers are owed first
        early = "sent"
    except RuntimeError:
        early = "refused"
    after_run = driver.agree([7, 30])
    driver.control(b"register", reply=1)
    after_control = driver.agree([100])
    driver.control(b"forget")  # no reply asked: nothing to agree
    driver.close()
    return {"gathered": gathered, "after_run": after_run, "after_control": after_control,
            "early": early}
