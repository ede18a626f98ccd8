"""Captured CUDA graphs of the decode step, one per padded batch size.

Lifecycle (the ``ModelRunner`` drives it): ``DecodeGraphs(...)`` allocates the static
inputs (token ids, positions and slot mapping as one [3, largest] int64 device tensor;
each size uses its first ``size`` columns) and asks the attention backend for per-size
graph wrappers; ``capture()`` warms each size up eagerly, then captures it on a side
stream into one shared memory pool, largest size first (the smaller graphs then reuse
the largest one's activations memory); ``run(inputs)`` pads a decode batch of B rows to
the smallest captured size >= B (``padding.py``: extra rows write and read only the
scratch block), copies ids/positions/slots into the static inputs, plans attention
outside the graph (``plan_for_graph``), replays, and returns the logits of the sampled
rows (the padded rows' logits are dropped).

What a graph captures: the whole ``LlamaForCausalLM.forward`` over the static inputs, so
RoPE reads the positions and ``write_kv`` the slot mapping from those buffers at replay,
and FlashInfer reads the page table its ``plan`` copied into the wrapper's fixed buffers.
``run_eager`` runs the same padded step through the same wrappers without the graph: the
same kernels on the same shapes, which is what the exactness test compares against.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.graphs.padding import pad_decode_inputs, scratch_input
from pdserve.engine.graphs.sizes import padded_size
from pdserve.engine.host_copy import staged, upload
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.step_inputs import FlatBatch, ModelInput, flatten_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureStats:
    """What capturing cost: wall time for all sizes (warm-up included) and device memory
    (``free_bytes_used``: drop of the device's free memory, which includes the graph pool,
    cuBLAS workspaces and FlashInfer's per-wrapper buffers; ``torch_reserved_bytes``: growth
    of torch's caching allocator alone)."""

    sizes: tuple[int, ...]
    seconds: float
    free_bytes_used: int
    torch_reserved_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


class DecodeGraphs:
    def __init__(self, model, kv_cache: KVCache, attn: AttentionBackend, device: torch.device,
                 sizes: Sequence[int], scratch_block: int, max_pages_per_seq: int):
        if not sizes:
            raise ValueError("no CUDA graph sizes")
        self.model, self.kv_cache, self.attn, self.device = model, kv_cache, attn, device
        self.sizes = tuple(sorted(sizes))
        self.scratch_block = scratch_block
        self.block_size = kv_cache.spec.block_size
        # Rows: token ids, positions, slot mapping.
        self._inputs = torch.zeros(3, self.sizes[-1], dtype=torch.long, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self.stats: CaptureStats | None = None
        attn.init_cuda_graphs(self.sizes, max_pages_per_seq)

    def padded_size(self, batch: int) -> int | None:
        return padded_size(self.sizes, batch)

    def _prepare(self, inputs: Sequence[ModelInput]) -> tuple[int, FlatBatch]:
        """Pad, fill the static inputs, plan attention; the padded size and flat batch."""
        size = self.padded_size(len(inputs))
        if size is None:
            raise ValueError(f"a batch of {len(inputs)} exceeds the largest graph {self.sizes[-1]}")
        return size, self._load(pad_decode_inputs(inputs, size, self.scratch_block))

    @torch.inference_mode()  # the buffers may be inference tensors (built under it)
    def _load(self, padded: Sequence[ModelInput]) -> FlatBatch:
        """Fill the static inputs' first ``len(padded)`` columns and plan attention."""
        size = len(padded)
        flat = flatten_inputs(padded, self.block_size)
        # One host-to-device copy for all three rows, not waiting for the device.
        host = torch.tensor([flat.ids, flat.positions, flat.slots], dtype=torch.long)
        self._inputs[:, :size].copy_(staged(host, self.device), non_blocking=True)
        self.attn.plan_for_graph(AttentionMetadata(
            flat.query_lens, flat.seq_lens, flat.block_tables, self._inputs[2, :size],
            self.block_size))
        return flat

    def _forward(self, size: int) -> torch.Tensor:
        return self.model.forward(self._inputs[0, :size], self._inputs[1, :size],
                                  self.kv_cache, self.attn, None)

    def _sampled(self, logits: torch.Tensor, flat: FlatBatch) -> torch.Tensor:
        """The sampled rows' logits as a fresh tensor (the graph's output buffer is
        overwritten by the next replay); padded rows are never sampled."""
        rows = flat.sample_rows
        if rows == list(range(len(rows))):
            return logits[:len(rows)].clone()
        return logits[upload(torch.tensor(rows, dtype=torch.long), self.device)]

    def run(self, inputs: Sequence[ModelInput]) -> torch.Tensor:
        """Logits [sampled rows, vocab] of a decode-only batch, by graph replay."""
        size, flat = self._prepare(inputs)
        self._graphs[size].replay()
        return self._sampled(self._logits[size], flat)

    def run_eager(self, inputs: Sequence[ModelInput]) -> torch.Tensor:
        """The same padded step and wrappers as ``run``, launched op by op (no graph)."""
        size, flat = self._prepare(inputs)
        return self._sampled(self._forward(size), flat)

    def capture(self) -> CaptureStats:
        dev = self.device
        torch.cuda.synchronize(dev)
        free0, reserved0 = torch.cuda.mem_get_info(dev)[0], torch.cuda.memory_reserved(dev)
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):  # largest first: the pool is sized by it
                self._load([scratch_input(self.scratch_block)] * size)  # all rows padding
                self._forward(size)  # warm-up: lazy inits and workspaces outside the graph
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's CUDA calls (a worker's) do not void it.
                with torch.cuda.graph(graph, pool=pool, stream=stream,
                                      capture_error_mode="thread_local"):
                    self._logits[size] = self._forward(size)
                self._graphs[size] = graph
        torch.cuda.current_stream(dev).wait_stream(stream)
        torch.cuda.synchronize(dev)
        self.stats = CaptureStats(self.sizes, time.perf_counter() - t0,
                                  free0 - torch.cuda.mem_get_info(dev)[0],
                                  torch.cuda.memory_reserved(dev) - reserved0)
        log.info("captured %d decode CUDA graphs (batch sizes %s) in %.2f s, %.0f MiB of "
                 "device memory (%.0f MiB in torch's pool)", len(self.sizes),
                 ",".join(map(str, self.sizes)), self.stats.seconds,
                 self.stats.free_bytes_used / 2**20, self.stats.torch_reserved_bytes / 2**20)
        return self.stats
