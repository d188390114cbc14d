"""Fused MoE-LoRA in Triton: forward and backward of the routed LoRA experts, fused with the frozen base linear.

Semantics (METHOD.md section 2):
    y[t] = x[t] W0^T + b0 + sum_j gate[t,j] * (phi(x[t] A[e] + ba[e]) B[e] + bb[e]),  e = idx[t,j],
    gate = scale * topk_w (the scale is folded into the gate in torch, so d topk_w = scale * d gate by autograd).

Shapes: x (T, d_in) fp16/bf16/fp32/fp64; A (E, d_in, r); B (E, r, d_out); topk_idx (T, k) int32/int64;
topk_w (T, k) float; W0 (d_out, d_in) and b0 (d_out,) frozen and optional; ba (E, r), bb (E, d_out) optional.
Output y (T, d_out) in x.dtype; gradients in each input's dtype. Rows are tokens: this is the general path of
per-token routing. Per-sample routing (topk_idx (T / L, k), `tokens_per_sample=L`) goes to the per-sample kernels
(`igsp_kernels.ops.moe_lora_sample`), and reaches this path expanded to its tokens only when a tile's slot axis would
not fit (tiny L with a wide k). W0 arrives in x's dtype (functional.moe_lora's cached copy under autocast): no
kernel converts it inside a GEMM loop.

Plan (roofline reasoning in shared/KERNELS.md: the LoRA path is memory-bound alone and nearly free when it
rides on the base GEMM, so the big activations x, y, dy, dx are each written once and never as T x k x d_out):
    metadata  the T*k assignments sorted by expert and padded per expert to BLOCK_S-row blocks, the expert of each
              block, each expert's first block, the blocks in first-token order (a row's k gathers then run at
              about the same time and the later ones hit L2) and the tokens grouped by expert set (few experts
              per GEMM row tile) (`igsp_kernels.ops.routing.routing_metadata`): ~15 small torch ops, no host
              sync, computed once in forward and reused by backward.
    forward   1. shrink (expert-sorted blocks): h = x A_e + ba, fp32 rank intermediate (T*k, r).
              2. base GEMM x W0^T over row tiles in token_order, whose epilogue adds sum_e (gate * phi(h))_e B_e,
                 one (rows x r) @ (r x BLOCK_N) MMA per expert present in the tile (a bitmask, one reduction),
                 plus the biases; y is written once.
    backward  1. rank pass (expert-sorted blocks) over the gathered dy rows: t = dy B_e^T, D = gate t phi'(h),
                 d gate = <phi(h), t> + <dy, bb_e>, the bias partials and, at small rank (FUSE), the per-block
                 dB partial (gate phi(h))^T dy and the dA partial x^T D on the same pass.
              2. at larger rank (not FUSE) split-token weight-gradient GEMMs, one partial per chunk of blocks.
              3. deterministic segmented sum of the partials per expert (fixed order, no atomics).
              4. dgrad GEMM dy W0 whose epilogue adds sum_e D_e A_e^T; dx is written once.
Memory: saved for backward are x (a reference), the fp32 (T*k, r) rank intermediate and the int32 metadata;
backward allocates fp32 partials of size ~T*k/BLOCK_S x r x (d_in + d_out) (FUSE) or a chunk count of them.

Adapted ideas (own code): the sorted, block-aligned routing metadata and gathered-row expert GEMMs of ScatterMoE
(shawntan/scattermoe) and vLLM's fused_moe; keeping the rank intermediate in fp32 (vLLM LoRA ops); the
"t = dy B^T, dw = <h, t>" backward without saved expert outputs (KERNELS.md lesson 3).
"""

import logging
from dataclasses import dataclass
from typing import Any

import torch
import triton

from igsp_kernels.ops import _moe_lora_kernels as K
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
from igsp_kernels.ops.moe_lora_sample import moe_lora_sample_triton
from igsp_kernels.ops.moe_lora_sample import supports as supports_sample
from igsp_kernels.ops.routing import routing_metadata
from igsp_kernels.reference.routing import expand_sample_routing

__all__ = [
    "MoELoRAFunction",
    "fuse_weight_grads",
    "gpu_sort_block",
    "moe_lora_backward",
    "moe_lora_forward",
    "moe_lora_triton",
    "sort_block_size",
]

logger = logging.getLogger(__name__)

# Expert-sorted block sizes, largest first. Larger blocks mean fewer, smaller partials in backward (the per-block
# dB partial is 2*k*r/BLOCK_S of dy's bytes: 1/4 at r=16, BLOCK_S=256).
SORT_BLOCKS = (256, 128, 64, 32, 16)
# The rank pass keeps h, gate*phi(h) and t for BLOCK_S x BLOCK_R elements in registers: cap the product at 4096
# (16 fp32 registers per thread each at 8 warps).
MAX_BLOCK_ELEMENTS = 4096
# Rows per split-token partial in the unfused weight gradient: 1024 rows keep the partials ~1/16 of the operand
# while leaving T*k/1024 + E chunks, enough programs for 132 SMs at ViT-B/16 batch 64 (T*k = 25,216).
CHUNK_ROWS = 1024
#: Test-only overrides of the tiling policy ("sort_block", "fuse", "chunk_blocks", "index64"); use monkeypatch.
TUNING_OVERRIDES: dict[str, Any] = {}



# --------------------------------------------------------------------------------------------- policy
def sort_block_size(num_assign: int, rank: int, device: torch.device) -> int:
    """Rows per expert-sorted block (see `gpu_sort_block`); under the interpreter the smallest block (16), so
    that the experts of the tiny test problems span several blocks."""
    if "sort_block" in TUNING_OVERRIDES:
        return int(TUNING_OVERRIDES["sort_block"])
    if interpreting() or device.type != "cuda":
        return SORT_BLOCKS[-1]
    return gpu_sort_block(num_assign, rank, num_sms(device))


def gpu_sort_block(num_assign: int, rank: int, sms: int) -> int:
    """The largest block that still gives a full wave of blocks (>= one per SM) and fits the rank pass registers."""
    rank_tile = max(16, next_pow2(rank))
    for block in SORT_BLOCKS:
        if block * rank_tile <= MAX_BLOCK_ELEMENTS and num_assign >= sms * block:
            return block
    return SORT_BLOCKS[-1]


def fuse_weight_grads(block: int, rank: int) -> bool:
    """Compute the dA/dB partials on the rank pass (one partial per block) or in separate chunked GEMMs.

    Fused reads dy k times and writes/reads partials of 2*(2*k*r/BLOCK_S) dy-sizes; unfused reads dy 2*k times
    with small partials. Fusion wins when 4*r < BLOCK_S (r = 16 with BLOCK_S >= 128).
    """
    if "fuse" in TUNING_OVERRIDES:
        return bool(TUNING_OVERRIDES["fuse"])
    return 4 * rank < block


def _chunk_blocks(block: int) -> int:
    if "chunk_blocks" in TUNING_OVERRIDES:
        return int(TUNING_OVERRIDES["chunk_blocks"])
    return max(1, CHUNK_ROWS // block)


def _expert_tile(E: int) -> int:
    """Lanes for the per-expert offset vectors: 64 up to 64 experts (one compiled variant for every pool size the
    method uses; the vectors are a few hundred bytes), the next power of two beyond."""
    return max(64, next_pow2(E))


@dataclass(frozen=True)
class _Dims:
    T: int
    d_in: int
    d_out: int
    r: int
    E: int
    k: int

    @classmethod
    def of(cls, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, topk_idx: torch.Tensor) -> "_Dims":
        return cls(x.shape[0], x.shape[1], B.shape[2], A.shape[2], A.shape[0], topk_idx.shape[1])


def _common_meta(dims: _Dims, x: torch.Tensor, num_blocks: int, num_partials: int = 0) -> dict[str, Any]:
    """Constexprs shared by every kernel of one call."""
    big = max(
        dims.T * max(dims.d_in, dims.d_out),
        dims.T * dims.k * max(16, next_pow2(dims.r)),
        max(num_blocks, num_partials) * dims.r * max(dims.d_in, dims.d_out),
    )
    index64 = bool(TUNING_OVERRIDES.get("index64", big > INT32_LIMIT))
    return {
        "OP_DT": op_tl_dtype(x.dtype),
        "ACC_DT": acc_tl_dtype(x.dtype),
        "PRECISION": dot_precision(x.dtype),
        "INDEX_64": index64,
    }


# --------------------------------------------------------------------------------------------- launchers
_SHRINK = KernelLauncher(K._moe_lora_shrink_kernel, K.shrink_configs, ["d_in", "r", "E", "t_bucket", "BLOCK_S"],
                         K.prune_shrink_configs, K.INTERPRET_SHRINK)
# Autotune keys: model dims and the bucketed token count only, never routing counts (STYLE C2); tensor dtypes are
# added by the autotuner itself.
_GEMM_KEY = ["d_in", "d_out", "r", "E", "t_bucket", "HAS_BASE", "PRECISION"]
_FWD = KernelLauncher(K._moe_lora_fwd_kernel, K.gemm_configs, _GEMM_KEY, K.prune_gemm_configs, K.INTERPRET_GEMM)
_RANK = KernelLauncher(K._moe_lora_bwd_rank_kernel, K.rank_configs,
                       ["d_in", "d_out", "r", "E", "t_bucket", "BLOCK_S", "FUSE"], K.prune_rank_configs,
                       K.INTERPRET_RANK)
_DW = KernelLauncher(K._moe_lora_bwd_dw_kernel, K.dw_configs, ["N", "r", "E", "t_bucket", "BLOCK_S", "COEF_GATED"],
                     K.prune_dw_configs, K.INTERPRET_DW)
_REDUCE = KernelLauncher(K._moe_lora_reduce_kernel, K.reduce_configs, ["M"], None, K.INTERPRET_REDUCE)
_DX = KernelLauncher(K._moe_lora_bwd_dx_kernel, K.gemm_configs, _GEMM_KEY, K.prune_gemm_configs, K.INTERPRET_GEMM)


def _segment_sum(part: torch.Tensor, blk_off: torch.Tensor, out: torch.Tensor, cb: int, index64: bool) -> None:
    """out[e] = sum of expert e's partials (part rows grouped cb blocks at a time), in a fixed order."""
    E, M = out.shape
    if E == 0 or M == 0:
        return
    _REDUCE(lambda meta: (E, triton.cdiv(M, meta["BLOCK_N"])), part_ptr=part, out_ptr=out, blk_off_ptr=blk_off,
            M=M, E=E, CB=cb, INDEX_64=index64, BLOCK_E=_expert_tile(E))


def moe_lora_forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    gate: torch.Tensor,
    sorted_assign: torch.Tensor,
    block_expert: torch.Tensor,
    block_order: torch.Tensor,
    token_order: torch.Tensor,
    base_weight: torch.Tensor | None,
    base_bias: torch.Tensor | None,
    bias_a: torch.Tensor | None,
    bias_b: torch.Tensor | None,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns y (T, d_out) x.dtype and the rank intermediate h (T*k, r) fp32/fp64.

    gate: (T, k) fp32/fp64 = scale * topk_w; the metadata tensors come from `routing_metadata`.
    """
    check_moe_lora_launchable(x, A, B, base_weight)
    dims = _Dims.of(x, A, B, topk_idx)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty(dims.T, dims.d_out, dtype=x.dtype, device=x.device)
    hpre = torch.empty(dims.T * dims.k, dims.r, dtype=acc, device=x.device)
    nb = block_expert.numel()
    if dims.T == 0:
        return y, hpre
    block = sorted_assign.numel() // nb
    meta = _common_meta(dims, x, nb)
    rank_tile = max(16, next_pow2(dims.r))
    with device_ctx(x):
        _SHRINK(
            lambda m: (nb,),
            x_ptr=x, a_ptr=A, ba_ptr=bias_a if bias_a is not None else hpre, hpre_ptr=hpre,
            sorted_ptr=sorted_assign, block_expert_ptr=block_expert, block_order_ptr=block_order,
            d_in=dims.d_in, r=dims.r, E=dims.E, k=dims.k, stride_x_t=x.stride(0), t_bucket=t_bucket(dims.T),
            HAS_BA=bias_a is not None, BLOCK_S=block, BLOCK_R=rank_tile, **meta,
        )
        has_base = base_weight is not None
        _FWD(
            lambda m: (triton.cdiv(dims.T, m["BLOCK_M"]) * triton.cdiv(dims.d_out, m["BLOCK_N"]),),
            x_ptr=x, w0_ptr=base_weight if has_base else x, b0_ptr=base_bias if base_bias is not None else x,
            b_ptr=B, bb_ptr=bias_b if bias_b is not None else x, hpre_ptr=hpre, idx_ptr=topk_idx, gate_ptr=gate,
            y_ptr=y, token_order_ptr=token_order, T=dims.T, d_in=dims.d_in, d_out=dims.d_out, r=dims.r, E=dims.E,
            k=dims.k,
            stride_x_t=x.stride(0), stride_w0_n=base_weight.stride(0) if has_base else 0, stride_y_t=y.stride(0),
            t_bucket=t_bucket(dims.T), N_OUT=dims.d_out, HAS_BASE=has_base, HAS_B0=base_bias is not None,
            HAS_BB=bias_b is not None, ACTIVATION=ACTIVATION_CODES[activation], BLOCK_R=rank_tile,
            BLOCK_J=next_pow2(dims.k), **meta,
        )
    return y, hpre


def _empty(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=device)


def moe_lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    gate: torch.Tensor,
    hpre: torch.Tensor,
    sorted_assign: torch.Tensor,
    block_expert: torch.Tensor,
    expert_block_off: torch.Tensor,
    block_order: torch.Tensor,
    token_order: torch.Tensor,
    base_weight: torch.Tensor | None,
    bias_a: torch.Tensor | None,
    bias_b: torch.Tensor | None,
    activation: str,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dgate: bool,
    need_dba: bool,
    need_dbb: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns (dx, dA, dB, dgate, d bias_a, d bias_b); a gradient not asked for is an empty
    tensor. dgate is (T, k) in the accumulation dtype; the others have their input's shape and dtype."""
    check_moe_lora_launchable(x, A, B, base_weight)
    dims = _Dims.of(x, A, B, topk_idx)
    dev = x.device
    acc = hpre.dtype
    dx = torch.empty_like(x) if need_dx else _empty(x.dtype, dev)
    dA = torch.empty_like(A) if need_dA else _empty(A.dtype, dev)
    dB = torch.empty_like(B) if need_dB else _empty(B.dtype, dev)
    dgate = torch.empty(dims.T, dims.k, dtype=acc, device=dev) if need_dgate else _empty(acc, dev)
    dba = torch.empty_like(bias_a) if (need_dba and bias_a is not None) else _empty(acc, dev)
    dbb = torch.empty_like(bias_b) if (need_dbb and bias_b is not None) else _empty(acc, dev)
    need_dba = need_dba and bias_a is not None
    need_dbb = need_dbb and bias_b is not None
    nb = block_expert.numel()
    if dims.T == 0 or nb == 0:
        for g, needed in ((dA, need_dA), (dB, need_dB), (dba, need_dba), (dbb, need_dbb)):
            if needed:
                g.zero_()
        if need_dx:
            dx.zero_()
        return dx, dA, dB, dgate, dba, dbb
    block = sorted_assign.numel() // nb
    fuse = fuse_weight_grads(block, dims.r)
    cb = _chunk_blocks(block)
    num_chunks = triton.cdiv(nb, cb) + min(dims.E, nb)
    meta = _common_meta(dims, x, nb, num_chunks)
    rank_tile = max(16, next_pow2(dims.r))
    bucket = t_bucket(dims.T)
    need_d = need_dx or (need_dA and not fuse)
    need_t = need_d or need_dgate or need_dba or need_dA
    d_rank = torch.empty(dims.T * dims.k, dims.r, dtype=acc, device=dev) if need_d else hpre
    dgate_flat = dgate if need_dgate else hpre
    pda = torch.empty(nb, dims.d_in, dims.r, dtype=acc, device=dev) if (fuse and need_dA) else hpre
    pdb = torch.empty(nb, dims.r, dims.d_out, dtype=acc, device=dev) if (fuse and need_dB) else hpre
    pdba = torch.empty(nb, dims.r, dtype=acc, device=dev) if need_dba else hpre
    pdbb = torch.empty(nb, dims.d_out, dtype=acc, device=dev) if need_dbb else hpre
    with device_ctx(x):
        if need_t or need_dbb or (fuse and need_dB):  # else the rank pass would read dy for nothing
            _RANK(
                lambda m: (nb,),
                x_ptr=x, dy_ptr=dy, b_ptr=B, bb_ptr=bias_b if bias_b is not None else hpre, hpre_ptr=hpre,
                gate_ptr=gate, sorted_ptr=sorted_assign, block_expert_ptr=block_expert,
                block_order_ptr=block_order, d_ptr=d_rank,
                dgate_ptr=dgate_flat, pda_ptr=pda, pdb_ptr=pdb, pdba_ptr=pdba, pdbb_ptr=pdbb,
                d_in=dims.d_in, d_out=dims.d_out, r=dims.r, E=dims.E, k=dims.k, stride_x_t=x.stride(0),
                stride_dy_t=dy.stride(0), t_bucket=bucket, HAS_BB=bias_b is not None,
                ACTIVATION=ACTIVATION_CODES[activation], NEED_T=need_t, NEED_D=need_d, NEED_DGATE=need_dgate,
                NEED_DA=need_dA, NEED_DB=need_dB, NEED_DBA=need_dba, NEED_DBB=need_dbb, FUSE=fuse,
                BLOCK_S=block, BLOCK_R=rank_tile, **meta,
            )
        index64 = meta["INDEX_64"]
        if need_dA:
            if fuse:
                _segment_sum(pda, expert_block_off, dA.view(dims.E, -1), 1, index64)
            else:
                part = torch.empty(num_chunks, dims.d_in * dims.r, dtype=acc, device=dev)
                _DW(
                    lambda m: (num_chunks, triton.cdiv(dims.d_in, m["BLOCK_N"])),
                    act_ptr=x, coef_ptr=d_rank, gate_ptr=gate, sorted_ptr=sorted_assign, blk_off_ptr=expert_block_off,
                    part_ptr=part, N=dims.d_in, r=dims.r, E=dims.E, k=dims.k, CB=cb, stride_act_t=x.stride(0),
                    stride_p_n=dims.r, stride_p_r=1, t_bucket=bucket, COEF_GATED=False, ACTIVATION=0,
                    BLOCK_S=block, BLOCK_R=rank_tile, BLOCK_E=_expert_tile(dims.E), **meta,
                )
                _segment_sum(part, expert_block_off, dA.view(dims.E, -1), cb, index64)
        if need_dB:
            if fuse:
                _segment_sum(pdb, expert_block_off, dB.view(dims.E, -1), 1, index64)
            else:
                part = torch.empty(num_chunks, dims.r * dims.d_out, dtype=acc, device=dev)
                _DW(
                    lambda m: (num_chunks, triton.cdiv(dims.d_out, m["BLOCK_N"])),
                    act_ptr=dy, coef_ptr=hpre, gate_ptr=gate, sorted_ptr=sorted_assign, blk_off_ptr=expert_block_off,
                    part_ptr=part, N=dims.d_out, r=dims.r, E=dims.E, k=dims.k, CB=cb, stride_act_t=dy.stride(0),
                    stride_p_n=1, stride_p_r=dims.d_out, t_bucket=bucket, COEF_GATED=True,
                    ACTIVATION=ACTIVATION_CODES[activation], BLOCK_S=block, BLOCK_R=rank_tile,
                    BLOCK_E=_expert_tile(dims.E), **meta,
                )
                _segment_sum(part, expert_block_off, dB.view(dims.E, -1), cb, index64)
        if need_dba:
            _segment_sum(pdba, expert_block_off, dba, 1, index64)
        if need_dbb:
            _segment_sum(pdbb, expert_block_off, dbb, 1, index64)
        if need_dx:
            has_base = base_weight is not None
            _DX(
                lambda m: (triton.cdiv(dims.T, m["BLOCK_M"]) * triton.cdiv(dims.d_in, m["BLOCK_N"]),),
                dy_ptr=dy, w0_ptr=base_weight if has_base else dy, a_ptr=A, d_ptr=d_rank, idx_ptr=topk_idx,
                dx_ptr=dx, token_order_ptr=token_order, T=dims.T, d_in=dims.d_in, d_out=dims.d_out, r=dims.r,
                E=dims.E, k=dims.k,
                stride_dy_t=dy.stride(0), stride_w0_n=base_weight.stride(0) if has_base else 0,
                stride_dx_t=dx.stride(0), t_bucket=bucket, N_OUT=dims.d_in, HAS_BASE=has_base,
                BLOCK_R=rank_tile, BLOCK_J=next_pow2(dims.k), **meta,
            )
    return dx, dA, dB, dgate, dba, dbb


# --------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("igsp_kernels::moe_lora_fwd", mutates_args=())
def _moe_lora_fwd_op(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    gate: torch.Tensor,
    sorted_assign: torch.Tensor,
    block_expert: torch.Tensor,
    block_order: torch.Tensor,
    token_order: torch.Tensor,
    base_weight: torch.Tensor | None,
    base_bias: torch.Tensor | None,
    bias_a: torch.Tensor | None,
    bias_b: torch.Tensor | None,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return ensure_contiguous(moe_lora_forward)(
        x, A, B, topk_idx, gate, sorted_assign, block_expert, block_order, token_order, base_weight, base_bias,
        bias_a, bias_b, activation,
    )


@_moe_lora_fwd_op.register_fake
def _(x, A, B, topk_idx, gate, sorted_assign, block_expert, block_order, token_order, base_weight, base_bias,
      bias_a, bias_b, activation):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    T, k = topk_idx.shape
    return x.new_empty(T, B.shape[2]), x.new_empty(T * k, A.shape[2], dtype=acc)


@torch.library.custom_op("igsp_kernels::moe_lora_bwd", mutates_args=())
def _moe_lora_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    gate: torch.Tensor,
    hpre: torch.Tensor,
    sorted_assign: torch.Tensor,
    block_expert: torch.Tensor,
    expert_block_off: torch.Tensor,
    block_order: torch.Tensor,
    token_order: torch.Tensor,
    base_weight: torch.Tensor | None,
    bias_a: torch.Tensor | None,
    bias_b: torch.Tensor | None,
    activation: str,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dgate: bool,
    need_dba: bool,
    need_dbb: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return ensure_contiguous(moe_lora_backward)(
        dy, x, A, B, topk_idx, gate, hpre, sorted_assign, block_expert, expert_block_off, block_order, token_order,
        base_weight, bias_a, bias_b, activation, need_dx, need_dA, need_dB, need_dgate, need_dba, need_dbb,
    )


@_moe_lora_bwd_op.register_fake
def _(dy, x, A, B, topk_idx, gate, hpre, sorted_assign, block_expert, expert_block_off, block_order, token_order,
      base_weight, bias_a, bias_b, activation, need_dx, need_dA, need_dB, need_dgate, need_dba, need_dbb):
    acc = hpre.dtype
    dgate = x.new_empty(topk_idx.shape, dtype=acc) if need_dgate else x.new_empty(0, dtype=acc)
    return (fake_grad(need_dx, x, x, x.dtype), fake_grad(need_dA, A, x, A.dtype), fake_grad(need_dB, B, x, B.dtype),
            dgate, fake_grad(need_dba, bias_a, x, acc), fake_grad(need_dbb, bias_b, x, acc))


# --------------------------------------------------------------------------------------------- autograd
class MoELoRAFunction(torch.autograd.Function):
    """Autograd of the fused op. Saves x (a reference), the fp32 rank intermediate and the routing metadata;
    recomputes nothing big and never stores expert outputs (backward uses t = dy B^T, KERNELS.md lesson 3)."""

    @staticmethod
    def forward(ctx, x, A, B, topk_idx, gate, base_weight, base_bias, activation, bias_a, bias_b):
        T, k = topk_idx.shape
        E, _, r = A.shape
        block = sort_block_size(T * k, r, x.device)
        sorted_assign, _, block_expert, expert_block_off, block_order, token_order = routing_metadata(
            topk_idx, E, block)
        y, hpre = torch.ops.igsp_kernels.moe_lora_fwd(
            x, A, B, topk_idx, gate, sorted_assign, block_expert, block_order, token_order, base_weight, base_bias,
            bias_a, bias_b, activation,
        )
        ctx.save_for_backward(x, A, B, topk_idx, gate, base_weight, bias_a, bias_b, hpre, sorted_assign,
                              block_expert, expert_block_off, block_order, token_order)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, A, B, topk_idx, gate, base_weight, bias_a, bias_b, hpre, sorted_assign, block_expert,
         expert_block_off, block_order, token_order) = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dba = bool(need[8]) and bias_a is not None
        need_dbb = bool(need[9]) and bias_b is not None
        dx, dA, dB, dgate, dba, dbb = torch.ops.igsp_kernels.moe_lora_bwd(
            dy, x, A, B, topk_idx, gate, hpre, sorted_assign, block_expert, expert_block_off, block_order,
            token_order, base_weight, bias_a, bias_b, ctx.activation, bool(need[0]), bool(need[1]), bool(need[2]),
            bool(need[4]), need_dba, need_dbb,
        )
        return (
            dx if need[0] else None,  # x
            dA if need[1] else None,  # A
            dB if need[2] else None,  # B
            None,  # topk_idx
            dgate if need[4] else None,  # gate
            None,  # base_weight (frozen)
            None,  # base_bias (frozen)
            None,  # activation
            dba if need_dba else None,  # bias_a
            dbb if need_dbb else None,  # bias_b
        )


def moe_lora_triton(
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
    """Backend entry (`TritonBackend.table["moe_lora"]`); inputs already validated by `igsp_kernels.moe_lora`.

    Semantics: y = x W0^T + b0 + scale * sum_j w[:, j] (phi(x A[e_j] + ba[e_j]) B[e_j] + bb[e_j]).
    Returns y (T, d_out) in x.dtype, differentiable in x, A, B, topk_w, bias_a, bias_b.
    """
    if tokens_per_sample > 1:
        if supports_sample(x.shape[0], tokens_per_sample, topk_idx.shape[1], A.shape[2]):
            return moe_lora_sample_triton(x, A, B, topk_idx, topk_w, base_weight, base_bias, scale, activation,
                                          bias_a, bias_b, tokens_per_sample)
        # tiny L with a wide k: the slot axis would not fit a tile's registers; the token path takes it
        topk_idx, topk_w = expand_sample_routing(topk_idx, topk_w, tokens_per_sample)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    # The scale rides in the gate: the kernels never see a python float, so fp64 runs stay exact (a float kernel
    # argument would be rounded to fp32), and d topk_w = scale * d gate comes from autograd for free.
    gate = topk_w.to(acc) * scale
    return MoELoRAFunction.apply(x, A, B, topk_idx, gate, base_weight, base_bias, activation, bias_a, bias_b)
