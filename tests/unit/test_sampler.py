"""Unit tests for pdserve.engine.sampler (CPU only)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.messages import SampledToken
from pdserve.engine.sampler import Sampler, apply_top_k_top_p, make_generator
from pdserve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def _nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """Smallest set of most likely ids whose cumulative probability reaches top_p."""
    values, ids = probs.double().sort(descending=True)
    cum = values.cumsum(0)
    size = int((cum < top_p).sum().item()) + 1
    return set(ids[: min(size, len(ids))].tolist())


def _midpoint_top_p(probs: torch.Tensor, size: int) -> float:
    """A top_p whose nucleus has exactly `size` tokens, far from any rounding boundary."""
    cum = probs.double().sort(descending=True).values.cumsum(0)
    return float((cum[size - 2] + cum[size - 1]) / 2)


def _draw(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """Draw n tokens for one request by batching n copies of it (global RNG, seeded)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = Sampler()(logits_row.expand(n, -1).clone(), [params] * n, [None] * n)
    return [t.token_id for t in out]


# --------------------------------------------------------------------------- greedy


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 6),
    vocab=st.integers(1, 64),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_greedy_equals_argmax(
    batch: int, vocab: int, seed: int, scale: float, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, vocab, generator=gen) * scale).clamp(-6e4, 6e4).to(dtype)
    # Quantising creates ties on purpose; argmax must resolve them like torch.argmax.
    if seed % 2:
        logits = logits.round()
    out = Sampler()(logits, [GREEDY] * batch, [None] * batch)
    assert [t.token_id for t in out] == logits.float().argmax(dim=-1).tolist()
    assert all(isinstance(t.token_id, int) for t in out)


def test_greedy_rows_unaffected_by_random_rows() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(3))
    params = [GREEDY, SamplingParams(temperature=1.5), GREEDY, SamplingParams(temperature=0.7)]
    out = Sampler()(logits, params, [None, make_generator(1), None, None])
    expected = logits.argmax(dim=-1)
    assert out[0].token_id == expected[0].item()
    assert out[2].token_id == expected[2].item()


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), [GREEDY], [None, None])
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(5), [GREEDY], [None])
    assert Sampler()(torch.zeros(0, 5), [], []) == []


# --------------------------------------------------------------------------- seeds


def test_make_generator() -> None:
    assert make_generator(None) is None
    gen = make_generator(1234)
    assert isinstance(gen, torch.Generator)
    assert gen.initial_seed() == 1234


def test_seeded_request_reproducible_regardless_of_batch() -> None:
    steps, vocab = 6, 1000
    step_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(7))
    seeded = SamplingParams(temperature=1.0, top_k=500, top_p=0.95, seed=123)
    other_random = SamplingParams(temperature=0.9)
    other_seeded = SamplingParams(temperature=1.2, top_p=0.8, seed=99)

    def run(layout: list[str], global_seed: int) -> list[int]:
        """Run `steps` steps with the seeded request at layout.index('me')."""
        torch.manual_seed(global_seed)
        generators = {
            "me": make_generator(seeded.seed),
            "other_seeded": make_generator(other_seeded.seed),
        }
        table = {"me": seeded, "greedy": GREEDY, "rand": other_random, "other_seeded": other_seeded}
        noise = torch.Generator().manual_seed(global_seed)
        tokens = []
        for step in range(steps):
            rows = [
                step_logits[step] if name == "me" else torch.randn(vocab, generator=noise)
                for name in layout
            ]
            out = Sampler()(
                torch.stack(rows),
                [table[name] for name in layout],
                [generators.get(name) for name in layout],
            )
            tokens.append(out[layout.index("me")].token_id)
        return tokens

    with torch.random.fork_rng():
        reference = run(["me"], global_seed=0)
        assert run(["rand", "me", "greedy"], global_seed=1) == reference
        assert run(["greedy", "other_seeded", "rand", "me"], global_seed=2) == reference
        assert run(["other_seeded", "me", "rand", "rand", "greedy"], global_seed=3) == reference
    # The draws are genuinely random (not e.g. always the argmax).
    assert len(set(reference)) > 1 or reference[0] != step_logits[0].argmax().item()


def test_different_seeds_give_different_draws() -> None:
    logits = torch.zeros(1, 1000)
    sampler = Sampler()

    def draws(seed: int) -> list[int]:
        gen = make_generator(seed)
        params = SamplingParams(temperature=1.0, seed=seed)
        return [sampler(logits, [params], [gen])[0].token_id for _ in range(20)]

    first, second = draws(1), draws(2)
    # Two independent uniform streams over 1000 tokens match with probability 1e-60.
    assert first != second
    assert draws(1) == first
    assert len(set(first)) > 10


# --------------------------------------------------------------------------- top-k / top-p


def test_apply_top_k_top_p_counts() -> None:
    vocab = 40
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(0))
    top_k = torch.tensor([3, 0, -1, vocab, vocab + 10])
    top_p = torch.ones(5)
    filtered = apply_top_k_top_p(logits, top_k, top_p)
    kept = torch.isfinite(filtered).sum(dim=-1).tolist()
    assert kept == [3, vocab, vocab, vocab, vocab]
    assert set(filtered[0].topk(3).indices.tolist()) == set(logits[0].topk(3).indices.tolist())
    # Surviving entries are unchanged and the input is left alone.
    assert torch.equal(filtered[1], logits[1])
    assert torch.isfinite(logits).all()


def test_top_p_one_keeps_tiny_tail() -> None:
    # Float rounding can make the cumulative sum hit 1.0 early; top_p == 1 must still keep all.
    logits = torch.cat([torch.tensor([[30.0]]), torch.full((1, 999), -30.0)], dim=1)
    filtered = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([1.0]))
    assert torch.isfinite(filtered).all()


def test_apply_top_p_matches_independent_nucleus() -> None:
    gen = torch.Generator().manual_seed(1)
    for size in (2, 5, 17):
        logits = torch.randn(1, 64, generator=gen) * 2
        probs = logits.softmax(-1)[0]
        top_p = _midpoint_top_p(probs, size)
        filtered = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([top_p]))
        kept = set(torch.isfinite(filtered[0]).nonzero().flatten().tolist())
        assert kept == _nucleus(probs, top_p)
        assert len(kept) == size


def test_top_k_sampling_stays_in_top_k() -> None:
    logits = torch.randn(200, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=3.0, top_k=7)
    tokens = _draw(logits, params, n=2000)
    allowed = set(logits.topk(7).indices.tolist())
    assert set(tokens) <= allowed
    # At temperature 3 every one of the 7 survivors is likely enough to show up.
    assert len(set(tokens)) == 7


def test_top_p_sampling_stays_in_nucleus() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(4)) * 3
    temperature = 1.3
    probs = (logits / temperature).softmax(-1)
    top_p = _midpoint_top_p(probs, 12)
    tokens = _draw(logits, SamplingParams(temperature=temperature, top_p=top_p), n=3000)
    nucleus = _nucleus(probs, top_p)
    assert len(nucleus) == 12
    assert set(tokens) <= nucleus
    assert len(set(tokens)) > 1


def test_tiny_top_p_always_keeps_top1() -> None:
    logits = torch.randn(500, generator=torch.Generator().manual_seed(5))
    for params in (
        SamplingParams(temperature=5.0, top_p=1e-6),
        SamplingParams(temperature=5.0, top_k=1),
    ):
        tokens = _draw(logits, params, n=300)
        assert set(tokens) == {int(logits.argmax())}


def test_top_k_then_top_p_on_renormalised_distribution() -> None:
    logits = torch.randn(400, generator=torch.Generator().manual_seed(6)) * 2
    temperature, k = 1.0, 10
    top_vals, top_ids = (logits / temperature).topk(k)
    renorm = top_vals.softmax(-1)
    top_p = _midpoint_top_p(renorm, 4)
    expected = {top_ids[i].item() for i in _nucleus(renorm, top_p)}
    assert len(expected) == 4
    # Applying top-p to the full distribution would keep more tokens: order matters.
    assert len(_nucleus((logits / temperature).softmax(-1), top_p)) > 4

    filtered = apply_top_k_top_p(logits[None], torch.tensor([k]), torch.tensor([top_p]))
    assert set(torch.isfinite(filtered[0]).nonzero().flatten().tolist()) == expected

    tokens = _draw(logits, SamplingParams(temperature=temperature, top_k=k, top_p=top_p), 2000)
    assert set(tokens) == expected


def test_mixed_filters_in_one_batch() -> None:
    vocab = 50
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(8))
    filtered = apply_top_k_top_p(logits, torch.tensor([5, 0, 0]), torch.tensor([1.0, 1e-6, 1.0]))
    assert torch.isfinite(filtered).sum(dim=-1).tolist() == [5, 1, vocab]
    assert torch.isfinite(filtered[1, logits[1].argmax()])


# --------------------------------------------------------------------------- logprobs


def test_logprobs_match_raw_log_softmax() -> None:
    logits = torch.randn(3, 80, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.7, top_k=5, logprobs=4),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0, seed=3, logprobs=20),
    ]
    out = Sampler()(logits, params, [None, None, make_generator(3)])
    raw = torch.log_softmax(logits.float(), dim=-1)
    for row, (tok, p) in enumerate(zip(out, params, strict=True)):
        assert isinstance(tok, SampledToken)
        assert isinstance(tok.logprob, float)
        assert tok.logprob == pytest.approx(raw[row, tok.token_id].item(), abs=1e-5)
        assert len(tok.top_logprobs) == p.logprobs
        values = [lp for _, lp in tok.top_logprobs]
        assert values == sorted(values, reverse=True)
        expected = raw[row].topk(p.logprobs) if p.logprobs else None
        if expected is not None:
            assert values == pytest.approx(expected.values.tolist(), abs=1e-5)
            for token_id, lp in tok.top_logprobs:
                assert isinstance(token_id, int)
                assert lp == pytest.approx(raw[row, token_id].item(), abs=1e-5)
    assert out[1].top_logprobs == ()


def test_logprobs_absent_when_not_requested() -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(10))
    params = [GREEDY, SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, logprobs=2)]
    out = Sampler()(logits, params, [None, None, None])
    assert (out[0].logprob, out[0].top_logprobs) == (None, ())
    assert (out[1].logprob, out[1].top_logprobs) == (None, ())
    assert out[2].logprob is not None and len(out[2].top_logprobs) == 2

    only_plain = Sampler()(logits, [GREEDY] * 3, [None] * 3)
    assert all(t.logprob is None and t.top_logprobs == () for t in only_plain)


def test_top_logprobs_capped_by_vocab() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = Sampler()(logits, [SamplingParams(logprobs=5)], [None])
    assert [t for t, _ in out[0].top_logprobs] == [2, 1, 0]


# --------------------------------------------------------------------------- temperature


def test_low_temperature_behaves_like_greedy() -> None:
    logits = torch.tensor([1.0, 2.0, 4.0, 3.5, 0.0, -1.0])
    tokens = _draw(logits, SamplingParams(temperature=1e-4), n=500)
    assert set(tokens) == {2}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_empirical_frequencies_match_softmax(temperature: float) -> None:
    target = torch.tensor([0.2, 0.3, 0.5])
    logits = target.log()
    expected = (logits / temperature).softmax(-1).tolist()
    gen = make_generator(42)
    params = SamplingParams(temperature=temperature, seed=42)
    sampler = Sampler()
    n = 3000
    counts = [0, 0, 0]
    for _ in range(n):
        counts[sampler(logits[None], [params], [gen])[0].token_id] += 1
    for count, prob in zip(counts, expected, strict=True):
        assert math.isclose(count / n, prob, abs_tol=0.05)
