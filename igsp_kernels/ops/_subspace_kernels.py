"""Triton kernel of the iGSP subspace ops: R = M - U (U^T M) for every matrix of every layer in one launch (A3).

Matrices of different shapes are grouped by a pointer table: one int64 row per matrix (its address, its basis'
address, sizes and strides), so one launch covers all layers (the per-layer work is tiny and launch-bound,
KERNELS.md). Program (i, q) handles batch entry c and column tile j of matrix i. The basis is taken BLOCK_MU
columns at a time: for each chunk, pass A forms P = U_c^T cur (BLOCK_MU x BLOCK_NS, registers) over the d rows and
pass B writes cur - U_c P; projecting out orthonormal column blocks one after another equals projecting out U
((I - U1 U1^T)(I - U2 U2^T) = I - U U^T when U1 is orthogonal to U2). Orchestration: `igsp_kernels/ops/subspace.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from igsp_kernels.ops._utils import next_pow2

# Fields of one pointer-table row (int64).
ROW_SRC, ROW_U, ROW_OUT, ROW_C, ROW_D, ROW_N, ROW_M = 0, 1, 2, 3, 4, 5, 6
ROW_SC, ROW_SD, ROW_SN, ROW_SUD, ROW_SUM = 7, 8, 9, 10, 11
ROW_FIELDS = 12


# (BLOCK_NS, BLOCK_MU, BLOCK_D, warps): one tile per column-tile width and basis-chunk width, each spill-free under
# ptxas -arch=sm_90a -v in fp32, bf16 and fp64, penalty and in-place (tests/kernels/test_triton_registers.py). The
# former 64-row, 128-column-chunk tiles spilled in every variant (up to 7.8 KB a thread in bf16): an fp32 "ieee" dot
# is FMA code that keeps K-long operand slices per thread, so the row step (K of U^T cur) stays at 16-32 rows.
_TILES = (
    (16, 16, 16, 4), (16, 64, 16, 4),
    (32, 32, 16, 4), (32, 64, 32, 8),
    (64, 16, 16, 4), (64, 32, 16, 4), (64, 64, 32, 8),
)


def subspace_configs() -> list[triton.Config]:
    """Candidate tiles of the one-launch projection; `choose_subspace_config` picks one from the shapes.

    No autotuning: `project_grad_` works in place, so an autotune sweep would project a gradient once per trial,
    and the problem is launch-bound anyway. BLOCK_NS covers the column count (r = 8..64) in one tile; BLOCK_MU takes
    up to 64 basis columns per chunk; BLOCK_D rows per step.
    """
    return [triton.Config({"BLOCK_D": d, "BLOCK_NS": ns, "BLOCK_MU": mu}, num_warps=w, num_stages=1)
            for ns, mu, d, w in _TILES]


def choose_subspace_config(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The config whose column tile covers max_n (<= 64) with the narrowest listed basis chunk covering max_m
    (the widest, 64, when none does: the basis then takes several chunks)."""
    a = {**named_args, **kwargs}
    ns = min(64, max(16, next_pow2(a["max_n"])))
    same = sorted((c for c in configs if c.kwargs["BLOCK_NS"] == ns), key=lambda c: c.kwargs["BLOCK_MU"])
    fit = [c for c in same if c.kwargs["BLOCK_MU"] >= a["max_m"]]
    return [fit[0] if fit else same[-1]]


# Under TRITON_INTERPRET: small tiles so that tests (d ~ 40, m ~ 20) run several row steps and basis chunks.
INTERPRET_SUBSPACE = triton.Config({"BLOCK_D": 16, "BLOCK_NS": 16, "BLOCK_MU": 16}, num_warps=4, num_stages=1)


@triton.jit
def _load_cur(first, src_base, s_d, s_n, dst_base, t_d, t_n, dd, offs_ns, mask, ACC_DT: tl.constexpr):
    """The matrix being projected: M itself for the first basis chunk, the partly projected dst afterwards."""
    if first:
        cur = tl.load(src_base + dd[:, None] * s_d + offs_ns[None, :] * s_n, mask=mask, other=0.0).to(ACC_DT)
    else:
        cur = tl.load(dst_base + dd[:, None] * t_d + offs_ns[None, :] * t_n, mask=mask, other=0.0).to(ACC_DT)
    return cur


@triton.jit
def _subspace_project_kernel(
    table_ptr,  # (n_mats, ROW_FIELDS) int64: src addr, basis addr, out offset, C, d, n, m, strides (elements)
    out_ptr,  # flat ACC_DT buffer receiving R of every matrix (penalty); unused when IN_PLACE
    values_ptr,  # (n_mats, Q) ACC_DT out: ||R||_F^2 of each (matrix, batch entry, column tile); penalty only
    Q,
    max_n,  # config choice only: the largest column count
    max_m,  # config choice only: the largest basis width
    SRC_DT: tl.constexpr,
    U_DT: tl.constexpr,
    ACC_DT: tl.constexpr,
    IN_PLACE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_NS: tl.constexpr,
    BLOCK_MU: tl.constexpr,
):
    """Semantics: R_i = M_i - U_i (U_i^T M_i); in place (project_grad_) or into out with ||R||^2 (penalty)."""
    i = tl.program_id(0)
    q = tl.program_id(1)
    row = table_ptr + i * 12
    src = tl.load(row + 0).to(tl.pointer_type(SRC_DT))
    u = tl.load(row + 1).to(tl.pointer_type(U_DT))
    out_off = tl.load(row + 2)
    C = tl.load(row + 3)
    d = tl.load(row + 4)
    n = tl.load(row + 5)
    m = tl.load(row + 6)
    s_c = tl.load(row + 7)
    s_d = tl.load(row + 8)
    s_n = tl.load(row + 9)
    s_ud = tl.load(row + 10)
    s_um = tl.load(row + 11)
    n_tiles = tl.cdiv(n, BLOCK_NS)
    c = q // n_tiles
    jt = q % n_tiles
    if c >= C:
        if not IN_PLACE:
            tl.store(values_ptr + i * Q + q, 0.0)
        return

    offs_ns = tl.arange(0, BLOCK_NS)
    mask_n = (jt * BLOCK_NS + offs_ns) < n
    offs_d = tl.arange(0, BLOCK_D)
    offs_mu = tl.arange(0, BLOCK_MU)
    src_base = src + c * s_c + jt * BLOCK_NS * s_n
    if IN_PLACE:
        dst_base = src_base
        t_d = s_d
        t_n = s_n
    else:
        dst_base = out_ptr + out_off + c * d * n + jt * BLOCK_NS
        t_d = n
        t_n = 1
    total = tl.zeros((BLOCK_D, BLOCK_NS), dtype=ACC_DT)
    for m0 in range(0, m, BLOCK_MU):
        first = m0 == 0
        mu = m0 + offs_mu
        mask_mu = mu < m
        p = tl.zeros((BLOCK_MU, BLOCK_NS), dtype=ACC_DT)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < d
            ut = tl.load(u + dd[:, None] * s_ud + mu[None, :] * s_um, mask=mask_d[:, None] & mask_mu[None, :],
                         other=0.0).to(ACC_DT)
            cur = _load_cur(first, src_base, s_d, s_n, dst_base, t_d, t_n, dd, offs_ns,
                            mask_d[:, None] & mask_n[None, :], ACC_DT)
            p = tl.dot(tl.trans(ut), cur, p, input_precision="ieee", out_dtype=ACC_DT)
        tl.debug_barrier()  # every row of cur is read before any row of dst is overwritten (in place)
        last = m0 + BLOCK_MU >= m
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < d
            mask = mask_d[:, None] & mask_n[None, :]
            ut = tl.load(u + dd[:, None] * s_ud + mu[None, :] * s_um, mask=mask_d[:, None] & mask_mu[None, :],
                         other=0.0).to(ACC_DT)
            cur = _load_cur(first, src_base, s_d, s_n, dst_base, t_d, t_n, dd, offs_ns, mask, ACC_DT)
            res = cur - tl.dot(ut, p, input_precision="ieee", out_dtype=ACC_DT)
            tl.store(dst_base + dd[:, None] * t_d + offs_ns[None, :] * t_n,
                     res.to(dst_base.dtype.element_ty), mask=mask)
            if not IN_PLACE:
                if last:
                    total += tl.where(mask, res * res, 0.0)
        tl.debug_barrier()  # dst is complete before the next chunk reads it
    if not IN_PLACE:
        if m == 0:
            # no basis: R = M
            for d0 in range(0, d, BLOCK_D):
                dd = d0 + offs_d
                mask = (dd < d)[:, None] & mask_n[None, :]
                cur = tl.load(src_base + dd[:, None] * s_d + offs_ns[None, :] * s_n, mask=mask,
                              other=0.0).to(ACC_DT)
                tl.store(dst_base + dd[:, None] * t_d + offs_ns[None, :] * t_n, cur, mask=mask)
                total += cur * cur
        tl.store(values_ptr + i * Q + q, tl.sum(tl.sum(total, axis=1), axis=0))
