"""Triton kernels of the per-sample MoE-LoRA path: only `@triton.jit` code and configs (STYLE A3).

Orchestration and the design (why these kernels, with the performance model's numbers) live in
`igsp_kernels/ops/moe_lora_sample.py`. Per-sample routing: sample s owns the contiguous rows [s L, s L + L) of x and
one routing row (k experts, k gates), so no kernel here reads a (T, k) routing tensor or gathers a token row.

Slots. A tile of BLOCK_M consecutive rows spans at most SAMPLES = ceil((BLOCK_M - 1) / L) + 1 samples, starting at
s_lo = row0 // L. Its experts are the SAMPLES x k "slots" (slot = q k + j: sample s_lo + q, its j-th expert), laid
side by side on a rank axis of SLOTS x BLOCK_R columns (column = slot BLOCK_R + c, c < r). One MMA against the
gathered [A_e(slot 0) | A_e(slot 1) | ...] (BLOCK_K x SLOTS BLOCK_R) gives every row's projection on every slot; a
row keeps its own sample's k slots (the `own` mask) and zeroes the others, so the next MMA (expansion by the
gathered B or A^T) adds exactly its k experts. One program serves all k experts of its rows, and x / dy stream once.
A tile inside one sample (36 % of 128-row tiles at L = 197) takes a second code path with only its k slots
(SLOTS1 = next_pow2(k) columns of rank): the slot MMAs of those tiles cost half.
Gates are computed in the kernels, g = topk_w * scale, with scale split in two fp32 halves (scale_hi + scale_lo) so
fp64 runs stay exact to ~1e-15 (a float kernel argument is fp32), and d topk_w comes back already scaled: no torch
op runs beside the kernels.

Kernels:
- `_ps_fwd_kernel`: y = x W0^T + b0 + sum_j g phi(x A_e + ba) B_e + g bb_e, the shrink x A riding in the first N
  tile's K loop (x is read by the base GEMM anyway), the expansion in every tile's epilogue; writes y and the fp32
  pre-activation h (T, k, r) for the backward.
- `_ps_bwd_kernel`: one launch of up to three kinds of programs, interleaved in the grid (so memory-bound weight-
  gradient programs run beside compute-bound GEMM tiles): MAIN rows x N-groups of the dgrad GEMM dx = dy W0 +
  sum_j D_j A_e^T, computing t = dy B_e^T in its K loop (T_IN_LOOP) or reading D; SIDE_A (expert, d_in tile)
  programs dA_e = sum over e's samples x_s^T D_s (+ d ba); SIDE_B (expert, d_out tile) programs
  dB_e = sum over e's samples (g phi(h_s))^T dy_s (+ d bb). Weight gradients go straight to dA / dB: an expert's
  program walks its own samples' row segments in a fixed order (expert-major grouped GEMM), no partials, no atomics.
- `_ps_pairs_kernel`: the B k sample-expert pairs sorted by expert (stable) and each expert's first pair; one
  program, one launch, no host sync.

Conventions as `_moe_lora_kernels.py`: OP_DT is the MMA operand dtype, ACC_DT the accumulation dtype, INDEX_64
switches row offsets to int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from igsp_kernels.ops._utils import SMEM_LIMIT_BYTES, smem_bytes

# Headroom under the Hopper limit for what the estimate leaves out (epilogue tiles, layout conversions).
_SMEM_BUDGET = SMEM_LIMIT_BYTES - 16 * 1024


# --------------------------------------------------------------------------------------------- configs
def sample_gemm_configs() -> list[triton.Config]:
    """Configs of the per-sample GEMM programs (forward, and the backward's MAIN + SIDE programs), best first.

    BLOCK_M is not here: it fixes the slot layout (SAMPLES), so the launcher chooses it from the rank and the row
    count (`moe_lora_sample.row_block`). BLOCK_WN x BLOCK_L is the activation tile of the weight-gradient programs;
    BLOCK_L = 32 makes a 197-token sample 7 row chunks (224 rows, 14 % padding in those MMAs; 64-row chunks would
    pad 30 %, and they ride in a compute-bound launch). The 8-warp, 2-stage, BLOCK_K = 32 entries serve r = 64,
    whose 256-column slot axis (4 slots of 64) needs 8 warps to stay within registers and 2 stages to leave shared
    memory for the fp32 master A tile; the 4-warp one gives 64-row tiles 2 CTAs per SM. Four candidates keep the
    sm_90 compile of every shipped config in CPU CI to ~20 compiles.
    """
    def cfg(bn: int, bk: int, warps: int, stages: int, wn: int = 64, bl: int = 32) -> triton.Config:
        return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_WN": wn, "BLOCK_L": bl}, num_warps=warps,
                             num_stages=stages)

    return [
        cfg(128, 64, 8, 3),
        cfg(64, 64, 4, 3),
        cfg(128, 32, 8, 2),
        cfg(64, 32, 8, 2, 64, 32),
    ]


# Under TRITON_INTERPRET: small tiles so the test shapes (d ~ 20..48, L ~ 9..37) span several tiles and row chunks.
INTERPRET_SAMPLE_GEMM = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_WN": 32, "BLOCK_L": 16}, num_warps=4,
                                      num_stages=1)


def pairs_configs() -> list[triton.Config]:
    """The one-program pair sort: CHUNK pairs per step (a CHUNK x CHUNK rank matrix: 128 x 128 int32 over 4 warps)."""
    return [triton.Config({"CHUNK": 128}, num_warps=4, num_stages=1)]


INTERPRET_PAIRS = triton.Config({"CHUNK": 64}, num_warps=4, num_stages=1)

# Accumulator registers a thread may hold (fp32 tiles over the CTA's threads), of 255: the rest goes to the
# pipelined operand fragments, addresses and masks. ptxas -v (tests/kernels/test_triton_registers.py) found 204-240
# registers in use at 64-80 accumulator registers, and spills from 128 on (r = 64 at 4 warps).
ACC_REGISTER_BUDGET = 96
# Elements of the gathered expansion operand (slot axis x BLOCK_N) a config may hold: r = 64's 256-column slot axis
# at BLOCK_N = 128 compiled to 234 KB of shared memory with expert output biases (over Hopper's 227 KB).
MAX_EXPANSION_TILE = 128 * 128


def prune_sample_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs that overflow shared memory or registers, sized with each tensor's real dtype (fp32 master
    A / B beside bf16 activations take 4 bytes a value, not 2).

    Shared memory is the larger of the two passes of a program: the rank pass (x or dy tile + gathered A or B
    slot tile per stage) and the N tiles (x or dy tile + W0 tile per stage, then the gathered expansion operand and
    the coefficient tile). Registers: the fp32 accumulators live at once (the output tile and the bf16
    coefficients during the N tiles; the slot accumulator during the rank pass) per thread.
    """
    a = {**named_args, **kwargs}
    act, lora, acc = a["OP_ELT"], a["LORA_ELT"], max(4, a["OP_ELT"])
    sr, bm = a["SLOTS"] * a["BLOCK_R"], a["BLOCK_M"]
    fma = a["OP_ELT"] == 8 or (a["OP_ELT"] == 4 and a["PRECISION"] == "ieee")
    fits = []
    for c in configs:
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        wn, bl = c.kwargs["BLOCK_WN"], c.kwargs["BLOCK_L"]
        rank_pass = smem_bytes(c.num_stages, bm * bk * act, bk * sr * lora)
        tiles = smem_bytes(c.num_stages, bm * bk * act, bk * bn * act) + sr * bn * lora + bm * sr * act
        side = smem_bytes(c.num_stages, bl * wn * act, bl * a["BLOCK_R"] * 4)
        threads = 32 * c.num_warps
        regs = max(bm * bn * acc + bm * sr * act, bm * sr * acc) / 4 / threads
        ok = max(rank_pass, tiles, side) <= _SMEM_BUDGET and regs <= ACC_REGISTER_BUDGET
        ok = ok and sr * bn <= MAX_EXPANSION_TILE
        # fp32 "ieee" and fp64 dots are FMA code: a deep K step only unrolls more code (see _moe_lora_kernels)
        fits.append(ok and not (fma and (bk > 32 or bn > 64)))
    kept = [c for c, ok in zip(configs, fits) if ok]
    return kept or [configs[-1]]


# --------------------------------------------------------------------------------------------- helpers
@triton.jit
def _gates(w_ptr, off, mask, scale_hi, scale_lo, ACC_DT: tl.constexpr):
    """g = topk_w * scale in the accumulation dtype (scale = scale_hi + scale_lo, two fp32 halves)."""
    w = tl.load(w_ptr + off, mask=mask, other=0.0).to(ACC_DT)
    return w * scale_hi + w * scale_lo


@triton.jit
def _slot_columns(idx_ptr, w_ptr, scale_hi, scale_lo, s_lo, n_samples, k, r, SAMPLES: tl.constexpr,
                  SLOTS: tl.constexpr, BLOCK_R: tl.constexpr, ACC_DT: tl.constexpr):
    """Per column of the slot axis (SLOTS * BLOCK_R): (sample offset q, slot's j, rank index c, expert (int32:
    expert offsets stay below 2**31, checked by the launcher), gate, valid). idx_ptr / w_ptr: (n_samples, k)."""
    col = tl.arange(0, SLOTS * BLOCK_R)
    slot = col // BLOCK_R
    c = col % BLOCK_R
    q = slot // k
    j = slot % k
    sample = s_lo + q
    live = (slot < SAMPLES * k) & (sample < n_samples)
    e = tl.load(idx_ptr + sample * k + j, mask=live, other=0).to(tl.int32)
    g = _gates(w_ptr, sample * k + j, live, scale_hi, scale_lo, ACC_DT)
    return q, j, c, e, g, live & (c < r)


@triton.jit
def _slot_lanes(idx_ptr, w_ptr, scale_hi, scale_lo, s_lo, n_samples, k, SAMPLES: tl.constexpr, SB: tl.constexpr,
                ACC_DT: tl.constexpr):
    """Per lane of a slot vector padded to SB (>= 16, the smallest MMA width): (q, j, expert, gate, valid)."""
    sb = tl.arange(0, SB)
    q = sb // k
    j = sb % k
    sample = s_lo + q
    live = (sb < SAMPLES * k) & (sample < n_samples)
    e = tl.load(idx_ptr + sample * k + j, mask=live, other=0).to(tl.int32)
    g = _gates(w_ptr, sample * k + j, live, scale_hi, scale_lo, ACC_DT)
    return q, j, e, g, live


@triton.jit
def _tile_rows(row0, T, L, INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of a tile (clamped to row 0 past T: loads stay in bounds, stores are masked), their mask and their
    sample's offset from the tile's first sample."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    rows = tl.where(mask_m, offs_m, 0)
    if INDEX_64:
        rows = rows.to(tl.int64)
    qrow = offs_m // L - row0 // L
    return rows, mask_m, qrow


@triton.jit
def _single_sample(row0, T, L, BLOCK_M: tl.constexpr):
    """True when the tile's rows all belong to one sample (the k-slot code path)."""
    return (row0 // L) == (tl.minimum(row0 + BLOCK_M, T) - 1) // L


@triton.jit
def _expand_store(acc, coef, lora_ptr, l_col, s_le, s_lr, s_ln, bias_ptr, qrow, qb, eb, gb, liveb, b0_ptr, live,
                  out_ptr, row_out, mask_m, offs_n, N, idx_ptr, s_lo, n_samples, k, r, HAS_BIAS: tl.constexpr,
                  HAS_B0: tl.constexpr, SLOTWISE: tl.constexpr, SAMPLES: tl.constexpr, SLOTS: tl.constexpr,
                  BLOCK_R: tl.constexpr, OP_DT: tl.constexpr, ACC_DT: tl.constexpr, PRECISION: tl.constexpr):
    """out[rows, offs_n] = acc + coef @ L_gathered (+ g_own @ bias_gathered + b0): L_gathered[col, n] at
    lora_ptr + l_col[col] + n s_ln (B in the forward, A^T in dx), l_col = e s_le + c s_lr; row_out = row offsets
    of out (rows x stride).

    SLOTWISE (fp32 "ieee" and fp64: FMA dots, no tensor cores): one dot per slot with K = BLOCK_R. An FMA dot keeps
    K-long operand slices per thread, and K = the whole slot axis (64+) made those kernels spill (ptxas, sm_90a).
    """
    mask_n = offs_n < N
    if SLOTWISE:
        coef3 = tl.reshape(coef, (coef.shape[0], SLOTS, BLOCK_R))
        lane = tl.arange(0, SLOTS)
        offs_r = tl.arange(0, BLOCK_R)
        for slot in tl.static_range(SLOTS):
            cs = tl.sum(tl.where((lane == slot)[None, :, None], coef3, 0.0), axis=1)  # (rows, BLOCK_R)
            sample = s_lo + slot // k
            live_s = (slot < SAMPLES * k) & (sample < n_samples)
            e_s = tl.load(idx_ptr + sample * k + slot % k, mask=live_s, other=0).to(tl.int32)
            lt = tl.load(lora_ptr + e_s * s_le + offs_r[:, None] * s_lr + offs_n[None, :] * s_ln,
                         mask=(offs_r < r)[:, None] & mask_n[None, :] & live_s, other=0.0).to(OP_DT)
            acc = tl.dot(cs.to(OP_DT), lt, acc, input_precision=PRECISION, out_dtype=ACC_DT)
    else:
        lt = tl.load(lora_ptr + l_col[:, None] + offs_n[None, :] * s_ln, mask=live[:, None] & mask_n[None, :],
                     other=0.0).to(OP_DT)
        acc = tl.dot(coef, lt, acc, input_precision=PRECISION, out_dtype=ACC_DT)
    if HAS_BIAS:
        gown = tl.where((qrow[:, None] == qb[None, :]) & liveb[None, :], gb[None, :], 0.0).to(OP_DT)
        bt = tl.load(bias_ptr + (eb * N)[:, None] + offs_n[None, :], mask=liveb[:, None] & mask_n[None, :],
                     other=0.0).to(OP_DT)
        acc = tl.dot(gown, bt, acc, input_precision=PRECISION, out_dtype=ACC_DT)
    if HAS_B0:
        acc += tl.load(b0_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DT)[None, :]
    tl.store(out_ptr + row_out[:, None] + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _base_tile(acc, inp_ptr, row_inp, w_ptr, w_col, s_wk, K, INDEX_64: tl.constexpr, OP_DT: tl.constexpr,
               ACC_DT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += inp[rows, :K] @ W[:K, cols]: inp at inp_ptr + row_inp[m] + kk, W at w_ptr + kk s_wk + w_col[n].

    Addresses are rebuilt each step from the 1-D offset vectors: a 2-D 64-bit pointer tile carried through the
    loop costs 2 registers a value (64 a thread for a 128 x 64 tile at 8 warps), what made the fused kernels spill.
    """
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < K
        if INDEX_64:
            kk = kk.to(tl.int64)
        a = tl.load(inp_ptr + row_inp[:, None] + kk[None, :], mask=mk[None, :], other=0.0).to(OP_DT)
        w = tl.load(w_ptr + kk[:, None] * s_wk + w_col[None, :], mask=mk[:, None], other=0.0).to(OP_DT)
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC_DT)
    return acc


# --------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_rows(
    row0, grp, x_ptr, w0_ptr, b0_ptr, a_ptr, b_ptr, ba_ptr, bb_ptr, idx_ptr, w_ptr, scale_hi, scale_lo, y_ptr,
    hpre_ptr, T, d_in, d_out, r, k, L, n_samples, stride_x_t, stride_y_t, n_groups,
    HAS_BASE: tl.constexpr, HAS_B0: tl.constexpr, HAS_BA: tl.constexpr, HAS_BB: tl.constexpr,
    ACTIVATION: tl.constexpr, OP_DT: tl.constexpr, ACC_DT: tl.constexpr, PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr, SAMPLES: tl.constexpr, SLOTS: tl.constexpr, SB: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SLOTWISE: tl.constexpr,
):
    """The forward of one row block and N-group with a slot axis of SAMPLES x k slots."""
    rows, mask_m, qrow = _tile_rows(row0, T, L, INDEX_64, BLOCK_M)
    s_lo = row0 // L
    q, j, c, e, g, live = _slot_columns(idx_ptr, w_ptr, scale_hi, scale_lo, s_lo, n_samples, k, r, SAMPLES, SLOTS,
                                        BLOCK_R, ACC_DT)
    qb, jb, eb, gb, liveb = _slot_lanes(idx_ptr, w_ptr, scale_hi, scale_lo, s_lo, n_samples, k, SAMPLES, SB, ACC_DT)
    row_x = rows * stride_x_t
    row_y = rows * stride_y_t
    b_col = e * (r * d_out) + c * d_out  # B[e, c, n] at b_ptr + b_col + n

    # ---- the shrink over the row block: h = x [A_e ...] for every slot, one pass over the rows of x
    hacc = tl.zeros((BLOCK_M, SLOTS * BLOCK_R), dtype=ACC_DT)
    offs_k = tl.arange(0, BLOCK_K)
    a_col = e * (d_in * r) + c  # A[e, kk, c] at a_ptr + a_col + kk r
    for k0 in range(0, d_in, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < d_in
        xt = tl.load(x_ptr + row_x[:, None] + kk[None, :], mask=mk[None, :], other=0.0).to(OP_DT)
        at = tl.load(a_ptr + kk[:, None] * r + a_col[None, :], mask=mk[:, None] & live[None, :], other=0.0)
        hacc = tl.dot(xt, at.to(OP_DT), hacc, input_precision=PRECISION, out_dtype=ACC_DT)
    if HAS_BA:
        hacc += tl.load(ba_ptr + e * r + c, mask=live, other=0.0).to(ACC_DT)[None, :]
    own = (qrow[:, None] == q[None, :]) & live[None, :] & mask_m[:, None]
    # the pre-activation of each row's own k slots, once (group 0)
    tl.store(hpre_ptr + (rows * (k * r))[:, None] + (j * r + c)[None, :], hacc, mask=own & (grp == 0))
    if ACTIVATION == 1:
        hacc = tl.maximum(hacc, 0.0)
    coef = tl.where(own, hacc * g[None, :], 0.0).to(OP_DT)
    # ---- the group's N tiles: base GEMM (x re-read from L2) + expansion. The shrink runs as its own pass, not in
    # the first tile's K loop, so its accumulator is dead before the output tile's is live (together they made
    # the backward's twin of this kernel spill at 8 warps).
    tiles_per_group = tl.cdiv(tl.cdiv(d_out, BLOCK_N), n_groups)
    n_first = grp * tiles_per_group * BLOCK_N
    n_stop = tl.minimum(d_out, n_first + tiles_per_group * BLOCK_N)
    for n0 in range(n_first, n_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
        if HAS_BASE:
            w_col = (offs_n % d_out) * d_in  # W0^T[kk, n] = W0[n, kk]: columns past d_out wrap (never stored)
            if INDEX_64:
                w_col = w_col.to(tl.int64)
            acc = _base_tile(acc, x_ptr, row_x, w0_ptr, w_col, 1, d_in, INDEX_64, OP_DT, ACC_DT, PRECISION,
                             BLOCK_K)
        _expand_store(acc, coef, b_ptr, b_col, r * d_out, d_out, 1, bb_ptr, qrow, qb, eb, gb, liveb, b0_ptr, live,
                      y_ptr, row_y, mask_m, offs_n, d_out, idx_ptr, s_lo, n_samples, k, r, HAS_BB, HAS_B0, SLOTWISE,
                      SAMPLES, SLOTS, BLOCK_R, OP_DT, ACC_DT, PRECISION)


@triton.jit
def _ps_fwd_kernel(
    x_ptr,  # (T, d_in) activations
    w0_ptr,  # (d_out, d_in) frozen base weight in x's dtype (dummy when HAS_BASE is False)
    b0_ptr,  # (d_out,) frozen base bias (dummy when HAS_B0 is False)
    a_ptr,  # (E, d_in, r) A, contiguous, any float dtype
    b_ptr,  # (E, r, d_out) B, contiguous
    ba_ptr,  # (E, r) expert input bias (dummy when HAS_BA is False)
    bb_ptr,  # (E, d_out) expert output bias (dummy when HAS_BB is False)
    idx_ptr,  # (n_samples, k) int32/int64 routing of each sample
    w_ptr,  # (n_samples, k) topk_w, any float dtype (gate = topk_w * scale)
    scale_hi,  # fp32: scale = scale_hi + scale_lo
    scale_lo,
    y_ptr,  # (T, d_out) out, x's dtype
    hpre_ptr,  # (T, k, r) ACC_DT out: pre-activation x A_e + ba_e of each row's k experts
    T,
    d_in,
    d_out,
    r,
    E,
    k,
    L,  # tokens per sample
    n_samples,
    stride_x_t,
    stride_y_t,
    n_groups,  # N-groups per row block (each recomputes the shrink; see moe_lora_sample.n_groups)
    t_bucket,  # autotune key only (bucketed T)
    OP_ELT,  # pruner only: bytes of an activation value
    LORA_ELT,  # pruner only: bytes of an A / B value
    HAS_BASE: tl.constexpr,
    HAS_B0: tl.constexpr,
    HAS_BA: tl.constexpr,
    HAS_BB: tl.constexpr,
    ACTIVATION: tl.constexpr,
    OP_DT: tl.constexpr,
    ACC_DT: tl.constexpr,
    PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    SAMPLES: tl.constexpr,
    SLOTS: tl.constexpr,
    SB: tl.constexpr,
    SLOTS1: tl.constexpr,
    SB1: tl.constexpr,
    SLOTWISE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_WN: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Semantics: y[t] = x[t] W0^T + b0 + sum_j g[s,j] (phi(x[t] A[e] + ba[e]) B[e] + bb[e]), s = t // L,
    e = idx[s, j], g = topk_w * scale; one program = a row block and a group of N tiles."""
    pid = tl.program_id(0)
    rb = pid // n_groups
    grp = pid % n_groups
    row0 = rb * BLOCK_M
    if _single_sample(row0, T, L, BLOCK_M):
        _fwd_rows(row0, grp, x_ptr, w0_ptr, b0_ptr, a_ptr, b_ptr, ba_ptr, bb_ptr, idx_ptr, w_ptr, scale_hi, scale_lo,
                  y_ptr, hpre_ptr, T, d_in, d_out, r, k, L, n_samples, stride_x_t, stride_y_t, n_groups, HAS_BASE,
                  HAS_B0, HAS_BA, HAS_BB, ACTIVATION, OP_DT, ACC_DT, PRECISION, INDEX_64, 1, SLOTS1, SB1, BLOCK_M,
                  BLOCK_N, BLOCK_K, BLOCK_R, SLOTWISE)
    else:
        _fwd_rows(row0, grp, x_ptr, w0_ptr, b0_ptr, a_ptr, b_ptr, ba_ptr, bb_ptr, idx_ptr, w_ptr, scale_hi, scale_lo,
                  y_ptr, hpre_ptr, T, d_in, d_out, r, k, L, n_samples, stride_x_t, stride_y_t, n_groups, HAS_BASE,
                  HAS_B0, HAS_BA, HAS_BB, ACTIVATION, OP_DT, ACC_DT, PRECISION, INDEX_64, SAMPLES, SLOTS, SB,
                  BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, SLOTWISE)


# --------------------------------------------------------------------------------------------- backward
@triton.jit
def _main_rows(
    row0, grp, dy_ptr, w0_ptr, a_ptr, b_ptr, bb_ptr, idx_ptr, w_ptr, scale_hi, scale_lo, hpre_ptr, d_ptr, dgtok_ptr,
    dx_ptr, T, d_in, d_out, r, k, L, n_samples, stride_dy_t, stride_dx_t, n_groups,
    T_IN_LOOP: tl.constexpr, NEED_DX: tl.constexpr, STORE_D: tl.constexpr, NEED_DGATE: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_BB: tl.constexpr, ACTIVATION: tl.constexpr, OP_DT: tl.constexpr,
    ACC_DT: tl.constexpr, PRECISION: tl.constexpr, INDEX_64: tl.constexpr, SAMPLES: tl.constexpr,
    SLOTS: tl.constexpr, SB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, SLOTWISE: tl.constexpr,
):
    """One row block x N-group of dx = dy W0 + sum_j D_j A_e^T; with T_IN_LOOP also t = dy B_e^T (in the first
    tile's K loop over dy), D = g t phi'(h) and the per-token d gate terms."""
    rows, mask_m, qrow = _tile_rows(row0, T, L, INDEX_64, BLOCK_M)
    s_lo = row0 // L
    q, j, c, e, g, live = _slot_columns(idx_ptr, w_ptr, scale_hi, scale_lo, s_lo, n_samples, k, r, SAMPLES, SLOTS,
                                        BLOCK_R, ACC_DT)
    row_dy = rows * stride_dy_t
    a_col = e * (d_in * r) + c  # A^T[c, n] of expert e at a_ptr + a_col + n r
    if T_IN_LOOP:
        # ---- the rank pass over the row block's dy: t = dy [B_e ...]^T (+ <dy, bb_e>), then D and d gate
        qb, jb, eb, gb, liveb = _slot_lanes(idx_ptr, w_ptr, scale_hi, scale_lo, s_lo, n_samples, k, SAMPLES, SB,
                                            ACC_DT)
        tacc = tl.zeros((BLOCK_M, SLOTS * BLOCK_R), dtype=ACC_DT)
        uacc = tl.zeros((BLOCK_M, SB), dtype=ACC_DT)
        offs_k = tl.arange(0, BLOCK_K)
        b_col = e * (r * d_out) + c * d_out  # B[e, c, kk] at b_ptr + b_col + kk
        bb_col = eb * d_out
        for k0 in range(0, d_out, BLOCK_K):
            kk = k0 + offs_k
            mk = kk < d_out
            dyt = tl.load(dy_ptr + row_dy[:, None] + kk[None, :], mask=mk[None, :], other=0.0).to(OP_DT)
            bt = tl.load(b_ptr + kk[:, None] + b_col[None, :], mask=mk[:, None] & live[None, :], other=0.0)
            tacc = tl.dot(dyt, bt.to(OP_DT), tacc, input_precision=PRECISION, out_dtype=ACC_DT)
            if HAS_BB:
                if NEED_DGATE:
                    bbt = tl.load(bb_ptr + kk[:, None] + bb_col[None, :], mask=mk[:, None] & liveb[None, :],
                                  other=0.0)
                    uacc = tl.dot(dyt, bbt.to(OP_DT), uacc, input_precision=PRECISION, out_dtype=ACC_DT)
        own = (qrow[:, None] == q[None, :]) & live[None, :] & mask_m[:, None]
        rank_off = (rows * (k * r))[:, None] + (j * r + c)[None, :]  # (row, j, c) in the (T, k, r) layouts
        h = tl.load(hpre_ptr + rank_off, mask=own, other=0.0).to(ACC_DT)
        if NEED_DGATE:
            # d gate[t, slot] = <phi(h), t> over the slot's r columns (+ <dy, bb_e>, whose MMA has SB >= 16 lanes of
            # which lanes >= SLOTS are zero): sums over a (rows, slots, rank) view, in the accumulation dtype
            if ACTIVATION == 1:
                phi = tl.maximum(h, 0.0)
            else:
                phi = h
            dg = tl.sum(tl.reshape(phi * tacc, (BLOCK_M, SLOTS, BLOCK_R)), axis=2)
            if HAS_BB:
                dg += tl.sum(tl.reshape(uacc, (BLOCK_M, SB // SLOTS, SLOTS)), axis=1)
            lane = tl.arange(0, SLOTS)
            own_s = (qrow[:, None] == (lane // k)[None, :]) & (lane < SAMPLES * k)[None, :] & mask_m[:, None]
            own_s = own_s & ((s_lo + lane // k) < n_samples)[None, :]
            tl.store(dgtok_ptr + (rows * k)[:, None] + (lane % k)[None, :], dg, mask=own_s & (grp == 0))
        dd = tacc * g[None, :]
        if ACTIVATION == 1:
            dd = tl.where(h > 0.0, dd, 0.0)
        dd = tl.where(own, dd, 0.0)
        if STORE_D:
            tl.store(d_ptr + rank_off, dd, mask=own & (grp == 0))
    else:
        own = (qrow[:, None] == q[None, :]) & live[None, :] & mask_m[:, None]
        rank_off = (rows * (k * r))[:, None] + (j * r + c)[None, :]
        dd = tl.load(d_ptr + rank_off, mask=own, other=0.0).to(ACC_DT)
    if NEED_DX:
        # ---- the group's N tiles of dx: base GEMM over dy (re-read from L2) + D [A_e ...]^T
        coef = dd.to(OP_DT)
        row_dx = rows * stride_dx_t
        tiles_per_group = tl.cdiv(tl.cdiv(d_in, BLOCK_N), n_groups)
        n_first = grp * tiles_per_group * BLOCK_N
        n_stop = tl.minimum(d_in, n_first + tiles_per_group * BLOCK_N)
        for n0 in range(n_first, n_stop, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
            if HAS_BASE:
                acc = _base_tile(acc, dy_ptr, row_dy, w0_ptr, offs_n % d_in, d_in, d_out, INDEX_64, OP_DT, ACC_DT,
                                 PRECISION, BLOCK_K)
            _expand_store(acc, coef, a_ptr, a_col, d_in * r, 1, r, a_ptr, qrow, q, e, g, live, a_ptr, live, dx_ptr,
                          row_dx, mask_m, offs_n, d_in, idx_ptr, s_lo, n_samples, k, r, False, False, SLOTWISE,
                          SAMPLES, SLOTS, BLOCK_R, OP_DT, ACC_DT, PRECISION)


@triton.jit
def _weight_grad_part(
    si, act_ptr, stride_act, N, n_tiles, coef_ptr, w_ptr, scale_hi, scale_lo, pairs_ptr, pair_off_ptr, out_ptr,
    s_on, s_or, bias_ptr, dgtok_ptr, dw_ptr, k, r, L, INDEX_64: tl.constexpr, ROLE_A: tl.constexpr,
    NEED_W: tl.constexpr, NEED_BIAS: tl.constexpr, NEED_DGATE: tl.constexpr, ACTIVATION: tl.constexpr,
    OP_DT: tl.constexpr, ACC_DT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_WN: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Expert-major grouped GEMM over expert e's samples, one (e, N tile) per program:
    out[e][n, c] = sum over pairs (s, j) of e, rows l of s: act[s L + l, n] * coef[s L + l, j, c], with
    coef = D (ROLE_A: dA; d ba = column sums; d topk_w[s, j] = scale * sum of the d gate terms of the pair's rows)
    or g phi(h) (dB; d bb[n] = sum g dy). Written straight into the gradients (element (n, c) at n s_on + c s_or),
    in a fixed order: deterministic, no partials."""
    e = si // n_tiles
    nt = si % n_tiles
    lo = tl.load(pair_off_ptr + e)
    hi = tl.load(pair_off_ptr + e + 1)
    offs_n = nt * BLOCK_WN + tl.arange(0, BLOCK_WN)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    offs_l = tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_WN, BLOCK_R), dtype=ACC_DT)
    bias_r = tl.zeros((BLOCK_R,), dtype=ACC_DT)
    bias_n = tl.zeros((BLOCK_WN,), dtype=ACC_DT)
    for p in range(lo, hi):
        pair = tl.load(pairs_ptr + p)
        s = pair // k
        jj = pair % k
        if INDEX_64:
            s = s.to(tl.int64)
        gs = _gates(w_ptr, pair, True, scale_hi, scale_lo, ACC_DT)
        dgs = tl.zeros((BLOCK_L,), dtype=ACC_DT)
        for l0 in range(0, L, BLOCK_L):
            ml = (l0 + offs_l) < L
            rows = s * L + l0 + offs_l
            cf = tl.load(coef_ptr + rows[:, None] * (k * r) + jj * r + offs_r[None, :],
                         mask=ml[:, None] & mask_r[None, :], other=0.0).to(ACC_DT)
            if not ROLE_A:
                if ACTIVATION == 1:
                    cf = tl.maximum(cf, 0.0)
                cf = cf * gs
            if NEED_W or not ROLE_A:
                at = tl.load(act_ptr + rows[:, None] * stride_act + offs_n[None, :],
                             mask=ml[:, None] & mask_n[None, :], other=0.0)
                if NEED_W:
                    acc = tl.dot(tl.trans(at.to(OP_DT)), cf.to(OP_DT), acc, input_precision=PRECISION,
                                 out_dtype=ACC_DT)
                if not ROLE_A:
                    if NEED_BIAS:
                        bias_n += tl.sum(at.to(ACC_DT), axis=0) * gs
            if ROLE_A:
                if NEED_BIAS:
                    bias_r += tl.sum(cf, axis=0)
                if NEED_DGATE:
                    dgs += tl.load(dgtok_ptr + rows * k + jj, mask=ml & (nt == 0), other=0.0).to(ACC_DT)
        if ROLE_A:
            if NEED_DGATE:  # d topk_w = scale * d gate, summed over the sample's rows in order
                dg = tl.sum(dgs, axis=0)
                tl.store(dw_ptr + pair, (dg * scale_hi + dg * scale_lo).to(
                    dw_ptr.dtype.element_ty), mask=nt == 0)
    e64 = e.to(tl.int64)
    if NEED_W:
        tl.store(out_ptr + e64 * N * r + offs_n[:, None] * s_on + offs_r[None, :] * s_or,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_r[None, :])
    if NEED_BIAS:
        if ROLE_A:
            tl.store(bias_ptr + e64 * r + offs_r, bias_r.to(bias_ptr.dtype.element_ty), mask=mask_r & (nt == 0))
        else:
            tl.store(bias_ptr + e64 * N + offs_n, bias_n.to(bias_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _ps_bwd_kernel(
    dy_ptr,  # (T, d_out) output gradient, x's dtype
    x_ptr,  # (T, d_in) activations (SIDE_A)
    w0_ptr,  # (d_out, d_in) frozen base weight in x's dtype (dummy when HAS_BASE is False)
    a_ptr,  # (E, d_in, r) A
    b_ptr,  # (E, r, d_out) B
    bb_ptr,  # (E, d_out) expert output bias (dummy when HAS_BB is False)
    idx_ptr,  # (n_samples, k) int32/int64 routing
    w_ptr,  # (n_samples, k) topk_w (gate = topk_w * scale)
    scale_hi,  # fp32: scale = scale_hi + scale_lo
    scale_lo,
    hpre_ptr,  # (T, k, r) ACC_DT saved pre-activation
    d_ptr,  # (T, k, r) ACC_DT D = g t phi'(h): written by T_IN_LOOP programs (STORE_D), read otherwise and by SIDE_A
    dgtok_ptr,  # (T, k) ACC_DT per-token d gate terms: written by T_IN_LOOP programs, summed per pair by SIDE_A
    dx_ptr,  # (T, d_in) out, x's dtype
    pairs_ptr,  # (n_samples k,) int32 sample-expert pairs sorted by expert (_ps_pairs_kernel)
    pair_off_ptr,  # (E + 1,) int32 first pair of each expert
    da_ptr,  # (E, d_in, r) out: dA, A's dtype
    dba_ptr,  # (E, r) out: d bias_a
    dw_ptr,  # (n_samples, k) out: d topk_w, topk_w's dtype
    db_ptr,  # (E, r, d_out) out: dB, B's dtype
    dbb_ptr,  # (E, d_out) out: d bias_b
    T,
    d_in,
    d_out,
    r,
    E,
    k,
    L,
    n_samples,
    stride_x_t,
    stride_dy_t,
    stride_dx_t,
    n_groups,  # MAIN programs: row blocks x n_groups (the counts below are recomputed by the launcher's grid)
    t_bucket,  # autotune key only (bucketed T)
    OP_ELT,  # pruner only
    LORA_ELT,  # pruner only
    T_IN_LOOP: tl.constexpr,
    NEED_DX: tl.constexpr,
    STORE_D: tl.constexpr,
    NEED_DGATE: tl.constexpr,
    NEED_DA: tl.constexpr,
    NEED_DBA: tl.constexpr,
    NEED_DB: tl.constexpr,
    NEED_DBB: tl.constexpr,
    HAS_MAIN: tl.constexpr,
    HAS_SIDE_A: tl.constexpr,
    HAS_SIDE_B: tl.constexpr,
    HAS_BASE: tl.constexpr,
    HAS_BB: tl.constexpr,
    ACTIVATION: tl.constexpr,
    OP_DT: tl.constexpr,
    ACC_DT: tl.constexpr,
    PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    SAMPLES: tl.constexpr,
    SLOTS: tl.constexpr,
    SB: tl.constexpr,
    SLOTS1: tl.constexpr,
    SB1: tl.constexpr,
    SLOTWISE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_WN: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One backward launch: MAIN dgrad / rank programs and SIDE weight-gradient programs, interleaved so program
    i is a SIDE program iff floor((i+1) S / P) > floor(i S / P) (S side, P total programs): the memory-bound
    weight-gradient programs are spread over the whole launch instead of queuing after the GEMM tiles."""
    pid = tl.program_id(0).to(tl.int64)
    n_main = 0
    if HAS_MAIN:
        n_main = tl.cdiv(T, BLOCK_M) * n_groups
    tiles_a = 1  # d ba / d topk_w alone need one program per expert
    if NEED_DA:
        tiles_a = tl.cdiv(d_in, BLOCK_WN)
    n_side_a = 0
    if HAS_SIDE_A:
        n_side_a = E * tiles_a
    tiles_b = tl.cdiv(d_out, BLOCK_WN)
    n_side_b = 0
    if HAS_SIDE_B:
        n_side_b = E * tiles_b
    n_side = n_side_a + n_side_b
    total = n_main + n_side
    before = (pid * n_side) // total
    after = ((pid + 1) * n_side) // total
    if after > before:
        si = before
        if HAS_SIDE_A:
            if si < n_side_a:
                _weight_grad_part(si, x_ptr, stride_x_t, d_in, tiles_a, d_ptr, w_ptr, scale_hi, scale_lo, pairs_ptr,
                                  pair_off_ptr, da_ptr, r, 1, dba_ptr, dgtok_ptr, dw_ptr, k, r, L, INDEX_64, True,
                                  NEED_DA, NEED_DBA, NEED_DGATE, ACTIVATION, OP_DT, ACC_DT, PRECISION, BLOCK_R,
                                  BLOCK_WN, BLOCK_L)
        if HAS_SIDE_B:
            if si >= n_side_a:
                _weight_grad_part(si - n_side_a, dy_ptr, stride_dy_t, d_out, tiles_b, hpre_ptr, w_ptr, scale_hi,
                                  scale_lo, pairs_ptr, pair_off_ptr, db_ptr, 1, d_out, dbb_ptr, dgtok_ptr, dw_ptr, k,
                                  r, L, INDEX_64, False, NEED_DB, NEED_DBB, False, ACTIVATION, OP_DT, ACC_DT,
                                  PRECISION, BLOCK_R, BLOCK_WN, BLOCK_L)
    else:
        if HAS_MAIN:
            mi = pid - before
            row0 = (mi // n_groups) * BLOCK_M
            grp = mi % n_groups
            if _single_sample(row0, T, L, BLOCK_M):
                _main_rows(row0, grp, dy_ptr, w0_ptr, a_ptr, b_ptr, bb_ptr, idx_ptr, w_ptr, scale_hi, scale_lo,
                           hpre_ptr, d_ptr, dgtok_ptr, dx_ptr, T, d_in, d_out, r, k, L, n_samples, stride_dy_t,
                           stride_dx_t, n_groups, T_IN_LOOP, NEED_DX, STORE_D, NEED_DGATE, HAS_BASE, HAS_BB,
                           ACTIVATION, OP_DT, ACC_DT, PRECISION, INDEX_64, 1, SLOTS1, SB1, BLOCK_M, BLOCK_N, BLOCK_K,
                           BLOCK_R, SLOTWISE)
            else:
                _main_rows(row0, grp, dy_ptr, w0_ptr, a_ptr, b_ptr, bb_ptr, idx_ptr, w_ptr, scale_hi, scale_lo,
                           hpre_ptr, d_ptr, dgtok_ptr, dx_ptr, T, d_in, d_out, r, k, L, n_samples, stride_dy_t,
                           stride_dx_t, n_groups, T_IN_LOOP, NEED_DX, STORE_D, NEED_DGATE, HAS_BASE, HAS_BB,
                           ACTIVATION, OP_DT, ACC_DT, PRECISION, INDEX_64, SAMPLES, SLOTS, SB, BLOCK_M, BLOCK_N,
                           BLOCK_K, BLOCK_R, SLOTWISE)


# --------------------------------------------------------------------------------------------- metadata
@triton.jit
def _ps_pairs_kernel(
    idx_ptr,  # (P,) int32/int64 flattened (n_samples, k) routing: pair p = s k + j uses expert idx[p]
    pairs_ptr,  # (P,) int32 out: pairs sorted by expert, stable (ties keep sample order)
    pair_off_ptr,  # (E + 1,) int32 out: first sorted position of each expert, pair_off[E] = P
    P,
    E,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """A stable counting sort of the B k pairs by expert in one program: counts, exclusive scan, then each
    pair's position = its expert's next free slot + its rank among the chunk's earlier pairs of that expert."""
    lanes = tl.arange(0, E_PAD)
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, P, CHUNK):
        m = (c0 + offs) < P
        ex = tl.load(idx_ptr + c0 + offs, mask=m, other=-1).to(tl.int32)
        counts += tl.sum((ex[:, None] == lanes[None, :]).to(tl.int32), axis=0)
    start = tl.cumsum(counts, 0) - counts
    tl.store(pair_off_ptr + lanes, start, mask=lanes <= E)
    for c0 in range(0, P, CHUNK):
        m = (c0 + offs) < P
        ex = tl.load(idx_ptr + c0 + offs, mask=m, other=-1).to(tl.int32)
        hit = ex[:, None] == lanes[None, :]
        base = tl.sum(tl.where(hit, start[None, :], 0), axis=1)
        earlier = (ex[:, None] == ex[None, :]) & (offs[None, :] < offs[:, None]) & m[None, :]
        rank = tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(pairs_ptr + base + rank, c0 + offs, mask=m)
        start += tl.sum(hit.to(tl.int32), axis=0)
