"""Fused MoE-LoRA in Triton for per-sample routing: every large activation read or written once per pass.

Semantics (METHOD.md section 2, `igsp_kernels.reference.moe_lora_ref(..., tokens_per_sample=L)`):
    y[t] = x[t] W0^T + b0 + sum_j gate[s,j] * (phi(x[t] A[e] + ba[e]) B[e] + bb[e]),  s = t // L, e = idx[s, j],
    gate = scale * topk_w (formed in the kernels; d topk_w = scale * d gate comes back from them).
Shapes: x (T, d_in) with T = n_samples * L, sample s owning rows [s L, s L + L); topk_idx / topk_w (n_samples, k);
A (E, d_in, r), B (E, r, d_out) in any float dtype (fp32 master weights under autocast); W0 (d_out, d_in) and b0
in x's dtype (the cached compute-dtype copy, `igsp_kernels._dtypes.cast_frozen`); ba (E, r), bb (E, d_out).

Plan (kernels in `_moe_lora_sample_kernels.py`; design numbers: docs/kernels.md, from `make perf-model`):
    forward   one launch; a program owns a row block (and a group of N tiles): it first projects its rows of x on
              the tile's slots (its samples' k experts side by side, x [A_e ...]), then runs its N tiles: the base
              GEMM (re-reading its rows of x from L2) whose epilogue adds (gate phi(h)) [B_e ...]; y is written
              once, and the fp32 pre-activation h (T, k, r) for the backward.
    backward  metadata: one tiny launch sorts the n_samples k sample-expert pairs by expert (no host sync).
              Then two launches, each mixing programs of three kinds (MAIN dgrad rows, SIDE_A dA experts,
              SIDE_B dB experts), chosen per shape by `backward_plan`:
              "t_in_dgrad" (fc1-like, dy larger than x): launch 1 = the dgrad GEMM dx = dy W0 + D [A_e^T ...],
                  each program first passing over its rows of dy for t = dy [B_e ...]^T, D = gate t phi'(h) and
                  d gate (dy is read by the program that reads it for the GEMM anyway), plus the dB programs
                  (they read dy and h, ready before the launch); launch 2 = the dA programs (they need D).
              "rank_first" (fc2-like, x larger than dy): launch 1 = a rank pass over dy (t, D, d gate);
                  launch 2 = the dgrad GEMM reading D, plus the dA and dB programs.
              The weight-gradient programs are expert-major grouped GEMMs over the contiguous row segments of each
              expert's samples, written straight into dA / dB in a fixed order: no fp32 partials, no atomics,
              deterministic. Riding in a compute-bound GEMM launch, their memory traffic overlaps its MMAs.
Memory: saved for backward are x, the weights (references) and h (T k r fp32: 6.5 MB for ViT-B/16 at 256 images,
r = 16); the backward allocates D (T k r fp32) and the per-token d gate terms (T k fp32) besides its outputs.
No host sync, no host-to-device copy: CUDA-graph capturable.

Adapted ideas (own code): grouped GEMMs over per-expert row segments (punica's SGMV, S-LoRA), "t = dy B^T" without
saved expert outputs (KERNELS.md lesson 3), fp32 rank intermediate (vLLM LoRA ops).
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import torch
import triton

from igsp_kernels.ops import _moe_lora_sample_kernels as K
from igsp_kernels.ops._roofline import H200, peak_flops
from igsp_kernels.ops._utils import (
    ACTIVATION_CODES,
    INT32_LIMIT,
    KernelLauncher,
    acc_tl_dtype,
    check_moe_lora_launchable,
    device_ctx,
    dot_precision,
    ensure_contiguous,
    fake_grad,
    interpreting,
    next_pow2,
    num_sms,
    op_tl_dtype,
    t_bucket,
)

__all__ = [
    "MoELoRASampleFunction",
    "backward_plan",
    "moe_lora_sample_backward",
    "moe_lora_sample_forward",
    "moe_lora_sample_triton",
    "mean_slot_width",
    "n_groups",
    "row_block",
    "sample_pairs",
    "supports",
]

logger = logging.getLogger(__name__)

# Row blocks tried on a GPU, largest first, with the widest slot axis (SLOTS x BLOCK_R columns) each may hold:
# at 128 rows the shrink / t accumulator beside the 128 x 128 fp32 output tile must stay <= 64 columns (128 x 64
# fp32 = 32 registers a thread at 8 warps), at <= 64 rows up to 256 columns (r = 64 with 2 samples x k = 2 slots).
ROW_BLOCKS = ((128, 64), (64, 256), (32, 256), (16, 256))
#: Test-only overrides of the policy ("row_block", "groups", "plan", "fuse_side", "index64"); use monkeypatch.
TUNING_OVERRIDES: dict[str, Any] = {}



# --------------------------------------------------------------------------------------------- policy
def _rank_tile(r: int) -> int:
    return max(16, next_pow2(r))


def samples_per_tile(block_m: int, L: int) -> int:
    """The most samples a tile of block_m consecutive rows can touch: ceil((block_m - 1) / L) + 1."""
    return triton.cdiv(block_m - 1, L) + 1


def slots(block_m: int, L: int, k: int) -> int:
    """Width of a tile's slot axis in slots (samples x k, padded to a power of two)."""
    return next_pow2(samples_per_tile(block_m, L) * k)


def row_block(L: int, k: int, r: int, T: int = 0, sms: int = 1) -> int | None:
    """Rows per tile of the per-sample kernels, or None when no tile keeps its slot axis within the register
    budget (tiny L and large k: the token path serves those). Among the blocks that fit, the largest that still
    gives every SM a row block: at 64 images (T = 12,608) 128-row blocks make 99 programs for 132 SMs, 64-row
    blocks 197 (and a tile crosses a sample boundary less often: 32 % instead of 64 % at L = 197). 16 under the
    interpreter (tests span several tiles)."""
    if "row_block" in TUNING_OVERRIDES:
        return int(TUNING_OVERRIDES["row_block"])
    candidates = ((16, 256),) if interpreting() else ROW_BLOCKS
    fits = [bm for bm, widest in candidates if slots(bm, L, k) * _rank_tile(r) <= widest]
    if not fits:
        return None
    return next((bm for bm in fits if triton.cdiv(T, bm) >= sms), fits[-1])


def supports(T: int, L: int, k: int, r: int) -> bool:
    """Whether the per-sample kernels take this problem (else the caller expands to per-token routing)."""
    return L > 1 and row_block(L, k, r) is not None


def n_groups(T: int, block_m: int, N: int, sms: int) -> int:
    """N-groups per row block. Each group recomputes the tile's shrink (forward) or t (backward), so one group is
    cheapest, but fewer programs than SMs leave SMs idle: when even the smallest row block cannot fill the SMs,
    split N until it does, never below one 256-column tile per group."""
    if "groups" in TUNING_OVERRIDES:
        return int(TUNING_OVERRIDES["groups"])
    blocks = triton.cdiv(T, block_m)
    return max(1, min(triton.cdiv(sms, max(blocks, 1)), triton.cdiv(N, 256)))


def mean_slot_width(L: int, k: int, r: int, block_m: int) -> float:
    """The expected slot-axis columns of a tile: k slots inside one sample, the full axis across a boundary (a tile
    crosses one with probability ~ (block_m - 1) / L)."""
    cross = min(1.0, (block_m - 1) / L)
    return _rank_tile(r) * ((1.0 - cross) * next_pow2(k) + cross * slots(block_m, L, k))


def backward_plan(T: int, d_in: int, d_out: int, L: int, k: int, r: int, block_m: int, groups: int,
                  dtype: torch.dtype, need_dx: bool, need_dA: bool) -> str:
    """"t_in_dgrad" or "rank_first" (module docstring), whichever adds less predicted time on an H200.

    t_in_dgrad adds the t MMAs (2 T d_out w per N-group, w the mean slot width) to the compute-bound dgrad and a
    memory-bound dA launch reading x and D; rank_first adds a memory-bound rank pass reading dy (writing D) and puts
    the dA MMAs into the compute-bound dgrad launch, whose traffic they hide. ViT-B/16 at 256 images, r = 16, bf16:
    fc1 (768 -> 3072) 40 vs 79 us -> t_in_dgrad; fc2 (3072 -> 768) 79 vs 35 us -> rank_first (benchmarks/
    perf_model.py records both and prints the other plan's total beside the chosen one's).
    """
    if "plan" in TUNING_OVERRIDES:
        return str(TUNING_OVERRIDES["plan"])
    if not need_dx:
        return "t_in_dgrad"  # no dgrad GEMM to share: the rank pass is the only reader of dy either way
    elt = torch.empty((), dtype=dtype).element_size()
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    peak, bw = peak_flops(H200, dtype, tf32), H200.bandwidth
    rank_rows = T * k * r * 4.0  # one (T, k, r) fp32 tensor: h or D
    width = mean_slot_width(L, k, r, block_m)
    da_rows = T * k * (triton.cdiv(L, 32) * 32 / L)  # the dA programs' row chunks, padding included
    t_in_dgrad = 2.0 * T * d_out * width * groups / peak + (T * d_in * elt * need_dA + rank_rows) / bw
    rank_first = (T * d_out * elt + 2.0 * rank_rows + T * k * 4.0) / bw
    rank_first += 2.0 * da_rows * d_in * _rank_tile(r) / peak if need_dA else 0.0
    return "t_in_dgrad" if t_in_dgrad <= rank_first else "rank_first"


def _fuse_side() -> bool:
    return bool(TUNING_OVERRIDES.get("fuse_side", True))


def _meta(x: torch.Tensor, A: torch.Tensor, T: int, d_in: int, d_out: int, k: int, r: int, L: int, E: int
          ) -> dict[str, Any]:
    """Constexprs and tiling shared by the launches of one call."""
    bm = row_block(L, k, r, T, num_sms(x.device))
    rt = _rank_tile(r)
    big = max(T * max(d_in, d_out), T * k * rt, E * rt * max(d_in, d_out), d_in * d_out)
    one = next_pow2(k)  # the slot axis of a tile inside one sample
    return {
        "OP_DT": op_tl_dtype(x.dtype), "ACC_DT": acc_tl_dtype(x.dtype), "PRECISION": dot_precision(x.dtype),
        "INDEX_64": bool(TUNING_OVERRIDES.get("index64", big > INT32_LIMIT)),
        "SAMPLES": samples_per_tile(bm, L), "SLOTS": slots(bm, L, k), "SB": max(16, slots(bm, L, k)),
        "SLOTS1": one, "SB1": max(16, one),
        # FMA dots (fp64, fp32 without TF32) expand slot by slot (see _expand_store)
        "SLOTWISE": x.dtype == torch.float64 or (x.dtype == torch.float32 and dot_precision(x.dtype) == "ieee"),
        "BLOCK_M": bm, "BLOCK_R": rt, "OP_ELT": x.element_size(), "LORA_ELT": A.element_size(),
    }


# --------------------------------------------------------------------------------------------- launchers
_KEY = ["d_in", "d_out", "r", "E", "k", "t_bucket", "HAS_BASE", "PRECISION", "SLOTS", "BLOCK_M"]
_FWD = KernelLauncher(K._ps_fwd_kernel, K.sample_gemm_configs, _KEY + ["HAS_BB"], K.prune_sample_configs,
                      K.INTERPRET_SAMPLE_GEMM)
_PAIRS = KernelLauncher(K._ps_pairs_kernel, K.pairs_configs, [], None, K.INTERPRET_PAIRS, autotune=False)
_BWD = KernelLauncher(K._ps_bwd_kernel, K.sample_gemm_configs,
                      _KEY + ["T_IN_LOOP", "NEED_DX", "HAS_MAIN", "HAS_SIDE_A", "HAS_SIDE_B"], K.prune_sample_configs,
                      K.INTERPRET_SAMPLE_GEMM)


def sample_pairs(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs (n_samples k,) int32 sorted by expert, stable; pair_off (E + 1,) int32 first pair of each expert) of
    the per-sample routing topk_idx (n_samples, k): one launch of one program, no host sync."""
    P = topk_idx.numel()
    pairs = torch.empty(P, dtype=torch.int32, device=topk_idx.device)
    off = torch.empty(num_experts + 1, dtype=torch.int32, device=topk_idx.device)
    with device_ctx(topk_idx):
        _PAIRS(lambda m: (1,), idx_ptr=topk_idx, pairs_ptr=pairs, pair_off_ptr=off, P=P, E=num_experts,
               E_PAD=next_pow2(num_experts + 1))
    return pairs, off


def _split_scale(scale: float) -> tuple[float, float]:
    """scale = hi + lo with hi, lo fp32 values (kernel float arguments are fp32): exact to ~1e-15 relative."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return hi, struct.unpack("f", struct.pack("f", scale - hi))[0]


def moe_lora_sample_forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_w: torch.Tensor,
    scale: float,
    base_weight: torch.Tensor | None,
    base_bias: torch.Tensor | None,
    bias_a: torch.Tensor | None,
    bias_b: torch.Tensor | None,
    activation: str,
    tokens_per_sample: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns y (T, d_out) in x.dtype and h (T * k, r) fp32 (fp64 for fp64 x).

    topk_w: (n_samples, k) any float dtype; the kernels use gate = scale * topk_w.
    """
    check_moe_lora_launchable(x, A, B, base_weight)
    T, d_in = x.shape
    E, _, r = A.shape
    d_out = B.shape[2]
    n_samples, k = topk_idx.shape
    L = tokens_per_sample
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty(T, d_out, dtype=x.dtype, device=x.device)
    hpre = torch.empty(T * k, r, dtype=acc, device=x.device)
    if T == 0:
        return y, hpre
    meta = _meta(x, A, T, d_in, d_out, k, r, L, E)
    groups = n_groups(T, meta["BLOCK_M"], d_out, num_sms(x.device))
    has_base = base_weight is not None
    hi, lo = _split_scale(scale)
    with device_ctx(x):
        _FWD(
            lambda m: (triton.cdiv(T, m["BLOCK_M"]) * groups,),
            x_ptr=x, w0_ptr=base_weight if has_base else x, b0_ptr=base_bias if base_bias is not None else x,
            a_ptr=A, b_ptr=B, ba_ptr=bias_a if bias_a is not None else A, bb_ptr=bias_b if bias_b is not None else B,
            idx_ptr=topk_idx, w_ptr=topk_w, scale_hi=hi, scale_lo=lo, y_ptr=y, hpre_ptr=hpre, T=T, d_in=d_in,
            d_out=d_out, r=r, E=E, k=k, L=L,
            n_samples=n_samples, stride_x_t=x.stride(0), stride_y_t=y.stride(0), n_groups=groups,
            t_bucket=t_bucket(T), HAS_BASE=has_base, HAS_B0=base_bias is not None, HAS_BA=bias_a is not None,
            HAS_BB=bias_b is not None, ACTIVATION=ACTIVATION_CODES[activation], **meta,
        )
    return y, hpre


def _empty(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=device)


def moe_lora_sample_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_w: torch.Tensor,
    scale: float,
    hpre: torch.Tensor,
    base_weight: torch.Tensor | None,
    bias_a: torch.Tensor | None,
    bias_b: torch.Tensor | None,
    activation: str,
    tokens_per_sample: int,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dw: bool,
    need_dba: bool,
    need_dbb: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns (dx, dA, dB, d topk_w, d bias_a, d bias_b); a gradient not asked for is an
    empty tensor; each has its input's shape and dtype."""
    check_moe_lora_launchable(x, A, B, base_weight)
    T, d_in = x.shape
    E, _, r = A.shape
    d_out = B.shape[2]
    n_samples, k = topk_idx.shape
    L = tokens_per_sample
    dev = x.device
    acc = hpre.dtype
    need_dba = need_dba and bias_a is not None
    need_dbb = need_dbb and bias_b is not None
    dx = torch.empty_like(x) if need_dx else _empty(x.dtype, dev)
    dA = torch.empty_like(A) if need_dA else _empty(A.dtype, dev)
    dB = torch.empty_like(B) if need_dB else _empty(B.dtype, dev)
    dba = torch.empty_like(bias_a) if need_dba else _empty(acc, dev)
    dbb = torch.empty_like(bias_b) if need_dbb else _empty(acc, dev)
    dw = torch.empty_like(topk_w) if need_dw else _empty(topk_w.dtype, dev)
    if T == 0:
        for g, needed in ((dA, need_dA), (dB, need_dB), (dba, need_dba), (dbb, need_dbb), (dw, need_dw)):
            if needed:
                g.zero_()
        return dx, dA, dB, dw, dba, dbb
    meta = _meta(x, A, T, d_in, d_out, k, r, L, E)
    groups = n_groups(T, meta["BLOCK_M"], d_in, num_sms(dev)) if need_dx else 1
    plan = backward_plan(T, d_in, d_out, L, k, r, meta["BLOCK_M"], groups, x.dtype, need_dx, need_dA)
    need_t = need_dx or need_dA or need_dw or need_dba
    side_a = need_dA or need_dba or need_dw  # the per-expert reductions of D and of the d gate terms
    side_b = need_dB or need_dbb
    store_d = need_dA or need_dba or plan == "rank_first"
    d_rank = torch.empty(T * k, r, dtype=acc, device=dev) if store_d else hpre
    dgtok = torch.empty(T, k, dtype=acc, device=dev) if need_dw else hpre
    pairs, pair_off = sample_pairs(topk_idx, E) if (side_a or side_b) else (topk_idx, topk_idx)
    hi, lo = _split_scale(scale)
    common = dict(
        dy_ptr=dy, x_ptr=x, w0_ptr=base_weight if base_weight is not None else dy, a_ptr=A, b_ptr=B,
        bb_ptr=bias_b if bias_b is not None else B, idx_ptr=topk_idx, w_ptr=topk_w, scale_hi=hi, scale_lo=lo,
        hpre_ptr=hpre, d_ptr=d_rank, dgtok_ptr=dgtok, dx_ptr=dx if need_dx else dy, pairs_ptr=pairs,
        pair_off_ptr=pair_off, da_ptr=dA if need_dA else A, dba_ptr=dba if need_dba else A,
        dw_ptr=dw if need_dw else topk_w, db_ptr=dB if need_dB else B,
        dbb_ptr=dbb if need_dbb else B, T=T, d_in=d_in, d_out=d_out, r=r, E=E, k=k, L=L, n_samples=n_samples,
        stride_x_t=x.stride(0), stride_dy_t=dy.stride(0), stride_dx_t=dx.stride(0) if need_dx else 0,
        t_bucket=t_bucket(T), NEED_DGATE=need_dw, NEED_DA=need_dA, NEED_DBA=need_dba, NEED_DB=need_dB,
        NEED_DBB=need_dbb, HAS_BASE=base_weight is not None, HAS_BB=bias_b is not None,
        ACTIVATION=ACTIVATION_CODES[activation], **meta,
    )

    def launch(main: str | None, main_groups: int, a: bool, b: bool) -> None:
        """main: None, "rank" (t, D, d gate; dx too when the plan computes t in the dgrad) or "dgrad" (reads D)."""
        t_in_loop = main == "rank"
        with_dx = need_dx and (main == "dgrad" or (t_in_loop and plan == "t_in_dgrad"))

        def grid(m: dict[str, Any]) -> tuple[int]:
            n = triton.cdiv(T, m["BLOCK_M"]) * main_groups if main else 0
            n += E * (triton.cdiv(d_in, m["BLOCK_WN"]) if need_dA else 1) if a else 0
            n += E * triton.cdiv(d_out, m["BLOCK_WN"]) if b else 0
            return (n,)

        _BWD(grid, n_groups=main_groups, T_IN_LOOP=t_in_loop, NEED_DX=with_dx, STORE_D=store_d and t_in_loop,
             HAS_MAIN=main is not None, HAS_SIDE_A=a, HAS_SIDE_B=b, **common)

    fuse = _fuse_side()
    with device_ctx(x):
        if plan == "rank_first":  # need_dx
            launch("rank", 1, False, False)
            launch("dgrad", groups, side_a and fuse, side_b and fuse)
            if not fuse:
                for a, b in ((side_a, False), (False, side_b)):
                    if a or b:
                        launch(None, 0, a, b)
        else:
            if need_t:
                launch("rank", groups if need_dx else 1, False, side_b and fuse)
            if side_b and (not fuse or not need_t):
                launch(None, 0, False, True)
            if side_a:
                launch(None, 0, True, False)
    return dx, dA, dB, dw, dba, dbb


# --------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("igsp_kernels::moe_lora_sample_fwd", mutates_args=())
def _moe_lora_sample_fwd_op(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_w: torch.Tensor,
    scale: float,
    base_weight: torch.Tensor | None,
    base_bias: torch.Tensor | None,
    bias_a: torch.Tensor | None,
    bias_b: torch.Tensor | None,
    activation: str,
    tokens_per_sample: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return ensure_contiguous(moe_lora_sample_forward)(
        x, A, B, topk_idx, topk_w, scale, base_weight, base_bias, bias_a, bias_b, activation, tokens_per_sample)


@_moe_lora_sample_fwd_op.register_fake
def _(x, A, B, topk_idx, topk_w, scale, base_weight, base_bias, bias_a, bias_b, activation, tokens_per_sample):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[0], B.shape[2]), x.new_empty(x.shape[0] * topk_idx.shape[1], A.shape[2], dtype=acc)


@torch.library.custom_op("igsp_kernels::moe_lora_sample_bwd", mutates_args=())
def _moe_lora_sample_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_w: torch.Tensor,
    scale: float,
    hpre: torch.Tensor,
    base_weight: torch.Tensor | None,
    bias_a: torch.Tensor | None,
    bias_b: torch.Tensor | None,
    activation: str,
    tokens_per_sample: int,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dw: bool,
    need_dba: bool,
    need_dbb: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return ensure_contiguous(moe_lora_sample_backward)(
        dy, x, A, B, topk_idx, topk_w, scale, hpre, base_weight, bias_a, bias_b, activation, tokens_per_sample,
        need_dx, need_dA, need_dB, need_dw, need_dba, need_dbb,
    )


@_moe_lora_sample_bwd_op.register_fake
def _(dy, x, A, B, topk_idx, topk_w, scale, hpre, base_weight, bias_a, bias_b, activation, tokens_per_sample,
      need_dx, need_dA, need_dB, need_dw, need_dba, need_dbb):
    acc = hpre.dtype
    return (fake_grad(need_dx, x, x, x.dtype), fake_grad(need_dA, A, x, A.dtype), fake_grad(need_dB, B, x, B.dtype),
            fake_grad(need_dw, topk_w, x, topk_w.dtype), fake_grad(need_dba, bias_a, x, acc),
            fake_grad(need_dbb, bias_b, x, acc))


# --------------------------------------------------------------------------------------------- autograd
class MoELoRASampleFunction(torch.autograd.Function):
    """Autograd of the per-sample fused op. Saves x, the weights (references) and the fp32 pre-activation h; the
    pair metadata is rebuilt by the backward (one launch over n_samples k pairs; the forward needs none). The gate
    scale * topk_w is formed inside the kernels, so d topk_w comes back scaled and no torch op runs beside them."""

    @staticmethod
    def forward(ctx, x, A, B, topk_idx, topk_w, scale, base_weight, base_bias, activation, bias_a, bias_b,
                tokens_per_sample):
        y, hpre = torch.ops.igsp_kernels.moe_lora_sample_fwd(
            x, A, B, topk_idx, topk_w, scale, base_weight, base_bias, bias_a, bias_b, activation, tokens_per_sample)
        ctx.save_for_backward(x, A, B, topk_idx, topk_w, base_weight, bias_a, bias_b, hpre)
        ctx.scale = scale
        ctx.activation = activation
        ctx.tokens_per_sample = tokens_per_sample
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, topk_idx, topk_w, base_weight, bias_a, bias_b, hpre = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dba = bool(need[9]) and bias_a is not None
        need_dbb = bool(need[10]) and bias_b is not None
        dx, dA, dB, dw, dba, dbb = torch.ops.igsp_kernels.moe_lora_sample_bwd(
            dy, x, A, B, topk_idx, topk_w, ctx.scale, hpre, base_weight, bias_a, bias_b, ctx.activation,
            ctx.tokens_per_sample, bool(need[0]), bool(need[1]), bool(need[2]), bool(need[4]), need_dba, need_dbb,
        )
        return (
            dx if need[0] else None,  # x
            dA if need[1] else None,  # A
            dB if need[2] else None,  # B
            None,  # topk_idx
            dw if need[4] else None,  # topk_w
            None,  # scale
            None,  # base_weight (frozen)
            None,  # base_bias (frozen)
            None,  # activation
            dba if need_dba else None,  # bias_a
            dbb if need_dbb else None,  # bias_b
            None,  # tokens_per_sample
        )


def moe_lora_sample_triton(
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
    tokens_per_sample: int,
) -> torch.Tensor:
    """The per-sample path of `moe_lora_triton` (topk_idx / topk_w (T / L, k)); inputs validated upstream and
    `supports(...)` true. Returns y (T, d_out) in x.dtype, differentiable in x, A, B, topk_w and the expert biases.
    """
    return MoELoRASampleFunction.apply(x, A, B, topk_idx, topk_w, float(scale), base_weight, base_bias, activation,
                                       bias_a, bias_b, tokens_per_sample)
