"""FlashInfer paged attention for CUDA (imported only when selected).

Per step, ``plan`` builds FlashInfer's page-table arrays (int32 ``indptr``,
``indices``, ``last_page_len``; indptr and last_page_len on the CPU so planning does
not sync the device) and calls ``wrapper.plan`` once; every layer then calls ``run``.
A step with any multi-token row uses ``BatchPrefillWithPagedKVCacheWrapper`` for all
rows (a decode row is simply a prefill row of length 1; ``causal=True`` is
bottom-right aligned, which is what chunked prefill and prefix hits need); a pure
decode step uses ``BatchDecodeWithPagedKVCacheWrapper``. RoPE is applied by the model
(``pos_encoding_mode="NONE"``), so the cache holds rotated K exactly as the torch
reference backend does and blocks move between backends and workers unchanged.
Layers with different sliding windows get their own wrapper, since ``window_left`` is
a planning argument.

CUDA graphs (``engine/graphs/``): ``init_cuda_graphs(sizes, max_pages)`` adds, per
captured batch size and sliding window, a decode wrapper built with
``use_cuda_graph=True`` over fixed int32 device buffers (FlashInfer copies each plan's
page table into them, so a captured ``run`` reads the step's table at replay).
``plan_for_graph(meta)`` plans those wrappers (outside the graph; ``meta`` is already
padded to a captured size) and routes ``forward`` to them until the next ``plan``.

The prefill wrapper's kernel family comes from ``EngineConfig.flashinfer_prefill_backend``
("auto": FlashInfer's choice, FA3 on Hopper, FA2 elsewhere; or "fa2" / "fa3"). An FA3
module (one per dtype x head_dim x sliding window) takes nvcc minutes of CPU per kernel
file to JIT-compile, an FA2 one seconds; the GPU benchmarks pin "fa2" for that reason
(``benchmarks/gpu/run.sh``). The tensor-core decode wrapper always uses FA2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata, write_kv
from pdserve.engine.host_copy import upload

# FlashInfer recommends a 128 MiB float workspace, zeroed before first use.
WORKSPACE_BYTES = 128 << 20
PREFILL_BACKENDS = ("auto", "fa2", "fa3")


def page_table(seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
               block_size: int) -> tuple[list[int], list[int], list[int]]:
    """FlashInfer's CSR page table: ``indptr`` [B + 1], ``indices`` (each sequence's
    first ceil(len / block_size) blocks, concatenated) and ``last_page_len`` [B], each in
    [1, block_size]."""
    indptr, indices, last_len = [0], [], []
    for seq_len, table in zip(seq_lens, block_tables, strict=True):
        n_pages = (seq_len + block_size - 1) // block_size
        indices.extend(table[:n_pages])
        indptr.append(indptr[-1] + n_pages)
        last_len.append(seq_len - (n_pages - 1) * block_size)
    return indptr, indices, last_len


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"
    supports_cuda_graphs = True

    def __init__(self, config, device, dtype, prefill_backend: str = "auto"):
        super().__init__(config, device, dtype)
        import flashinfer  # noqa: F401  (fail here, clearly, if the gpu extra is missing)

        if prefill_backend not in PREFILL_BACKENDS:
            raise ValueError(f"prefill_backend must be one of {PREFILL_BACKENDS}, "
                             f"got {prefill_backend!r}")
        self._fi = flashinfer
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._windows = sorted(set(config.sliding_windows), key=lambda w: -1 if w is None else w)
        self.prefill_backend = prefill_backend
        self._prefill = {w: flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._workspace, "NHD", backend=self.prefill_backend) for w in self._windows}
        self._decode = {w: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=True) for w in self._windows}
        # (batch size, window) -> decode wrapper over fixed buffers; see init_cuda_graphs.
        self._graph_decode: dict[tuple[int, int | None], object] = {}
        self._active: dict[int | None, object] = {}

    def init_cuda_graphs(self, sizes: Sequence[int], max_pages_per_seq: int) -> None:
        """One graph-safe decode wrapper per (size, sliding window), each over its own
        fixed int32 ``indptr`` [size + 1], ``indices`` [size * max_pages_per_seq] and
        ``last_page_len`` [size] device buffers, sharing the float workspace (one step
        runs at a time)."""
        i32, dev = torch.int32, self.device
        for size in sizes:
            for w in self._windows:
                self._graph_decode[(size, w)] = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                    self._workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
                    paged_kv_indptr_buffer=torch.zeros(size + 1, dtype=i32, device=dev),
                    paged_kv_indices_buffer=torch.zeros(size * max_pages_per_seq, dtype=i32,
                                                        device=dev),
                    paged_kv_last_page_len_buffer=torch.zeros(size, dtype=i32, device=dev))

    def plan(self, meta: AttentionMetadata) -> None:
        self.meta = meta
        self.decode_only = meta.is_decode_only
        wrappers = self._decode if self.decode_only else self._prefill
        self._active = wrappers
        if self.decode_only:
            self._plan_decode(meta, wrappers)
            return
        c, p, dtype = self.config, meta.block_size, self.dtype
        kv_indptr, indices, last_len = page_table(meta.seq_lens, meta.block_tables, p)
        qo_indptr = [0]
        for q in meta.query_lens:
            qo_indptr.append(qo_indptr[-1] + q)
        for w, wrapper in wrappers.items():
            wrapper.plan(
                torch.tensor(qo_indptr, dtype=torch.int32),
                torch.tensor(kv_indptr, dtype=torch.int32),
                torch.tensor(indices, dtype=torch.int32, device=self.device),
                torch.tensor(last_len, dtype=torch.int32), c.num_heads, c.num_kv_heads,
                c.head_dim, p, causal=True, pos_encoding_mode="NONE",
                window_left=-1 if w is None else w - 1, q_data_type=dtype, kv_data_type=dtype,
                sm_scale=self.scale,
            )

    def plan_for_graph(self, meta: AttentionMetadata) -> None:
        """Plan the graph wrappers of size ``len(meta.seq_lens)`` (a captured size; decode
        rows only); ``forward`` uses them until the next ``plan``. Call outside the graph."""
        if not meta.is_decode_only:
            raise ValueError("a decode graph runs decode rows only")
        size = len(meta.seq_lens)
        wrappers = {w: self._graph_decode[(size, w)] for w in self._windows
                    if (size, w) in self._graph_decode}
        if len(wrappers) != len(self._windows):
            raise ValueError(f"no CUDA-graph decode wrappers for batch size {size}")
        self.meta, self.decode_only, self._active = meta, True, wrappers
        self._plan_decode(meta, wrappers)

    def _plan_decode(self, meta: AttentionMetadata, wrappers: dict) -> None:
        c, p, dtype = self.config, meta.block_size, self.dtype
        kv_indptr, indices, last_len = page_table(meta.seq_lens, meta.block_tables, p)
        kv_indptr_t = torch.tensor(kv_indptr, dtype=torch.int32)
        # On the device already, uploaded without waiting: a blocking copy, here or in plan
        # (which copies a CPU tensor into a graph wrapper's buffer blocking), would wait
        # for the device to finish the previous step.
        indices_t = upload(torch.tensor(indices, dtype=torch.int32), self.device)
        last_len_t = torch.tensor(last_len, dtype=torch.int32)
        for w, wrapper in wrappers.items():
            wrapper.plan(
                kv_indptr_t, indices_t, last_len_t, c.num_heads, c.num_kv_heads, c.head_dim, p,
                pos_encoding_mode="NONE", window_left=-1 if w is None else w - 1,
                q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale,
            )

    def forward(self, layer, q, k, v, kv):
        write_kv(k, v, kv, self.meta.slot_mapping)
        return self._active[self.sliding_windows[layer]].run(q.contiguous(), kv)
