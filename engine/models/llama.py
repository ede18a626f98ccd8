"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

One ``forward`` runs a whole scheduled step: the new tokens of every sequence in the
batch are flattened into one [T] vector (prefill chunks and decode tokens alike), so
each layer is a handful of large matmuls. Attention is delegated to the step's
``AttentionBackend``, which writes this step's K/V into the cache by slot and reads
each sequence's history through its block table. An optional ``layer_done`` callback
fires after each layer's K/V is in the cache, which is what layer-by-layer KV transfer
hooks into.

Under tensor parallelism the same code runs on every rank with that rank's shard of the
weights and a rank-local ``config`` (its own heads and MLP width, ``TPShard.local_config``);
``parallel`` supplies the embedding, the row-parallel projections and the logits, which
are where the ranks talk (``engine/parallel/layers.py``). Only rank 0 gets logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pdserve.engine.attention.base import AttentionBackend
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.parallel.layers import Parallelism, SingleDevice
from pdserve.engine.rope import RotaryEmbedding, apply_rotary
from pdserve.engine.weights import ModelWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the model dtype, as the reference implementation does.
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


class LlamaForCausalLM:
    """Stateless apart from its weights: the KV cache and attention plan come per call."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, device: torch.device,
                 parallel: Parallelism | None = None):
        self.config = config
        self.w = weights
        self.parallel = parallel or SingleDevice()
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, device)
        self.scale = config.head_dim ** -0.5

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        attn: AttentionBackend,
        logits_indices: torch.Tensor | None,
        layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor | None:
        """input_ids/positions [T]; returns logits [len(logits_indices), vocab] (all T if None),
        or None on a tensor-parallel rank other than 0.

        ``attn.plan`` must already have been called for this step.
        """
        c = self.config
        par = self.parallel
        t = input_ids.shape[0]
        h = par.embed(input_ids, self.w.embed)
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        q_end, k_end = c.q_size, c.q_size + c.kv_size
        for i, lw in enumerate(self.w.layers):
            x = rms_norm(h, lw.input_norm, c.rms_norm_eps)
            qkv = F.linear(x, lw.qkv, lw.qkv_bias)
            q = apply_rotary(qkv[:, :q_end].view(t, c.num_heads, c.head_dim), cos, sin)
            k = apply_rotary(qkv[:, q_end:k_end].view(t, c.num_kv_heads, c.head_dim), cos, sin)
            v = qkv[:, k_end:].view(t, c.num_kv_heads, c.head_dim)
            o = attn.forward(i, q, k, v, kv_cache.layer(i))
            h = h + par.row_linear(o.reshape(t, c.q_size), lw.o_proj, lw.o_bias)
            x = rms_norm(h, lw.post_norm, c.rms_norm_eps)
            gate, up = F.linear(x, lw.gate_up).chunk(2, dim=-1)
            h = h + par.row_linear(F.silu(gate) * up, lw.down, None)
            if layer_done is not None:
                layer_done(i)
        if logits_indices is not None:
            h = h[logits_indices]
        h = rms_norm(h, self.w.norm, c.rms_norm_eps)
        return par.logits(h, self.w.lm_head)
