"""Model factory: open_clip CLIP models (real `pretrained=` loading), the tiny test config, text/image features.

`pretrained` is None (random init), an open_clip tag (e.g. "openai", fetched through open_clip's cache) or a
local checkpoint path. Offline with the weights not cached, `PretrainedWeightsError` says how to supply them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TINY_MODEL", "PretrainedWeightsError", "create_clip", "image_features", "text_features"]

logger = logging.getLogger(__name__)

TINY_MODEL = "igsp-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
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
    if pretrained is not None and pretrained != "":
        path = Path(os.path.expanduser(pretrained))
        is_path = path.suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained
        if is_path and not path.is_file():
            raise PretrainedWeightsError(f"model.pretrained: checkpoint file {str(path)!r} does not exist")
        if not is_path:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                raise ValueError(f"model.pretrained: {pretrained!r} is not a tag of {model_name} "
                                 f"(tags: {tags}) nor a checkpoint path")
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
