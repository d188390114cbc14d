"""iGSP subspace ops in Triton: the regularizer value+gradient and the in-place gradient projection, each over
all candidate matrices of all layers in one launch.

Semantics (as `igsp_kernels.reference.subspace`):
    subspace_penalty(mats, bases, lam) = lam * sum_i ||(I - U_i U_i^T) M_i||_F^2,  d/dM_i = 2 lam (I - U_i U_i^T) M_i
    project_grad_(grads, bases):          G_i <- G_i - U_i (U_i^T G_i), in place
Shapes: M_i (..., d_i, n_i) projected along dim -2 (a batch of experts (C, d, r); B^T arrives as a transposed view
and is handled through its strides, written through in place); U_i (d_i, m_i) orthonormal, m_i may be 0.

Plan: one pointer-table row per matrix (`_subspace_kernels.py`), one launch per dtype group (normally one). The
penalty computes R = (I - U U^T) M in the forward, writes it to a flat fp32 buffer and returns sum ||R||^2; the
backward only scales R by 2 lam grad_output (gradient-in-forward, STYLE D6; Liger's cross-entropy). The tables are
cached by (addresses, shapes, strides): parameters keep their storage across steps, so a training step reuses its
table and uploads nothing; a fresh table (the first call for a set of matrices) is a synchronous host-to-device
copy, so the ops are CUDA-graph capturable after one warm-up call.
"""

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton

from igsp_kernels.ops import _subspace_kernels as K
from igsp_kernels.ops._utils import KernelLauncher, interpreting, tl_dtype

__all__ = ["SubspacePenaltyFunction", "project_grad_triton_", "subspace_penalty_triton"]

logger = logging.getLogger(__name__)

_TABLE_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
# Distinct (layers x shapes) sets seen in one run: one per phase and task in practice; 64 is ample.
_TABLE_CACHE_SIZE = 64


def _as_3d(M: torch.Tensor) -> torch.Tensor | None:
    """M (..., d, n) as a (C, d, n) view sharing its storage, or None when the leading dims cannot be merged."""
    d, n = M.shape[-2], M.shape[-1]
    if M.dim() == 2:
        return M.unsqueeze(0)
    if M.dim() == 3:
        return M
    try:
        return M.view(-1, d, n)
    except RuntimeError:
        return None


def _upload(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """The pointer table on `device`, by a synchronous copy (a pinned buffer with a non-blocking copy could be
    freed and reused before the copy ran, and is unsafe inside a CUDA-graph capture). Runs on a cache miss only:
    the first call for a set of matrices; a capture must come after that warm-up call."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("subspace ops: a new set of matrices during CUDA-graph capture would copy their pointer "
                           "table from the host; run the op once for these tensors before capturing")
    return torch.tensor(rows, dtype=torch.int64).to(device)


def _table(mats3: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], out_offsets: Sequence[int]) -> torch.Tensor:
    key = tuple(
        (M.data_ptr(), tuple(M.shape), M.stride(), U.data_ptr(), tuple(U.shape), U.stride(), off)
        for M, U, off in zip(mats3, bases, out_offsets)
    ) + (str(mats3[0].device),)
    table = _TABLE_CACHE.get(key)
    if table is not None:
        _TABLE_CACHE.move_to_end(key)
        return table
    rows = []
    for M, U, off in zip(mats3, bases, out_offsets):
        C, d, n = M.shape
        m = U.shape[1]
        rows.append([M.data_ptr(), U.data_ptr() if m > 0 else M.data_ptr(), off, C, d, n, m,
                     M.stride(0), M.stride(1), M.stride(2), U.stride(0) if m > 0 else 0, U.stride(1) if m > 0 else 0])
    table = _upload(rows, mats3[0].device)
    _TABLE_CACHE[key] = table
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table


_PROJECT = KernelLauncher(K._subspace_project_kernel, K.subspace_configs, [], K.choose_subspace_config,
                          K.INTERPRET_SUBSPACE, autotune=False)


def _launch(mats3: list[torch.Tensor], bases: list[torch.Tensor], out: torch.Tensor | None,
            out_offsets: list[int], in_place: bool) -> torch.Tensor | None:
    """One launch over `mats3` (one dtype, one basis dtype). Returns the (n_mats, Q) squared norms of the residual
    tiles for the penalty (None in place)."""
    dev = mats3[0].device
    acc = torch.float64 if mats3[0].dtype == torch.float64 else torch.float32
    args = {"max_n": max(M.shape[2] for M in mats3), "max_m": max(U.shape[1] for U in bases)}
    cfg = _PROJECT.select(args)
    ns = cfg.kwargs["BLOCK_NS"]
    Q = max(M.shape[0] * triton.cdiv(M.shape[2], ns) for M in mats3)
    values = None if in_place else torch.empty(len(mats3), Q, dtype=acc, device=dev)
    if Q == 0:
        return None if values is None else values.zero_()
    table = _table(mats3, bases, out_offsets)
    ctx = torch.cuda.device(dev) if dev.type == "cuda" else _nullctx()
    with ctx:
        _PROJECT(
            lambda m: (len(mats3), Q),
            table_ptr=table, out_ptr=out if out is not None else table,
            values_ptr=values if values is not None else table, Q=Q, **args,
            SRC_DT=tl_dtype(mats3[0].dtype), U_DT=tl_dtype(bases[0].dtype), ACC_DT=tl_dtype(acc), IN_PLACE=in_place,
        )
    return values


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton subspace kernels need CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")


def _dtype_groups(mats: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, (M, U) in enumerate(zip(mats, bases)):
        groups.setdefault((M.dtype, U.dtype), []).append(i)
    return groups


# --------------------------------------------------------------------------------------------- penalty
def subspace_penalty_forward(mats: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i ||(I - U_i U_i^T) M_i||^2 (scalar, fp32 or fp64) and every R_i, flattened into one buffer (same dtype)
    in list order, each R_i laid out contiguously in M_i's shape."""
    _check_device(mats[0])
    acc = torch.float64 if any(M.dtype == torch.float64 for M in mats) else torch.float32
    dev = mats[0].device
    mats3 = []
    for M in mats:
        M3 = _as_3d(M)
        mats3.append(M3 if M3 is not None else M.reshape(-1, M.shape[-2], M.shape[-1]))
    offsets = [0]
    for M in mats:
        offsets.append(offsets[-1] + M.numel())
    out = torch.empty(offsets[-1], dtype=acc, device=dev)
    parts = []
    for idx in _dtype_groups(mats, bases).values():
        values = _launch([mats3[i] for i in idx], [bases[i] for i in idx], out, [offsets[i] for i in idx],
                         in_place=False)
        parts.append(values.sum())
    total = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
    return total, out


@torch.library.custom_op("igsp_kernels::subspace_penalty_fwd", mutates_args=())
def _subspace_penalty_fwd_op(mats: list[torch.Tensor], bases: list[torch.Tensor]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    return subspace_penalty_forward(mats, bases)


@_subspace_penalty_fwd_op.register_fake
def _(mats, bases):
    acc = torch.float64 if any(M.dtype == torch.float64 for M in mats) else torch.float32
    total = sum(M.numel() for M in mats)
    return mats[0].new_empty((), dtype=acc), mats[0].new_empty(total, dtype=acc)


class SubspacePenaltyFunction(torch.autograd.Function):
    """Value in forward with the residuals R_i kept; backward returns 2 lam grad_output R_i (one multiply)."""

    @staticmethod
    def forward(ctx, lam, n, *tensors):
        mats, bases = list(tensors[:n]), list(tensors[n:])
        total, resid = torch.ops.igsp_kernels.subspace_penalty_fwd(mats, bases)
        ctx.save_for_backward(resid)
        ctx.lam = lam
        ctx.shapes = [(M.shape, M.dtype) for M in mats]
        ctx.n = n
        return lam * total

    @staticmethod
    def backward(ctx, grad_out):
        (resid,) = ctx.saved_tensors
        scaled = resid * (2.0 * ctx.lam * grad_out)
        grads = []
        off = 0
        for shape, dtype in ctx.shapes:
            numel = shape.numel()
            grads.append(scaled[off:off + numel].view(shape).to(dtype))
            off += numel
        return (None, None, *grads, *([None] * ctx.n))  # lam, n, mats..., bases...


def subspace_penalty_triton(mats: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], lam: float) -> torch.Tensor:
    """Backend entry (`TritonBackend.table["subspace_penalty"]`); inputs validated by `igsp_kernels.subspace_penalty`.

    Returns lam * sum_i ||(I - U_i U_i^T) M_i||_F^2 as a fp32 (fp64 for fp64 inputs) scalar, differentiable in M_i.
    """
    return SubspacePenaltyFunction.apply(float(lam), len(mats), *mats, *bases)


# --------------------------------------------------------------------------------------------- projection
def project_grad_forward(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    """In place: G_i <- G_i - U_i (U_i^T G_i) for every i, one launch per dtype group."""
    _check_device(grads[0])
    views: list[torch.Tensor] = []
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for G in grads:
        G3 = _as_3d(G)
        if G3 is None:  # leading dims not mergeable: project a contiguous copy, then write it back
            G3 = G.reshape(-1, G.shape[-2], G.shape[-1]).clone()
            copies.append((G, G3))
        views.append(G3)
    for idx in _dtype_groups(grads, bases).values():
        keep = [i for i in idx if bases[i].shape[1] > 0]  # m = 0: nothing to project out
        if keep:
            _launch([views[i] for i in keep], [bases[i] for i in keep], None, [0] * len(keep), in_place=True)
    for G, G3 in copies:
        G.copy_(G3.view(G.shape))


@torch.library.custom_op("igsp_kernels::project_grad_", mutates_args=("grads",))
def _project_grad_op(grads: list[torch.Tensor], bases: list[torch.Tensor]) -> None:
    project_grad_forward(grads, bases)


@_project_grad_op.register_fake
def _(grads, bases):
    return None


def project_grad_triton_(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    """Backend entry (`TritonBackend.table["project_grad"]`): G_i <- G_i - U_i (U_i^T G_i) in place, all layers in
    one launch; a transposed view (B^T) is written through."""
    with torch.no_grad():
        torch.ops.igsp_kernels.project_grad_(list(grads), list(bases))
