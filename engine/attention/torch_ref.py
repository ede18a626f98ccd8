"""Reference paged attention in plain torch; runs on CPU (and any device).

``plan`` turns block tables into gather indices and boolean masks once per step.
Decode rows (one new token each) gather their whole blocks and are attended together
in one batched ``scaled_dot_product_attention`` with a length mask; prefill rows (several new tokens) go one sequence at a time through
``scaled_dot_product_attention`` with an explicit bottom-right causal mask, because
SDPA's own ``is_causal`` is top-left aligned and would be wrong for chunked prefill
or prefix-cache hits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata, write_kv


@dataclass
class _PrefillRow:
    start: int
    end: int
    slots: torch.Tensor  # [kv_len]
    q_len: int
    kv_len: int


class TorchAttention(AttentionBackend):
    name = "torch"

    def plan(self, meta: AttentionMetadata) -> None:
        self.meta = meta
        dev, p = self.device, meta.block_size
        starts = [0]
        for q in meta.query_lens:
            starts.append(starts[-1] + q)
        dec = [i for i, q in enumerate(meta.query_lens) if q == 1]
        self._dec_masks: dict[int | None, torch.Tensor] = {}
        self._pre_masks: dict[tuple[int, int | None], torch.Tensor] = {}
        self.dec_tokens = None
        if dec:
            lens = torch.tensor([meta.seq_lens[i] for i in dec], device=dev)
            width = max(len(meta.block_tables[i]) for i in dec)
            table = torch.tensor(
                [list(meta.block_tables[i]) + [0] * (width - len(meta.block_tables[i])) for i in dec],
                dtype=torch.long, device=dev,
            )
            # Whole blocks are gathered (one contiguous copy per block rather than a gather
            # per token); the padding past each sequence's length is masked out.
            self.dec_table = table
            self.dec_tokens = torch.tensor([starts[i] for i in dec], device=dev)
            self._dec_pos = torch.arange(width * p, device=dev)
            self._dec_lens = lens
        self.pre_rows = []
        for i, q in enumerate(meta.query_lens):
            if q == 1:
                continue
            kv_len = meta.seq_lens[i]
            bt = torch.tensor(meta.block_tables[i], dtype=torch.long, device=dev)
            slots = (bt[:, None] * p + torch.arange(p, device=dev)).reshape(-1)[:kv_len]
            self.pre_rows.append(_PrefillRow(starts[i], starts[i + 1], slots, q, kv_len))

    def _dec_mask(self, window: int | None) -> torch.Tensor:
        mask = self._dec_masks.get(window)
        if mask is None:
            lens = self._dec_lens[:, None]
            mask = self._dec_pos[None, :] < lens
            if window is not None:
                mask &= self._dec_pos[None, :] >= lens - window
            self._dec_masks[window] = mask
        return mask

    def _pre_mask(self, row: _PrefillRow, window: int | None) -> torch.Tensor:
        key = (row.start, window)
        mask = self._pre_masks.get(key)
        if mask is None:
            qpos = torch.arange(row.q_len, device=self.device)[:, None] + (row.kv_len - row.q_len)
            kpos = torch.arange(row.kv_len, device=self.device)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            self._pre_masks[key] = mask
        return mask

    def forward(self, layer, q, k, v, kv):
        write_kv(k, v, kv, self.meta.slot_mapping)
        k_cache, v_cache = kv
        hkv, d = k_cache.shape[-2:]
        flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
        window = self.sliding_windows[layer]
        out = torch.empty_like(q)
        if self.dec_tokens is not None:
            b = self.dec_tokens.shape[0]
            keys = k_cache[self.dec_table].view(b, -1, hkv, d).transpose(1, 2)  # [B, Hkv, S, D]
            vals = v_cache[self.dec_table].view(b, -1, hkv, d).transpose(1, 2)
            qd = q[self.dec_tokens].unsqueeze(2)  # [B, Hq, 1, D]
            o = F.scaled_dot_product_attention(
                qd, keys, vals, attn_mask=self._dec_mask(window)[:, None, None, :],
                scale=self.scale, enable_gqa=True)
            out[self.dec_tokens] = o.squeeze(2)
        for row in self.pre_rows:
            qr = q[row.start:row.end].transpose(0, 1).unsqueeze(0)
            kr = flat_k[row.slots].transpose(0, 1).unsqueeze(0)
            vr = flat_v[row.slots].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qr, kr, vr, attn_mask=self._pre_mask(row, window), scale=self.scale,
                enable_gqa=True,
            )
            out[row.start:row.end] = o.squeeze(0).transpose(0, 1)
        return out
