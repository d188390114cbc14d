"""Export a pretrained model as a named tag (`igsp/pretrained/<tag>.pt` + `<tag>.json`) and measure its zero-shot
accuracy on the offline-mtil stream (the numbers its manifest records and tests/pretrain reproduces).

The `.pt` file is the stock open_clip state dict minus the 49,408-row token embedding, plus the rows of the
tokens the corpus uses (`token_ids`, `token_rows`); igsp.model.load_pretrained_file expands it back (zeros for
every other token). At width 96 that is ~2.7 MB instead of ~21 MB. The manifest holds what is needed to trust
and rebuild the file: its sha256, the exact command and seed, the corpus version, the training summary, the
library versions, and the recorded zero-shot accuracies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from igsp.checkpoint import atomic_save, atomic_write_bytes, atomic_write_json
from igsp.data.base import TaskDataset
from igsp.data.offline_mtil import offline_mtil_benchmark
from igsp.model import PRETRAINED_DIR, PRETRAINED_FORMAT, image_features, sha256_file, text_features
from igsp.pretrain.corpus import CORPUS_VERSION
from igsp.pretrain.train import PretrainConfig, dense_state_dict

__all__ = ["ZERO_SHOT_STREAM", "export_pretrained", "install_pretrained", "stream_zero_shot", "zero_shot_accuracy"]

logger = logging.getLogger(__name__)

# The stream split whose zero-shot accuracies a manifest records (and tests reproduce): seed 0, test split.
ZERO_SHOT_STREAM = {"kind": "offline-mtil", "seed": 0, "split": "test"}


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, tokenizer: Any, task: TaskDataset, *, batch_size: int = 256) -> float:
    """Top-1 accuracy (percent) of `model` as a zero-shot classifier of `task`: each class's text feature is the
    mean of its normalised prompt features over all the task's templates, re-normalised (what the trainer's
    `zeroshot` method and its evaluation compute)."""
    was_training = model.training
    model.eval()
    text = text_features(model, tokenizer, task.classnames, task.templates)
    correct = 0
    for start in range(0, len(task), batch_size):
        items = [task.dataset[i] for i in range(start, min(start + batch_size, len(task)))]
        images = torch.stack([x for x, _ in items])
        labels = torch.tensor([y for _, y in items])
        pred = (image_features(model, images) @ text.T).argmax(dim=1)
        correct += int((pred == labels).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(task), 1)


def stream_zero_shot(model: nn.Module, tokenizer: Any, *, seed: int = 0,
                     tasks: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of `model` on each offline-mtil test task: {task: {"accuracy", "chance", "n"}}."""
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    out = {}
    for task in offline_mtil_benchmark(image_size=size, seed=seed, tasks=tasks, split="test"):
        out[task.name] = {"accuracy": zero_shot_accuracy(model, tokenizer, task),
                          "chance": 100.0 / task.num_classes, "n": len(task)}
    return out


def _versions() -> dict[str, str]:
    import numpy
    import open_clip
    import PIL

    return {"python": sys.version.split()[0], "torch": torch.__version__, "open_clip": open_clip.__version__,
            "pillow": PIL.__version__, "numpy": numpy.__version__, "platform": platform.platform()}


def export_pretrained(model: nn.Module, tokenizer: Any, config: PretrainConfig, tag: str,
                      output_dir: str | os.PathLike[str], *, command: str, summary: dict[str, Any]) -> Path:
    """Write `<output_dir>/<tag>.pt` (compact weights) and `<tag>.json` (manifest); return the manifest path.

    The zero-shot accuracies are measured on the weights as written (loaded back through
    igsp.model.load_pretrained_file), so the manifest records what any later load reproduces.
    """
    from igsp.model import create_clip, load_pretrained_file

    if not tag or "/" in tag or tag.endswith((".pt", ".json")):
        raise ValueError(f"tag must be a plain name such as 'igsp-small-synthetic', got {tag!r}")
    out = Path(output_dir)
    dense = dense_state_dict(model)
    table = dense.pop("token_embedding.weight")
    ids = torch.nonzero(table.abs().sum(dim=1) > 0).flatten()
    state = {"format": PRETRAINED_FORMAT, "model": config.model, "state_dict": dense, "token_ids": ids,
             "token_rows": table[ids].clone(), "vocab_size": table.shape[0]}
    pt_path = atomic_save(state, out / f"{tag}.pt")
    digest = sha256_file(pt_path)
    # Measure on the file as written: build the stock model and load the file back.
    loaded, _, _, tok = create_clip(config.model, None)
    load_pretrained_file(loaded, pt_path, expected_model=config.model, sha256=digest)
    zero_shot = stream_zero_shot(loaded, tok, seed=ZERO_SHOT_STREAM["seed"])
    params = sum(v.numel() for v in loaded.state_dict().values())
    manifest = {
        "format": PRETRAINED_FORMAT,
        "tag": tag,
        "model": config.model,
        "file": pt_path.name,
        "sha256": digest,
        "bytes": pt_path.stat().st_size,
        "command": command,
        "seed": config.seed,
        "corpus_version": CORPUS_VERSION,
        "config": dataclasses.asdict(config),
        "parameters": {"total": params, "vocabulary_rows": int(ids.numel()),
                       "without_token_embedding": params - table.numel()},
        "training": {k: summary.get(k) for k in ("steps", "first_loss", "last_loss", "train_s", "cpu_s",
                                                 "cpu_workers_s", "load_average")},
        "corpus_probe": summary["probes"][-1] if summary.get("probes") else None,
        "zero_shot": {"stream": dict(ZERO_SHOT_STREAM), "tasks": zero_shot,
                      "at_least_twice_chance": sorted(t for t, r in zero_shot.items()
                                                      if r["accuracy"] >= 2 * r["chance"])},
        "versions": _versions(),
    }
    path = out / f"{tag}.json"
    atomic_write_json(path, manifest)
    logger.info("exported %s: %s (%d bytes, sha256 %s)", tag, pt_path, manifest["bytes"], digest[:12])
    return path


def install_pretrained(manifest_path: str | os.PathLike[str], target_dir: str | os.PathLike[str] | None = None
                       ) -> Path:
    """Copy an exported tag (manifest + weights, checked against the manifest's sha256) into `target_dir`
    (default igsp/pretrained/, where `model.pretrained=<tag>` finds it); return the installed manifest path."""
    src = Path(manifest_path)
    manifest = json.loads(src.read_text(encoding="utf-8"))
    weights = src.parent / manifest["file"]
    if sha256_file(weights) != manifest["sha256"]:
        raise ValueError(f"{weights}: sha256 does not match its manifest {src}; re-export it")
    dst = Path(target_dir) if target_dir is not None else PRETRAINED_DIR
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dst / manifest["file"], weights.read_bytes())
    atomic_write_json(dst / src.name, manifest)
    return dst / src.name
