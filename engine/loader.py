"""Building a model and its KV cache from an ``EngineConfig``.

Shared by the single-process engine and by the prefill and decode workers, so all of
them load checkpoints, pick dtypes and size caches the same way. ``load_model`` reads
config, weights and tokenizer once; ``build_runner`` sizes and allocates the paged KV
cache (or wraps a buffer the caller provides, e.g. shared memory for KV transfer) and
wires the attention backend.

With ``tensor_parallel_size > 1`` each rank process calls ``load_model`` with its joined
``TPGroup``: it reads only its shard of the weights, and its cache and attention backend
are sized by its own heads (``rank_config``); ``kv_head_range`` says which global KV heads
its cache holds. The ranks agree on one block count (the smallest any of them can hold),
so a block id means the same tokens on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.attention.registry import create_backend
from pdserve.engine.checkpoint import ensure_model_present, has_tokenizer
from pdserve.engine.config import DEFAULT_CPU_KV_BYTES, EngineConfig
from pdserve.engine.graphs.sizes import capture_sizes, graphs_wanted
from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.models.llama import LlamaForCausalLM
from pdserve.engine.parallel.group import TPGroup
from pdserve.engine.parallel.layers import SingleDevice, TensorParallel
from pdserve.engine.parallel.shard import HeadRange, TPShard
from pdserve.engine.tokenizer import Tokenizer
from pdserve.engine.weights import load_weights


@dataclass
class LoadedModel:
    config: EngineConfig
    model_config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer | None
    device: torch.device
    dtype: torch.dtype
    shard: TPShard | None = None  # None: the whole model (tp=1)
    group: TPGroup | None = None

    def __post_init__(self) -> None:
        if self.shard is None:
            self.shard = TPShard.for_rank(self.model_config)

    @property
    def rank_config(self) -> ModelConfig:
        """The model as this rank holds it (its heads, its MLP width); the model itself at tp=1."""
        return self.shard.local_config(self.model_config)

    @property
    def kv_head_range(self) -> HeadRange:
        """The global KV heads this rank's cache holds (all of them at tp=1)."""
        return self.shard.kv_heads

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len or self.model_config.max_position_embeddings

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= self.tokenizer.eos_token_ids
        return frozenset(ids)


def load_model(config: EngineConfig, load_tokenizer: bool = True,
               group: TPGroup | None = None) -> LoadedModel:
    """``group``: this rank's joined group, required iff ``config.tensor_parallel_size > 1``."""
    tp = config.tensor_parallel_size
    if (group.size if group is not None else 1) != tp:
        raise ValueError(f"tensor_parallel_size {tp} needs a joined group of {tp} ranks, got "
                         f"{'none' if group is None else group.size}")
    ensure_model_present(config.model)
    model_config = ModelConfig.from_pretrained(config.model)
    shard = TPShard.for_rank(model_config, tp, group.rank if group is not None else 0)
    if config.max_model_len and config.max_model_len > model_config.max_position_embeddings:
        raise ValueError(
            f"max_model_len {config.max_model_len} exceeds the model's "
            f"max_position_embeddings {model_config.max_position_embeddings}"
        )
    device = config.resolve_device()
    dtype = config.resolve_dtype(model_config.torch_dtype, device)
    torch.manual_seed(config.seed)
    weights = load_weights(config.model, model_config, dtype, device, shard)
    tokenizer = None
    if load_tokenizer and has_tokenizer(config.model):
        tokenizer = Tokenizer.from_pretrained(config.model)
    parallel = SingleDevice() if group is None else TensorParallel(group, shard,
                                                                     model_config.vocab_size)
    model = LlamaForCausalLM(shard.local_config(model_config), weights, device, parallel)
    return LoadedModel(config, model_config, model, tokenizer, device, dtype, shard, group)


def num_kv_blocks(loaded: LoadedModel) -> int:
    cfg = loaded.config
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    per_block = cfg.block_size * loaded.rank_config.kv_bytes_per_token(
        torch.empty((), dtype=loaded.dtype).element_size())
    budget = cfg.kv_cache_memory_bytes
    if budget is None:
        if loaded.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(loaded.device)
            budget = int(free - total * (1 - cfg.gpu_memory_utilization))
        else:
            budget = DEFAULT_CPU_KV_BYTES
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(f"KV cache budget of {budget} bytes holds no block of {per_block} bytes")
    return int(blocks) if loaded.group is None else loaded.group.min_int(int(blocks))


def kv_cache_spec(loaded: LoadedModel, num_blocks: int | None = None) -> KVCacheSpec:
    return KVCacheSpec.for_model(loaded.rank_config, num_blocks or num_kv_blocks(loaded),
                                 loaded.config.block_size, loaded.dtype)


def build_runner(loaded: LoadedModel, spec: KVCacheSpec | None = None,
                 kv_buffer: torch.Tensor | None = None) -> ModelRunner:
    spec = spec or kv_cache_spec(loaded)
    cache = KVCache(spec, loaded.device, buffer=kv_buffer)
    cfg = loaded.config
    attn = create_backend(cfg.attention_backend, loaded.rank_config, loaded.device,
                          loaded.dtype, flashinfer_prefill_backend=cfg.flashinfer_prefill_backend)
    runner = ModelRunner(loaded.model, cache, attn, loaded.device)
    if graphs_wanted(cfg.enforce_eager, loaded.device.type, attn.supports_cuda_graphs,
                     cfg.tensor_parallel_size):
        runner.capture_decode_graphs(capture_sizes(cfg.cuda_graph_sizes, cfg.max_num_seqs),
                                     loaded.max_model_len)
    return runner
