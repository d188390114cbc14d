"""Offline pretraining of a small CLIP: the synthetic image-caption corpus, `igsp pretrain`, and tag export.

No pretrained CLIP weights or image datasets can be downloaded on this project's machines, so the project makes
its own: `igsp pretrain` draws an image-caption corpus (igsp.pretrain.corpus), trains the `igsp-small` open_clip
config on it contrastively (igsp.pretrain.train) and exports the result as a named tag (igsp.pretrain.export)
that `--set model.pretrained=igsp-small-synthetic` loads like an open_clip tag (igsp.model). Docs:
docs/datasets.md ("The pretraining corpus").

Submodules load on first use (PEP 562), so `import igsp.pretrain.command` for the CLI stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PretrainConfig",
    "corpus_batch",
    "corpus_item",
    "export_pretrained",
    "install_pretrained",
    "match_matrix",
    "pretrain",
    "stream_zero_shot",
]

_WHERE = {
    "PretrainConfig": "train", "pretrain": "train", "corpus_batch": "corpus", "corpus_item": "corpus",
    "match_matrix": "corpus", "export_pretrained": "export", "install_pretrained": "export",
    "stream_zero_shot": "export",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"igsp.pretrain.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'igsp.pretrain' has no attribute {name!r}")
