"""Ranks 1 .. tp-1 of a tensor-parallel decode instance: run rank 0's steps, receive KV.

A follower loads its shard, allocates its cache through its own KV receiver (the cache
holds this rank's KV heads; prefill ranks write them there), publishes the receiver's
endpoint to rank 0 once, and follows rank 0 (``engine/parallel/executor.follow``). Its
``DecodeRankHooks`` act on ``RankControl`` messages (``rank_control.py``): expect the
transfers rank 0 reserved, report their state, forget finished ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pdserve.decode_worker.rank_control import (
    FAILED,
    STATE_CODES,
    decode_control,
    encode_endpoint,
)
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.engine.loader import build_runner, kv_cache_spec, load_model
from pdserve.engine.parallel.executor import RankHooks, follow
from pdserve.engine.parallel.group import TPGroup
from pdserve.engine.parallel.step_message import StepKind
from pdserve.kv_transfer.base import KVReceiver


class DecodeRankHooks(RankHooks):
    def __init__(self, receiver: KVReceiver):
        self.receiver = receiver

    def answer(self, kind: StepKind, extra: bytes, reply: int) -> Sequence[int]:
        msg = decode_control(extra)
        for tid in msg.forget:
            self.receiver.forget(tid)
        out = []
        for r in msg.register:
            try:
                self.receiver.expect(r.transfer_id, r.block_ids)
                out.append(1)
            except (ValueError, KeyError):
                out.append(0)
        for tid in msg.poll:
            try:
                out.append(STATE_CODES[self.receiver.state(tid)])
            except KeyError:  # never registered here, or forgotten: it cannot land
                out.append(FAILED)
        return out


def run_decode_follower(config: EngineConfig, group: TPGroup,
                        receiver_factory: Callable[[KVCacheSpec], tuple[KVReceiver, KVCache]]
                        ) -> int:
    """Load this rank's shard, allocate its cache with ``receiver_factory(spec)``, publish
    the receiver's endpoint to rank 0 and follow rank 0; the steps run when rank 0 closes."""
    loaded = load_model(config, load_tokenizer=False, group=group)
    spec = kv_cache_spec(loaded)
    receiver, cache = receiver_factory(spec)
    try:
        runner = build_runner(loaded, spec, cache.data)
        group.all_gather_bytes(encode_endpoint(receiver.endpoint))
        return follow(runner, group, loaded.model_config.vocab_size, DecodeRankHooks(receiver))
    finally:
        receiver.close()
