"""Shared input checks for the method layer: a list of `(name, MoELoRALinear)` pairs, as `adapter_layers` returns."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from igsp_kernels import MoELoRALinear, moe_lora_layers

Layers = Sequence[tuple[str, MoELoRALinear]]


def check_layers(layers: object, *, arg: str = "layers") -> list[tuple[str, MoELoRALinear]]:
    """Validate `layers` (a sequence of (name, MoELoRALinear) with unique names) and return it as a list."""
    if isinstance(layers, nn.Module):
        raise TypeError(f"{arg} must be a list of (name, MoELoRALinear) pairs (e.g. adapter_layers(model)), "
                        f"got a {type(layers).__name__} module")
    if not isinstance(layers, Sequence) or isinstance(layers, str):
        raise TypeError(f"{arg} must be a list of (name, MoELoRALinear) pairs, got {type(layers).__name__}")
    out = []
    seen = set()
    for i, item in enumerate(layers):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"{arg}[{i}] must be a (name, MoELoRALinear) pair, got {item!r}")
        name, layer = item
        if not isinstance(name, str):
            raise TypeError(f"{arg}[{i}][0] must be the layer name (str), got {type(name).__name__}")
        if not isinstance(layer, MoELoRALinear):
            raise TypeError(f"{arg}[{i}][1] ({name!r}) must be an igsp_kernels.MoELoRALinear, "
                            f"got {type(layer).__name__}")
        if name in seen:
            raise ValueError(f"{arg} names layer {name!r} twice; layer names must be unique")
        seen.add(name)
        out.append((name, layer))
    return out


def as_layers(model_or_layers: object, *, arg: str = "model") -> list[tuple[str, MoELoRALinear]]:
    """An nn.Module (every MoELoRALinear inside it, in named_modules order) or a (name, layer) list."""
    if isinstance(model_or_layers, nn.Module):
        return list(moe_lora_layers(model_or_layers))
    return check_layers(model_or_layers, arg=arg)
