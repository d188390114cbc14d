"""The compiled C++ CPU backend: op schemas, lazy loading of `igsp_kernels._C`, autograd and the backend functions.

The kernels live in csrc/cpu (ATen GEMMs + OpenMP loops, see csrc/README.md) and register themselves for the
CPU dispatch key of the `igsp_kernels_cpp` torch.library namespace when `igsp_kernels._C` is imported. The
schemas are defined here, in Python, in one place (`SCHEMAS`), together with their fake (meta) implementations
and the autograd formula, so the ops compose with `torch.compile` and another backend (e.g. a Triton kernel for
CUDA) can register an implementation of the same op names with `torch.library.register_kernel`.

Importing this module never fails: it only defines schemas. `is_available()` imports the extension on first use
(STYLE F2); a failure is logged once and reported by `load_error()`, and dispatch then falls back to the
reference. Ops (all CPU):

    igsp_kernels_cpp::moe_lora_fwd   (y, hpre): y = x W0^T + b0 + s sum_j w (phi(x A_e + ba_e) B_e + bb_e) and the
                                     rank-r pre-activation hpre = x A_e + ba_e ((T k, r), fp32), saved for backward
    igsp_kernels_cpp::moe_lora_bwd   (dx, dA, dB, dw, dba, dbb) from the saved hpre (no expert output is stored)
    igsp_kernels_cpp::subspace_penalty  lam sum ||(I - UU^T) M||^2 and, optionally, its gradients
    igsp_kernels_cpp::project_grad_  G <- G - U (U^T G) in place, over lists
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from igsp_kernels import _env

__all__ = [
    "NAMESPACE",
    "SCHEMAS",
    "is_available",
    "load_error",
    "moe_lora_cpp",
    "project_grad_cpp_",
    "subspace_penalty_cpp",
]

logger = logging.getLogger(__name__)

NAMESPACE = "igsp_kernels_cpp"
# Optional tensors are `Tensor?`. topk_idx / topk_w are (T / L, k) with L = tokens_per_sample (1: per-token rows;
# L > 1: native per-sample routing, each sample one run of L rows). moe_lora_fwd also returns hpre (T k, r) in the
# accumulation dtype (fp32, fp64 for fp64 x), row t k + j = x[t] A[e] + ba[e] for e = topk_idx[t // L, j], which
# moe_lora_bwd takes back. `output_mask`
# says which of (dx, dA, dB, dw, dba, dbb) to compute: an unrequested gradient comes back as an empty tensor (the
# bias gradients also when the bias is None).
SCHEMAS: dict[str, str] = {
    "moe_lora_fwd": (
        "moe_lora_fwd(Tensor x, Tensor A, Tensor B, Tensor topk_idx, Tensor topk_w, Tensor? base_weight, "
        "Tensor? base_bias, Tensor? bias_a, Tensor? bias_b, float scale, str activation, int tokens_per_sample) "
        "-> (Tensor, Tensor)"
    ),
    "moe_lora_bwd": (
        "moe_lora_bwd(Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor topk_idx, Tensor topk_w, Tensor hpre, "
        "Tensor? base_weight, Tensor? bias_a, Tensor? bias_b, float scale, str activation, int tokens_per_sample, "
        "bool[6] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "subspace_penalty": (
        "subspace_penalty(Tensor[] mats, Tensor[] bases, float lam, bool compute_grads) -> (Tensor, Tensor[])"
    ),
    "project_grad_": "project_grad_(Tensor(a!)[] grads, Tensor[] bases) -> ()",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------- fake impls
@torch.library.register_fake(f"{NAMESPACE}::moe_lora_fwd")
def _moe_lora_fwd_fake(x, A, B, topk_idx, topk_w, base_weight, base_bias, bias_a, bias_b, scale, activation,
                       tokens_per_sample):
    y = x.new_empty((x.shape[0], B.shape[2]))
    return y, x.new_empty((x.shape[0] * topk_idx.shape[1], A.shape[2]), dtype=_acc_dtype(x.dtype))


@torch.library.register_fake(f"{NAMESPACE}::moe_lora_bwd")
def _moe_lora_bwd_fake(grad_y, x, A, B, topk_idx, topk_w, hpre, base_weight, bias_a, bias_b, scale, activation,
                       tokens_per_sample, output_mask):
    def grad(needed: bool, like: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
        if like is None:  # a missing bias: an empty tensor in the accumulation dtype, as the kernel returns
            return fallback.new_empty((0,), dtype=_acc_dtype(x.dtype))
        return like.new_empty(like.shape) if needed else like.new_empty((0,))

    return (
        grad(output_mask[0], x, x), grad(output_mask[1], A, x), grad(output_mask[2], B, x),
        grad(output_mask[3], topk_w, x), grad(output_mask[4], bias_a, x), grad(output_mask[5], bias_b, x),
    )


@torch.library.register_fake(f"{NAMESPACE}::subspace_penalty")
def _subspace_penalty_fake(mats, bases, lam, compute_grads):
    acc = _acc_dtype(mats[0].dtype)
    value = mats[0].new_empty((), dtype=acc)
    return value, [M.new_empty(M.shape, dtype=acc) for M in mats] if compute_grads else []


@torch.library.register_fake(f"{NAMESPACE}::project_grad_")
def _project_grad_fake(grads, bases):
    return None


# --------------------------------------------------------------------------------------------- autograd
def _moe_lora_setup_context(ctx: Any, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, A, B, topk_idx, topk_w, base_weight, _base_bias, bias_a, bias_b, scale, activation, tokens_per_sample = inputs
    hpre = output[1]
    # The inputs and the rank-r pre-activation hpre (T k r floats, 0.2 MB for 1576 tokens at k = 2, r = 16): reading
    # it back saves the backward one x A GEMM per group (~2-3 % of fc2 forward + backward), as the Triton backend
    # does. No expert output is ever stored (STYLE D1). hpre is an internal output: no gradient flows through it.
    ctx.mark_non_differentiable(hpre)
    ctx.save_for_backward(x, A, B, topk_idx, topk_w, hpre, base_weight, bias_a, bias_b)
    ctx.scale = scale
    ctx.activation = activation
    ctx.tokens_per_sample = tokens_per_sample


def _moe_lora_backward(ctx: Any, grad_y: torch.Tensor, _grad_hpre: torch.Tensor | None) -> tuple:
    x, A, B, topk_idx, topk_w, hpre, base_weight, bias_a, bias_b = ctx.saved_tensors
    n = ctx.needs_input_grad
    mask = [n[0], n[1], n[2], n[4], bias_a is not None and n[7], bias_b is not None and n[8]]
    dx, dA, dB, dw, dba, dbb = torch.ops.igsp_kernels_cpp.moe_lora_bwd(
        grad_y, x, A, B, topk_idx, topk_w, hpre, base_weight, bias_a, bias_b, ctx.scale, ctx.activation,
        ctx.tokens_per_sample, mask
    )
    pick = lambda needed, g: g if needed else None
    return (
        pick(mask[0], dx),  # x
        pick(mask[1], dA),  # A
        pick(mask[2], dB),  # B
        None,  # topk_idx (integer)
        pick(mask[3], dw),  # topk_w
        None,  # base_weight (frozen)
        None,  # base_bias (frozen)
        pick(mask[4], dba),  # bias_a
        pick(mask[5], dbb),  # bias_b
        None,  # scale
        None,  # activation
        None,  # tokens_per_sample
    )


torch.library.register_autograd(
    f"{NAMESPACE}::moe_lora_fwd", _moe_lora_backward, setup_context=_moe_lora_setup_context
)


class _SubspacePenalty(torch.autograd.Function):
    """lam sum ||(I - UU^T) M||^2 whose gradient 2 lam (I - UU^T) M is computed in forward (STYLE D6)."""

    @staticmethod
    def forward(ctx: Any, lam: float, bases: tuple[torch.Tensor, ...], *mats: torch.Tensor) -> torch.Tensor:
        value, grads = torch.ops.igsp_kernels_cpp.subspace_penalty(list(mats), list(bases), lam, True)
        ctx.save_for_backward(*grads)
        ctx.dtypes = [M.dtype for M in mats]
        return value

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        grads = ctx.saved_tensors
        # The usual loss.backward(): skip the multiply (a CPU scalar, no device sync). Not while torch.compile
        # traces the backward: there the value is unknown and the multiply is free.
        unit = not torch.compiler.is_compiling() and bool(grad_out == 1)
        out = [
            (g if unit else g * grad_out).to(dtype) if ctx.needs_input_grad[2 + i] else None
            for i, (g, dtype) in enumerate(zip(grads, ctx.dtypes))
        ]
        return (None, None, *out)  # lam, bases, *mats


# ---------------------------------------------------------------------------------------------- loading
_state: dict[str, Any] = {"tried": False, "error": None}


def _load() -> None:
    """Import `igsp_kernels._C` once; record why it failed (logged once as a warning)."""
    if _state["tried"]:
        return
    _state["tried"] = True
    try:
        importlib.import_module("igsp_kernels._C")
        missing = [
            name for name in SCHEMAS
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CPU")
        ]
        if missing:  # an old build from before an op was added
            raise ImportError(f"igsp_kernels._C has no CPU kernel for {missing} (stale build: rebuild it)")
    except Exception as exc:  # any failure (missing .so, undefined symbol, ABI mismatch) means "not available"
        _state["error"] = f"{type(exc).__name__}: {exc}"
        _explain_missing(_state["error"])


def _explain_missing(error: str) -> None:
    """Say once why the extension is missing: info when the install opted out, a warning (with the build's reason
    when the installed package recorded one) otherwise."""
    from igsp_kernels._build_info import cpp_build_info

    info = cpp_build_info()
    if info is not None and info["cpp_extension"] == "opted_out":
        logger.info("the C++ CPU extension was not built (%s); CPU ops use the eager reference", info["reason"])
        return
    why = f"; the install skipped it: {info['reason']}" if info is not None and info["reason"] else ""
    logger.warning(
        "the C++ CPU extension igsp_kernels._C is unavailable (%s%s); CPU ops use the reference. Build it with "
        "torch installed: `pip install --no-build-isolation .` (IGSP_KERNELS_BUILD_CPU=0 skips it on purpose).",
        error, why,
    )


def is_available() -> bool:
    """True when the compiled CPU kernels are loaded (False under IGSP_KERNELS_DISABLE_CPP=1, without loading)."""
    if _env.cpp_disabled():
        return False
    _load()
    return _state["error"] is None


def load_error() -> str | None:
    """Why the extension is unavailable (None when it is available or was never requested)."""
    if _env.cpp_disabled():
        return "disabled by IGSP_KERNELS_DISABLE_CPP=1"
    return _state["error"]


def _require() -> None:
    if not is_available():
        raise RuntimeError(f"the igsp_kernels C++ CPU extension is not available: {load_error()}")


# -------------------------------------------------------------------------------------- backend functions
def moe_lora_cpp(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_w: torch.Tensor,
    base_weight: torch.Tensor | None,
    base_bias: torch.Tensor | None,
    scale: float,
    activation: str,
    bias_a: torch.Tensor | None,
    bias_b: torch.Tensor | None,
    tokens_per_sample: int = 1,
) -> torch.Tensor:
    """MoE-LoRA fused with the optional frozen base linear, on the CPU (inputs validated by functional.moe_lora).

    Shapes: x (T, d_in); A (E, d_in, r); B (E, r, d_out); topk_idx (T / L, k) int32/int64; topk_w (T / L, k) with
    L = tokens_per_sample (native per-sample routing for L > 1: each sample is one run of rows);
    base_weight (d_out, d_in); base_bias (d_out,); bias_a (E, r); bias_b (E, d_out). Any float dtypes: the op
    computes in fp32 (fp64 for fp64 x), returns y (T, d_out) in x.dtype and each gradient in its input's dtype.
    Differentiable in x, A, B, topk_w, bias_a and bias_b.
    """
    _require()
    y, _hpre = torch.ops.igsp_kernels_cpp.moe_lora_fwd(
        x, A, B, topk_idx, topk_w, base_weight, base_bias, bias_a, bias_b, float(scale), activation,
        int(tokens_per_sample)
    )
    return y


def subspace_penalty_cpp(mats: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], lam: float) -> torch.Tensor:
    """lam * sum_i ||(I - U_i U_i^T) M_i||_F^2: a scalar in fp32 (fp64 for fp64 inputs), differentiable in M_i.

    mats: (..., d_i, n_i) matrices; bases: (d_i, m_i) orthonormal bases (m_i may be 0).
    """
    _require()
    if torch.is_grad_enabled() and any(M.requires_grad for M in mats):
        return _SubspacePenalty.apply(float(lam), tuple(bases), *mats)
    value, _ = torch.ops.igsp_kernels_cpp.subspace_penalty(list(mats), list(bases), float(lam), False)
    return value


def project_grad_cpp_(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    """In place, for every i: G_i <- G_i - U_i (U_i^T G_i). grads (..., d_i, n_i); bases (d_i, m_i)."""
    _require()
    with torch.no_grad():
        torch.ops.igsp_kernels_cpp.project_grad_(list(grads), list(bases))
