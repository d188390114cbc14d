"""Triton kernels of the fused MoE-LoRA op: only `@triton.jit` code and autotune configs (STYLE A3).

Orchestration (routing metadata, launchers, autograd, custom ops) lives in `igsp_kernels/ops/moe_lora.py`, whose
docstring explains the plan. Two tilings are used:

- token tiles (`_moe_lora_fwd_kernel`, `_moe_lora_bwd_dx_kernel`): the frozen base GEMM over rows in their natural
  order; its epilogue adds the rank-r expansion of the fp32 rank intermediate, one small MMA per expert present in
  the tile (`tile rows x r @ r x BLOCK_N`), so the big activations y / dx are written exactly once;
- expert-sorted blocks (`_moe_lora_shrink_kernel`, `_moe_lora_bwd_rank_kernel`, `_moe_lora_bwd_dw_kernel`): rows of
  the padded, expert-sorted assignment list (every block belongs to one expert), gathered by index; the grid is sized
  to an upper bound of the block count and unused blocks exit at once (no host sync).

Conventions: pointers carry a shape/dtype comment; `OP_DT` is the MMA operand dtype, `ACC_DT` the accumulation
dtype (fp32, or fp64 for fp64 inputs); `INDEX_64` switches row offsets to int64 when an offset can pass 2**31 - 1.
"""

from __future__ import annotations

import triton
import triton.language as tl

from igsp_kernels.ops._utils import SMEM_LIMIT_BYTES, next_pow2, smem_bytes

# Bytes per element of each Triton dtype, for the shared-memory estimates of the pruners.
_ELT = {tl.float16: 2, tl.bfloat16: 2, tl.float32: 4, tl.float64: 8}
# Headroom under the Hopper limit for what the estimate leaves out (epilogue operand tiles, layout conversions).
_SMEM_BUDGET = SMEM_LIMIT_BYTES - 16 * 1024


# --------------------------------------------------------------------------------------------- configs
def gemm_configs() -> list[triton.Config]:
    """Token-tile GEMM configs (base GEMM + LoRA epilogue), best default first.

    The list follows Triton's Hopper matmul tutorial tiles; the last one is small enough for fp64 (8-byte operands).
    """
    def cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                             num_stages=stages)

    return [
        cfg(128, 128, 64, 8, 3),
        cfg(128, 256, 64, 8, 3),
        cfg(64, 256, 32, 4, 4),
        cfg(128, 128, 32, 4, 4),
        cfg(128, 64, 32, 4, 4),
        cfg(64, 128, 32, 4, 4),
        cfg(64, 64, 32, 4, 2),
    ]


def shrink_configs() -> list[triton.Config]:
    """Expert-sorted shrink (gathered x rows @ A_e): only the reduction chunk and warps vary (BLOCK_S is fixed
    by the routing metadata)."""
    return [
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=2),
    ]


def rank_configs() -> list[triton.Config]:
    """Expert-sorted backward rank pass: d_out chunk (BLOCK_N) and d_in chunk (BLOCK_K)."""
    return [
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    ]


def dw_configs() -> list[triton.Config]:
    """Expert-sorted weight-gradient GEMM (split-token partials): output column tile BLOCK_N."""
    return [
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
    ]


def reduce_configs() -> list[triton.Config]:
    """Deterministic segmented sum of the partials (memory-bound, one config is enough)."""
    return [triton.Config({"BLOCK_N": 512}, num_warps=4, num_stages=1)]


# Under TRITON_INTERPRET: tiles small enough that test shapes (d ~ 33..48) span two tiles / loop iterations, large
# enough to keep the program count low (each program costs ~1 ms of interpreter overhead per reduction).
INTERPRET_GEMM = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1)
INTERPRET_SHRINK = triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)
INTERPRET_RANK = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
INTERPRET_DW = triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)
INTERPRET_REDUCE = triton.Config({"BLOCK_N": 1024}, num_warps=4, num_stages=1)


def _args(named_args: dict, kwargs: dict) -> dict:
    return {**named_args, **kwargs}


def _keep(configs: list[triton.Config], fits: list[bool]) -> list[triton.Config]:
    kept = [c for c, ok in zip(configs, fits) if ok]
    # Never return an empty list (the autotuner raises): fall back to the smallest-footprint config, the last one.
    return kept or [configs[-1]]


def prune_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles that overflow shared memory for the operand dtype, or are far larger than the problem."""
    a = _args(named_args, kwargs)
    elt = _ELT[a["OP_DT"]]
    # the epilogue's expert tile (B forward, A dx) in its own dtype: fp32 master weights beside bf16 activations
    lora = next((t.element_size() for t in (a.get("b_ptr"), a.get("a_ptr")) if hasattr(t, "element_size")), elt)
    rank_tile = a["BLOCK_R"]
    m_cap = max(16, next_pow2(a["T"]))
    n_cap = max(16, next_pow2(a["N_OUT"]))
    # fp32 "ieee" and fp64 dots are FMA code, not tensor-core MMAs: a deeper K step only unrolls more code (fp32
    # fwd kernels took ~7 s to compile at BLOCK_K = 64) without speed to gain, so keep BLOCK_K <= 32 there.
    fma = a["OP_DT"] == tl.float64 or (a["OP_DT"] == tl.float32 and a["PRECISION"] == "ieee")
    fits = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        smem = smem_bytes(c.num_stages, bm * bk * elt, bk * bn * elt) + rank_tile * bn * lora + bm * rank_tile * elt
        fits.append(smem <= _SMEM_BUDGET and bm <= max(64, m_cap) and bn <= max(64, n_cap) and not (fma and bk > 32))
    kept = _keep(configs, fits)
    if fma:  # pinned default for FMA code: a 128 x 64 tile (a 128 x 256 fp32 accumulator would spill registers)
        kept.sort(key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] != 128 * 64)
    return kept


def prune_shrink_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    a = _args(named_args, kwargs)
    elt = _ELT[a["OP_DT"]]
    lora = a["a_ptr"].element_size() if hasattr(a.get("a_ptr"), "element_size") else elt
    s, br = a["BLOCK_S"], a["BLOCK_R"]
    fits = [smem_bytes(c.num_stages, s * c.kwargs["BLOCK_K"] * elt, c.kwargs["BLOCK_K"] * br * lora) <= _SMEM_BUDGET
            for c in configs]
    return _keep(configs, fits)


def prune_rank_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Shared memory of both loops, with the dy / x tiles in the activation dtype and the B tile in B's own dtype
    (fp32 master weights under autocast). FMA dots (fp32 "ieee", fp64) keep K-long operand slices per thread: their
    32-wide steps (BLOCK_N, BLOCK_K <= 32) keep the fused fp32 variant from spilling (ptxas, sm_90a: 408 B at 64)."""
    a = _args(named_args, kwargs)
    elt = _ELT[a["OP_DT"]]
    lora = a["b_ptr"].element_size() if hasattr(a.get("b_ptr"), "element_size") else elt
    s, br = a["BLOCK_S"], a["BLOCK_R"]
    fma = a["OP_DT"] == tl.float64 or (a["OP_DT"] == tl.float32 and a["PRECISION"] == "ieee")
    fits = []
    for c in configs:
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        loop1 = smem_bytes(c.num_stages, s * bn * elt, bn * br * lora) + s * br * elt
        loop2 = smem_bytes(c.num_stages, s * bk * elt) + s * br * elt
        fits.append(max(loop1, loop2) <= _SMEM_BUDGET and not (fma and max(bn, bk) > 32))
    return _keep(configs, fits)


def prune_dw_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    a = _args(named_args, kwargs)
    elt = _ELT[a["OP_DT"]]
    s, br = a["BLOCK_S"], a["BLOCK_R"]
    fits = [smem_bytes(c.num_stages, s * c.kwargs["BLOCK_N"] * elt, s * br * elt) <= _SMEM_BUDGET for c in configs]
    return _keep(configs, fits)


# --------------------------------------------------------------------------------------------- helpers
@triton.jit
def _or_combine(a, b):
    return a | b


@triton.jit
def _expert_segment(blk_off_ptr, e, E, CB, BLOCK_E: tl.constexpr):
    """(first partial, number of partials) of expert e when its blocks are grouped CB at a time.

    blk_off_ptr: (E + 1,) int32, first block of each expert in the padded expert-sorted order.
    """
    offs = tl.arange(0, BLOCK_E)
    m = offs < E
    lo = tl.load(blk_off_ptr + offs, mask=m, other=0)
    hi = tl.load(blk_off_ptr + offs + 1, mask=m, other=0)
    n = (hi - lo + CB - 1) // CB
    ends = tl.cumsum(n, 0)
    sel = offs == e
    count = tl.sum(tl.where(sel, n, 0))
    first = tl.sum(tl.where(sel, ends - n, 0))
    return first, count


@triton.jit
def _gemm_expand(
    inp_ptr,  # (T, K_main) activations: x (forward) or dy (dx)
    stride_inp_t,
    w_ptr,  # frozen base weight viewed as (K_main, N): W0^T (forward) or W0 (dx)
    stride_w_k,
    stride_w_n,
    coef_ptr,  # (T * k, r) ACC_DT rank rows: pre-activation h (forward) or D (dx)
    idx_ptr,  # (T, k) int32/int64 expert of each assignment
    gate_ptr,  # (T * k,) ACC_DT gate = scale * topk_w (forward only)
    l_ptr,  # expert expansion matrices viewed as (E, r, N): B (forward) or A^T (dx)
    stride_l_e,
    stride_l_r,
    stride_l_n,
    bb_ptr,  # (E, N) expert output bias (forward only)
    b0_ptr,  # (N,) frozen base bias (forward only)
    out_ptr,  # (T, N) output in the activation dtype
    stride_out_t,
    row_perm_ptr,  # (T,) int32 token of each tile row (tokens grouped by expert set: few experts per tile)
    T,
    K_main,
    N,
    r,
    E,
    k,
    HAS_BASE: tl.constexpr,
    HAS_B0: tl.constexpr,
    HAS_BB: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    OP_DT: tl.constexpr,
    ACC_DT: tl.constexpr,
    PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[t] = inp[t] @ Wmat + sum_j coef'[t, j] @ L[e_tj] (+ biases); one (BLOCK_M, BLOCK_N) tile."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: GROUP_M row tiles share each weight column tile while it is in L2.
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < T
    mask_n = offs_n < N
    # Rows past T read token 0 (a valid row; their results are never stored): no row mask in the main loop.
    rows = tl.load(row_perm_ptr + offs_m, mask=mask_m, other=0)
    if INDEX_64:
        rows = rows.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
    if HAS_BASE:
        # Columns past the edge are wrapped (they compute garbage that is never stored), so the loads in the main
        # loop carry only the K-tail mask (Triton's matmul tutorial does the same).
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = inp_ptr + rows[:, None] * stride_inp_t + offs_k[None, :]
        w_ptrs = w_ptr + offs_k[:, None] * stride_w_k + (offs_n % N)[None, :] * stride_w_n
        for k0 in range(0, K_main, BLOCK_K):
            mk = (k0 + offs_k) < K_main
            a = tl.load(a_ptrs, mask=mk[None, :], other=0.0).to(OP_DT)
            w = tl.load(w_ptrs, mask=mk[:, None], other=0.0).to(OP_DT)
            acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC_DT)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_w_k

    # ---- epilogue: the LoRA expansion of the rank intermediate, one MMA per expert present in the tile
    offs_j = tl.arange(0, BLOCK_J)
    offs_r = tl.arange(0, BLOCK_R)
    mask_j = offs_j < k
    mask_r = offs_r < r
    mask_mj = mask_m[:, None] & mask_j[None, :]
    slot = rows[:, None] * k + offs_j[None, :]  # (BLOCK_M, BLOCK_J) assignment ids
    idx = tl.load(idx_ptr + slot, mask=mask_mj, other=-1)
    coef = tl.load(coef_ptr + slot[:, :, None] * r + offs_r[None, None, :],
                   mask=mask_mj[:, :, None] & mask_r[None, None, :], other=0.0).to(ACC_DT)
    if GATED:
        gate = tl.load(gate_ptr + slot, mask=mask_mj, other=0.0).to(ACC_DT)
        if ACTIVATION == 1:
            coef = tl.maximum(coef, 0.0)
        coef = coef * gate[:, :, None]
    l_cols = offs_n[None, :] * stride_l_n + offs_r[:, None] * stride_l_r
    l_mask = mask_r[:, None] & mask_n[None, :]
    idx64 = idx.to(tl.int64)
    # Experts present in the tile as a bitmask, 64 experts per word: one OR-reduction per word instead of one
    # reduction per expert (22 block-wide reductions per tile would cost ~40 % of a ViT fc1 base GEMM tile).
    for w0 in range(0, E, 64):
        in_word = (idx64 >= w0) & (idx64 < w0 + 64)
        shift = tl.where(in_word, idx64 - w0, 0)
        word = tl.reduce(tl.where(in_word, tl.full(idx64.shape, 1, tl.int64) << shift, 0), None, _or_combine)
        for e in range(w0, tl.minimum(E, w0 + 64)):
            if ((word >> (e - w0)) & 1) != 0:
                hit = idx == e
                c = tl.sum(tl.where(hit[:, :, None], coef, 0.0), axis=1)  # (BLOCK_M, BLOCK_R)
                lt = tl.load(l_ptr + e * stride_l_e + l_cols, mask=l_mask, other=0.0).to(OP_DT)
                acc = tl.dot(c.to(OP_DT), lt, acc, input_precision=PRECISION, out_dtype=ACC_DT)
                if HAS_BB:
                    ge = tl.sum(tl.where(hit, gate, 0.0), axis=1)
                    bbv = tl.load(bb_ptr + e * N + offs_n, mask=mask_n, other=0.0).to(ACC_DT)
                    acc += ge[:, None] * bbv[None, :]
    if HAS_B0:
        acc += tl.load(b0_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DT)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_out_t + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------- forward
@triton.jit
def _moe_lora_shrink_kernel(
    x_ptr,  # (T, d_in) x.dtype
    a_ptr,  # (E, d_in, r) A.dtype, contiguous
    ba_ptr,  # (E, r) bias_a.dtype (dummy when HAS_BA is False)
    hpre_ptr,  # (T * k, r) ACC_DT out: h = x A_e + ba_e per assignment, assignment order
    sorted_ptr,  # (NB * BLOCK_S,) int32 assignment id of each padded expert-sorted slot, -1 = padding
    block_expert_ptr,  # (NB,) int32 expert of each block, >= E for blocks past the end
    block_order_ptr,  # (NB,) int32 blocks in visiting order (by first token: L2 reuse of the gathered rows)
    d_in,
    r,
    E,
    k,
    stride_x_t,
    t_bucket,  # autotune key only (bucketed T)
    HAS_BA: tl.constexpr,
    OP_DT: tl.constexpr,
    ACC_DT: tl.constexpr,
    PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Semantics: h[a] = x[a // k] @ A[e] + ba[e] for every assignment a of the block's expert e."""
    blk = tl.load(block_order_ptr + tl.program_id(0))
    e = tl.load(block_expert_ptr + blk)
    if e >= E:
        return
    e64 = e.to(tl.int64)
    assign = tl.load(sorted_ptr + blk * BLOCK_S + tl.arange(0, BLOCK_S))
    valid = assign >= 0
    assign = tl.where(valid, assign, 0)
    if INDEX_64:
        assign = assign.to(tl.int64)
    tok = assign // k
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_x_t + offs_k[None, :]
    a_ptrs = a_ptr + e64 * d_in * r + offs_k[:, None] * r + offs_r[None, :]
    acc = tl.zeros((BLOCK_S, BLOCK_R), dtype=ACC_DT)
    for k0 in range(0, d_in, BLOCK_K):
        mk = (k0 + offs_k) < d_in
        xt = tl.load(x_ptrs, mask=valid[:, None] & mk[None, :], other=0.0).to(OP_DT)
        at = tl.load(a_ptrs, mask=mk[:, None] & mask_r[None, :], other=0.0).to(OP_DT)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION, out_dtype=ACC_DT)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K * r
    if HAS_BA:
        acc += tl.load(ba_ptr + e64 * r + offs_r, mask=mask_r, other=0.0).to(ACC_DT)[None, :]
    tl.store(hpre_ptr + assign[:, None] * r + offs_r[None, :], acc, mask=valid[:, None] & mask_r[None, :])


@triton.jit
def _moe_lora_fwd_kernel(
    x_ptr,  # (T, d_in) x.dtype
    w0_ptr,  # (d_out, d_in) frozen base weight (dummy when HAS_BASE is False)
    b0_ptr,  # (d_out,) frozen base bias (dummy when HAS_B0 is False)
    b_ptr,  # (E, r, d_out) B.dtype, contiguous
    bb_ptr,  # (E, d_out) expert output bias (dummy when HAS_BB is False)
    hpre_ptr,  # (T * k, r) ACC_DT pre-activation rank intermediate (from the shrink kernel)
    idx_ptr,  # (T, k) int32/int64 routing
    gate_ptr,  # (T * k,) ACC_DT scale * topk_w
    y_ptr,  # (T, d_out) out, x.dtype
    token_order_ptr,  # (T,) int32 tokens grouped by expert set (routing metadata)
    T,
    d_in,
    d_out,
    r,
    E,
    k,
    stride_x_t,
    stride_w0_n,
    stride_y_t,
    t_bucket,  # autotune key only (bucketed T)
    N_OUT,  # = d_out, named for the shared GEMM pruner
    HAS_BASE: tl.constexpr,
    HAS_B0: tl.constexpr,
    HAS_BB: tl.constexpr,
    ACTIVATION: tl.constexpr,
    OP_DT: tl.constexpr,
    ACC_DT: tl.constexpr,
    PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Semantics: y[t] = x[t] W0^T + b0 + sum_j gate[t,j] * (phi(h[t,j]) @ B[e_tj] + bb[e_tj])."""
    _gemm_expand(
        x_ptr, stride_x_t, w0_ptr, 1, stride_w0_n, hpre_ptr, idx_ptr, gate_ptr, b_ptr, r * d_out, d_out, 1,
        bb_ptr, b0_ptr, y_ptr, stride_y_t, token_order_ptr, T, d_in, d_out, r, E, k,
        HAS_BASE, HAS_B0, HAS_BB, True, ACTIVATION, OP_DT, ACC_DT, PRECISION, INDEX_64,
        BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, BLOCK_J, GROUP_M,
    )


# --------------------------------------------------------------------------------------------- backward
@triton.jit
def _moe_lora_bwd_rank_kernel(
    x_ptr,  # (T, d_in) x.dtype (read only when FUSE and NEED_DA)
    dy_ptr,  # (T, d_out) dy, x.dtype
    b_ptr,  # (E, r, d_out) B.dtype
    bb_ptr,  # (E, d_out) expert output bias (dummy when HAS_BB is False)
    hpre_ptr,  # (T * k, r) ACC_DT saved pre-activation
    gate_ptr,  # (T * k,) ACC_DT scale * topk_w
    sorted_ptr,  # (NB * BLOCK_S,) int32 padded expert-sorted assignment ids, -1 = padding
    block_expert_ptr,  # (NB,) int32
    block_order_ptr,  # (NB,) int32 blocks in visiting order (by first token: L2 reuse of the gathered rows)
    d_ptr,  # (T * k, r) ACC_DT out: D = gate * (dy B_e^T) * phi'(h), the rank-space input gradient
    dgate_ptr,  # (T * k,) ACC_DT out: d gate = <phi(h), dy B_e^T> + <dy, bb_e>
    pda_ptr,  # (NB, d_in, r) ACC_DT out: per-block partial dA (FUSE)
    pdb_ptr,  # (NB, r, d_out) ACC_DT out: per-block partial dB (FUSE)
    pdba_ptr,  # (NB, r) ACC_DT out: per-block partial d bias_a
    pdbb_ptr,  # (NB, d_out) ACC_DT out: per-block partial d bias_b
    d_in,
    d_out,
    r,
    E,
    k,
    stride_x_t,
    stride_dy_t,
    t_bucket,  # autotune key only (bucketed T)
    HAS_BB: tl.constexpr,
    ACTIVATION: tl.constexpr,
    NEED_T: tl.constexpr,
    NEED_D: tl.constexpr,
    NEED_DGATE: tl.constexpr,
    NEED_DA: tl.constexpr,
    NEED_DB: tl.constexpr,
    NEED_DBA: tl.constexpr,
    NEED_DBB: tl.constexpr,
    FUSE: tl.constexpr,
    OP_DT: tl.constexpr,
    ACC_DT: tl.constexpr,
    PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One pass over the gathered dy rows of one expert block: t = dy B_e^T, D, d gate and the bias partials; with
    FUSE also the per-block dB partial (coef^T dy) and, after t is complete, the dA partial (x^T D)."""
    blk = tl.load(block_order_ptr + tl.program_id(0))
    e = tl.load(block_expert_ptr + blk)
    if e >= E:
        return
    e64 = e.to(tl.int64)
    assign = tl.load(sorted_ptr + blk * BLOCK_S + tl.arange(0, BLOCK_S))
    if INDEX_64:
        blk = tl.cast(blk, tl.int64)
    valid = assign >= 0
    assign = tl.where(valid, assign, 0)
    if INDEX_64:
        assign = assign.to(tl.int64)
    tok = assign // k
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    hmask = valid[:, None] & mask_r[None, :]
    h = tl.load(hpre_ptr + assign[:, None] * r + offs_r[None, :], mask=hmask, other=0.0).to(ACC_DT)
    g = tl.load(gate_ptr + assign, mask=valid, other=0.0).to(ACC_DT)
    if ACTIVATION == 1:
        phi = tl.maximum(h, 0.0)
    else:
        phi = h
    coef_b = (phi * g[:, None]).to(OP_DT)  # dB_e = sum_a (g_a phi(h_a))^T dy_a

    t = tl.zeros((BLOCK_S, BLOCK_R), dtype=ACC_DT)
    u = tl.zeros((BLOCK_S,), dtype=ACC_DT)
    offs_n = tl.arange(0, BLOCK_N)
    dy_ptrs = dy_ptr + tok[:, None] * stride_dy_t + offs_n[None, :]
    for n0 in range(0, d_out, BLOCK_N):
        nn = n0 + offs_n
        mn = nn < d_out
        dyt = tl.load(dy_ptrs, mask=valid[:, None] & mn[None, :], other=0.0)
        if NEED_T:
            bt = tl.load(b_ptr + e64 * r * d_out + offs_r[None, :] * d_out + nn[:, None],
                         mask=mn[:, None] & mask_r[None, :], other=0.0).to(OP_DT)  # (BLOCK_N, BLOCK_R) = B_e^T
            t = tl.dot(dyt.to(OP_DT), bt, t, input_precision=PRECISION, out_dtype=ACC_DT)
            if HAS_BB:
                if NEED_DGATE:
                    bbv = tl.load(bb_ptr + e64 * d_out + nn, mask=mn, other=0.0).to(ACC_DT)
                    u += tl.sum(dyt.to(ACC_DT) * bbv[None, :], axis=1)
        if FUSE:
            if NEED_DB:
                pdb = tl.dot(tl.trans(coef_b), dyt.to(OP_DT), input_precision=PRECISION, out_dtype=ACC_DT)
                tl.store(pdb_ptr + blk * r * d_out + offs_r[:, None] * d_out + nn[None, :], pdb,
                         mask=mask_r[:, None] & mn[None, :])
        if NEED_DBB:
            tl.store(pdbb_ptr + blk * d_out + nn, tl.sum(g[:, None] * dyt.to(ACC_DT), axis=0), mask=mn)
        dy_ptrs += BLOCK_N

    if NEED_DGATE:
        tl.store(dgate_ptr + assign, tl.sum(phi * t, axis=1) + u, mask=valid)
    dh = t * g[:, None]
    if ACTIVATION == 1:
        dh = tl.where(h > 0.0, dh, 0.0)
    if NEED_D:
        tl.store(d_ptr + assign[:, None] * r + offs_r[None, :], dh, mask=hmask)
    if NEED_DBA:
        tl.store(pdba_ptr + blk * r + offs_r, tl.sum(dh, axis=0), mask=mask_r)
    if FUSE:
        if NEED_DA:
            dhc = dh.to(OP_DT)
            offs_k = tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + tok[:, None] * stride_x_t + offs_k[None, :]
            for k0 in range(0, d_in, BLOCK_K):
                kk = k0 + offs_k
                mk = kk < d_in
                xt = tl.load(x_ptrs, mask=valid[:, None] & mk[None, :], other=0.0).to(OP_DT)
                pda = tl.dot(tl.trans(xt), dhc, input_precision=PRECISION, out_dtype=ACC_DT)  # (BLOCK_K, BLOCK_R)
                tl.store(pda_ptr + blk * d_in * r + kk[:, None] * r + offs_r[None, :], pda,
                         mask=mk[:, None] & mask_r[None, :])
                x_ptrs += BLOCK_K


@triton.jit
def _moe_lora_bwd_dw_kernel(
    act_ptr,  # (T, N) x (for dA) or dy (for dB), activation dtype
    coef_ptr,  # (T * k, r) ACC_DT: D (dA) or the saved pre-activation h (dB, COEF_GATED)
    gate_ptr,  # (T * k,) ACC_DT scale * topk_w (COEF_GATED only)
    sorted_ptr,  # (NB * BLOCK_S,) int32 padded expert-sorted assignment ids, -1 = padding
    blk_off_ptr,  # (E + 1,) int32 first block of each expert
    part_ptr,  # (NC, N * r) ACC_DT out: one partial per chunk of CB blocks of one expert
    N,
    r,
    E,
    k,
    CB,
    stride_act_t,
    stride_p_n,  # partial layout: element (n, rr) of a chunk at n * stride_p_n + rr * stride_p_r
    stride_p_r,
    t_bucket,  # autotune key only (bucketed T)
    COEF_GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    OP_DT: tl.constexpr,
    ACC_DT: tl.constexpr,
    PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Semantics: part[c][n, :] = sum over the chunk's assignments a of act[a // k, n] * coef[a, :].

    Split-token weight gradient without atomics: chunk c owns up to CB consecutive blocks of one expert and writes
    its own partial; `_moe_lora_reduce_kernel` sums an expert's partials in a fixed order (deterministic).
    """
    c = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_e = tl.arange(0, BLOCK_E)
    m_e = offs_e < E
    lo = tl.load(blk_off_ptr + offs_e, mask=m_e, other=0)
    hi = tl.load(blk_off_ptr + offs_e + 1, mask=m_e, other=0)
    n_chunks = (hi - lo + CB - 1) // CB
    ends = tl.cumsum(n_chunks, 0)
    e = tl.sum((ends <= c).to(tl.int32))
    if e >= E:
        return
    sel = offs_e == e
    first_chunk = tl.sum(tl.where(sel, ends - n_chunks, 0))
    b_first = tl.sum(tl.where(sel, lo, 0)) + (c - first_chunk) * CB
    b_last = tl.minimum(b_first + CB, tl.sum(tl.where(sel, hi, 0)))

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC_DT)
    for b in range(b_first, b_last):
        assign = tl.load(sorted_ptr + b * BLOCK_S + tl.arange(0, BLOCK_S))
        valid = assign >= 0
        assign = tl.where(valid, assign, 0)
        if INDEX_64:
            assign = assign.to(tl.int64)
        tok = assign // k
        cf = tl.load(coef_ptr + assign[:, None] * r + offs_r[None, :], mask=valid[:, None] & mask_r[None, :],
                     other=0.0).to(ACC_DT)
        if COEF_GATED:
            if ACTIVATION == 1:
                cf = tl.maximum(cf, 0.0)
            cf = cf * tl.load(gate_ptr + assign, mask=valid, other=0.0).to(ACC_DT)[:, None]
        at = tl.load(act_ptr + tok[:, None] * stride_act_t + offs_n[None, :], mask=valid[:, None] & mask_n[None, :],
                     other=0.0).to(OP_DT)
        acc = tl.dot(tl.trans(at), cf.to(OP_DT), acc, input_precision=PRECISION, out_dtype=ACC_DT)
    c_off = c
    if INDEX_64:
        c_off = tl.cast(c_off, tl.int64)
    tl.store(part_ptr + c_off * N * r + offs_n[:, None] * stride_p_n + offs_r[None, :] * stride_p_r, acc,
             mask=mask_n[:, None] & mask_r[None, :])


@triton.jit
def _moe_lora_reduce_kernel(
    part_ptr,  # (NP, M) ACC_DT partial sums, the partials of expert e are consecutive
    out_ptr,  # (E, M) out, the gradient's dtype
    blk_off_ptr,  # (E + 1,) int32 first block of each expert
    M,
    E,
    CB,  # blocks per partial (1: one partial per block)
    INDEX_64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Semantics: out[e] = sum of expert e's partials, in increasing partial order (deterministic, no atomics)."""
    e = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < M
    first, count = _expert_segment(blk_off_ptr, e, E, CB, BLOCK_E)
    acc = tl.zeros((BLOCK_N,), dtype=part_ptr.dtype.element_ty)
    for p in range(first, first + count):
        p_off = p
        if INDEX_64:
            p_off = tl.cast(p_off, tl.int64)
        acc += tl.load(part_ptr + p_off * M + offs, mask=mask, other=0.0)
    e_off = e
    if INDEX_64:
        e_off = tl.cast(e_off, tl.int64)
    tl.store(out_ptr + e_off * M + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _moe_lora_bwd_dx_kernel(
    dy_ptr,  # (T, d_out) x.dtype
    w0_ptr,  # (d_out, d_in) frozen base weight (dummy when HAS_BASE is False)
    a_ptr,  # (E, d_in, r) A.dtype
    d_ptr,  # (T * k, r) ACC_DT D = gate * (dy B_e^T) * phi'(h) from the rank kernel
    idx_ptr,  # (T, k) int32/int64 routing
    dx_ptr,  # (T, d_in) out, x.dtype
    token_order_ptr,  # (T,) int32 tokens grouped by expert set (routing metadata)
    T,
    d_in,
    d_out,
    r,
    E,
    k,
    stride_dy_t,
    stride_w0_n,
    stride_dx_t,
    t_bucket,  # autotune key only (bucketed T)
    N_OUT,  # = d_in, named for the shared GEMM pruner
    HAS_BASE: tl.constexpr,
    OP_DT: tl.constexpr,
    ACC_DT: tl.constexpr,
    PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Semantics: dx[t] = dy[t] W0 + sum_j D[t,j] @ A[e_tj]^T."""
    _gemm_expand(
        dy_ptr, stride_dy_t, w0_ptr, stride_w0_n, 1, d_ptr, idx_ptr, d_ptr, a_ptr, d_in * r, 1, r,
        d_ptr, d_ptr, dx_ptr, stride_dx_t, token_order_ptr, T, d_out, d_in, r, E, k,
        HAS_BASE, False, False, False, 0, OP_DT, ACC_DT, PRECISION, INDEX_64,
        BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, BLOCK_J, GROUP_M,
    )
