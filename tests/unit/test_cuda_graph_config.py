"""CUDA-graph and kernel-switch configuration: EngineConfig validation, which sizes are
captured, which graph a batch uses, when graphs are used at all (no GPU needed)."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.engine.config import EngineConfig
from pdserve.engine.graphs.sizes import (
    DEFAULT_CUDA_GRAPH_SIZES,
    MAX_CUDA_GRAPH_SIZE,
    capture_sizes,
    graphs_wanted,
    padded_size,
    validate_sizes,
)


def test_defaults_are_graphs_on_with_the_default_sizes_and_auto_kernels():
    c = EngineConfig(model="m")
    assert c.enforce_eager is False
    assert c.cuda_graph_sizes == DEFAULT_CUDA_GRAPH_SIZES
    assert list(c.cuda_graph_sizes) == sorted(set(c.cuda_graph_sizes))
    assert c.flashinfer_prefill_backend == "auto"


def test_sizes_are_normalised_to_a_sorted_tuple_and_the_config_stays_frozen_and_hashable():
    c = EngineConfig(model="m", cuda_graph_sizes=[8, 1, 4])
    assert c.cuda_graph_sizes == (1, 4, 8)
    assert hash(c) == hash(EngineConfig(model="m", cuda_graph_sizes=(4, 8, 1)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.enforce_eager = True
    # replace re-validates
    assert dataclasses.replace(c, cuda_graph_sizes=[2]).cuda_graph_sizes == (2,)


@pytest.mark.parametrize("sizes, match", [
    ((), "at least one"),
    ([0, 1], "in \\[1,"),
    ([-4], "in \\[1,"),
    ([MAX_CUDA_GRAPH_SIZE + 1], "in \\[1,"),
    ([1, 2, 2], "duplicates"),
    ([1, 2.0], "integers"),
    ([True], "integers"),
    ("1,2", "sequence of ints"),
])
def test_bad_cuda_graph_sizes_are_rejected(sizes, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model="m", cuda_graph_sizes=sizes)


def test_enforce_eager_must_be_a_bool():
    assert EngineConfig(model="m", enforce_eager=True).enforce_eager is True
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(model="m", enforce_eager="yes")


@pytest.mark.parametrize("name", ["auto", "fa2", "fa3"])
def test_flashinfer_prefill_backend_accepts_the_kernel_families(name):
    assert EngineConfig(model="m", flashinfer_prefill_backend=name).flashinfer_prefill_backend == name


@pytest.mark.parametrize("name", ["", "FA2", "fa4", "trtllm-gen"])
def test_flashinfer_prefill_backend_rejects_anything_else(name):
    with pytest.raises(ValueError, match="flashinfer_prefill_backend"):
        EngineConfig(model="m", flashinfer_prefill_backend=name)


def test_validate_sizes_sorts():
    assert validate_sizes([16, 1, 2]) == (1, 2, 16)


@pytest.mark.parametrize("sizes, max_num_seqs, want", [
    (DEFAULT_CUDA_GRAPH_SIZES, 64, (1, 2, 4, 8, 16, 24, 32, 48, 64)),
    (DEFAULT_CUDA_GRAPH_SIZES, 128, (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)),
    # 40 is not a size: the next one up is captured, so a batch of 40 still has a graph
    (DEFAULT_CUDA_GRAPH_SIZES, 40, (1, 2, 4, 8, 16, 24, 32, 48)),
    ((8, 16), 3, (8,)),
    ((1, 2, 4), 100, (1, 2, 4)),  # nothing above: batches of 5..100 run eagerly
    ((4, 1, 2, 4), 4, (1, 2, 4)),
])
def test_capture_sizes(sizes, max_num_seqs, want):
    assert capture_sizes(sizes, max_num_seqs) == want


def test_padded_size_is_the_smallest_captured_size_that_holds_the_batch():
    sizes = (1, 2, 4, 8, 16, 24, 32)
    assert [padded_size(sizes, b) for b in (1, 2, 3, 4, 5, 8, 9, 17, 24, 25, 32)] == \
        [1, 2, 4, 4, 8, 8, 16, 24, 24, 32, 32]
    assert padded_size(sizes, 33) is None
    with pytest.raises(ValueError):
        padded_size(sizes, 0)


@pytest.mark.parametrize("eager, device, supports, tp, want", [
    (False, "cuda", True, 1, True),
    (True, "cuda", True, 1, False),   # enforce_eager
    (False, "cpu", True, 1, False),   # CPU: never
    (False, "cuda", False, 1, False),  # torch reference backend: never
    (False, "cuda", True, 2, False),  # tensor parallel: not built
])
def test_graphs_wanted(eager, device, supports, tp, want):
    assert graphs_wanted(eager, device, supports, tp) is want


def test_cli_flags_reach_the_engine_config():
    import argparse

    from pdserve.cluster.cli.common import add_gpu_engine_args, gpu_engine_kwargs

    p = argparse.ArgumentParser()
    add_gpu_engine_args(p)
    defaults = EngineConfig(model="m", **gpu_engine_kwargs(p.parse_args([])))
    assert defaults == EngineConfig(model="m")
    args = p.parse_args(["--enforce-eager", "--cuda-graph-sizes", "8,1,4",
                         "--flashinfer-prefill-backend", "fa2"])
    c = EngineConfig(model="m", **gpu_engine_kwargs(args))
    assert (c.enforce_eager, c.cuda_graph_sizes, c.flashinfer_prefill_backend) == \
        (True, (1, 4, 8), "fa2")
    for bad in (["--cuda-graph-sizes", "1,x"], ["--flashinfer-prefill-backend", "fa9"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
