"""A tiny random-weight Llama checkpoint with a working tokenizer, built offline.

Lifecycle / contract:

* ``create_demo_model(path)`` builds the checkpoint once and returns its directory.
  If ``path`` already holds a checkpoint (it has ``config.json``) and ``overwrite`` is
  false, it is returned untouched, so callers may invoke this on every start.
* Nothing is downloaded: the byte-level BPE tokenizer is trained on a small corpus
  embedded below and the model weights are drawn from ``torch`` under a fixed seed,
  so the same ``seed`` (and library versions) always gives identical files.
* The checkpoint is written in the Hugging Face layout (``config.json``,
  ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
  ``tokenizer_config.json``) and loads with ``AutoModelForCausalLM`` /
  ``AutoTokenizer`` using ``local_files_only=True``.
* Creation is atomic: everything is built in a temporary directory next to the target
  and renamed into place, so concurrent creators never see or leave a half-written
  checkpoint; if another process wins the race, its copy is kept.

The weights are random, so generated text is gibberish; the model exists for demos,
tests and benchmarks of the serving machinery, not for quality.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

DEMO_MODEL_VERSION = "v1"

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
_SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
_TARGET_VOCAB_SIZE = 1024
_DTYPES = ("float32", "float16", "bfloat16")

# Roles are plain text; only the end-of-turn marker is a special token, so a decoded
# conversation stays readable and the template works with any role name.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Training text for the tokenizer. Its only job is to give the BPE merges something
# English-like to learn from; any text still encodes thanks to the byte alphabet.
_CORPUS = """\
A serving system has two jobs that pull in opposite directions. It must answer the
first token of every request quickly, and it must keep streaming the following tokens
at a steady pace. The first job is called prefill: the whole prompt is read at once and
the attention cache is filled. The second job is called decode: one token is produced
per step for every running request. Prefill is hungry for arithmetic, while decode is
hungry for memory bandwidth, so placing them on separate machines lets each one run
the batch size it likes best. The price is that the cache must travel from the prefill
worker to the decode worker, and the router has to decide where each request goes.

When the queue grows, latency grows with it. A good scheduler watches the time to the
first token and the time per output token, and it admits new work only while both stay
under their targets. If the decode workers are busy, a long prompt can wait a little;
if the prefill workers are idle, short prompts can be grouped together. Measuring is
the first step, and measuring honestly means counting the slow requests too, not only
the average ones.

The weather this morning was grey and cool. Clouds came in from the west before
sunrise, and by nine o'clock a light rain was falling on the garden. The wind turned
around noon, the sky cleared, and the afternoon was bright and warm enough to sit
outside. Tomorrow the forecast says there will be fog near the river, then sunshine,
then perhaps a storm in the evening. Farmers watch the sky, sailors watch the sea, and
children watch for puddles deep enough to jump in.

To make a simple soup, start by warming a spoon of oil in a heavy pot. Add a chopped
onion, two carrots and a stick of celery, and cook them slowly until they are soft and
sweet. Pour in a litre of water or stock, add a handful of lentils, a bay leaf and a
pinch of salt, and let it simmer for about forty minutes. Taste it, add pepper, lemon
juice or fresh herbs, and serve it hot with bread. The same pot can hold beans, rice,
potatoes or whatever is left in the kitchen on a Sunday night.

Numbers matter as well: 1, 2, 3, 10, 42, 100, 256, 1024, 2048 and 4096 appear in logs,
in configuration files and in benchmark tables. Questions, answers, lists and quotes
("like this one") are common in chat, so the tokenizer should see commas, colons,
semicolons; dashes - and brackets (round, [square] and {curly}) at least a few times.
What time is it? Where is the nearest station? How many requests per second can one
worker handle before the tail latency starts to climb?
"""


def default_cache_dir() -> Path:
    """Directory for pdserve's generated artifacts: ``$PDSERVE_CACHE_DIR`` or ``~/.cache/pdserve``."""
    env = os.environ.get("PDSERVE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pdserve"


def demo_model_path() -> Path:
    """Default location of the demo checkpoint for the current ``DEMO_MODEL_VERSION``."""
    return default_cache_dir() / f"demo-llama-{DEMO_MODEL_VERSION}"


def _build_tokenizer():
    """Train the byte-level BPE tokenizer and wrap it for ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # No prefix space: encode/decode must round-trip arbitrary text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TARGET_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        # The full byte alphabet guarantees every unicode string is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Cleanup would rewrite " ." to "." and break exact round trips.
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def save_tokenizer(out_dir: Path):
    """Train the demo tokenizer, save it into ``out_dir`` and return it."""
    tokenizer = _build_tokenizer()
    tokenizer.save_pretrained(out_dir)
    # Some transformers versions record the backend class name instead of one that
    # AutoTokenizer resolves; pin it so the Llama model_type cannot pick a Llama
    # tokenizer class with different special-token behaviour.
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _build_checkpoint(out_dir: Path, seed: int, dtype: str) -> None:
    """Write tokenizer, model weights, configs and README into ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = save_tokenizer(out_dir)
    special_ids = special_token_ids(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **special_ids,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out_dir)
    GenerationConfig(**special_ids).save_pretrained(out_dir)

    (out_dir / "README.md").write_text(
        f"# pdserve demo Llama ({DEMO_MODEL_VERSION})\n\n"
        "This checkpoint has RANDOM weights (seed "
        f"{seed}, dtype {dtype}) and a byte-level BPE tokenizer trained on a few "
        "paragraphs of text. It produces gibberish and exists only for demos and tests "
        "of pdserve. Created by `pdserve.engine.demo_model.create_demo_model`.\n",
        encoding="utf-8",
    )


def create_demo_model(
    path: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    overwrite: bool = False,
    dtype: str = "float32",
) -> Path:
    """Create the demo checkpoint at ``path`` (default ``demo_model_path()``) and return it.

    An existing checkpoint (a directory containing ``config.json``) is returned unchanged
    unless ``overwrite`` is true. ``dtype`` is one of ``float32``, ``float16`` or
    ``bfloat16``. Raises ``FileExistsError`` if ``path`` is a file or a non-empty
    directory that is not a checkpoint (it is never deleted without ``overwrite``).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    target = Path(path).expanduser() if path is not None else demo_model_path()
    # Looked up at call time, so a test can stand in for the builder.
    return create_checkpoint(target, lambda out: _build_checkpoint(out, seed, dtype), overwrite)


def create_checkpoint(target: Path, build: Callable[[Path], None], overwrite: bool) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``target`` atomically (see the module
    docstring); an existing checkpoint there is kept unless ``overwrite``."""
    if not overwrite:
        if (target / "config.json").is_file():
            return target
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"demo model path {target} exists and is not a directory")
        if target.is_dir() and any(target.iterdir()):
            raise FileExistsError(
                f"demo model path {target} is a non-empty directory without config.json; "
                "pass overwrite=True to replace it"
            )

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        if overwrite and (target.exists() or target.is_symlink()):
            _replace_existing(target, tmp)
        else:
            try:
                # Atomic on POSIX; an empty target directory is replaced, a populated one
                # (another creator finished first) makes the rename fail.
                os.replace(tmp, target)
            except OSError:
                if (target / "config.json").is_file():
                    return target
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace_existing(target: Path, new_dir: Path) -> None:
    """Swap ``new_dir`` into ``target``, removing what was there before."""
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    # Move the old entry aside first: a directory rename cannot replace a non-empty one.
    old = trash / "old"
    os.replace(target, old)
    try:
        os.replace(new_dir, target)
    except OSError:
        # Put the previous checkpoint back rather than leave nothing at ``target``.
        os.replace(old, target)
        raise
    finally:
        # rmtree does not follow a symlink moved aside, it only removes the link.
        shutil.rmtree(trash, ignore_errors=True)
