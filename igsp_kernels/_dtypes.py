"""The dtype rule of `igsp_kernels.moe_lora` and the frozen base weight prepared once in the compute dtype.

The rule (issue 14 item 3), the same on every backend:
- outside autocast, x, A, B, base_weight, base_bias and the expert biases share one floating dtype, else a
  `TypeError` stating the rule (torch.matmul refuses mixed dtypes too, and promoting silently would hide an fp64
  activation meeting fp32 weights); topk_w may be any float dtype (routers compute in fp32);
- under `torch.autocast` for x's device type, moe_lora is an autocast op (on autocast's lower-precision list, like
  `F.linear`): x, base_weight and base_bias are used in the autocast dtype; A, B and the expert biases may stay in
  their own float dtype (fp32 master weights), the rank-r intermediate is kept in fp32; the output is in the autocast
  dtype and every gradient in its input's dtype. float64 x is never cast (autocast leaves float64 alone), so an
  fp64 call follows the first rule.

The frozen base weight in the compute dtype (issue 9 item 3): under bf16 autocast the trainer passes an fp32 frozen
weight, which every call would otherwise cast again (torch's autocast cache only keeps casts of leaves that require
grad, so it never caches a frozen weight). `cast_frozen` keeps one copy per (weight, dtype), reused until the weight
changes: the entry records the weight's storage address, its in-place version counter, shape and strides, and is
dropped when the weight is garbage-collected. Under `torch.compile` the cast is a plain traced `.to` (no Python-side
state while tracing); the kernels themselves never cast the frozen weight inside a GEMM loop.
Memory: one extra copy of each frozen weight in the compute dtype, e.g. 113 MB for the 24 MLP linears of a
ViT-B/16 in bf16 (768 x 3072 x 2 B each); `clear_cast_cache()` frees them.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["autocast_dtype", "cast_frozen", "check_same_dtype", "clear_cast_cache"]


@dataclass
class _Entry:
    ref: weakref.ref
    ptr: int
    version: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    copy: torch.Tensor


_CACHE: dict[tuple[int, torch.dtype], _Entry] = {}


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype moe_lora computes in for activations `x`, or None when autocast does not apply (disabled
    for x's device type, or x is float64, which autocast never casts)."""
    if x.dtype == torch.float64:
        return None
    device_type = x.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type without autocast support (meta, ...)
        return None


def check_same_dtype(x: torch.Tensor, others: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    """Outside autocast: every tensor of `others` has x's dtype, else a TypeError stating the rule."""
    for name, t in others:
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"{name} must have the dtype of x ({_dt(x.dtype)}), got {_dt(t.dtype)}: outside torch.autocast, x, A, "
                "B, base_weight, base_bias and expert_bias must share one floating dtype (torch.matmul refuses mixed "
                "dtypes too; topk_w may be any float dtype). Cast them, or call moe_lora under torch.autocast, where "
                "x and the frozen base are used in the autocast dtype and A, B may stay fp32 master weights."
            )


def cast_frozen(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`t` (a frozen weight or bias) in `dtype`: itself when it already is, else a copy made once and reused until t
    changes (storage, version, shape or strides). Tensors that require grad, inference tensors and calls traced by
    torch.compile get a plain cast."""
    if t is None or t.dtype == dtype:
        return t
    if torch.compiler.is_compiling() or t.requires_grad or t.is_inference():
        return t.to(dtype)
    key = (id(t), dtype)
    entry = _CACHE.get(key)
    if (entry is not None and entry.ref() is t and entry.ptr == t.data_ptr() and entry.version == t._version
            and entry.shape == tuple(t.shape) and entry.stride == t.stride()):
        return entry.copy
    copy = t.detach().to(dtype).contiguous()
    ref = weakref.ref(t, lambda _r, key=key: _drop(key, _r))
    _CACHE[key] = _Entry(ref, t.data_ptr(), t._version, tuple(t.shape), t.stride(), copy)
    return copy


def _drop(key: tuple[int, torch.dtype], ref: weakref.ref) -> None:
    entry = _CACHE.get(key)
    if entry is not None and entry.ref is ref:  # a later tensor with the same id may own the key by now
        del _CACHE[key]


def clear_cast_cache() -> None:
    """Free every cached low-precision copy of a frozen weight (they are rebuilt on the next call)."""
    _CACHE.clear()
