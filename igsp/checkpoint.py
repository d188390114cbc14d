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
Temporary names follow one pattern, `.<target name>.<writer pid>.<8 hex digits>.tmp` (`TEMP_PATTERN`): a process
killed between creating and renaming its temporary leaves it behind, and `igsp.runlock.remove_stale_temporaries`
(called when a run claims its folder) removes exactly those files whose writer is gone.

Loading (`load_checkpoint`) never shows torch's zip or unpickler errors raw: an empty, truncated, random-bytes,
foreign or unsafe file raises `CheckpointError` naming the file and what is wrong with it, and a checkpoint that
loads but does not fit the run (`restoring_from`) does the same.

Test hook: `IGSP_TEST_KILL_IN_WRITE=NAME:N` makes the process exit hard (`os._exit(KILL_EXIT_CODE)`, no cleanup,
like a SIGKILL) during its N-th atomic write of a file called NAME, after the temporary is written and synced
and before the rename: the fault-injection test of tests/trainer/ uses it. It is not meant for users.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import secrets
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from igsp_kernels import MoELoRALinear
from igsp_kernels.adapters import adapter_state_dict, load_adapter_state_dict  # one implementation, the kernel layer's

__all__ = [
    "CHECKPOINT_FORMAT",
    "KILL_EXIT_CODE",
    "KILL_IN_WRITE_ENV",
    "TEMP_PATTERN",
    "CheckpointError",
    "adapter_state_dict",
    "atomic_open",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "backbone_checksum",
    "find_latest",
    "load_adapter_state_dict",
    "load_checkpoint",
    "load_usage_state",
    "require_run_dir",
    "restoring_from",
    "usage_state",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
KILL_IN_WRITE_ENV = "IGSP_TEST_KILL_IN_WRITE"
KILL_EXIT_CODE = 75  # the test hooks' exit status (EX_TEMPFAIL): distinct from a crash (1) or bad input (2)
# `.<target>.<pid>.<8 hex>.tmp`; the pid tells a live writer's temporary from a killed one's.
TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp$")
_write_counts: dict[str, int] = {}


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: empty, truncated, corrupt, foreign, unsafe, or made by another run.

    The message names the file and what is wrong; the underlying torch error is chained as the cause.
    """


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


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _maybe_kill_in_write(path: Path) -> None:
    spec = os.environ.get(KILL_IN_WRITE_ENV)
    if not spec:
        return
    name, _, count = spec.rpartition(":")
    if not name or not count.isdigit():
        raise ValueError(f"{KILL_IN_WRITE_ENV}: got {spec!r}; allowed: NAME:N (e.g. latest.pt:3)")
    if name != path.name:
        return
    _write_counts[name] = _write_counts.get(name, 0) + 1
    if _write_counts[name] == int(count):
        logger.warning("%s=%s: exiting hard inside the atomic write of %s (test hook)", KILL_IN_WRITE_ENV, spec,
                       path)
        os._exit(KILL_EXIT_CODE)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write a file atomically: yield a binary file in the same directory, then fsync and `os.replace` it.

    A crash leaves either the old file or the new one, never a torn one; the temporary file (named after
    `TEMP_PATTERN`) is removed on error, and by `igsp.runlock.remove_stale_temporaries` after a kill. The file
    gets mode 0o644 minus the umask (results, reports and checkpoints are meant to be shared).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
            break
        except FileExistsError:  # 2^32 names per pid and target: only a leftover of a reused pid collides
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _maybe_kill_in_write(path)
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


# torch's weights-only refusal wraps the real reason in advice that does not apply here (we never retry with
# weights_only=False); these lines of its message are dropped from the detail we show.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")
_DETAIL_CHARS = 200


def _detail(exc: BaseException) -> str:
    """`exc` in one short line: type, then its message's first informative sentence (whitespace collapsed)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)] or lines
    text = " ".join(lines)
    if not isinstance(exc, KeyError):
        text = text.split(". ")[0]
    if len(text) > _DETAIL_CHARS:
        text = text[:_DETAIL_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    """A CheckpointError saying why torch could not read `path` (torch's reason, shortened, as the detail)."""
    detail = _detail(exc)
    if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in str(exc):
        # torch's weights-only unpickler refused a class or function: report it, never load it unsafely.
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"pickled objects other than tensors and plain containers ({found.group(1) if found else 'code'})"
        return CheckpointError(f"checkpoint {str(path)!r} holds {what}; refused without running them "
                               "(not an igsp checkpoint; load only files from a trusted source)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        problem = "is truncated or corrupt (a torch zip archive without a readable directory)"
    elif not zipfile.is_zipfile(path):
        problem = "is not a torch checkpoint (random bytes, another format, or truncated)"
    else:
        problem = "is corrupt (torch could not read its contents)"
    return CheckpointError(f"checkpoint {str(path)!r} {problem}; torch said {detail}")


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an igsp training checkpoint with `weights_only=True` (no pickled code is ever run).

    Raises:
        FileNotFoundError: `path` does not exist.
        CheckpointError: the file is empty, truncated, random bytes, holds unsafe pickles, is not an igsp
            checkpoint, or has another format version; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes); use an earlier one "
                              "(checkpoints/task<i>_phase<p>.pt copied over latest.pt)")
    try:
        with warnings.catch_warnings():
            # A foreign pickle makes torch warn about its protocol before failing: the error below says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise _unreadable(path, exc) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {str(path)!r}: format {found!r}, expected {CHECKPOINT_FORMAT} "
                              "(an igsp training checkpoint)")
    return ckpt


@contextlib.contextmanager
def restoring_from(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn errors raised while restoring a loaded checkpoint into a `CheckpointError` naming the file.

    A file with the right format tag can still miss keys or hold tensors of other shapes (hand-edited, or
    written by another version); the restore code then fails with KeyError, shape RuntimeErrors and the like.
    """
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
            key = exc.args[0]
            detail = f"it has no entry {key!r}" if " " not in key else key
        else:
            detail = " ".join(str(exc).split())  # torch's load_state_dict errors span several lines
            if len(detail) > 2 * _DETAIL_CHARS:
                detail = detail[:2 * _DETAIL_CHARS - 3] + "..."
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this run: {detail}") from exc


def require_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """`run_dir` as a Path if it is an existing igsp run folder (it holds config.json), else a clear error.

    Raises:
        FileNotFoundError: no such folder, or a folder without config.json. NotADirectoryError: a file.
    """
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"no such folder: {str(run_dir)!r}")
    if not path.is_dir():
        raise NotADirectoryError(f"not a folder: {str(run_dir)!r} (give a run directory)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"folder {str(run_dir)!r} is not an igsp run directory (it has no config.json)")
    return path


def find_latest(run_dir: str | os.PathLike[str]) -> Path:
    """RUN_DIR/checkpoints/latest.pt, with an error naming the run directory when it is missing."""
    path = Path(run_dir) / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} has no checkpoints/latest.pt (was the run started "
                                "with train.checkpoint_keep='none', or killed before its first checkpoint?)")
    return path


def _adapter_modules(model: nn.Module) -> list[tuple[str, MoELoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]


def usage_state(layers: Iterable[tuple[str, MoELoRALinear]]) -> dict[str, list[torch.Tensor]]:
    """{name: [usage_weight, usage_prob, usage_rows, usage_count]} CPU copies (the layers' non-persistent usage
    buffers)."""
    return {name: [layer.usage_weight.detach().cpu().clone(), layer.usage_prob.detach().cpu().clone(),
                   layer.usage_rows.detach().cpu().clone(), layer.usage_count.detach().cpu().clone()]
            for name, layer in layers}


def load_usage_state(layers: Iterable[tuple[str, MoELoRALinear]], state: dict[str, list[torch.Tensor]]) -> None:
    """Restore the usage buffers written by `usage_state` (shapes must match the current pools)."""
    for name, layer in layers:
        if name not in state:
            raise KeyError(f"checkpoint usage state has no layer {name!r}")
        w, p, rows = state[name][:3]
        # Checkpoints written before selection counts existed hold three buffers: the counts restart at zero.
        count = state[name][3] if len(state[name]) > 3 else torch.zeros_like(w)
        if w.shape != layer.usage_weight.shape:
            raise ValueError(f"usage of layer {name!r}: checkpoint has {tuple(w.shape)} experts, the layer "
                             f"{tuple(layer.usage_weight.shape)}")
        dev = layer.usage_weight.device
        layer.usage_weight = w.to(dev).clone()
        layer.usage_prob = p.to(dev).clone()
        layer.usage_rows = rows.to(dev).clone()
        layer.usage_count = count.to(dev).clone()


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
