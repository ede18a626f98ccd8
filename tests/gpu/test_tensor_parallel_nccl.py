"""Tensor parallelism over NCCL: the CPU test's scenario with one GPU per rank.

Same code as on CPU (``TPGroup`` picks NCCL for a CUDA device); float32 and the torch
attention backend, so tp 2 is held to tp 1 on GPU 0 as tightly as on CPU (2e-4: cuBLAS may
reduce in another order). Needs two GPUs: skipped on a one-GPU host.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]
ENGINE = {"dtype": "float32", "attention_backend": "torch"}


def test_tp2_over_nccl_matches_tp1(tmp_path):
    from pdserve.engine.demo_tp_model import create_tp_demo_model
    from tests.tp_harness import run_ranks
    from tests.tp_scenario import scenario

    paths = [str(create_tp_demo_model(a, tmp_path / a)) for a in ("llama", "qwen2", "mistral")]
    want = scenario(None, paths, "cuda:0", **ENGINE)
    got = run_ranks(_scenario_f32, 2, paths, device="cuda", preload=(__name__,))
    for path in paths:
        assert got[0][path]["generated"] == want[path]["generated"]
        for g, w in zip(got[0][path]["steps"], want[path]["steps"], strict=True):
            np.testing.assert_allclose(g, w, atol=2e-4, rtol=0)


def _scenario_f32(group, paths):
    from tests.tp_scenario import scenario

    return scenario(group, paths, **ENGINE)
