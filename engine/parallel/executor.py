"""Rank 0 drives the other ranks of a tensor-parallel instance, one step at a time.

Rank 0 is the worker the rest of the system knows (the single-process engine, a prefill
or decode worker: scheduler, block manager, sampler, unchanged). Its ``ModelRunner`` is a
``DrivingRunner``: each ``run`` first sends the step's inputs to the other ranks
(``StepChannel``), then runs them; the other ranks run ``follow``, which receives each
step and runs it on their own shard and KV cache, so the model's collectives line up.
Only rank 0 gets logits.

Liveness: while rank 0 has nothing to run, a keepalive thread sends IDLE messages every
quarter of the group's timeout, so a follower's wait is bounded by that timeout even
when the instance is idle; a follower that fails leaves the group, and rank 0's next
message or collective raises (at once for a closed connection, after the timeout for a
stuck rank). Either way the instance fails and is restarted as a group.

Lifecycle: ``DrivingRunner.wrap(runner, group)`` on rank 0, ``follow(runner, group)`` on
the others (returns when rank 0 closes); ``DrivingRunner.close()`` sends SHUTDOWN.

The worker layer rides along (``RankHooks``): a step's ``extra`` bytes reach every
follower's hooks, which may ship KV from the layer hook; a message with ``reply`` > 0 is
answered by every rank with that many integers, combined by all-reduce MIN (rank 0 calls
``agree`` after its own part; until then no other message may be sent, and the keepalive
waits). ``control`` is a message without a model step (KV of parked requests to ship,
reservations to register). Every rank runs these collectives in the same order.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVCacheSpec
from pdserve.engine.loader import build_runner, kv_cache_spec, load_model
from pdserve.engine.model_runner import ModelInput, ModelRunner
from pdserve.engine.parallel.group import TPGroup
from pdserve.engine.parallel.step_channel import StepChannel
from pdserve.engine.parallel.step_message import StepInputs, StepKind, StepSequence


class RankHooks(ABC):
    """A follower's share of the worker layer's work, from each message's ``extra``."""

    def layer_hook(self, extra: bytes) -> Callable[[int], None] | None:
        """Before a RUN with ``extra``: called after each layer (e.g. to ship its KV)."""
        return None

    @abstractmethod
    def answer(self, kind: StepKind, extra: bytes, reply: int) -> Sequence[int]:
        """After a RUN's model step, or for a CONTROL: do this rank's part of ``extra``,
        and return ``reply`` integers (its say in the all-reduce MIN). Must not raise for
        a failure rank 0 should hear about: report it in the answer instead."""


class DrivingRunner(ModelRunner):
    """Rank 0's runner: sends each step to the followers, then runs it."""

    def __init__(self, runner: ModelRunner, group: TPGroup,
                 keepalive_s: float | None = None):
        super().__init__(runner.model, runner.kv_cache, runner.attn, runner.device)
        self.channel = StepChannel(group)
        # One message at a time, and a step's message and its collectives together.
        self._lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._closed = False
        self.error = None  # a broken group (seen by a step or the keepalive)
        self._stop = threading.Event()
        self._owed = 0  # the last RUN's reply, not yet agreed
        self._keepalive_s = keepalive_s or group.config.timeout_s / 4
        self._keepalive = threading.Thread(target=self._keep_alive, daemon=True,
                                           name="pdserve-tp-keepalive")
        self._keepalive.start()

    @classmethod
    def wrap(cls, runner: ModelRunner, group: TPGroup) -> DrivingRunner:
        if not group.is_first:
            raise ValueError(f"rank {group.rank} follows; only rank 0 drives")
        return cls(runner, group)

    @property
    def num_ranks(self) -> int:
        return self.channel.group.size

    def run(self, inputs: Sequence[ModelInput], all_logits: bool = False,
            layer_done: Callable[[int], None] | None = None, extra: bytes = b"",
            reply: int = 0) -> torch.Tensor | None:
        if not inputs:
            raise ValueError("empty step")
        seqs = tuple(StepSequence(tuple(i.token_ids), i.start, tuple(i.block_table), i.sample)
                     for i in inputs)
        with self._lock:
            self._check_open()
            try:
                self._send(StepKind.RUN, seqs, all_logits, extra, reply)
                self._owed = reply
                return super().run(inputs, all_logits, layer_done)
            except BaseException as exc:  # a broken group stays broken: fail fast from now
                self.error = exc
                raise

    def agree(self, values: Sequence[int]) -> list[int]:
        with self._lock:
            if self.error is not None:
                raise RuntimeError("a tensor-parallel rank has failed") from self.error
            if len(values) != self._owed:
                raise ValueError(f"the last step asked {self._owed} answers, got {len(values)}")
            try:
                return self._agree(values)
            except BaseException as exc:
                self.error = exc
                raise

    def control(self, extra: bytes, reply: int = 0) -> None:
        with self._lock:
            self._check_open()
            try:
                self._send(StepKind.CONTROL, extra=extra, reply=reply)
                self._owed = reply
            except BaseException as exc:
                self.error = exc
                raise

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        with self._lock:
            self._check_open()
            return self.channel.group.all_gather_bytes(data)

    def _agree(self, values: Sequence[int]) -> list[int]:
        out = self.channel.group.agree_min(values)
        self._owed = 0
        self._last_sent = time.monotonic()
        return out

    def close(self) -> None:
        """Tell the followers to return; idempotent. Rank 0's group stays joined (its
        owner leaves it)."""
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.error is None and not self._owed:
                self._send(StepKind.SHUTDOWN)

    def _send(self, kind: StepKind, seqs: tuple[StepSequence, ...] = (),
              all_logits: bool = False, extra: bytes = b"", reply: int = 0) -> None:
        self.channel.send(StepInputs(self.channel.next_id(), kind, seqs, all_logits, extra,
                                     reply))
        self._last_sent = time.monotonic()

    def _check_open(self) -> None:
        if self.error is not None:
            raise RuntimeError("a tensor-parallel rank has failed") from self.error
        if self._closed:
            raise RuntimeError("the runner is closed")
        if self._owed:
            raise RuntimeError(f"the last step's {self._owed} answers were not agreed")

    def _keep_alive(self) -> None:
        while not self._stop.wait(self._keepalive_s / 2):
            with self._lock:
                if self._closed or self.error is not None:
                    return
                if self._owed or time.monotonic() - self._last_sent < self._keepalive_s:
                    continue  # (the followers wait in the agreement, bounded by the timeout)
                try:
                    self._send(StepKind.IDLE)
                except BaseException as exc:  # the group is broken: the next run raises
                    self.error = exc
                    return


def follow(runner: ModelRunner, group: TPGroup, vocab_size: int,
           hooks: RankHooks | None = None) -> int:
    """A follower's loop: run every step rank 0 sends until it sends SHUTDOWN; the number
    of steps run. Raises (and so leaves the step sequence) on a broken group, a malformed
    message or a failed step. ``hooks``: the worker layer's part of each message's
    ``extra`` (a message with extra or a reply and no hooks is an error)."""
    if group.is_first:
        raise ValueError("rank 0 drives; it does not follow")
    channel = StepChannel(group)
    num_blocks = runner.kv_cache.spec.num_blocks
    steps = 0
    while True:
        msg = channel.recv(num_blocks, vocab_size)
        if msg.kind == StepKind.SHUTDOWN:
            return steps
        if msg.kind not in (StepKind.RUN, StepKind.CONTROL):
            continue
        if (msg.extra or msg.reply) and hooks is None:
            raise ValueError(f"step {msg.step_id} carries worker data and this rank has no hooks")
        if msg.kind == StepKind.RUN:
            layer_done = hooks.layer_hook(msg.extra) if msg.extra else None
            runner.run([ModelInput(s.token_ids, s.start, s.block_table, s.sample)
                        for s in msg.sequences], msg.all_logits, layer_done)
            steps += 1
        if msg.extra or msg.reply:
            answer = list(hooks.answer(msg.kind, msg.extra, msg.reply))
            if len(answer) != msg.reply:
                raise ValueError(f"hooks answered {len(answer)} of {msg.reply} integers")
            if msg.reply:
                group.agree_min(answer)


def run_follower(config: EngineConfig, group: TPGroup, kv_spec: KVCacheSpec | None = None,
                 kv_buffer: torch.Tensor | None = None) -> int:
    """Load this rank's shard, build its runner (agreeing on the block count with rank 0,
    which does the same once) and follow rank 0 until it closes; the steps run. (A
    worker's follower, which ships or receives KV, builds its own: ``*_worker/follower.py``.)"""
    loaded = load_model(config, load_tokenizer=False, group=group)
    runner = build_runner(loaded, kv_spec or kv_cache_spec(loaded), kv_buffer)
    return follow(runner, group, loaded.model_config.vocab_size)
