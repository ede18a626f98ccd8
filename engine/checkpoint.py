"""What a checkpoint directory holds, checked without loading it (torch-free).

The router needs a model's config and tokenizer but not its weights; these checks let it
(and the workers, before they load) look at a checkpoint without importing torch.
"""

from __future__ import annotations

from pathlib import Path

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(model_dir: str) -> bool:
    """A checkpoint without tokenizer files is served on token ids only."""
    return any((Path(model_dir) / f).is_file() for f in _TOKENIZER_FILES)


def ensure_model_present(model_dir: str) -> None:
    """On a worker node without a demo checkpoint (``demo_model``, ``demo_tp_model``), create
    it: they are deterministic, so every node builds identical weights (real checkpoints
    must be on every node)."""
    from pdserve.engine.demo_model import create_demo_model, demo_model_path
    from pdserve.engine.demo_tp_model import (
        TP_DEMO_ARCHS,
        create_tp_demo_model,
        tp_demo_model_path,
    )

    path = Path(model_dir)
    if path.exists():
        return
    if path == demo_model_path():
        create_demo_model(model_dir)
    for arch in TP_DEMO_ARCHS:
        if path == tp_demo_model_path(arch):
            create_tp_demo_model(arch, model_dir)
