"""KV computed by a real prefill instance of tp=p lands right in a decode instance of tp=d.

The prefill ranks are processes (gloo, ``tests/tp_harness.py``) running the sharded TP
demo Llama (4 KV heads); the decode ranks' receivers live in this process, one per rank
with its share of the heads, over shared memory and TCP. Each prefill rank prefills the
prompt and ships its planned head slices layer by layer from the layer hook. Afterwards
every decode rank's reserved blocks hold its heads of the tp 1 model's KV for the prompt
(within float32 rounding of the all-reduces) and nothing else of its cache changed; TCP
receivers report the transfer DONE.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.demo_tp_model import create_tp_demo_model
from pdserve.engine.kv_cache import KVCacheSpec
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.parallel.shard import kv_head_range
from pdserve.kv_transfer.base import TransferState
from pdserve.kv_transfer.registry import create_receiver
from pdserve.kv_transfer.tp_destination import TPKVDestination
from tests.tp_handoff_scenario import BLOCK, prefill_and_send, reference_cache
from tests.tp_harness import run_ranks

DECODE_BLOCKS = 16
DST = (3, 12, 0, 7, 9)
PROMPT = [17, 3, 99, 41, 5, 250, 12, 8, 77, 64, 1, 33, 180, 2, 45, 6, 91]  # 5 blocks of 4
BACKENDS = ("shm", "tcp")
PAIRS = {1: (2,), 2: (1, 2), 4: (2,)}  # prefill tp -> decode tps


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[str, ModelConfig]:
    path = str(create_tp_demo_model("llama", tmp_path_factory.mktemp("tp") / "llama"))
    return path, ModelConfig.from_pretrained(path)


class DecodeInstance:
    """``d`` receivers of one backend, each expecting the prompt's blocks."""

    def __init__(self, backend: str, d: int, cfg: ModelConfig, tid: str):
        self.d = d
        self.receivers = []
        for r in range(d):
            heads = len(kv_head_range(cfg.num_kv_heads, d, r))
            spec = KVCacheSpec(cfg.num_layers, DECODE_BLOCKS, BLOCK, heads,
                               cfg.head_dim, torch.float32)
            receiver, _ = create_receiver(backend, spec, f"{tid}-{r}")
            receiver.expect(tid, DST)
            self.receivers.append(receiver)
        self.dest = TPKVDestination(tid, tuple(x.endpoint for x in self.receivers), DST,
                                    len(PROMPT), cfg.num_kv_heads)

    def close(self) -> None:
        for receiver in self.receivers:
            receiver.close()


@pytest.mark.parametrize("p", sorted(PAIRS))
def test_decode_ranks_get_the_tp1_kv_from_a_tp_prefill(p, model):
    path, cfg = model
    want = reference_cache(path, PROMPT)
    instances = [DecodeInstance(b, d, cfg, f"p{p}-d{d}-{b}") for d in PAIRS[p] for b in BACKENDS]
    try:
        dests = [i.dest for i in instances]
        if p == 1:
            written = [prefill_and_send(None, path, PROMPT, dests)]
        else:
            written = run_ranks(prefill_and_send, p, path, PROMPT, dests,
                                preload=("tests.tp_handoff_scenario",))
        # every decode rank of every destination was written, by one or more prefill ranks
        assert sum(written) >= sum(i.d for i in instances)
        for inst in instances:
            for r, receiver in enumerate(inst.receivers):
                if receiver.name == "tcp":
                    assert receiver.wait(inst.dest.transfer_id, 30) is TransferState.DONE
                h = kv_head_range(cfg.num_kv_heads, inst.d, r)
                got = receiver.cache.data
                torch.testing.assert_close(got[:, :, list(DST)], want[..., h.start:h.stop, :],
                                           atol=1e-5, rtol=1e-5)
                others = [b for b in range(DECODE_BLOCKS) if b not in DST]
                assert not got[:, :, others].any()
    finally:
        for inst in instances:
            inst.close()
