"""Ranks 1 .. tp-1 of a tensor-parallel prefill instance: run rank 0's steps, ship KV.

A follower loads its shard, builds its runner and a KV sender of the instance's backend,
and follows rank 0 (``engine/parallel/executor.follow``). Its ``PrefillRankHooks`` read
each step's ``ShipOrders`` (``rank_sends.py``): for a RUN, the layer hook sends each
computed layer of every ordered request's KV (this rank's heads, to the decode ranks
the transfer plan names); for a CONTROL, it sends every layer at once. It then waits for
its transfers and answers 1 (finished) or 0 (failed) per order. A failed transfer is
reported, never raised: only a broken group ends a follower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.loader import build_runner, kv_cache_spec, load_model
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.parallel.executor import RankHooks, follow
from pdserve.engine.parallel.group import TPGroup
from pdserve.engine.parallel.step_message import StepKind
from pdserve.kv_transfer.base import KVSender
from pdserve.kv_transfer.tp_destination import TPKVDestination
from pdserve.kv_transfer.tp_send import RankSends
from pdserve.prefill_worker.rank_sends import ShipOrder, decode_orders

log = logging.getLogger(__name__)


class PrefillRankHooks(RankHooks):
    def __init__(self, runner: ModelRunner, sender: KVSender, rank: int, tp: int,
                 num_kv_heads: int, timeout_s: float = 30.0):
        self.runner = runner
        self.sender = sender
        self.rank = rank
        self.tp = tp
        self.num_kv_heads = num_kv_heads
        self.timeout_s = timeout_s
        # this step's sends, in order: None where the transfer failed
        self._sends: list[RankSends | None] = []
        self._tables: list[torch.Tensor] = []

    def layer_hook(self, extra: bytes) -> Callable[[int], None]:
        self._open(extra)

        def layer_done(layer: int) -> None:
            self._send_layer(layer)

        return layer_done

    def answer(self, kind: StepKind, extra: bytes, reply: int) -> Sequence[int]:
        if kind == StepKind.CONTROL:  # parked requests: their KV is all there already
            self._open(extra)
            self._send_all_layers()
        out = []
        for sends in self._sends:
            ok = sends is not None
            if ok:
                try:
                    sends.finish(self.timeout_s)
                except Exception as exc:
                    log.warning("rank %d: KV transfer failed: %s", self.rank, exc)
                    sends.abort()
                    ok = False
            out.append(int(ok))
        self._sends, self._tables = [], []
        return out

    def _open(self, extra: bytes) -> None:
        msg = decode_orders(extra)
        self._sends = [self._begin(o, msg.checksum) for o in msg.orders]
        self._tables = [torch.tensor(o.block_table, dtype=torch.long, device=self.runner.device)
                        for o in msg.orders]

    def _begin(self, order: ShipOrder, checksum: str) -> RankSends | None:
        try:
            dest = TPKVDestination.of(order.destination, self.num_kv_heads)
            return RankSends.begin(self.sender, dest, self.rank, self.tp,
                                   self.runner.kv_cache.spec, checksum)
        except Exception as exc:  # refused (stale destination, bad shape): rank 0 hears of it
            log.warning("rank %d: KV transfer refused: %s", self.rank, exc)
            return None

    def _send_layer(self, layer: int) -> None:
        data = self.runner.kv_cache.data[layer]
        self._each(lambda sends, table: sends.send_layer(layer, data.index_select(1, table)))

    def _send_all_layers(self) -> None:
        """One gather of each request's blocks over all layers, one stacked send."""
        data = self.runner.kv_cache.data
        self._each(lambda sends, table: sends.send_layers(0, data.index_select(2, table)))

    def _each(self, send) -> None:
        for i, sends in enumerate(self._sends):
            if sends is None:
                continue
            try:
                send(sends, self._tables[i])
            except Exception as exc:
                log.warning("rank %d: KV transfer failed: %s", self.rank, exc)
                sends.abort()
                self._sends[i] = None


def run_prefill_follower(config: EngineConfig, group: TPGroup, sender: KVSender,
                         timeout_s: float = 30.0) -> int:
    """Load this rank's shard and follow rank 0, shipping this rank's KV heads; returns the
    steps run when rank 0 closes."""
    loaded = load_model(config, load_tokenizer=False, group=group)
    runner = build_runner(loaded, kv_cache_spec(loaded))
    hooks = PrefillRankHooks(runner, sender, group.rank, group.size,
                             loaded.model_config.num_kv_heads, timeout_s)
    try:
        return follow(runner, group, loaded.model_config.vocab_size, hooks)
    finally:
        sender.close()
