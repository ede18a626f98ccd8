"""Disaggregated serving across two processes on one GPU equals the single-process engine.

A prefill process and a decode process (``benchmarks/gpu/proc_hosts.py``: the real hosts
in spawned processes, the real router and gRPC server here, no Ray) with KV moving by
CUDA IPC; each prompt is sent alone, greedy. The tokens must equal ``LLMEngine``'s on
the same checkpoint, prompt by prompt, exactly: the same kernels see the same shapes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NEW_TOKENS = 16


def test_disaggregated_cuda_ipc_equals_single_process_engine(gpu_checkpoint, prefill_backend):
    from pdserve.benchmarks.gpu.proc_hosts import ProcCluster, sequential_greedy
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.kv_transfer.backend_config import KVTransferConfig

    cfg = EngineConfig(model=str(gpu_checkpoint), device="cuda", dtype="bfloat16",
                       num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=512,
                       max_model_len=1024, flashinfer_prefill_backend=prefill_backend)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 37, 300)]
    engine = LLMEngine.from_config(cfg)
    params = SamplingParams(max_tokens=NEW_TOKENS)
    want = [list(engine.generate([p], params)[0].token_ids) for p in prompts]
    del engine
    torch.cuda.empty_cache()

    prefill_cfg = dataclasses.replace(cfg, num_kv_blocks=128)
    with ProcCluster(str(gpu_checkpoint), prefill_cfg, cfg,
                     KVTransferConfig(backend="cuda_ipc", timeout_s=60.0)) as cluster:
        got = sequential_greedy(cluster.address, prompts, NEW_TOKENS)
        stats = cluster.stats()
    assert got == want
    prefill = next(s for s in stats if s.worker_id.startswith("prefill"))
    assert prefill.completed == len(prompts) and prefill.failed == 0
