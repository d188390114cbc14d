"""Model-level adapter utilities with PEFT's shape: save/load, parameter counts, merging, disabling.

| PEFT | igsp_kernels |
|---|---|
| `get_peft_model(model, LoraConfig(...))` | `inject_moe_lora(model, MoELoRAConfig(...))` |
| `model.save_pretrained(dir)` | `save_adapters(model, dir)` |
| `PeftModel.from_pretrained(base, dir)` | `load_adapters(base, dir)` (injects when the model has no adapters yet) |
| `model.print_trainable_parameters()` | `print_trainable_parameters(model)` (returns the line, logs it at info) |
| `model.get_nb_trainable_parameters()` | `get_nb_trainable_parameters(model)` |
| `model.merge_adapter()` / `unmerge_adapter()` | `merge_(model, task=...)` / `unmerge_(model)` |
| `model.merge_and_unload()` | `merge_and_unload(model, task=...)` |
| `with model.disable_adapter():` | `with disable_adapters(model):` |
| `modules_to_save=[...]` | `MoELoRAConfig(modules_to_save=[...])` (`ModulesToSaveWrapper`) |
| `set_adapter(name)` | `set_task(model, task)` |

On disk (`save_adapters`): `adapter_config.json` (format, version, a `MoELoRAConfig` of the saved layers, each
layer's routing settings, the modules_to_save) and the weights, `adapter_model.safetensors` when safetensors is
importable, else `adapter_model.pt` (loaded back with `torch.load(weights_only=True)`: no pickled code runs). Only
what the adapters add is stored: experts, routers, the layers' routing state, the trained copies of
modules_to_save; never the frozen base weights. Both files are written atomically, the config last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from igsp_kernels.config import MoELoRAConfig
from igsp_kernels.modules import (
    _SETTINGS,
    ModulesToSaveWrapper,
    MoELoRALinear,
    _disable_fast_paths,
    _wrap,
    moe_lora_layers,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "adapter_state_dict",
    "disable_adapters",
    "get_nb_trainable_parameters",
    "load_adapter_state_dict",
    "load_adapters",
    "merge_",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapters",
    "unmerge_",
]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
TORCH_NAME = "adapter_model.pt"
_FORMAT = "igsp_kernels.adapters"
_VERSION = 1


def _safetensors() -> Any | None:
    """safetensors.torch when importable (an optional dependency), else None."""
    try:
        import safetensors.torch
    except ImportError:
        return None
    return safetensors.torch


def _owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The adapter-owning modules of `model`: every MoELoRALinear and ModulesToSaveWrapper, with their names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (MoELoRALinear, ModulesToSaveWrapper))]


def _own_keys(module: nn.Module, key: str) -> bool:
    """Whether a key of `module`'s state_dict is adapter state (not the frozen base it wraps)."""
    if isinstance(module, ModulesToSaveWrapper):
        return key.startswith("modules_to_save.")
    return not key.startswith("base_layer.")


# --------------------------------------------------------------------------------------------- state dicts
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of `model` by qualified name, detached CPU copies: each MoELoRALinear's experts, routers
    and routing state (not its base layer) and each modules_to_save copy. All values are tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, module in _owners(model):
        prefix = f"{name}." if name else ""
        for key, value in module.state_dict().items():
            if _own_keys(module, key):
                out[prefix + key] = value.detach().cpu().clone()
    return out


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `adapter_state_dict` output into a model with the same adapters; expert pools and routers resize.

    Raises KeyError naming unexpected keys, adapter modules without state, and per module missing or unexpected
    keys (a different adapter config); a layer's other routing settings raise load_state_dict's RuntimeError.
    """
    owners = _owners(model)
    names = [n for n, _ in owners]
    per: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    orphans = []
    for key, value in state.items():
        # Longest match first: no module name is a prefix of another's keys except through a '.'.
        owner = max((n for n in names if key.startswith(f"{n}.")), key=len, default=None)
        if owner is None:
            orphans.append(key)
            continue
        per[owner][key[len(owner) + 1:]] = value
    empty = [n for n in names if not per[n]]
    if orphans or empty:
        raise KeyError(f"adapter state does not match this model (a different adapter config?): {len(orphans)} "
                       f"unexpected keys, e.g. {orphans[:3]}; adapter modules without state: {empty[:3]}")
    for name, module in owners:
        result = module.load_state_dict(per[name], strict=False)
        missing = [k for k in result.missing_keys if _own_keys(module, k)]
        if missing or result.unexpected_keys:
            raise KeyError(f"adapter state of {name!r}: missing {missing}, unexpected {result.unexpected_keys}")


# ------------------------------------------------------------------------------------------- save / load
def _atomic_write(path: Path, write: Any) -> None:
    """`write(tmp_path)` then os.replace onto `path`: a reader sees the old file or the new, never a torn one.
    (The kernel layer cannot use igsp.checkpoint's writer: it never imports the trainer.)"""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _config_of(model: nn.Module) -> tuple[MoELoRAConfig, dict[str, dict[str, Any]], list[str]]:
    """The saved description: a MoELoRAConfig of the layers (the first layer's settings), every layer's own
    settings, and the modules_to_save names."""
    layers = list(moe_lora_layers(model))
    if not layers:
        raise ValueError("model has no MoELoRALinear layers to save (inject_moe_lora first)")
    merged = [n for n, layer in layers if layer.merged is not None]
    if merged:
        raise ValueError(f"layers {merged[:3]} are merged into their base weights: unmerge_(model) before saving")
    to_save = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    first = layers[0][1]
    s = first.settings()
    config = MoELoRAConfig(
        target_modules=[n for n, _ in layers], num_experts=first.num_experts, rank=s["rank"], scale=s["scale"],
        top_k=s["top_k"], routing=s["routing"], route_token=s["route_token"], batch_first=s["batch_first"],
        activation=s["activation"], expert_bias=s["expert_bias"], expert_dropout=s["expert_dropout"],
        noise=s["noise"], noise_std=s["noise_std"], noise_floor=s["noise_floor"],
        router_init_std=first.router_init_std, modules_to_save=to_save or None, task=None, backend=first.backend,
    )
    return config, {n: layer.settings() for n, layer in layers}, to_save


def save_adapters(model: nn.Module, directory: str | os.PathLike[str], *, safe_serialization: bool = True) -> Path:
    """Write `model`'s adapters to `directory` (created if needed): adapter_config.json and the weights.

    Args:
        model: a model with MoELoRALinear layers (none merged).
        directory: the output folder.
        safe_serialization: safetensors when importable (else a torch file loaded back with weights_only=True).
    Returns:
        The weights file written.
    """
    config, layers, to_save = _config_of(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    st = _safetensors() if safe_serialization else None
    weights = out / (SAFETENSORS_NAME if st is not None else TORCH_NAME)
    if st is not None:
        _atomic_write(weights, lambda tmp: st.save_file(state, tmp, metadata={"format": "pt"}))
    else:
        _atomic_write(weights, lambda tmp: torch.save(state, tmp))
    from igsp_kernels import __version__

    meta = {"format": _FORMAT, "version": _VERSION, "igsp_kernels_version": __version__,
            "weights": weights.name, "config": config.to_dict(), "layers": layers, "modules_to_save": to_save}
    _atomic_write(out / ADAPTER_CONFIG_NAME,
                  lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8"))
    # The other weights format from an earlier save would be stale: the config names the one to read.
    for stale in {SAFETENSORS_NAME, TORCH_NAME} - {weights.name}:
        with contextlib.suppress(FileNotFoundError):
            (out / stale).unlink()
    return weights


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_path = directory / ADAPTER_CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no {ADAPTER_CONFIG_NAME} (not a save_adapters folder)")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{str(cfg_path)!r} is not an igsp_kernels adapter config (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {_FORMAT!r})")
    if meta.get("version", 0) > _VERSION:
        raise ValueError(f"{str(cfg_path)!r} has version {meta['version']}, newer than this igsp_kernels reads "
                         f"({_VERSION}): upgrade igsp_kernels")
    weights = directory / str(meta.get("weights", ""))
    if weights.name not in (SAFETENSORS_NAME, TORCH_NAME) or not weights.is_file():
        raise FileNotFoundError(f"{str(directory)!r}: the weights file {weights.name!r} named by "
                                f"{ADAPTER_CONFIG_NAME} is missing")
    try:
        if weights.name == SAFETENSORS_NAME:
            st = _safetensors()
            if st is None:
                raise ImportError(f"{str(weights)!r} needs the safetensors package: pip install safetensors")
            state = st.load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as exc:  # a truncated or foreign file: name it rather than show the reader's traceback
        raise ValueError(f"cannot read adapter weights {str(weights)!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(weights)!r} does not hold a dict of tensors")
    return meta, state


def load_adapters(model: nn.Module, directory: str | os.PathLike[str], *, backend: str | None = None) -> list[str]:
    """Load adapters written by `save_adapters` into `model`, and return the adapted layer names.

    A model without adapters (the plain base model, as for PEFT's `from_pretrained`) is injected first, each layer
    with its saved settings, the base frozen; a model that already has them (injected the same way) just takes
    the weights. The routing state is restored too: the outputs are those of the saved model, with no set_task.
    `backend` overrides the saved backend of the injected layers.
    """
    meta, state = _read(Path(directory))
    layers: dict[str, dict[str, Any]] = meta["layers"]
    config = MoELoRAConfig.from_dict(meta["config"])
    present = [n for n, _ in moe_lora_layers(model)]
    if not present:
        model.requires_grad_(False)
        for name, settings in layers.items():
            kw = {k: v for k, v in settings.items() if k in _SETTINGS and k not in ("in_features", "out_features")}
            kw.update(router_init_std=config.router_init_std, backend=backend or config.backend)
            try:
                _wrap(model, name, kw)
            except AttributeError:
                raise ValueError(f"the saved adapters wrap {name!r}, which this model does not have") from None
        for name in meta["modules_to_save"]:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ModulesToSaveWrapper(getattr(parent, child)))
        _disable_fast_paths(model, list(layers))
    elif sorted(present) != sorted(layers):
        raise ValueError(f"model's adapter layers {present[:4]}... differ from the saved ones {list(layers)[:4]}...: "
                         "load into the base model (no adapters) or one injected with the saved config")
    load_adapter_state_dict(model, state)
    return list(layers)


# ------------------------------------------------------------------------------------------- conveniences
def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameter elements, all parameter elements) of `model`, as PEFT counts them."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """PEFT's line, "trainable params: T || all params: N || trainable%: P", logged at info and returned.

    A library never prints (the caller decides where the line goes): `print(print_trainable_parameters(model))`
    gives PEFT's output; the name is kept so PEFT code ports line for line.
    """
    trainable, total = get_nb_trainable_parameters(model)
    line = (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total if total else 0.0:.4f}")
    logger.info(line)
    return line


def merge_(model: nn.Module, task: str | int | None = None) -> list[str]:
    """Fold task `task`'s experts (default: each layer's active task) into every layer's base weight, in place.

    Exact only where routing is fixed (see `MoELoRALinear.merge`); all layers are checked before any is changed,
    so a refusal leaves the model untouched. Returns the merged layer names.
    """
    layers = list(moe_lora_layers(model))
    for _, layer in layers:  # every check first: a refusal leaves no layer merged
        layer._merge_plan(task)
    for _, layer in layers:
        layer.merge(task)
    return [n for n, _ in layers]


def unmerge_(model: nn.Module) -> None:
    """Undo `merge_` on every layer (subtracting the same term: exact up to fp round-off, as PEFT)."""
    for _, layer in moe_lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, task: str | int | None = None) -> nn.Module:
    """`merge_`, then put each merged base nn.Linear back in place of its MoELoRALinear and each modules_to_save
    wrapper's trained copy in place of the wrapper: a plain torch model with no adapter code (PEFT's
    merge_and_unload). Returns `model`."""
    merge_(model, task)
    for name, module in list(model.named_modules()):
        if isinstance(module, MoELoRALinear):
            replacement = module.base_layer
        elif isinstance(module, ModulesToSaveWrapper):
            replacement = module.modules_to_save
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block `model` computes as its base model: every MoELoRALinear runs its base layer alone and every
    modules_to_save wrapper its original module (PEFT's `disable_adapter()`); the previous state comes back after.
    """
    owners = _owners(model)
    before = [m._disabled for _, m in owners]
    try:
        for _, m in owners:
            m._disabled = True
        yield model
    finally:
        for (_, m), was in zip(owners, before):
            m._disabled = was
