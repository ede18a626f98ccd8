"""Tokenizer wrapper and incremental (streaming) detokenizer.

Lifecycle / contract:

* ``Tokenizer.from_pretrained(model_dir)`` loads a Hugging Face tokenizer from a local
  directory only (``local_files_only=True``; nothing is ever downloaded). It is
  immutable afterwards and safe to share between requests.
* ``Tokenizer.detokenizer(prompt_ids)`` creates one ``IncrementalDetokenizer`` per
  request. The caller feeds it the ids generated so far with ``add()`` and streams the
  returned text deltas; the concatenation of all deltas equals ``decode`` of all
  generated ids, except that a trailing *incomplete* UTF-8 character (a multi-byte
  character whose remaining bytes have not been generated yet) is held back rather
  than emitted as U+FFFD.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Prompt tokens used as left context for the first generated token, so tokenizers
# that drop a leading space at the start of a decode (SentencePiece) render it right.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """Wraps ``transformers.AutoTokenizer`` loaded from a local model directory."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: frozenset[int] | None = None) -> None:
        """Wrap an already loaded Hugging Face tokenizer.

        ``eos_token_ids`` defaults to the tokenizer's own ``eos_token_id`` (if any).
        Prefer ``from_pretrained``, which also reads ``generation_config.json``.
        """
        self._tok = hf_tokenizer
        if eos_token_ids is None:
            eos = hf_tokenizer.eos_token_id
            eos_token_ids = frozenset() if eos is None else frozenset({int(eos)})
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.vocab_size: int = len(hf_tokenizer)
        bos = hf_tokenizer.bos_token_id
        self.bos_token_id: int | None = None if bos is None else int(bos)
        self.has_chat_template: bool = bool(getattr(hf_tokenizer, "chat_template", None))

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> Tokenizer:
        """Load the tokenizer stored in ``model_dir`` (local files only).

        Raises ``FileNotFoundError`` if the directory does not exist and ``ValueError``
        if it holds no loadable tokenizer or a malformed ``generation_config.json``.
        """
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        from transformers import AutoTokenizer

        try:
            hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError/...
            raise ValueError(f"could not load a tokenizer from {path}: {exc}") from exc
        if hf_tok is None or not hasattr(hf_tok, "decode"):
            raise ValueError(f"could not load a tokenizer from {path}")
        eos_ids: set[int] = set()
        if hf_tok.eos_token_id is not None:
            eos_ids.add(int(hf_tok.eos_token_id))
        eos_ids |= _generation_config_eos_ids(path / "generation_config.json")
        return cls(hf_tok, frozenset(eos_ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds e.g. BOS per the tokenizer."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; special tokens (BOS/EOS/...) are dropped by default."""
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Render ``messages`` with the model's chat template and return the token ids.

        Raises ``ValueError`` if the tokenizer has no chat template.
        """
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template; send a plain prompt instead")
        # Render to text, then encode without extra specials: templates spell out BOS
        # themselves, and this avoids depending on apply_chat_template's return type,
        # which changed between transformers releases.
        text = self._tok.apply_chat_template(
            [dict(m) for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        return self.encode(text, add_special_tokens=False)

    def detokenizer(
        self, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer for one request with the given prompt."""
        return IncrementalDetokenizer(self, prompt_token_ids, skip_special_tokens)


def _generation_config_eos_ids(path: Path) -> set[int]:
    """EOS ids listed in a ``generation_config.json`` (int or list); empty if absent."""
    if not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed generation config {path}: {exc}") from exc
    eos = data.get("eos_token_id") if isinstance(data, dict) else None
    if eos is None:
        return set()
    values = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"eos_token_id in {path} must be an int or a list of ints, got {eos!r}")
    return set(values)


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas for streaming.

    Uses the prefix-offset / read-offset technique: ``ids[prefix:read]`` is a window
    whose text has already been emitted (kept only as context), and ``ids[read:]`` are
    tokens not yet emitted. Each ``add`` decodes just that window, so the cost is
    proportional to the window, not to the whole generation. Text is held back while
    it ends in U+FFFD, i.e. while a multi-byte character is still incomplete.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = self._prompt_context(list(prompt_token_ids))
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._chunks: list[str] = []

    def _prompt_context(self, prompt: list[int]) -> list[int]:
        """The last few prompt ids, trimmed so their text starts and ends on whole chars.

        A context that ends mid-character would make the first generated token's bytes
        merge with the prompt's, so its text could not be split off as a suffix.
        """
        for n in range(min(_PROMPT_CONTEXT_TOKENS, len(prompt)), 0, -1):
            tail = prompt[-n:]
            text = self._decode(tail)
            if (
                text
                and not text.startswith(_REPLACEMENT_CHAR)
                and not text.endswith(_REPLACEMENT_CHAR)
            ):
                return tail
        return []

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append newly generated ids and return the text they complete (may be "")."""
        self._ids.extend(int(t) for t in token_ids)
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            # Nothing visible yet (e.g. a skipped special token) or an incomplete
            # character: keep the tokens pending so later ids can complete them.
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._chunks.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All generated text emitted so far (the concatenation of every delta)."""
        if len(self._chunks) > 1:
            # Collapse so repeated reads do not re-join the whole history each time.
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def token_ids(self) -> list[int]:
        """A copy of the generated token ids (prompt context excluded)."""
        return self._ids[self._num_context :]
