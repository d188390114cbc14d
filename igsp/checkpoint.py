"""Atomic, weights-only training checkpoints: adapters, routers, selector, bases, optimizer, RNG, progress.

What a checkpoint holds (a dict of tensors, plain containers and primitives only, so it loads with
`torch.load(..., weights_only=True)`, which refuses arbitrary pickled objects):

- `adapters`: the adapter state of every MoE-LoRA layer (experts, expert biases, routers and their `active`
  masks), *never* the frozen backbone (a ViT-B/16 backbone is ~600 MB; the adapters are a few MB). The
  backbone is rebuilt from the config on load; `backbone_checksum` guards against a different one.
- `usage`: each layer's usage buffers (non-persistent in the module, but phase 1's convergence windows and
  MoE-Adapters' freezing read them, so a run resumed mid-window must see the same counts).
- `selector`, `optimizer`, `method_state` (the method's own state, igsp.methods.Method.state_dict(): for igsp
  the bases, the phase-2 anchor, the router-convergence detector; checkpoints from before igsp/methods/ held
  those as top-level keys and are converted on load by igsp.engine.method_state), `rng` (torch CPU and CUDA
  generator states), `progress` (task, stage, phase, step), `acc` (the rows of the accuracy matrix so far),
  `records` (JSON-ready logs for results.json), `log_offset` (log.jsonl size at save time: a resumed run
  truncates the log there so the log has no duplicate records).

Atomicity: the file is written to a temporary name in the same directory, flushed and fsync'ed, then
`os.replace`d over the target (atomic on POSIX), and the directory is fsync'ed so the rename itself survives a
crash. A reader therefore sees either the previous complete file or the new complete file, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from igsp_kernels import MoELoRALinear

__all__ = [
    "CHECKPOINT_FORMAT",
    "adapter_state_dict",
    "atomic_save",
    "backbone_checksum",
    "find_latest",
    "load_adapter_state_dict",
    "load_checkpoint",
    "usage_state",
    "load_usage_state",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write a file atomically: yield a binary file in the same directory, then fsync and `os.replace` it.

    A crash leaves either the old file or the new one, never a torn one; the temporary file is removed on error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results, reports and checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """`data` to `path`, atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 1) -> None:
    """`obj` as JSON to `path`, atomically (see `atomic_open`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode("utf-8"))


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """torch.save `obj` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        torch.save(obj, f)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; raises ValueError for a foreign or newer format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {str(path)!r}: format {found!r}, expected {CHECKPOINT_FORMAT} "
                         "(an igsp training checkpoint)")
    return ckpt


def find_latest(run_dir: str | os.PathLike[str]) -> Path:
    """RUN_DIR/checkpoints/latest.pt, with an error naming the run directory when it is missing."""
    path = Path(run_dir) / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} has no checkpoints/latest.pt (was the run started "
                                "with train.checkpoint_keep='none', or killed before its first checkpoint?)")
    return path


def _adapter_modules(model: nn.Module) -> list[tuple[str, MoELoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every MoE-LoRA layer's parameters and persistent buffers (experts, routers, masks), on the CPU.

    The wrapped frozen linear (`base_layer`) is left out: only what training added or changed is stored.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in _adapter_modules(model):
        prefix = f"{name}."
        for key, value in layer.state_dict(prefix=prefix).items():
            if key.startswith(f"{prefix}base_layer."):
                continue
            out[key] = value.detach().cpu().clone()
    return out


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `adapter_state_dict` output into a freshly built (injected) model; pools and routers resize.

    Raises KeyError naming missing or unexpected adapter keys (a checkpoint of a different adapter config).
    """
    layers = _adapter_modules(model)
    names = {n for n, _ in layers}
    per_layer: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    orphans = []
    for key, value in state.items():
        # Longest match first: no layer name is a prefix of another's keys except through a '.'.
        owner = max((n for n in names if key.startswith(f"{n}.")), key=len, default=None)
        if owner is None:
            orphans.append(key)
            continue
        per_layer[owner][key[len(owner) + 1:]] = value
    missing_layers = sorted(n for n in names if not per_layer[n])
    if orphans or missing_layers:
        raise KeyError(f"checkpoint adapter state does not match this model (a different adapter config?): "
                       f"{len(orphans)} unexpected keys, e.g. {orphans[:3]}; layers without state: "
                       f"{missing_layers[:3]}")
    for name, layer in layers:
        sd = per_layer[name]
        if not sd:
            continue
        # base_layer weights are not in the checkpoint: strict=False, then check that only they are missing.
        result = layer.load_state_dict(sd, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("base_layer.")]
        if missing or result.unexpected_keys:
            raise KeyError(f"adapter state of layer {name!r}: missing {missing}, unexpected {result.unexpected_keys}")


def usage_state(layers: Iterable[tuple[str, MoELoRALinear]]) -> dict[str, list[torch.Tensor]]:
    """{name: [usage_weight, usage_prob, usage_rows]} CPU copies (the layers' non-persistent usage buffers)."""
    return {name: [layer.usage_weight.detach().cpu().clone(), layer.usage_prob.detach().cpu().clone(),
                   layer.usage_rows.detach().cpu().clone()] for name, layer in layers}


def load_usage_state(layers: Iterable[tuple[str, MoELoRALinear]], state: dict[str, list[torch.Tensor]]) -> None:
    """Restore the usage buffers written by `usage_state` (shapes must match the current pools)."""
    for name, layer in layers:
        if name not in state:
            raise KeyError(f"checkpoint usage state has no layer {name!r}")
        w, p, rows = state[name]
        if w.shape != layer.usage_weight.shape:
            raise ValueError(f"usage of layer {name!r}: checkpoint has {tuple(w.shape)} experts, the layer "
                             f"{tuple(layer.usage_weight.shape)}")
        dev = layer.usage_weight.device
        layer.usage_weight = w.to(dev).clone()
        layer.usage_prob = p.to(dev).clone()
        layer.usage_rows = rows.to(dev).clone()


@torch.no_grad()
def backbone_checksum(model: nn.Module) -> list[float]:
    """[sum, sum of squares] in float64 over every frozen backbone parameter (not the adapters).

    Identifies the backbone a checkpoint was trained on: a resumed run must rebuild the same one (same
    pretrained weights, or for random init the same seed).
    """
    adapter_params = {id(p) for _, layer in _adapter_modules(model) for n, p in layer.named_parameters()
                      if not n.startswith("base_layer.")}
    total = torch.zeros((), dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if id(p) in adapter_params:
            continue
        d = p.detach().double()
        total += d.sum().cpu()
        squares += d.square().sum().cpu()
    return [float(total), float(squares)]
