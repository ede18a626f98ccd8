"""What each rank of a prefill instance runs in ``tests/unit/test_tp_handoff.py``.

Every rank loads its shard, prefills the prompt into blocks ``SRC`` of its own cache and,
from the layer hook (as the prefill worker does: layer ``i`` ships while ``i + 1``
computes), sends its planned head slices of each layer to the decode ranks named by each
destination (``RankSends``), over that destination's backend.
"""

from __future__ import annotations

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.loader import build_runner, kv_cache_spec, load_model
from pdserve.engine.model_runner import ModelInput
from pdserve.engine.parallel.group import TPGroup
from pdserve.kv_transfer.registry import create_sender
from pdserve.kv_transfer.tp_destination import TPKVDestination
from pdserve.kv_transfer.tp_send import RankSends

BLOCK, NUM_BLOCKS = 4, 32
SRC = (5, 17, 2, 11, 29, 8)


def prefill_and_send(group: TPGroup | None, path: str, prompt: list[int],
                     dests: list[TPKVDestination]) -> int:
    """Prefill ``prompt`` once per destination, shipping this rank's share there; the
    number of decode ranks this rank wrote to, over all destinations."""
    torch.set_num_threads(1)
    tp, rank = (1, 0) if group is None else (group.size, group.rank)
    loaded = load_model(EngineConfig(model=path, device="cpu", block_size=BLOCK,
                                     num_kv_blocks=NUM_BLOCKS, tensor_parallel_size=tp),
                        load_tokenizer=False, group=group)
    runner = build_runner(loaded, kv_cache_spec(loaded, NUM_BLOCKS))
    table = torch.tensor(SRC[:len(dests[0].block_ids)])
    written = 0
    for dest in dests:
        sender = create_sender(dest.endpoints[0].backend)
        sends = RankSends.begin(sender, dest, rank, tp, runner.kv_cache.spec)
        try:
            def layer_done(layer: int, sends=sends) -> None:
                sends.send_layer(layer, runner.kv_cache.data[layer].index_select(1, table))

            runner.run([ModelInput(prompt, 0, SRC, sample=False)], layer_done=layer_done)
            sends.finish(timeout=30)
            written += len(sends.receivers)
        except BaseException:
            sends.abort()
            raise
        finally:
            sender.close()
    return written


def reference_cache(path: str, prompt: list[int]) -> torch.Tensor:
    """The tp 1 cache's K/V of the prompt's blocks: [L, 2, n, P, H, D]."""
    loaded = load_model(EngineConfig(model=path, device="cpu", block_size=BLOCK,
                                     num_kv_blocks=NUM_BLOCKS), load_tokenizer=False)
    runner = build_runner(loaded, kv_cache_spec(loaded, NUM_BLOCKS))
    runner.run([ModelInput(prompt, 0, SRC, sample=False)])
    n = -(-len(prompt) // BLOCK)
    return runner.kv_cache.data[:, :, list(SRC[:n])].clone()
