"""Runs one scheduled step of the model on the paged KV cache.

The runner owns the device-side pieces (model, KV cache, attention backend). Given
the step's chunks (which tokens of which sequence, from which position, in which
blocks) it builds the flat input ids, positions and slot mapping, plans attention once,
runs the model, and returns logits for the rows that need sampling. It knows nothing
about requests' sampling or stopping, so the prefill worker, the decode worker and the
single-process engine all use it unchanged.

CUDA graphs: after ``capture_decode_graphs(sizes, max_model_len)`` (``loader.build_runner``
calls it when ``EngineConfig`` wants graphs) a decode-only step of B rows, B <= the largest
captured size, with no ``all_logits`` and no ``layer_done``, replays the graph of the
smallest captured size >= B (``engine/graphs/``); every other step runs eagerly, as does
every step while ``graphs_active`` is False (benchmarks and tests compare the two). The
graphs reserve the cache's last block as scratch for padded rows: ``usable_blocks`` is
what a block manager may hand out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.graphs.decode_graphs import CaptureStats, DecodeGraphs
from pdserve.engine.graphs.padding import graph_eligible
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.models.llama import LlamaForCausalLM
from pdserve.engine.step_inputs import ModelInput, flatten_inputs

__all__ = ["ModelInput", "ModelRunner"]


class ModelRunner:
    # A failure outside any step that leaves the runner unusable (a tensor-parallel rank
    # lost while the instance idled): health checks read it; the next step raises it.
    error: BaseException | None = None

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, attn: AttentionBackend,
                 device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.attn = attn
        self.device = device
        self.block_size = kv_cache.spec.block_size
        self.graphs: DecodeGraphs | None = None
        self.graphs_active = True  # False: every step eager even with graphs captured

    @property
    def usable_blocks(self) -> int:
        """Blocks a block manager may hand out: all but the graphs' scratch block."""
        return self.kv_cache.spec.num_blocks - (self.graphs is not None)

    def capture_decode_graphs(self, sizes: Sequence[int], max_model_len: int) -> CaptureStats:
        """Capture one decode graph per batch size; the cache's last block becomes the
        scratch block padded rows use (so call before any block is handed out)."""
        if self.graphs is not None:
            raise RuntimeError("decode graphs are already captured")
        num_blocks = self.kv_cache.spec.num_blocks
        if num_blocks < 2:
            raise ValueError("CUDA graphs need a KV cache of at least 2 blocks (one is scratch)")
        # A sequence can neither outgrow max_model_len nor hold more than the real blocks.
        max_pages = min(-(-max_model_len // self.block_size), num_blocks - 1)
        graphs = DecodeGraphs(self.model, self.kv_cache, self.attn, self.device, sizes,
                              scratch_block=num_blocks - 1, max_pages_per_seq=max_pages)
        stats = graphs.capture()
        self.graphs = graphs
        return stats

    def run(self, inputs: Sequence[ModelInput], all_logits: bool = False,
            layer_done: Callable[[int], None] | None = None, extra: bytes = b"",
            reply: int = 0) -> torch.Tensor | None:
        """Logits [rows, vocab] in float32: one row per input with ``sample`` set (its last
        token), or one per token of every input if ``all_logits``. A tensor-parallel rank
        other than 0 runs the same step (every rank must, with the same inputs) and gets None.
        ``extra``/``reply``: what the other ranks of a tensor-parallel instance get with the
        step and owe after it (``executor.DrivingRunner``); nothing to do with one rank."""
        if not inputs:
            raise ValueError("empty step")
        graphs = self.graphs
        if (graphs is not None and self.graphs_active and graph_eligible(inputs, all_logits,
                                                                         layer_done)
                and graphs.padded_size(len(inputs)) is not None):
            return graphs.run(inputs)
        flat = flatten_inputs(inputs, self.block_size)
        meta = AttentionMetadata(
            query_lens=flat.query_lens, seq_lens=flat.seq_lens, block_tables=flat.block_tables,
            slot_mapping=torch.tensor(flat.slots, dtype=torch.long, device=self.device),
            block_size=self.block_size,
        )
        self.attn.plan(meta)
        logits_idx = None if all_logits else torch.tensor(flat.sample_rows, dtype=torch.long,
                                                             device=self.device)
        return self.model.forward(
            torch.tensor(flat.ids, dtype=torch.long, device=self.device),
            torch.tensor(flat.positions, dtype=torch.long, device=self.device),
            self.kv_cache, self.attn, logits_idx, layer_done,
        )

    # -- the worker layer's exchanges with the other ranks (trivial with one rank) ------
    @property
    def num_ranks(self) -> int:
        return 1

    def agree(self, values: Sequence[int]) -> list[int]:
        """The element-wise MIN of every rank's answer to the last step's ``reply``."""
        return list(values)

    def control(self, extra: bytes, reply: int = 0) -> None:
        """Hand ``extra`` to the other ranks without running the model; with ``reply`` > 0
        every rank owes that many integers, collected by ``agree`` after this rank's part."""

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` in rank order (once, before any step)."""
        return [data]

    def close(self) -> None:
        """Release what the runner holds beyond memory (a tensor-parallel rank 0's
        followers); nothing here."""
