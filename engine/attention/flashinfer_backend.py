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

The prefill wrapper's kernel family is FlashInfer's choice ("auto": FA3 on Hopper, FA2
elsewhere) unless ``PDSERVE_FLASHINFER_PREFILL_BACKEND`` names one ("fa2" or "fa3"). An
FA3 module (one per dtype x head_dim x sliding window) takes nvcc minutes of CPU per
kernel file to JIT-compile, an FA2 one seconds; the GPU benchmarks pin "fa2" for that
reason (``benchmarks/gpu/run.sh``). The tensor-core decode wrapper always uses FA2.
"""

from __future__ import annotations

import os

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata, write_kv

# FlashInfer recommends a 128 MiB float workspace, zeroed before first use.
WORKSPACE_BYTES = 128 << 20
PREFILL_BACKEND_ENV = "PDSERVE_FLASHINFER_PREFILL_BACKEND"
PREFILL_BACKENDS = ("auto", "fa2", "fa3")


def prefill_backend() -> str:
    name = os.environ.get(PREFILL_BACKEND_ENV, "auto") or "auto"
    if name not in PREFILL_BACKENDS:
        raise ValueError(f"{PREFILL_BACKEND_ENV}={name!r}: expected one of {PREFILL_BACKENDS}")
    return name


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"

    def __init__(self, config, device, dtype):
        super().__init__(config, device, dtype)
        import flashinfer  # noqa: F401  (fail here, clearly, if the gpu extra is missing)

        self._fi = flashinfer
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._windows = sorted(set(config.sliding_windows), key=lambda w: -1 if w is None else w)
        self.prefill_backend = prefill_backend()
        self._prefill = {w: flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._workspace, "NHD", backend=self.prefill_backend) for w in self._windows}
        self._decode = {w: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=True) for w in self._windows}

    def plan(self, meta: AttentionMetadata) -> None:
        self.meta = meta
        c, p = self.config, meta.block_size
        kv_indptr, indices, last_len = [0], [], []
        for seq_len, table in zip(meta.seq_lens, meta.block_tables, strict=True):
            n_pages = (seq_len + p - 1) // p
            indices.extend(table[:n_pages])
            kv_indptr.append(kv_indptr[-1] + n_pages)
            last_len.append(seq_len - (n_pages - 1) * p)
        kv_indptr_t = torch.tensor(kv_indptr, dtype=torch.int32)
        indices_t = torch.tensor(indices, dtype=torch.int32, device=self.device)
        last_len_t = torch.tensor(last_len, dtype=torch.int32)
        dtype = self.dtype
        self.decode_only = meta.is_decode_only
        if self.decode_only:
            for w, wrapper in self._decode.items():
                wrapper.plan(
                    kv_indptr_t, indices_t, last_len_t, c.num_heads, c.num_kv_heads, c.head_dim, p,
                    pos_encoding_mode="NONE", window_left=-1 if w is None else w - 1,
                    q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale,
                )
            return
        qo_indptr = [0]
        for q in meta.query_lens:
            qo_indptr.append(qo_indptr[-1] + q)
        qo_indptr_t = torch.tensor(qo_indptr, dtype=torch.int32)
        for w, wrapper in self._prefill.items():
            wrapper.plan(
                qo_indptr_t, kv_indptr_t, indices_t, last_len_t, c.num_heads, c.num_kv_heads,
                c.head_dim, p, causal=True, pos_encoding_mode="NONE",
                window_left=-1 if w is None else w - 1, q_data_type=dtype, kv_data_type=dtype,
                sm_scale=self.scale,
            )

    def forward(self, layer, q, k, v, kv):
        write_kv(k, v, kv, self.meta.slot_mapping)
        window = self.sliding_windows[layer]
        wrapper = (self._decode if self.decode_only else self._prefill)[window]
        return wrapper.run(q.contiguous(), kv)
