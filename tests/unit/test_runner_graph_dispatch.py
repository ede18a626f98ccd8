"""How the runner and the loader use CUDA graphs, on the CPU with a stand-in for the
captured graphs: which steps replay a graph, what the block manager may hand out, what
build_runner captures, and the FlashInfer kernel family reaching the backend from the
config (no GPU: the capture and replay themselves are in tests/gpu/test_decode_cuda_graphs.py)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine import loader as loader_mod
from pdserve.engine import model_step as model_step_mod
from pdserve.engine.attention import registry
from pdserve.engine.attention.torch_ref import TorchAttention
from pdserve.engine.config import EngineConfig
from pdserve.engine.graphs.sizes import capture_sizes, padded_size
from pdserve.engine.loader import build_runner, load_model
from pdserve.engine.model_runner import ModelInput
from pdserve.engine.model_step import EngineParts

BLOCKS = 32


class FakeGraphs:
    """Stands in for DecodeGraphs: records the batches it was asked to run."""

    def __init__(self, sizes=(1, 2, 4)):
        self.sizes, self.calls = sizes, []

    def padded_size(self, batch):
        return padded_size(self.sizes, batch)

    def run(self, inputs):
        self.calls.append(len(inputs))
        return torch.full((len(inputs), 3), 7.0)


@pytest.fixture
def config(tiny_checkpoints):
    return EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=BLOCKS)


@pytest.fixture
def runner(config):
    return build_runner(load_model(config, load_tokenizer=False))


def decode(n):
    return [ModelInput((5,), 3, (i,)) for i in range(n)]


def test_cpu_runner_has_no_graphs_and_every_block_is_usable(runner):
    assert runner.graphs is None and runner.usable_blocks == BLOCKS


def test_decode_only_steps_that_fit_a_graph_replay_it_everything_else_runs_eagerly(runner):
    eager_rows = runner.run(decode(3)).shape
    fake = runner.graphs = FakeGraphs()
    assert runner.usable_blocks == BLOCKS - 1  # the scratch block is reserved
    assert torch.equal(runner.run(decode(3)), torch.full((3, 3), 7.0))
    assert fake.calls == [3]
    mixed = [ModelInput((5, 6, 7), 0, (9,))] + decode(2)
    eager_cases = [
        (decode(5), {}),                                # larger than the largest graph
        (mixed, {}),                                    # a prefill row
        (decode(2), {"all_logits": True}),              # every token's logits
        (decode(2), {"layer_done": lambda i: None}),    # a per-layer callback
    ]
    for inputs, kw in eager_cases:
        out = runner.run(inputs, **kw)
        assert out.shape[1] == eager_rows[1]  # real logits, not the stand-in's
    runner.graphs_active = False
    assert runner.run(decode(2)).shape == (2, eager_rows[1])
    assert fake.calls == [3]


def test_the_block_manager_gets_only_the_usable_blocks(config, monkeypatch):
    real = model_step_mod.build_runner

    def with_graphs(loaded, spec=None, kv_buffer=None):
        r = real(loaded, spec, kv_buffer=kv_buffer)
        r.graphs = FakeGraphs()
        return r

    monkeypatch.setattr(model_step_mod, "build_runner", with_graphs)
    parts = EngineParts.build(config, load_tokenizer=False)
    assert parts.blocks.num_blocks == BLOCKS - 1
    scratch = BLOCKS - 1
    # distinct prompts of one block each (no prefix sharing): every usable block handed out
    got = [parts.blocks.allocate(f"r{i}", [i] * 16).block_ids for i in range(BLOCKS - 1)]
    handed = {b for ids in got for b in ids}
    assert len(handed) == BLOCKS - 1 and scratch not in handed
    assert parts.blocks.num_free_blocks == 0


def test_build_runner_captures_the_configured_sizes_up_to_max_num_seqs(tiny_checkpoints,
                                                                       monkeypatch):
    cfg = EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=BLOCKS,
                       max_num_seqs=40, max_model_len=256)
    captured = []
    monkeypatch.setattr(loader_mod, "graphs_wanted", lambda *a: True)
    monkeypatch.setattr(loader_mod.ModelRunner, "capture_decode_graphs",
                        lambda self, sizes, max_len: captured.append((sizes, max_len)))
    build_runner(load_model(cfg, load_tokenizer=False))
    assert captured == [(capture_sizes(cfg.cuda_graph_sizes, 40), 256)]
    assert captured[0][0][-1] == 48  # the smallest default size holding 40 rows


def test_graphs_wanted_gets_the_config_and_backend_facts(tiny_checkpoints, monkeypatch):
    seen = []
    monkeypatch.setattr(loader_mod, "graphs_wanted", lambda *a: seen.append(a) or False)
    cfg = EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=BLOCKS,
                       enforce_eager=True)
    assert build_runner(load_model(cfg, load_tokenizer=False)).graphs is None
    assert seen == [(True, "cpu", TorchAttention.supports_cuda_graphs, 1)]
    assert TorchAttention.supports_cuda_graphs is False


class _RecordingBackend:
    supports_cuda_graphs = False
    made: list[dict] = []

    def __init__(self, config, device, dtype, **kw):
        _RecordingBackend.made.append(kw)


class _FakeRegistry:
    def get(self, name):
        assert name == "flashinfer"
        return _RecordingBackend


@pytest.mark.parametrize("family", ["fa2", "fa3", "auto"])
def test_the_prefill_kernel_family_goes_from_the_config_to_the_flashinfer_backend(
        tiny_checkpoints, monkeypatch, family):
    monkeypatch.setattr(registry, "resolve_backend_name", lambda name, device: "flashinfer")
    monkeypatch.setattr(registry, "BACKENDS", _FakeRegistry())
    _RecordingBackend.made.clear()
    cfg = EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=BLOCKS,
                       flashinfer_prefill_backend=family)
    build_runner(load_model(cfg, load_tokenizer=False))
    assert _RecordingBackend.made == [{"prefill_backend": family}]


def test_other_backends_ignore_the_prefill_kernel_family(tiny_checkpoints, monkeypatch):
    # And no environment variable decides it any more.
    monkeypatch.setenv("PDSERVE_FLASHINFER_PREFILL_BACKEND", "not-a-family")
    cfg = EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=BLOCKS,
                       flashinfer_prefill_backend="fa3")
    assert isinstance(build_runner(load_model(cfg, load_tokenizer=False)).attn, TorchAttention)
