"""Triton kernels of top-k gating: fused masked softmax + top-k + renormalisation, and its backward (STYLE A3).

One program handles BLOCK_ROWS router rows with all E experts in registers (E is small: 22-64), so the softmax
and the k selections never leave the chip. Orchestration is in `igsp_kernels/ops/routing.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl


def route_configs() -> list[triton.Config]:
    """Rows per program; one row block is a few KB, so warps and stages hardly matter."""
    return [
        triton.Config({"BLOCK_ROWS": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_ROWS": 64}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_ROWS": 4}, num_warps=1, num_stages=1),
    ]


def prune_route_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the row block within 8K elements of (rows x E) and 32K of the backward's (rows x k x E) tensor."""
    a = {**named_args, **kwargs}
    be, bk = a["BLOCK_E"], a["BLOCK_K"]
    kept = [c for c in configs if c.kwargs["BLOCK_ROWS"] * be <= 8192 and c.kwargs["BLOCK_ROWS"] * be * bk <= 32768]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_ROWS"])]


INTERPRET_ROUTE = triton.Config({"BLOCK_ROWS": 8}, num_warps=4, num_stages=1)


@triton.jit
def _route_topk_fwd_kernel(
    z_ptr,  # (N, E) fp32 logits (noise already added)
    active_ptr,  # (N or 1, E) uint8 active mask (dummy when HAS_ACTIVE is False)
    idx_ptr,  # (N, k) int32 out: chosen experts, by decreasing probability
    w_ptr,  # (N, k) fp32 out: renormalised gates (rows sum to 1)
    probs_ptr,  # (N, E) fp32 out: softmax over the active experts (0 on inactive ones)
    N,
    E,
    k,
    stride_active_n,  # 0 for a shared (E,) mask, E for a per-row (N, E) mask
    e_bucket,  # autotune key only
    HAS_ACTIVE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Semantics: p = softmax(z masked to active); idx, top = topk(p, k); w = top / top.sum(-1)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_E)
    mask_n = rows < N
    valid = mask_n[:, None] & (cols < E)[None, :]
    if HAS_ACTIVE:
        act = tl.load(active_ptr + rows[:, None] * stride_active_n + cols[None, :], mask=valid, other=0)
        valid = valid & (act != 0)
    z = tl.load(z_ptr + rows[:, None] * E + cols[None, :], mask=valid, other=0.0)
    z = tl.where(valid, z, float("-inf"))
    zmax = tl.max(z, axis=1)
    zmax = tl.where(zmax == float("-inf"), 0.0, zmax)  # rows past N: every entry masked
    p = tl.where(valid, tl.exp(z - zmax[:, None]), 0.0)
    total = tl.sum(p, axis=1)
    p = p / tl.where(total > 0.0, total, 1.0)[:, None]
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=mask_n[:, None] & (cols < E)[None, :])

    # Inactive experts rank below every active one, even an active probability that underflowed to 0.
    key = tl.where(valid, p, -1.0)
    offs_k = tl.arange(0, BLOCK_K)
    top_v = tl.zeros((BLOCK_ROWS, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_ROWS, BLOCK_K), dtype=tl.int32)
    for j in range(0, k):
        best = tl.max(key, axis=1)
        # lowest index among the maxima (deterministic tie-break)
        best_i = tl.min(tl.where(key == best[:, None], cols[None, :], BLOCK_E), axis=1)
        top_v = tl.where(offs_k[None, :] == j, best[:, None], top_v)
        top_i = tl.where(offs_k[None, :] == j, best_i[:, None], top_i)
        key = tl.where(cols[None, :] == best_i[:, None], -2.0, key)
    mask_k = mask_n[:, None] & (offs_k < k)[None, :]
    top_v = tl.where(mask_k, top_v, 0.0)
    w = top_v / tl.where(mask_n, tl.sum(top_v, axis=1), 1.0)[:, None]
    tl.store(idx_ptr + rows[:, None] * k + offs_k[None, :], top_i, mask=mask_k)
    tl.store(w_ptr + rows[:, None] * k + offs_k[None, :], w, mask=mask_k)


@triton.jit
def _route_topk_bwd_kernel(
    dw_ptr,  # (N, k) fp32 gradient of the gates
    dprobs_ptr,  # (N, E) fp32 gradient of the probabilities
    idx_ptr,  # (N, k) int32 saved choices
    w_ptr,  # (N, k) fp32 saved gates
    probs_ptr,  # (N, E) fp32 saved probabilities
    dz_ptr,  # (N, E) fp32 out: gradient of the logits
    N,
    E,
    k,
    e_bucket,  # autotune key only
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """d top_j = (dw_j - sum_i dw_i w_i) / S with S = sum_j p[idx_j]; dp = dprobs + scatter(d top);
    dz = p * (dp - sum(p * dp)). Inactive experts have p = 0, hence dz = 0."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = rows < N
    mask_e = mask_n[:, None] & (cols < E)[None, :]
    mask_k = mask_n[:, None] & (offs_k < k)[None, :]
    p = tl.load(probs_ptr + rows[:, None] * E + cols[None, :], mask=mask_e, other=0.0)
    dp = tl.load(dprobs_ptr + rows[:, None] * E + cols[None, :], mask=mask_e, other=0.0)
    idx = tl.load(idx_ptr + rows[:, None] * k + offs_k[None, :], mask=mask_k, other=-1)
    w = tl.load(w_ptr + rows[:, None] * k + offs_k[None, :], mask=mask_k, other=0.0)
    dw = tl.load(dw_ptr + rows[:, None] * k + offs_k[None, :], mask=mask_k, other=0.0)
    hit = idx[:, :, None] == cols[None, None, :]  # (rows, k, E)
    top = tl.sum(tl.where(hit, p[:, None, :], 0.0), axis=2)
    total = tl.sum(top, axis=1)
    total = tl.where(total > 0.0, total, 1.0)
    dtop = (dw - tl.sum(dw * w, axis=1)[:, None]) / total[:, None]
    dp += tl.sum(tl.where(hit, dtop[:, :, None], 0.0), axis=1)
    dz = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    tl.store(dz_ptr + rows[:, None] * E + cols[None, :], dz, mask=mask_e)
