"""Reference paged attention in plain torch; runs on CPU (and any device).

``plan`` turns block tables into gather indices and boolean masks once per step.
Decode rows (one new token each) are grouped by length (within 1.5x of each other), each
group gathers its rows' whole blocks and is attended in one batched
``scaled_dot_product_attention`` with a length mask, so step cost follows the sum of
context lengths rather than batch size x the longest context; prefill rows (several new tokens) go one sequence at a time through
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


@dataclass
class _DecodeGroup:
    table: torch.Tensor  # [B, blocks] padded block tables
    tokens: torch.Tensor  # [B] rows of q
    lens: torch.Tensor  # [B] KV lengths
    pos: torch.Tensor  # [blocks * block_size]


# Decode rows whose lengths are within this factor share one padded batch; longer ones get
# their own, so a short sequence never pays for attending over a long one's padding.
_GROUP_SPREAD = 1.5


def _length_groups(rows: list[int], seq_lens: tuple[int, ...]) -> list[list[int]]:
    """``rows`` sorted by length -> runs whose longest is at most 1.5x their shortest."""
    groups: list[list[int]] = []
    for i in rows:
        if groups and seq_lens[i] <= _GROUP_SPREAD * seq_lens[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class TorchAttention(AttentionBackend):
    name = "torch"

    def plan(self, meta: AttentionMetadata) -> None:
        self.meta = meta
        dev, p = self.device, meta.block_size
        starts = [0]
        for q in meta.query_lens:
            starts.append(starts[-1] + q)
        dec = sorted((i for i, q in enumerate(meta.query_lens) if q == 1),
                     key=lambda i: meta.seq_lens[i])
        self._dec_masks: dict[tuple[int, int | None], torch.Tensor] = {}
        self._pre_masks: dict[tuple[int, int | None], torch.Tensor] = {}
        self.dec_groups = [self._dec_group(g, starts) for g in _length_groups(dec, meta.seq_lens)]
        self.pre_rows = []
        for i, q in enumerate(meta.query_lens):
            if q == 1:
                continue
            kv_len = meta.seq_lens[i]
            bt = torch.tensor(meta.block_tables[i], dtype=torch.long, device=dev)
            slots = (bt[:, None] * p + torch.arange(p, device=dev)).reshape(-1)[:kv_len]
            self.pre_rows.append(_PrefillRow(starts[i], starts[i + 1], slots, q, kv_len))

    def _dec_group(self, rows: list[int], starts: list[int]) -> _DecodeGroup:
        meta, dev, p = self.meta, self.device, self.meta.block_size
        width = max(len(meta.block_tables[i]) for i in rows)
        # Whole blocks are gathered (one contiguous copy per block rather than a gather per
        # token); the padding past each sequence's length is masked out.
        table = torch.tensor(
            [list(meta.block_tables[i]) + [0] * (width - len(meta.block_tables[i])) for i in rows],
            dtype=torch.long, device=dev)
        return _DecodeGroup(table, torch.tensor([starts[i] for i in rows], device=dev),
                            torch.tensor([meta.seq_lens[i] for i in rows], device=dev),
                            torch.arange(width * p, device=dev))

    def _dec_mask(self, gi: int, window: int | None) -> torch.Tensor:
        mask = self._dec_masks.get((gi, window))
        if mask is None:
            g = self.dec_groups[gi]
            lens = g.lens[:, None]
            mask = g.pos[None, :] < lens
            if window is not None:
                mask &= g.pos[None, :] >= lens - window
            self._dec_masks[(gi, window)] = mask
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
        for gi, g in enumerate(self.dec_groups):
            b = g.tokens.shape[0]
            keys = k_cache[g.table].view(b, -1, hkv, d).transpose(1, 2)  # [B, Hkv, S, D]
            vals = v_cache[g.table].view(b, -1, hkv, d).transpose(1, 2)
            qd = q[g.tokens].unsqueeze(2)  # [B, Hq, 1, D]
            o = F.scaled_dot_product_attention(
                qd, keys, vals, attn_mask=self._dec_mask(gi, window)[:, None, None, :],
                scale=self.scale, enable_gqa=True)
            out[g.tokens] = o.squeeze(2)
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
