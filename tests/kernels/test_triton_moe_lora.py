"""Fused MoE-LoRA Triton kernels against the reference: forward and every gradient, edge cases, dtypes, paths.

Runs under TRITON_INTERPRET=1 on the CPU (marker `interpret`) and compiled on a GPU (marker `gpu`); see conftest.
The oracle is `moe_lora_ref` on float64 copies of the inputs; low precision is judged relative to the eager loop
(`moe_lora_loop`) run in that precision (STYLE rule 8).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA device", allow_module_level=True)

import igsp_kernels as ik  # noqa: E402
from igsp_kernels.ops import moe_lora as ml  # noqa: E402
from igsp_kernels.reference import moe_lora_loop, moe_lora_ref  # noqa: E402
from igsp_kernels.testing import (  # noqa: E402
    MOE_LORA_EDGE_CASES,
    MoELoRACase,
    assert_close_lowp,
    make_moe_lora_inputs,
    tolerance,
)

CASES = {c.name: c for c in MOE_LORA_EDGE_CASES}


def run(inp, dy, fn, backend=None):
    """(y, grads of every leaf) of one implementation, with dy as the shared output gradient (STYLE G1)."""
    if backend is not None:
        y = ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend=backend, **inp.kwargs())
    else:
        y = fn(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, **inp.ref_kwargs())
    grads = torch.autograd.grad(y, inp.leaves(), dy.to(y.dtype), allow_unused=True)
    return y, grads


def reference64(inp, dy):
    return run(inp.to(torch.float64, "cpu"), dy.double().cpu(), moe_lora_ref)


def check_exact(case: MoELoRACase, device, dtype=torch.float32, **features):
    """ours vs the float64 reference with the per-dtype tolerance (fp32, fp64)."""
    inp = make_moe_lora_inputs(case, dtype=dtype, device=device, **features)
    dy = torch.randn(case.T, case.d_out, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    y, grads = run(inp, dy, None, backend="triton")
    y_ref, grads_ref = reference64(inp, dy)
    atol, rtol = tolerance(dtype, max(case.d_in, case.d_out, case.T))
    assert y.dtype == dtype and y.shape == (case.T, case.d_out)
    torch.testing.assert_close(y.cpu().double(), y_ref, atol=atol, rtol=rtol, msg=lambda m: f"y: {m}")
    for name, g, g_ref, leaf in zip(inp.leaf_names(), grads, grads_ref, inp.leaves()):
        assert g is not None and g.dtype == leaf.dtype and g.shape == leaf.shape, name
        torch.testing.assert_close(g.cpu().double(), g_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


# ----------------------------------------------------------------------------------- fp32 against the reference
@pytest.mark.parametrize("case", MOE_LORA_EDGE_CASES, ids=lambda c: c.name)
def test_edge_cases_fp32(case, device, no_tf32):
    # base linear + bias + expert biases: every gradient path of the op is live
    check_exact(case, device, base=True, expert_bias=True)


@pytest.mark.parametrize("features", [
    dict(base=False, expert_bias=True, activation="relu"),  # MoE-Adapters parity: parallel adapter, ReLU, biases
    dict(base=True, expert_bias=False, activation="identity"),  # plain LoRA on a frozen linear, no expert biases
    dict(base=False, expert_bias=False, activation="relu"),  # no base and no biases: the LoRA path alone
], ids=["adapter_relu", "lora", "relu_only"])
@pytest.mark.parametrize("case_name", ["odd", "per_sample"])
def test_feature_combinations_fp32(case_name, features, device, no_tf32):
    check_exact(CASES[case_name], device, **features)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused_wgrad", "split_wgrad"])
def test_weight_gradient_paths(fuse, device, no_tf32, monkeypatch):
    # Both weight-gradient strategies (per-block partials on the rank pass / chunked GEMMs), with chunks of 2
    # blocks so one expert's 40 rows (3 blocks of 16) make two partials, reduced in a fixed order.
    monkeypatch.setitem(ml.TUNING_OVERRIDES, "fuse", fuse)
    monkeypatch.setitem(ml.TUNING_OVERRIDES, "chunk_blocks", 2)
    check_exact(CASES["one_expert"], device, base=True, expert_bias=True, activation="relu")


def test_int64_offsets_path(device, no_tf32, monkeypatch):
    # The int64 row-offset code (used when T * d >= 2**31) is forced on at a small size to check its indexing.
    monkeypatch.setitem(ml.TUNING_OVERRIDES, "index64", True)
    monkeypatch.setitem(ml.TUNING_OVERRIDES, "fuse", False)
    check_exact(CASES["odd"], device, base=True, expert_bias=True)
    monkeypatch.setitem(ml.TUNING_OVERRIDES, "fuse", True)
    check_exact(CASES["odd"], device, base=False, expert_bias=False)


@pytest.mark.parametrize("which", [0, -1], ids=["first_configs", "last_configs"])
def test_shipped_gpu_configs(which, device, no_tf32, monkeypatch):
    # The interpreter normally runs small tiles; here every kernel runs a shipped GPU config instead (the pinned
    # default and the smallest), so their tile sizes, masks and loop bounds are checked too (T = 37 < one tile).
    from igsp_kernels.ops import _moe_lora_kernels as K
    from igsp_kernels.ops import _utils

    for name, configs in (("_moe_lora_fwd_kernel", K.gemm_configs), ("_moe_lora_bwd_dx_kernel", K.gemm_configs),
                          ("_moe_lora_shrink_kernel", K.shrink_configs), ("_moe_lora_bwd_rank_kernel", K.rank_configs),
                          ("_moe_lora_bwd_dw_kernel", K.dw_configs), ("_moe_lora_reduce_kernel", K.reduce_configs)):
        monkeypatch.setitem(_utils.CONFIG_OVERRIDES, name, configs()[which])
    monkeypatch.setitem(ml.TUNING_OVERRIDES, "fuse", which == 0)
    check_exact(CASES["odd"], device, base=True, expert_bias=True, activation="relu")


def test_float64(device):
    # fp64 runs fp64 MMAs and accumulators end to end: agreement to ~1e-12 shows no hidden fp32 step (the scale
    # rides in the gate tensor, never as an fp32 kernel argument).
    check_exact(CASES["per_sample"], device, dtype=torch.float64, base=True, expert_bias=True, activation="relu")


def test_gradcheck_float64(device):
    # The autograd Function's algebra in fp64 against finite differences (fast mode: random projections).
    case = MoELoRACase("tiny", 5, 6, 7, 3, 3, 2)
    inp = make_moe_lora_inputs(case, dtype=torch.float64, device=device, base=True, expert_bias=True,
                               activation="relu")
    # keep the ReLU inputs away from 0 so the finite differences never straddle the kink
    with torch.no_grad():
        inp.bias_a.add_(torch.sign(inp.bias_a) * 2.0)

    def f(x, A, B, w, ba, bb):
        return ik.moe_lora(x, A, B, inp.topk_idx, w, base_weight=inp.base_weight, base_bias=inp.base_bias,
                           scale=0.7, activation="relu", expert_bias=(ba, bb), backend="triton")

    assert torch.autograd.gradcheck(f, tuple(inp.leaves()), fast_mode=True, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------ low precision vs eager
def check_lowp(case: MoELoRACase, device, dtype, param_dtype=None, **features):
    inp = make_moe_lora_inputs(case, dtype=dtype, param_dtype=param_dtype, device=device, **features)
    dy = torch.randn(case.T, case.d_out, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    # fp32 master parameters beside low-precision activations is the autocast layout (refused outside autocast)
    with torch.autocast(device.type, dtype=dtype, enabled=param_dtype is not None and param_dtype != dtype):
        y, grads = run(inp, dy, None, backend="triton")
    eager_inp = inp.to(dtype, "cpu", param_dtype=param_dtype)
    y_eager, grads_eager = run(eager_inp, dy.cpu(), moe_lora_loop)
    y_ref, grads_ref = reference64(inp, dy)
    atol, _ = tolerance(dtype, max(case.d_in, case.d_out, case.T))
    assert y.dtype == dtype
    assert_close_lowp(y.cpu(), y_ref, y_eager, atol, "y")
    for name, g, ge, gr, leaf in zip(inp.leaf_names(), grads, grads_eager, grads_ref, inp.leaves()):
        assert g.dtype == leaf.dtype, f"d{name} has dtype {g.dtype}, its input {leaf.dtype}"
        assert_close_lowp(g.cpu(), gr, ge, atol, f"d{name}")


@pytest.mark.parametrize("case_name", ["odd", "per_sample", "empty_expert"])
def test_float16_relative_to_eager(case_name, device):
    check_lowp(CASES[case_name], device, torch.float16, base=True, expert_bias=True)


def test_bfloat16_relative_to_eager(device):
    # Under the interpreter bf16 operands are widened to fp32 (it multiplies bf16 on raw bits), so this checks the
    # bf16 loads, stores and dtype plumbing there, and the bf16 tensor-core path on a GPU.
    check_lowp(CASES["odd"], device, torch.bfloat16, base=True, expert_bias=True, activation="relu")


def test_fp32_params_with_low_precision_activations(device):
    # The autocast layout: fp32 expert parameters, fp16 activations. y and dx in fp16, dA/dB/biases in fp32.
    check_lowp(CASES["per_sample"], device, torch.float16, param_dtype=torch.float32, base=True, expert_bias=True)


# ------------------------------------------------------------------------------------------------ behaviour
def test_weight_gradients_are_deterministic(device):
    # Split-token partials + a fixed-order reduction, no atomics: two backward passes agree bitwise.
    inp = make_moe_lora_inputs(CASES["odd"], device=device, expert_bias=True)
    dy = torch.randn(inp.x.shape[0], inp.B.shape[2], device=device)
    first = run(inp, dy, None, backend="triton")[1]
    second = run(inp, dy, None, backend="triton")[1]
    for name, a, b in zip(inp.leaf_names(), first, second):
        assert torch.equal(a, b), f"d{name} differs between two identical backward passes"


@pytest.mark.parametrize("fuse", [True, False], ids=["fused_wgrad", "split_wgrad"])
def test_only_requested_gradients(fuse, device, no_tf32, monkeypatch):
    # x without grad (the first layer) and frozen A: the kernels skip dx / dA and stay correct; then B alone
    # (a fixed router): the rank pass has no t to compute (fused: only the dB partials; split: it is skipped).
    monkeypatch.setitem(ml.TUNING_OVERRIDES, "fuse", fuse)
    inp = make_moe_lora_inputs(CASES["odd"], device=device)
    inp.x.requires_grad_(False)
    inp.A.requires_grad_(False)
    ref = inp.to(torch.float64, "cpu")
    atol, rtol = tolerance(torch.float32, 64)
    for wanted in ([inp.B, inp.topk_w], [inp.B]):
        y = ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="triton", **inp.kwargs())
        got = torch.autograd.grad(y.sum(), wanted)
        y_ref = moe_lora_ref(ref.x, ref.A, ref.B, ref.topk_idx, ref.topk_w, **ref.ref_kwargs())
        want = torch.autograd.grad(y_ref.sum(), [ref.B, ref.topk_w][: len(wanted)])
        for g, g_ref in zip(got, want):
            torch.testing.assert_close(g.cpu().double(), g_ref, atol=atol, rtol=rtol)
        inp.topk_w.requires_grad_(False)
        ref.topk_w.requires_grad_(False)


def test_non_contiguous_input(device, no_tf32):
    # x as a row-strided view (a slice of a wider activation): the op makes it contiguous in one place.
    case = CASES["odd"]
    inp = make_moe_lora_inputs(case, device=device)
    wide = torch.randn(case.T, case.d_in + 7, device=device)
    x = wide[:, 3:3 + case.d_in]
    assert not x.is_contiguous()
    y = ik.moe_lora(x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="triton", **inp.kwargs())
    ref = inp.to(torch.float64, "cpu")
    y_ref = moe_lora_ref(x.cpu().double(), ref.A, ref.B, ref.topk_idx, ref.topk_w, **ref.ref_kwargs())
    atol, rtol = tolerance(torch.float32, case.d_in)
    torch.testing.assert_close(y.cpu().double(), y_ref, atol=atol, rtol=rtol)


def test_auto_dispatch_picks_triton(device):
    req = ik.OpRequest("moe_lora", torch.device(device), torch.float32)
    assert ik.available_backends(req)[0] == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="needs CUDA and compiled kernels")
def test_no_host_sync_on_gpu(monkeypatch):
    # The op (forward and backward) never synchronises with the host: CUDA's sync debug mode raises if it does.
    monkeypatch.setenv("IGSP_KERNELS_AUTOTUNE", "0")
    dev = torch.device("cuda")
    inp = make_moe_lora_inputs(MoELoRACase("sync", 512, 64, 96, 16, 8, 2), device=dev, expert_bias=True)
    dy = torch.randn(512, 96, device=dev)
    run(inp, dy, None, backend="triton")  # warm-up: compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = ml.moe_lora_triton(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, inp.base_weight, inp.base_bias,
                               0.5, "identity", inp.bias_a, inp.bias_b)
        torch.autograd.grad(y, inp.leaves(), dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
