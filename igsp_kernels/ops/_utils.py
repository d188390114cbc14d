"""Shared launch machinery of the Triton ops: dtype mapping, config selection (autotuned or pinned), contiguity.

Config selection (STYLE C4, C5):
- on a GPU with `IGSP_KERNELS_AUTOTUNE=1` (default) a kernel runs through `triton.autotune` over the configs of its
  named config function, keyed on model dims only (never routing counts: a routing-dependent key recompiles and
  re-tunes every step, unsloth's grouped GEMM lesson);
- with `IGSP_KERNELS_AUTOTUNE=0` the first config that survives pruning is pinned (CI, deterministic runs, an OOM
  during the sweep);
- under `TRITON_INTERPRET=1` one small interpreter config runs (small tiles, so the tiny test shapes span several
  tiles and the boundary masks are exercised).
Tests may pin a config per kernel with `monkeypatch.setitem(_utils.CONFIG_OVERRIDES, kernel_name, config)`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from igsp_kernels import _env

__all__ = [
    "ACTIVATION_CODES",
    "CONFIG_OVERRIDES",
    "INT32_LIMIT",
    "KernelLauncher",
    "acc_tl_dtype",
    "check_moe_lora_launchable",
    "device_ctx",
    "dot_precision",
    "ensure_contiguous",
    "fake_grad",
    "interpreting",
    "next_pow2",
    "num_sms",
    "op_tl_dtype",
    "t_bucket",
    "tl_dtype",
]

logger = logging.getLogger(__name__)

# Hopper (sm_90) allows 227 KiB of shared memory per block (232,448 bytes); a config above it fails to launch.
SMEM_LIMIT_BYTES = 232_448
# Offsets are int32 in the kernels unless one can pass this; then row offsets switch to int64 (KERNELS.md 5).
INT32_LIMIT = 2**31 - 1
# The ACTIVATION constexpr of the MoE-LoRA kernels.
ACTIVATION_CODES = {"identity": 0, "relu": 1}
#: kernel name -> triton.Config to use instead of the normal selection (tests only; see the module docstring).
CONFIG_OVERRIDES: dict[str, triton.Config] = {}

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return _env.triton_interpret()


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"dtype must be one of {list(_TL_DTYPES)}, got {dtype}") from None


def op_tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype of matrix-multiply operands for inputs of `dtype` (accumulation is always fp32 or fp64).

    The interpreter multiplies bf16 on raw bits (tl.dot on bf16 returns garbage there, KERNELS.md), so under
    TRITON_INTERPRET bf16 operands are widened to fp32; on a GPU they stay bf16 (tensor cores).
    """
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return tl_dtype(dtype)


def acc_tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """fp64 inputs accumulate in fp64 (gradcheck); every other dtype accumulates in fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: fp32 follows torch's matmul setting (TF32 only when the user allowed it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (132 on an H100/H200 SXM); 1 on the CPU (interpreter)."""
    if device.type != "cuda":
        return 1
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def ensure_contiguous(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make every tensor argument contiguous in one place (STYLE D3); a no-op for tensors that already are."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return wrapper


def t_bucket(T: int) -> int:
    """Autotune key for a token count: its power-of-two bucket (tile choice changes with T only by octaves)."""
    return min(next_pow2(max(T, 1)), 1 << 20)


class _NullCtx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def device_ctx(t: torch.Tensor):
    """`torch.cuda.device(t.device)` for CUDA tensors (launches go to t's GPU), a no-op context otherwise."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _NullCtx()


def check_moe_lora_launchable(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              base_weight: torch.Tensor | None = None) -> None:
    """What the MoE-LoRA launchers need beyond functional.moe_lora's validation: CUDA tensors (or the interpreter),
    int32 expert offsets, rows contiguous in their last dimension, the frozen weight in x's dtype."""
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton MoE-LoRA kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    for name, t in (("A", A), ("B", B)):
        if t.numel() > INT32_LIMIT:
            raise ValueError(f"{name} must have fewer than 2**31 elements (int32 expert offsets), got {t.numel()}")
    for name, t in (("x", x), ("A", A), ("B", B)):
        if t.dim() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    if base_weight is not None and base_weight.dtype != x.dtype:
        raise TypeError(f"base_weight must arrive in x's dtype ({x.dtype}; functional.moe_lora casts it once), got "
                        f"{base_weight.dtype}")


def fake_grad(needed: bool, like: torch.Tensor | None, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fake implementation's gradient output: shaped like `like` when it is asked for and exists, else an empty
    tensor of `dtype` on ref's device (what the launchers return for a gradient not asked for)."""
    return torch.empty_like(like) if (needed and like is not None) else ref.new_empty(0, dtype=dtype)


Pruner = Callable[..., list]


class KernelLauncher:
    """Runs one `@triton.jit` kernel with an autotuned, pinned, interpreter or test-override config.

    Args:
        fn: the jitted kernel.
        configs: named function returning the GPU configs, best default first (STYLE C1).
        key: autotune key, argument names of model dimensions only (STYLE C2).
        prune: `early_config_prune(configs, named_args, **kwargs) -> configs` dropping configs that cannot fit
            (STYLE C3); it must keep at least one config.
        interpret_config: the single config used under TRITON_INTERPRET.
    """

    def __init__(
        self,
        fn: Any,
        configs: Callable[[], list[triton.Config]],
        key: Sequence[str],
        prune: Pruner | None,
        interpret_config: triton.Config,
        autotune: bool = True,
    ) -> None:
        self.fn = fn
        self.name = fn.__name__ if hasattr(fn, "__name__") else str(fn)
        self.configs = configs
        self.key = list(key)
        self.prune = prune
        self.interpret_config = interpret_config
        self.autotune = autotune
        self._tuned: Any = None

    def _autotuner(self) -> Any:
        if self._tuned is None:
            prune_by = {"early_config_prune": self.prune} if self.prune is not None else None
            self._tuned = triton.autotune(configs=self.configs(), key=self.key, prune_configs_by=prune_by)(self.fn)
        return self._tuned

    def candidates(self, kwargs: dict[str, Any]) -> list[triton.Config]:
        """Every config a GPU launch with these arguments may run: the pruned list (autotuned kernels) or the
        single config the pruner picks (kernels that are never autotuned)."""
        configs = self.configs()
        if self.prune is not None:
            configs = self.prune(configs, {}, **kwargs)
        return configs if self.autotune else configs[:1]

    def pinned_config(self, kwargs: dict[str, Any]) -> triton.Config:
        """The config used without autotuning: the first default that survives pruning for these arguments."""
        return self.candidates(kwargs)[0]

    def select(self, kwargs: dict[str, Any]) -> triton.Config | None:
        """The config this launch uses, or None when the autotuner decides."""
        override = CONFIG_OVERRIDES.get(self.name)
        if override is not None:
            return override
        if interpreting():
            return self.interpret_config
        if self.autotune and _env.autotune_enabled():
            return None
        return self.pinned_config(kwargs)

    def __call__(self, grid: Callable[[dict[str, Any]], tuple[int, ...]], **kwargs: Any) -> None:
        cfg = self.select(kwargs)
        if cfg is None:
            self._autotuner()[grid](**kwargs)
            return
        meta = {**kwargs, **cfg.kwargs}
        self.fn[grid(meta)](**meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def smem_bytes(stages: int, *tiles_bytes: int) -> int:
    """Shared memory of a software-pipelined loop: `stages` copies of the operand tiles streamed per iteration."""
    return stages * sum(tiles_bytes)
