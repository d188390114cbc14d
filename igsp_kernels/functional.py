"""The typed public ops: validate once, pick a backend, run.

Every function here checks its inputs and raises `TypeError`/`ValueError`/`IndexError` naming the argument,
the expected and the received value, so no backend ever sees malformed input (no crash deep in a kernel,
no silent garbage). Then `igsp_kernels.backends.select_backend` picks the implementation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from igsp_kernels import _env
from igsp_kernels._dtypes import autocast_dtype, cast_frozen, check_same_dtype
from igsp_kernels.backends import OpRequest, select_backend
from igsp_kernels.reference.moe_lora import ACTIVATIONS
from igsp_kernels.reference.routing import expand_sample_routing
from igsp_kernels.reference.subspace import project_out_ref, subspace_basis_ref

__all__ = [
    "expand_sample_routing",
    "moe_lora",
    "project_grad_",
    "project_out",
    "route_topk",
    "subspace_basis",
    "subspace_penalty",
]

Activation = Literal["identity", "relu"]
BackendName = Literal["auto", "reference", "triton", "cpp"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
# Offsets inside the fused kernels are int32 where that is faster; the launchers switch to int64 above this.
INT32_LIMIT = 2**31 - 1


# ----------------------------------------------------------------------------------------------- checks
def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[_dt(d) for d in dtypes]}, got {_dt(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of x), got {t.device}")
    return t


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} ({what}), got {tuple(t.shape)}")


def _checking_values() -> bool:
    """Whether checks that read tensor values may run: never while torch.compile/export traces (a host read there
    is a graph break, or an error under fullgraph=True and torch.export)."""
    return not torch.compiler.is_compiling()


def _check_number(name: str, value: object, *, low: float | None = None, what: str = "a finite float") -> float:
    """A finite int/float (not a bool), >= low when given; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if not math.isfinite(value) or (low is not None and value < low):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _check_finite(name: str, t: torch.Tensor, hint: str = "") -> None:
    """Every entry of t finite. CPU: a host check (free there); an accelerator: an async device assert (no host
    sync). Skipped while torch.compile/export traces and under IGSP_KERNELS_CHECK_FINITE=0."""
    if t.numel() == 0 or t.device.type == "meta" or not _env.check_finite_enabled() or not _checking_values():
        return
    if t.device.type != "cpu":
        torch._assert_async(torch.isfinite(t).all(), f"{name} must be finite{hint}")
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        nan = int(torch.isnan(t).sum())
        raise ValueError(f"{name} must be finite, got {nan} NaN and {int((~finite).sum()) - nan} infinite "
                         f"value(s) in shape {tuple(t.shape)}{hint}")


def _check_index_range(name: str, idx: torch.Tensor, upper: int, what: str) -> None:
    """0 <= idx < upper. On CPU a real check; on an accelerator an async device assert (no host sync)."""
    if idx.numel() == 0 or not _env.check_indices_enabled() or not _checking_values():
        return
    if idx.device.type == "cpu":
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= upper:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name} values must lie in [0, {upper}) ({what}), got {bad}")
    else:
        torch._assert_async(((idx >= 0) & (idx < upper)).all(), f"{name} values must lie in [0, {upper}) ({what})")


# --------------------------------------------------------------------------------------------- dispatch
class _TracedImpls:
    """Implementations chosen while torch.compile/export traced a call, as attributes named by `_traced_choice`'s
    key. An object, not a dict: Dynamo snapshots a dict's items when it first reads it, but reads an object's
    attributes when asked, so an entry added by the opaque choice during the same trace is found."""


_TRACED_IMPLS = _TracedImpls()


@torch.compiler.assume_constant_result
def _traced_choice(op: str, device_type: str, device_index: int, dtype: torch.dtype, activation: str,
                   backend: str, tokens_per_sample: int = 1, mixed_dtypes: bool = False) -> str:
    """Run select_backend for a traced call, outside the graph (it imports lazily, reads IGSP_KERNELS_* flags and
    logs: each a graph break if traced) and return the key of the chosen implementation in `_TRACED_IMPLS`."""
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    chosen = select_backend(OpRequest(op, device, dtype, activation, tokens_per_sample, mixed_dtypes), backend)
    key = f"{op}__{chosen.name}"
    setattr(_TRACED_IMPLS, key, chosen.implementation(op))
    return key


def _dispatch(op: str, device: torch.device, dtype: torch.dtype, backend: str,
              activation: str = "identity", *, tokens_per_sample: int = 1,
              mixed_dtypes: bool = False) -> Callable[..., Any]:
    """The implementation `select_backend` picks for `op` on inputs of `device` and `dtype`.

    Under torch.compile/export the choice is made once per compilation, at trace time, and baked into the graph:
    flipping an IGSP_KERNELS_* flag afterwards needs `torch.compiler.reset()` to take effect in compiled code.
    """
    if torch.compiler.is_compiling():
        index = -1 if device.index is None else device.index
        key = _traced_choice(op, device.type, index, dtype, activation, backend, tokens_per_sample, mixed_dtypes)
        return getattr(_TRACED_IMPLS, key)
    chosen = select_backend(OpRequest(op, device, dtype, activation, tokens_per_sample, mixed_dtypes), backend)
    return lambda *args: chosen(op, *args)


# ---------------------------------------------------------------------------------------------- routing
def route_topk(
    logits: torch.Tensor,
    k: int,
    *,
    active: torch.Tensor | None = None,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    backend: BackendName = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k gating over the active experts.

    Semantics: p = softmax(logits + noise_std * N(0, 1)) over active experts; idx, w = topk(p, k); w /= w.sum(-1).

    Args:
        logits: (N, E) finite floating router logits (mask experts out with `active`, not with -inf).
        k: experts per row, 1 <= k <= number of active experts.
        active: optional bool mask (E,) or (N, E); inactive experts are never chosen.
        noise_std: std of Gaussian noise added to the logits (noisy top-k, training only); finite, >= 0.
        generator: RNG for the noise.
    Returns:
        topk_idx int32 (N, k), topk_w fp32 (N, k) (rows sum to 1), probs fp32 (N, E).

    Non-finite logits are refused: a ValueError on CPU, an async device-side assert on accelerators (no host
    sync). Where no check runs (while torch.compile/export traces, or IGSP_KERNELS_CHECK_FINITE=0) the rule is
    NaN propagation: a row whose active logits hold a NaN or +inf, or are all -inf, gets NaN weights and
    probabilities, so its output is NaN, never a finite wrong value.
    """
    _check_tensor("logits", logits, ndim=2, dtypes=_FLOAT_DTYPES)
    N, E = logits.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, {E}] (E = logits.shape[1]), got {k!r}")
    noise_std = _check_number("noise_std", noise_std, low=0.0, what="a finite float >= 0")
    if active is not None:
        _check_tensor("active", active, dtypes=(torch.bool,), device=logits.device)
        if tuple(active.shape) not in ((E,), (N, E)):
            raise ValueError(f"active must have shape ({E},) or ({N}, {E}), got {tuple(active.shape)}")
        if not _checking_values():
            pass
        elif active.device.type == "cpu":
            fewest = int(active.sum(-1).min()) if active.numel() else 0
            if N > 0 and fewest < k:
                raise ValueError(f"k={k} is larger than the number of active experts ({fewest}) in active")
        else:
            torch._assert_async((active.sum(-1) >= k).all(), f"k={k} is larger than the number of active experts")
    _check_finite("logits", logits, " (mask experts out with active=, not with -inf logits)")
    return _dispatch("route_topk", logits.device, logits.dtype, backend)(logits, k, active, float(noise_std),
                                                                          generator)


# --------------------------------------------------------------------------------------------- moe_lora
def moe_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_w: torch.Tensor,
    *,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    scale: float = 1.0,
    activation: Activation = "identity",
    expert_bias: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    tokens_per_sample: int | None = None,
    backend: BackendName = "auto",
) -> torch.Tensor:
    """Routed mixture of LoRA experts, fused with an optional frozen base linear.

    Semantics: y[t] = x[t] W0^T + b0 + scale * sum_j w[b,j] * (phi(x[t] A[e] + ba[e]) B[e] + bb[e]), e = idx[b,j],
    b = t // L with L = tokens_per_sample (b = t for per-token routing).

    Args:
        x: (T, d_in) fp16/bf16/fp32/fp64 token rows.
        A: (E, d_in, r) expert down-projections; B: (E, r, d_out) expert up-projections.
        topk_idx: (T / L, k) int32/int64 expert of each assignment, in [0, E).
        topk_w: (T / L, k) float gate of each assignment (differentiable; flows on to the router).
        base_weight: optional frozen (d_out, d_in) weight W0; base_bias: optional frozen (d_out,) b0.
            Without a base this is the parallel-adapter form. A base that requires grad is an error.
        scale: the LoRA scale s.
        activation: phi, "identity" (LoRA) or "relu" (adapter parity with MoE-Adapters).
        expert_bias: optional (ba (E, r) or None, bb (E, d_out) or None) per-expert biases.
        tokens_per_sample: None (per-token routing: one routing row per row of x) or L >= 1: per-sample routing,
            the routing row b covers the L consecutive rows b L .. b L + L - 1 of x (a (B, L, d) input flattened
            to (B L, d)); L must divide T. The kernels then work on the B k sample-expert pairs and never build
            (T, k) tensors.
        backend: "auto" (Triton on CUDA, the C++ extension on CPU when built, else the reference) or a name.
    Returns:
        y: (T, d_out) in x.dtype (in the autocast dtype under autocast). Gradients reach x, A, B, topk_w and the
        expert biases, each in its input's dtype.

    Dtypes (every backend): outside autocast, x, A, B, base_weight, base_bias and expert_bias share one floating
    dtype, else TypeError (torch.matmul refuses mixed dtypes too); topk_w may be any float dtype. Under
    `torch.autocast` for x's device type the op is an autocast op: x, base_weight and base_bias are used in the
    autocast dtype (the frozen weight's low-precision copy is made once and reused while it is unchanged,
    `igsp_kernels._dtypes.cast_frozen`), A, B and the expert biases may stay fp32 master weights, the rank-r
    intermediate is accumulated and kept in fp32, and y is in the autocast dtype. float64 x is never autocast.
    """
    _check_tensor("x", x, ndim=2, dtypes=_FLOAT_DTYPES)
    dev = x.device
    T, d_in = x.shape
    _check_tensor("A", A, ndim=3, dtypes=_FLOAT_DTYPES, device=dev)
    _check_tensor("B", B, ndim=3, dtypes=_FLOAT_DTYPES, device=dev)
    E, _, r = A.shape
    if E < 1 or r < 1:
        raise ValueError(f"A must have at least one expert and rank >= 1, got shape {tuple(A.shape)}")
    if A.shape[1] != d_in:
        raise ValueError(f"A must have shape (E, {d_in}, r) (d_in = x.shape[1]), got {tuple(A.shape)}")
    if B.shape[0] != E or B.shape[1] != r:
        raise ValueError(f"B must have shape ({E}, {r}, d_out) (E, r from A), got {tuple(B.shape)}")
    d_out = B.shape[2]
    L = 1 if tokens_per_sample is None else tokens_per_sample
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"tokens_per_sample must be None or an int >= 1, got {tokens_per_sample!r}")
    if T % L:
        raise ValueError(f"tokens_per_sample={L} must divide the number of rows of x (T = x.shape[0] = {T}): "
                         f"every sample has the same L tokens")
    rows = T // L
    what = "T = x.shape[0]" if L == 1 else f"T / tokens_per_sample = {T} / {L}"
    _check_tensor("topk_idx", topk_idx, ndim=2, dtypes=_INDEX_DTYPES, device=dev)
    if topk_idx.shape[0] != rows:
        raise ValueError(f"topk_idx must have shape ({rows}, k) ({what}), got {tuple(topk_idx.shape)}")
    k = topk_idx.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"topk_idx.shape[1] (k) must lie in [1, {E}] (E = A.shape[0]), got {k}")
    _check_tensor("topk_w", topk_w, ndim=2, dtypes=_FLOAT_DTYPES, device=dev)
    _check_shape("topk_w", topk_w, (rows, k), "same as topk_idx")
    if base_weight is not None:
        _check_tensor("base_weight", base_weight, ndim=2, dtypes=_FLOAT_DTYPES, device=dev)
        _check_shape("base_weight", base_weight, (d_out, d_in), "(d_out, d_in) with d_out = B.shape[2]")
        if base_weight.requires_grad:
            raise ValueError("base_weight must be frozen (requires_grad=False): the base linear is not trained")
    if base_bias is not None:
        _check_tensor("base_bias", base_bias, ndim=1, dtypes=_FLOAT_DTYPES, device=dev)
        _check_shape("base_bias", base_bias, (d_out,), "(d_out,)")
        if base_bias.requires_grad:
            raise ValueError("base_bias must be frozen (requires_grad=False): the base linear is not trained")
    bias_a = bias_b = None
    if expert_bias is not None:
        if not isinstance(expert_bias, (tuple, list)) or len(expert_bias) != 2:
            raise TypeError("expert_bias must be a pair (bias_a (E, r) | None, bias_b (E, d_out) | None), "
                            f"got {expert_bias!r}")
        bias_a, bias_b = expert_bias
        if bias_a is not None:
            _check_tensor("expert_bias[0]", bias_a, ndim=2, dtypes=_FLOAT_DTYPES, device=dev)
            _check_shape("expert_bias[0]", bias_a, (E, r), "(E, r)")
        if bias_b is not None:
            _check_tensor("expert_bias[1]", bias_b, ndim=2, dtypes=_FLOAT_DTYPES, device=dev)
            _check_shape("expert_bias[1]", bias_b, (E, d_out), "(E, d_out)")
    scale = _check_number("scale", scale)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check_index_range("topk_idx", topk_idx, E, "E = A.shape[0]")
    # The dtype rule (igsp_kernels/_dtypes.py): one dtype outside autocast; under autocast x and the frozen base in
    # the autocast dtype (a cached copy of the weight), A / B / expert biases as given.
    ac = autocast_dtype(x)
    params = (("A", A), ("B", B), ("expert_bias[0]", bias_a), ("expert_bias[1]", bias_b))
    if ac is None:
        check_same_dtype(x, (*params[:2], ("base_weight", base_weight), ("base_bias", base_bias), *params[2:]))
    else:
        x = x.to(ac)
        base_weight, base_bias = cast_frozen(base_weight, ac), cast_frozen(base_bias, ac)
    mixed = any(t is not None and t.dtype != x.dtype for _, t in params)
    impl = _dispatch("moe_lora", dev, x.dtype, backend, activation, tokens_per_sample=L, mixed_dtypes=mixed)
    # The backends implement the rule themselves; torch's autocast must not re-cast their inner matmuls.
    with torch.autocast(dev.type, enabled=False) if ac is not None else contextlib.nullcontext():
        return impl(x, A, B, topk_idx, topk_w, base_weight, base_bias, float(scale), activation, bias_a, bias_b, L)


# --------------------------------------------------------------------------------------------- subspace
@torch.library.custom_op("igsp_kernels::subspace_basis", mutates_args=())
def _subspace_basis_op(M: torch.Tensor, energy: float, max_rank: int) -> torch.Tensor:
    """The reference SVD as one opaque op (max_rank -1 = None): its output width m depends on the values of M,
    which torch.compile/export can only express through an op with a dynamic output size (see the fake below)."""
    # Inside the op the values are real even in a compiled graph: the host check costs no graph break.
    if M.device.type != "meta" and not bool(torch.isfinite(M).all()):
        nan = int(torch.isnan(M).sum())
        raise ValueError(f"M must be finite, got {nan} NaN and {int((~torch.isfinite(M)).sum()) - nan} infinite "
                         f"value(s) in shape {tuple(M.shape)} (an SVD of it would give a meaningless basis)")
    return subspace_basis_ref(M, energy, None if max_rank < 0 else max_rank)


@_subspace_basis_op.register_fake
def _subspace_basis_fake(M: torch.Tensor, energy: float, max_rank: int) -> torch.Tensor:
    upper = min(M.shape) if max_rank < 0 else min(min(M.shape), max_rank)
    m = torch.library.get_ctx().new_dynamic_size(min=0, max=upper)
    return M.new_empty(M.shape[0], m)


def subspace_basis(M: torch.Tensor, energy: float = 0.95, *, max_rank: int | None = None) -> torch.Tensor:
    """Orthonormal basis U (d, m) of the columns of M (d, n), keeping `energy` of the squared singular values.

    GPM's criterion: m is the smallest count with sum_{i<m} s_i^2 >= energy * sum_i s_i^2. m = 0 for an empty
    or zero M. Computed by SVD in fp64 (once per task, not on the hot path); returned in M.dtype. M must be
    finite (ValueError otherwise, also inside a compiled graph). Traceable: m is a dynamic size under
    torch.compile/export.
    """
    _check_tensor("M", M, ndim=2, dtypes=_FLOAT_DTYPES)
    if not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a float in (0, 1], got {energy!r}")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0):
        raise ValueError(f"max_rank must be an int >= 0 or None, got {max_rank!r}")
    # detach: a basis is a constant of the method (the reference never differentiated through the SVD either)
    return _subspace_basis_op(M.detach(), float(energy), -1 if max_rank is None else max_rank)


def _check_basis_pairs(mats_name: str, mats: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    if not isinstance(mats, (list, tuple)) or not isinstance(bases, (list, tuple)):
        raise TypeError(f"{mats_name} and bases must be lists of tensors, got {type(mats).__name__}, "
                        f"{type(bases).__name__}")
    if len(mats) != len(bases):
        raise ValueError(f"{mats_name} and bases must have the same length, got {len(mats)} and {len(bases)}")
    if not mats:
        raise ValueError(f"{mats_name} must hold at least one tensor, got an empty list")
    dev = mats[0].device if isinstance(mats[0], torch.Tensor) else None
    for i, (M, U) in enumerate(zip(mats, bases)):
        _check_tensor(f"{mats_name}[{i}]", M, dtypes=_FLOAT_DTYPES, device=dev)
        if M.dim() < 2:
            raise ValueError(f"{mats_name}[{i}] must have shape (..., d, n), got {tuple(M.shape)}")
        _check_tensor(f"bases[{i}]", U, ndim=2, dtypes=_FLOAT_DTYPES, device=dev)
        if U.shape[0] != M.shape[-2]:
            raise ValueError(f"bases[{i}] must have shape ({M.shape[-2]}, m) (d = {mats_name}[{i}].shape[-2]), "
                             f"got {tuple(U.shape)}")


def project_out(M: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """M - U (U^T M): the part of M (..., d, n) orthogonal to the span of U (d, m)."""
    _check_basis_pairs("M", [M], [U])
    return project_out_ref(M, U)


def subspace_penalty(
    mats: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    lam: float,
    *,
    backend: BackendName = "auto",
) -> torch.Tensor:
    """R = lam * sum_i ||(I - U_i U_i^T) M_i||_F^2 over all candidate matrices of all layers.

    Args:
        mats: list of (..., d_i, n_i) matrices (A_c as (C, d_in, r); B_c^T as (C, d_out, r)).
        bases: list of (d_i, m_i) orthonormal bases (m_i may be 0: no constraint).
        lam: the regularization weight, finite and >= 0.
    Returns: a scalar in fp32 (fp64 for fp64 inputs), differentiable in every M_i (d/dM = 2 lam (I - UU^T) M).
    """
    _check_basis_pairs("mats", mats, bases)
    lam = _check_number("lam", lam, low=0.0,
                        what="a finite float >= 0 (a negative weight rewards leaving the subspace)")
    impl = _dispatch("subspace_penalty", mats[0].device, mats[0].dtype, backend)
    return impl(list(mats), list(bases), float(lam))


def project_grad_(
    grads: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    *,
    backend: BackendName = "auto",
) -> None:
    """In place, for every i: G_i <- G_i - U_i (U_i^T G_i) (phase-2 orthogonal projection of all layers).

    Args:
        grads: list of (..., d_i, n_i) tensors, written in place (a transposed view writes through).
        bases: list of (d_i, m_i) orthonormal bases.
    """
    _check_basis_pairs("grads", grads, bases)
    _dispatch("project_grad", grads[0].device, grads[0].dtype, backend)(list(grads), list(bases))
