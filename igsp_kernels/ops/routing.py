"""Routing in Triton: fused top-k gating, and the expert-sorted routing metadata of the MoE-LoRA kernels.

Top-k gating. Semantics (as `igsp_kernels.reference.route_topk_ref`):
    p = softmax(z) over the active experts, z = logits.float() + noise_std * N(0, 1);
    (idx, top) = topk(p, k); w = top / top.sum(-1).
Shapes: logits (N, E) float; active bool (E,) or (N, E); returns idx int32 (N, k), w fp32 (N, k), probs fp32 (N, E).
The noise is drawn in torch before the kernel (same generator call as the reference, so noisy runs match);
one kernel does the masked softmax, the k selections and the renormalisation; the backward kernel maps
(dw, dprobs) to dz (softmax and renormalisation Jacobians, derived in `_route_topk_bwd_kernel`).

Routing metadata. For topk_idx (T, k) and a block size S: the T*k assignments a = t*k + j sorted by expert
(stable), each expert's run padded to a multiple of S, so every S-row block belongs to one expert:
    sorted_assign (NB*S,) int32   assignment id at each padded sorted slot, -1 on padding;
    assign_pos    (T*k,) int32    padded sorted slot of each assignment (inverse permutation);
    block_expert  (NB,) int32     expert of each block, E for blocks past the last used one;
    expert_block_off (E+1,) int32 first block of each expert (expert e owns blocks [off[e], off[e+1]));
    block_order   (NB,) int32     the blocks sorted by their first token, unused blocks last: the order in which
                                  the expert-sorted kernels visit them.
    token_order   (T,) int32      the tokens sorted (stable) by their sorted expert set (first 3 slots): the row
                                  order of the token-tile GEMMs.
Why token_order: the base GEMM's epilogue runs one small MMA per expert present in its row tile. In natural order a
tile of per-token-routed rows touches almost every expert (128 rows x k = 2 over E = 22); sorted by expert set, a
tile spans ~2 sets, so ~4 experts (per-sample routing is already grouped: 197 tokens share one set).
Why block_order: a token's k assignments sit in k different experts' blocks. Visiting blocks by token rather than
by expert runs those blocks at about the same time, so the second gather of the token's activation row hits L2
instead of HBM (per-sample routing: whole 197-token runs share their experts, so the overlap is large). The
partials stay indexed by block, so the reduction order (and the result) does not depend on the visiting order.
NB = max_blocks(T*k, E, S) is an upper bound known from shapes alone, so grids are sized without a host sync
and unused blocks exit at once (KERNELS.md lesson 1). Built from sort / searchsorted / cumsum: ~10 small launches,
no `.item()`, deterministic (no atomics), computed once per forward and reused by the backward.
"""

import torch
import triton

from igsp_kernels.ops import _routing_kernels as K
from igsp_kernels.ops._utils import KernelLauncher, ensure_contiguous, interpreting, next_pow2

__all__ = ["RouteTopkFunction", "max_blocks", "route_topk_triton", "routing_metadata"]


# --------------------------------------------------------------------------------------------- metadata
def max_blocks(num_assign: int, num_experts: int, block: int) -> int:
    """Upper bound on the S-row blocks of the padded expert-sorted order: sum_e ceil(c_e / S) <= ceil(n / S) + E."""
    return triton.cdiv(num_assign, block) + min(num_experts, num_assign)


@torch.library.custom_op("igsp_kernels::routing_metadata", mutates_args=())
def _routing_metadata_op(
    topk_idx: torch.Tensor, num_experts: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = topk_idx.device
    E = num_experts
    n = topk_idx.numel()
    nb = max_blocks(n, E, block)
    flat = topk_idx.reshape(-1).to(torch.int64)
    sorted_e, order = torch.sort(flat, stable=True)
    experts = torch.arange(E + 1, device=dev, dtype=torch.int64)
    bounds = torch.searchsorted(sorted_e, experts)  # first sorted position of each expert; bounds[E] = n
    counts = bounds[1:] - bounds[:-1]
    blk_off = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    blk_off[1:] = torch.cumsum((counts + block - 1) // block, 0)
    rank = torch.arange(n, device=dev, dtype=torch.int64) - bounds[sorted_e]
    pos = blk_off[sorted_e] * block + rank
    sorted_assign = torch.full((nb * block,), -1, dtype=torch.int32, device=dev)
    sorted_assign[pos] = order.to(torch.int32)
    assign_pos = torch.empty(n, dtype=torch.int32, device=dev)
    assign_pos[order] = pos.to(torch.int32)
    blocks = torch.arange(nb, device=dev, dtype=torch.int64)
    block_expert = torch.searchsorted(blk_off[1:].contiguous(), blocks, right=True)
    k = max(topk_idx.shape[1], 1) if topk_idx.dim() == 2 else 1
    first_token = sorted_assign.view(nb, block)[:, 0].to(torch.int64) // k if nb else blocks
    first_token = torch.where(block_expert < E, first_token, n)  # unused blocks go last
    block_order = torch.sort(first_token, stable=True).indices.to(torch.int32)
    key = torch.zeros(topk_idx.shape[0], dtype=torch.int64, device=dev)
    for col in torch.sort(topk_idx.to(torch.int64), dim=1).values[:, :3].unbind(1):  # E**3 < 2**63 for any E here
        key = key * E + col
    token_order = torch.sort(key, stable=True).indices.to(torch.int32)
    return (sorted_assign, assign_pos, block_expert.to(torch.int32), blk_off.to(torch.int32), block_order,
            token_order)


@_routing_metadata_op.register_fake
def _(topk_idx, num_experts, block):
    n = topk_idx.numel()
    nb = max_blocks(n, num_experts, block)
    i32 = torch.int32
    return (topk_idx.new_empty(nb * block, dtype=i32), topk_idx.new_empty(n, dtype=i32),
            topk_idx.new_empty(nb, dtype=i32), topk_idx.new_empty(num_experts + 1, dtype=i32),
            topk_idx.new_empty(nb, dtype=i32), topk_idx.new_empty(topk_idx.shape[0], dtype=i32))


def routing_metadata(
    topk_idx: torch.Tensor, num_experts: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_assign, assign_pos, block_expert, expert_block_off, block_order, token_order) of `topk_idx` (T, k)
    (see the module docstring).

    Computed under no_grad (integer metadata), with no host synchronisation.
    """
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 1, got {block}")
    with torch.no_grad():
        return torch.ops.igsp_kernels.routing_metadata(topk_idx.contiguous(), num_experts, block)


# --------------------------------------------------------------------------------------------- top-k gating
_FWD = KernelLauncher(K._route_topk_fwd_kernel, K.route_configs, ["e_bucket", "k"], K.prune_route_configs,
                      K.INTERPRET_ROUTE)
_BWD = KernelLauncher(K._route_topk_bwd_kernel, K.route_configs, ["e_bucket", "k"], K.prune_route_configs,
                      K.INTERPRET_ROUTE)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton routing kernels need CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")


def route_topk_forward(z: torch.Tensor, active: torch.Tensor | None, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused gating kernel on fp32 logits z (N, E). Returns idx int32, w fp32 (N, k), probs fp32 (N, E)."""
    _check_device(z)
    N, E = z.shape
    idx = torch.empty(N, k, dtype=torch.int32, device=z.device)
    w = torch.empty(N, k, dtype=torch.float32, device=z.device)
    probs = torch.empty(N, E, dtype=torch.float32, device=z.device)
    if N == 0:
        return idx, w, probs
    act = active.view(torch.uint8) if active is not None else z
    with torch.cuda.device(z.device) if z.device.type == "cuda" else _nullctx():
        _FWD(lambda m: (triton.cdiv(N, m["BLOCK_ROWS"]),), z_ptr=z, active_ptr=act, idx_ptr=idx, w_ptr=w,
             probs_ptr=probs, N=N, E=E, k=k, stride_active_n=E if (active is not None and active.dim() == 2) else 0,
             e_bucket=next_pow2(E), HAS_ACTIVE=active is not None, BLOCK_E=next_pow2(E), BLOCK_K=next_pow2(k))
    return idx, w, probs


def route_topk_backward(dw: torch.Tensor, dprobs: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                        probs: torch.Tensor) -> torch.Tensor:
    """Launch the gating backward: dz (N, E) fp32 from dw (N, k) and dprobs (N, E)."""
    _check_device(probs)
    N, E = probs.shape
    k = idx.shape[1]
    dz = torch.empty(N, E, dtype=torch.float32, device=probs.device)
    if N == 0:
        return dz
    with torch.cuda.device(probs.device) if probs.device.type == "cuda" else _nullctx():
        _BWD(lambda m: (triton.cdiv(N, m["BLOCK_ROWS"]),), dw_ptr=dw, dprobs_ptr=dprobs, idx_ptr=idx, w_ptr=w,
             probs_ptr=probs, dz_ptr=dz, N=N, E=E, k=k, e_bucket=next_pow2(E), BLOCK_E=next_pow2(E),
             BLOCK_K=next_pow2(k))
    return dz


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@torch.library.custom_op("igsp_kernels::route_topk_fwd", mutates_args=())
def _route_topk_fwd_op(z: torch.Tensor, active: torch.Tensor | None, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ensure_contiguous(route_topk_forward)(z, active, k)


@_route_topk_fwd_op.register_fake
def _(z, active, k):
    N, E = z.shape
    return (z.new_empty(N, k, dtype=torch.int32), z.new_empty(N, k, dtype=torch.float32),
            z.new_empty(N, E, dtype=torch.float32))


@torch.library.custom_op("igsp_kernels::route_topk_bwd", mutates_args=())
def _route_topk_bwd_op(dw: torch.Tensor, dprobs: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                       probs: torch.Tensor) -> torch.Tensor:
    return ensure_contiguous(route_topk_backward)(dw, dprobs, idx, w, probs)


@_route_topk_bwd_op.register_fake
def _(dw, dprobs, idx, w, probs):
    return torch.empty_like(probs)


class RouteTopkFunction(torch.autograd.Function):
    """Autograd of the fused gating: saves idx, w, probs (N x (2k + E) values) and recomputes the rest."""

    @staticmethod
    def forward(ctx, z, k, active):
        idx, w, probs = torch.ops.igsp_kernels.route_topk_fwd(z, active, k)
        ctx.save_for_backward(idx, w, probs)
        ctx.mark_non_differentiable(idx)
        return idx, w, probs

    @staticmethod
    def backward(ctx, didx, dw, dprobs):
        idx, w, probs = ctx.saved_tensors
        dz = torch.ops.igsp_kernels.route_topk_bwd(dw.float(), dprobs.float(), idx, w, probs)
        return dz, None, None  # z, k, active


def route_topk_triton(
    logits: torch.Tensor,
    k: int,
    active: torch.Tensor | None,
    noise_std: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend entry (`TritonBackend.table["route_topk"]`); inputs already validated by `igsp_kernels.route_topk`.

    Returns topk_idx int32 (N, k), topk_w fp32 (N, k) (rows sum to 1) and probs fp32 (N, E), differentiable
    (topk_w, probs) to logits.
    """
    z = logits.float()
    if noise_std > 0.0:
        # Same call as the reference so that a shared generator state gives the same noise.
        z = z + noise_std * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return RouteTopkFunction.apply(z, k, active)
