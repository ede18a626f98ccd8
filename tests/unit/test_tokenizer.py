"""Tests for pdserve.engine.tokenizer, using the demo checkpoint's byte-level BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pdserve.engine.demo_model import EOS_TOKEN, create_demo_model
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

SPECIAL_STRINGS = ("<s>", "</s>", "<pad>")

# Any unicode (no surrogates) plus a boosted share of multi-byte characters.
_chars = st.one_of(
    st.characters(exclude_categories=("Cs",)),
    st.sampled_from(list("你好世界日本語한국어éñüß€🎉👍🏽🚀\u200d ")),
    st.sampled_from(list("the quick brown fox, jumps.\n")),
)
texts = st.text(alphabet=_chars, max_size=60)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_demo_model(tmp_path_factory.mktemp("tok") / "model", seed=0)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


def _no_specials(text: str) -> bool:
    return not any(s in text for s in SPECIAL_STRINGS)


def test_attributes(tok: Tokenizer, model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert tok.vocab_size == config["vocab_size"]
    assert tok.bos_token_id == config["bos_token_id"]
    assert config["eos_token_id"] in tok.eos_token_ids
    assert tok.has_chat_template


def test_encode_adds_bos(tok: Tokenizer) -> None:
    ids = tok.encode("hello world")
    assert ids[0] == tok.bos_token_id
    assert ids[1:] == tok.encode("hello world", add_special_tokens=False)
    assert tok.decode(ids) == "hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hello world"


@settings(max_examples=150, deadline=None)
@given(texts)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assume(_no_specials(text))
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_eos_ids_from_generation_config(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7, 9]}))
    assert Tokenizer.from_pretrained(copy).eos_token_ids == frozenset({1, 7, 9})
    (copy / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json"):
        Tokenizer.from_pretrained(copy)


def test_chat_template(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather like?"},
    ]
    ids = tok.apply_chat_template(messages)
    assert ids[0] == tok.bos_token_id
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|assistant|>\n")
    assert "<|user|>\nWhat is the weather like?" + EOS_TOKEN in text
    tail = tok.encode("<|assistant|>\n", add_special_tokens=False)
    assert ids[-len(tail) :] == tail
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert not tok.decode(no_prompt, skip_special_tokens=False).endswith("<|assistant|>\n")


def test_chat_template_missing(tok: Tokenizer) -> None:
    bare = Tokenizer(tok._tok)
    bare.has_chat_template = False
    with pytest.raises(ValueError, match="chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_or_invalid_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        Tokenizer.from_pretrained(tmp_path / "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.from_pretrained(empty)


def _feed(detok: IncrementalDetokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    deltas, pos, i = [], 0, 0
    while pos < len(ids):
        step = sizes[i % len(sizes)] if sizes else 1
        deltas.append(detok.add(ids[pos : pos + step]))
        pos, i = pos + step, i + 1
    return deltas


@settings(max_examples=150, deadline=None)
@given(prompt=texts, text=texts, sizes=st.lists(st.integers(1, 4), max_size=8))
def test_incremental_matches_full_decode(
    tok: Tokenizer, prompt: str, text: str, sizes: list[int]
) -> None:
    assume(_no_specials(prompt) and _no_specials(text))
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.detokenizer(tok.encode(prompt))
    deltas = _feed(detok, ids, sizes)
    assert "".join(deltas) == detok.text == tok.decode(ids) == text
    assert detok.token_ids == ids
    assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_incremental_random_ids_is_prefix_of_decode(tok: Tokenizer, data: st.DataObject) -> None:
    """Arbitrary ids (specials, stray UTF-8 bytes): emitted text never diverges from decode."""
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    prompt = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=10))
    detok = tok.detokenizer(prompt)
    for i in ids:
        detok.add([i])
        assert tok.decode(detok.token_ids).startswith(detok.text)
    full = tok.decode(ids)
    # Only a trailing incomplete character may be held back.
    assert detok.text == full or full.endswith("\ufffd")


def test_multibyte_char_is_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # split across byte tokens in this small vocabulary
    detok = tok.detokenizer([])
    deltas = [detok.add([i]) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🎉"


def test_special_tokens_in_output(tok: Tokenizer) -> None:
    ids = tok.encode("hi there", add_special_tokens=False) + [tok.bos_token_id]
    eos = next(iter(tok.eos_token_ids))
    skipping = tok.detokenizer([])
    assert "".join(skipping.add([i]) for i in [*ids, eos]) == "hi there"
    keeping = tok.detokenizer([], skip_special_tokens=False)
    assert "".join(keeping.add([i]) for i in [*ids, eos]) == "hi there<s></s>"
    assert skipping.add([]) == ""


def test_window_stays_small(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = tok.encode("the quick brown fox jumps over the lazy dog. " * 40, add_special_tokens=False)
    detok = tok.detokenizer(tok.encode("a long prompt " * 50))
    lengths: list[int] = []
    real_decode = tok.decode

    def spy(token_ids, skip_special_tokens=True):  # type: ignore[no-untyped-def]
        lengths.append(len(token_ids))
        return real_decode(token_ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spy)
    for i in ids:
        detok.add([i])
    assert len(ids) > 200
    assert max(lengths) <= 8
    monkeypatch.undo()
    assert detok.text == tok.decode(ids)


def test_leading_space_uses_prompt_context() -> None:
    """SentencePiece-style decoders drop the first token's space; prompt context restores it."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "▁Hello": 2, "▁world": 3, "▁again": 4, "!": 5}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    raw.decoder = decoders.Metaspace(prepend_scheme="always")
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")
    tok = Tokenizer(hf)
    assert tok.decode([3]) == "world"  # the space a lone decode loses
    detok = tok.detokenizer([2])
    deltas = [detok.add([i]) for i in (3, 4, 5, 1)]
    assert deltas == [" world", " again", "!", ""]
    assert detok.text == " world again!"
