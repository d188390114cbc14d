"""Model factory: open_clip CLIP models (real `pretrained=` loading), the project's own configs, text/image features.

`pretrained` is None (random init), an open_clip tag (e.g. "openai", fetched through open_clip's cache), one of
this project's own tags (`igsp-small-synthetic`: a small CLIP that `igsp pretrain` trained on the synthetic
corpus, shipped in `igsp/pretrained/`), or a local checkpoint path. Offline with the weights not cached,
`PretrainedWeightsError` says how to supply them.

Own tags: `igsp/pretrained/<tag>.json` is the manifest (model config name, weights file, sha256, the command
that made it, recorded zero-shot accuracies; igsp.pretrain.export writes it), `<tag>.pt` the weights in the
compact format `load_pretrained_file` reads: an open_clip state dict without the token-embedding table, plus the
rows of the tokens the model was trained on (every other token embeds to zeros). Every load checks the sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PRETRAINED_DIR",
    "PRETRAINED_FORMAT",
    "TINY_MODEL",
    "PretrainedWeightsError",
    "create_clip",
    "image_features",
    "load_pretrained_file",
    "local_pretrained_tags",
    "sha256_file",
    "text_features",
]

logger = logging.getLogger(__name__)

TINY_MODEL = "igsp-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
PRETRAINED_FORMAT = "igsp-pretrained"
_registered = False


class PretrainedWeightsError(RuntimeError):
    """The requested pretrained weights are neither cached nor downloadable here."""


def _register_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def _how_to_supply(model_name: str, tag: str) -> str:
    return (
        f"On a machine with internet run `python -c \"import open_clip; open_clip.create_model('{model_name}', "
        f"pretrained='{tag}')\"` to fill the Hugging Face / open_clip cache, then copy the cache directory here "
        f"(or set HF_HOME / --set model.cache_dir=DIR), or pass the checkpoint file itself with "
        f"--set model.pretrained=/path/to/weights.bin (or .pt / .safetensors)."
    )


def local_pretrained_tags(directory: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """The project's own pretrained tags: {tag: manifest} for every `<tag>.json` manifest in `directory`
    (default `igsp/pretrained/`). Each manifest names its `model` config and weights `file`."""
    root = Path(directory) if directory is not None else PRETRAINED_DIR
    tags = {}
    for path in sorted(root.glob("*.json")):
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("skipping unreadable pretrained manifest %s: %s", path, exc)
            continue
        if isinstance(manifest, dict) and manifest.get("format") == PRETRAINED_FORMAT:
            tags[path.stem] = {**manifest, "path": str(root / manifest["file"])}
    return tags


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pretrained_file(model: nn.Module, path: str | os.PathLike[str], *, expected_model: str | None = None,
                         sha256: str | None = None) -> None:
    """Load a compact igsp-pretrained weights file into a stock open_clip `model` (strict: every key must match).

    Args:
        model: the open_clip model built from the file's model config.
        path: the `.pt` file (igsp.pretrain.export format).
        expected_model: the model config name `model` was built from; the file must be for the same.
        sha256: when given, the file's digest must equal it (a modified or truncated file is refused).
    Raises:
        PretrainedWeightsError: missing file, digest mismatch, wrong format or model, incompatible shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"model.pretrained: weights file {str(path)!r} does not exist")
    if sha256 is not None and sha256_file(path) != sha256:
        raise PretrainedWeightsError(f"model.pretrained: {str(path)!r} does not match the sha256 of its manifest "
                                     f"({sha256[:12]}...): the file was modified or truncated; restore it (git "
                                     "checkout) or re-run the command recorded in the manifest")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != PRETRAINED_FORMAT:
        raise PretrainedWeightsError(f"model.pretrained: {str(path)!r} is not an {PRETRAINED_FORMAT} weights file")
    if expected_model is not None and state["model"] != expected_model:
        raise PretrainedWeightsError(f"model.pretrained: {str(path)!r} holds weights of model {state['model']!r}, "
                                     f"not {expected_model!r}; set model.name={state['model']}")
    weights = dict(state["state_dict"])
    table = torch.zeros(int(state["vocab_size"]), state["token_rows"].shape[1], dtype=state["token_rows"].dtype)
    table[state["token_ids"]] = state["token_rows"]
    weights["token_embedding.weight"] = table
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise PretrainedWeightsError(f"model.pretrained: {str(path)!r} does not fit the model: {exc}") from exc


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _own_weights(pretrained: str, model_name: str) -> tuple[Path, str | None] | None:
    """(weights path, expected sha256 or None) if `pretrained` is one of our tags or an exported .pt with its
    manifest beside it; None for anything open_clip should load."""
    tags = local_pretrained_tags()
    if pretrained in tags:
        entry = tags[pretrained]
        if entry["model"] != model_name:
            raise ValueError(f"model.pretrained: tag {pretrained!r} holds weights of model {entry['model']!r}, not "
                             f"{model_name!r}; set model.name={entry['model']}")
        return Path(entry["path"]), entry["sha256"]
    path = Path(os.path.expanduser(pretrained))
    manifest = path.with_suffix(".json")
    if path.suffix == ".pt" and manifest.is_file():
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(meta, dict) and meta.get("format") == PRETRAINED_FORMAT:
            return path, meta.get("sha256")
    return None


def create_clip(
    model_name: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> tuple[nn.Module, object, object, object]:
    """Build an open_clip model with its transforms and tokenizer.

    Returns (model, preprocess_train, preprocess_val, tokenizer); model in eval mode on `device`.
    """
    _register_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"model.name: unknown open_clip model {model_name!r}; e.g. 'ViT-B-16' or {TINY_MODEL!r}")
    kwargs = dict(precision=precision, device=device, cache_dir=cache_dir)
    own = _own_weights(pretrained, model_name) if pretrained else None
    if own is not None:
        # open_clip warns "Model initialized randomly" on the root logger here; the weights are loaded next.
        quiet = _DropMessage("initialized randomly")
        logging.getLogger().addFilter(quiet)
        try:
            model, pre_train, pre_val = open_clip.create_model_and_transforms(model_name, pretrained=None, **kwargs)
        finally:
            logging.getLogger().removeFilter(quiet)
        load_pretrained_file(model, own[0], expected_model=model_name, sha256=own[1])
        model.to(device)
    elif pretrained is not None and pretrained != "":
        path = Path(os.path.expanduser(pretrained))
        is_path = path.suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained
        if is_path and not path.is_file():
            raise PretrainedWeightsError(f"model.pretrained: checkpoint file {str(path)!r} does not exist")
        if not is_path:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                raise ValueError(f"model.pretrained: {pretrained!r} is not a tag of {model_name} "
                                 f"(open_clip tags: {tags}; this project's tags: {sorted(local_pretrained_tags())}) "
                                 "nor a checkpoint path")
        try:
            model, pre_train, pre_val = open_clip.create_model_and_transforms(
                model_name, pretrained=str(path) if is_path else pretrained, **kwargs
            )
        except PretrainedWeightsError:
            raise
        except Exception as exc:  # hub unreachable, cache miss offline, corrupt file
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
            raise PretrainedWeightsError(
                f"could not load pretrained weights {pretrained!r} for {model_name}"
                f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: {type(exc).__name__}: {exc}. "
                + _how_to_supply(model_name, pretrained)
            ) from exc
    else:
        model, pre_train, pre_val = open_clip.create_model_and_transforms(model_name, pretrained=None, **kwargs)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    return model, pre_train, pre_val, tokenizer


def text_features(
    model: nn.Module,
    tokenizer: object,
    classnames: list[str],
    templates: list[str],
    device: str | torch.device = "cpu",
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """(C, D) class embeddings: the mean over templates of each class's encoded prompts, re-normalised.

    Differentiable through the text tower (and its adapters); wrap in torch.no_grad() for evaluation.
    """
    if not classnames or not templates:
        raise ValueError(f"classnames and templates must be non-empty, got {len(classnames)} and {len(templates)}")
    prompts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenizer(prompts).to(device)
    feats = model.encode_text(tokens)
    feats = F.normalize(feats.float(), dim=-1).reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1) if normalize else feats


def image_features(model: nn.Module, images: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """(B, D) image embeddings with the adapters as currently routed."""
    feats = model.encode_image(images).float()
    return F.normalize(feats, dim=-1) if normalize else feats
