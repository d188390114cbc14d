"""The per-sample Triton path (`tokens_per_sample=L`, routing (T / L, k)) against the reference: forward and every
gradient, both backward plans, fused and separate weight-gradient launches, dtypes, autocast, gradcheck.

Runs under TRITON_INTERPRET=1 on the CPU (marker `interpret`) and compiled on a GPU (marker `gpu`); see conftest.
The oracle is `moe_lora_ref` on float64 copies; low precision is judged relative to the eager loop in that precision
(STYLE rule 8). The shapes (`MOE_LORA_SAMPLE_CASES`) each say which boundary they hit: L a multiple of no block,
B = 1, a zero gate (a pruned expert), k = E, one expert taking every sample, tiles inside and across samples.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA device", allow_module_level=True)

import igsp_kernels as ik  # noqa: E402
from igsp_kernels.ops import moe_lora_sample as ms  # noqa: E402
from igsp_kernels.reference import moe_lora_loop, moe_lora_ref  # noqa: E402
from igsp_kernels.testing import (  # noqa: E402
    MOE_LORA_SAMPLE_CASES,
    MoELoRACase,
    assert_close_lowp,
    make_moe_lora_inputs,
    tolerance,
)

CASES = {c.name: c for c in MOE_LORA_SAMPLE_CASES}
PLANS = ["t_in_dgrad", "rank_first"]


def run(inp, dy, backend="triton"):
    """(y, grads of every leaf) of the public op, dy the shared output gradient (STYLE G1)."""
    y = ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend=backend, **inp.kwargs())
    return y, torch.autograd.grad(y, inp.leaves(), dy.to(y.dtype), allow_unused=True)


def reference64(inp, dy):
    ref = inp.to(torch.float64, "cpu")
    y = moe_lora_ref(ref.x, ref.A, ref.B, ref.topk_idx, ref.topk_w, **ref.ref_kwargs())
    return y, torch.autograd.grad(y, ref.leaves(), dy.double().cpu())


def output_grad(case: MoELoRACase, device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(case.T, case.d_out, generator=torch.Generator().manual_seed(1)).to(device, dtype)


def check_exact(case: MoELoRACase, device, dtype=torch.float32, **features):
    inp = make_moe_lora_inputs(case, dtype=dtype, device=device, per_sample=True, **features)
    assert inp.topk_idx.shape == (case.T // case.tokens_per_sample, case.k)  # no (T, k) routing anywhere
    dy = output_grad(case, device, dtype)
    y, grads = run(inp, dy)
    y_ref, grads_ref = reference64(inp, dy)
    atol, rtol = tolerance(dtype, max(case.d_in, case.d_out, case.T))
    assert y.dtype == dtype and y.shape == (case.T, case.d_out)
    torch.testing.assert_close(y.cpu().double(), y_ref, atol=atol, rtol=rtol, msg=lambda m: f"y: {m}")
    for name, g, g_ref, leaf in zip(inp.leaf_names(), grads, grads_ref, inp.leaves()):
        assert g is not None and g.dtype == leaf.dtype and g.shape == leaf.shape, name
        torch.testing.assert_close(g.cpu().double(), g_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


def uses_sample_kernels(monkeypatch) -> list[int]:
    """Count calls of the per-sample autograd Function (so a test fails if the op silently took the token path)."""
    calls = [0]
    orig = ms.MoELoRASampleFunction.apply

    def counted(*args):
        calls[0] += 1
        return orig(*args)

    monkeypatch.setattr(ms.MoELoRASampleFunction, "apply", counted)
    return calls


# ----------------------------------------------------------------------------------- fp32 against the reference
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("case", MOE_LORA_SAMPLE_CASES, ids=lambda c: c.name)
def test_edge_cases_fp32(case, plan, device, no_tf32, monkeypatch):
    # base linear + bias + expert biases + ReLU: every gradient path is live, under both backward plans
    monkeypatch.setitem(ms.TUNING_OVERRIDES, "plan", plan)
    calls = uses_sample_kernels(monkeypatch)
    check_exact(case, device, base=True, expert_bias=True, activation="relu")
    assert calls[0] == 1


@pytest.mark.parametrize("features", [
    dict(base=False, expert_bias=True, activation="relu"),  # MoE-Adapters parity: parallel adapter, ReLU, biases
    dict(base=True, expert_bias=False, activation="identity"),  # plain LoRA on a frozen linear
], ids=["adapter_relu", "lora"])
@pytest.mark.parametrize("plan", PLANS)
def test_feature_combinations_fp32(features, plan, device, no_tf32, monkeypatch):
    monkeypatch.setitem(ms.TUNING_OVERRIDES, "plan", plan)
    check_exact(CASES["odd_L"], device, **features)


@pytest.mark.parametrize("plan", PLANS)
def test_separate_weight_gradient_launches(plan, device, no_tf32, monkeypatch):
    # The weight-gradient programs in launches of their own instead of riding in the GEMM launch: same results.
    monkeypatch.setitem(ms.TUNING_OVERRIDES, "plan", plan)
    monkeypatch.setitem(ms.TUNING_OVERRIDES, "fuse_side", False)
    check_exact(CASES["long_L"], device, base=True, expert_bias=True, activation="relu")


@pytest.mark.parametrize("plan", PLANS)
def test_n_groups_split_the_output_columns(plan, device, no_tf32, monkeypatch):
    # 2 N-groups per row block (the small-batch policy): each group recomputes the shrink / t, only group 0
    # writes h, D and the d gate terms; d_out = 36 and d_in = 40 span 2 tiles of 32, so each group has one.
    monkeypatch.setitem(ms.TUNING_OVERRIDES, "plan", plan)
    monkeypatch.setitem(ms.TUNING_OVERRIDES, "groups", 2)
    check_exact(CASES["odd_L"], device, base=True, expert_bias=True, activation="relu")


def test_int64_offsets_path(device, no_tf32, monkeypatch):
    # The int64 row-offset code (used when T * d >= 2**31) forced on at a small size.
    monkeypatch.setitem(ms.TUNING_OVERRIDES, "index64", True)
    check_exact(CASES["odd_L"], device, base=True, expert_bias=True)


@pytest.mark.parametrize("which", [0, -1], ids=["first_config", "last_config"])
def test_shipped_gpu_configs(which, device, no_tf32, monkeypatch):
    # A shipped GPU config instead of the interpreter's (T = 39 < one tile of 32+ rows, d < one N tile): the tile
    # sizes, masks and loop bounds of the real configs, with the GPU row block of 32 rows.
    from igsp_kernels.ops import _moe_lora_sample_kernels as K
    from igsp_kernels.ops import _utils

    for name in ("_ps_fwd_kernel", "_ps_bwd_kernel"):
        monkeypatch.setitem(_utils.CONFIG_OVERRIDES, name, K.sample_gemm_configs()[which])
    monkeypatch.setitem(ms.TUNING_OVERRIDES, "row_block", 32)
    check_exact(CASES["odd_L"], device, base=True, expert_bias=True, activation="relu")


def test_float64(device):
    # fp64 end to end (fp64 MMAs and accumulators): agreement to ~1e-12 shows no hidden fp32 step.
    check_exact(CASES["long_L"], device, dtype=torch.float64, base=True, expert_bias=True, activation="relu")


@pytest.mark.parametrize("plan", PLANS)
def test_gradcheck_float64(plan, device, monkeypatch):
    # The per-sample autograd Function against finite differences (fast mode), both plans.
    monkeypatch.setitem(ms.TUNING_OVERRIDES, "plan", plan)
    case = MoELoRACase("tiny", 12, 6, 7, 3, 3, 2, routing="sample", tokens_per_sample=4)
    inp = make_moe_lora_inputs(case, dtype=torch.float64, device=device, base=True, expert_bias=True,
                               activation="relu", per_sample=True)
    with torch.no_grad():  # keep the ReLU inputs away from 0 so finite differences never straddle the kink
        inp.bias_a.add_(torch.sign(inp.bias_a) * 2.0)

    def f(x, A, B, w, ba, bb):
        return ik.moe_lora(x, A, B, inp.topk_idx, w, base_weight=inp.base_weight, base_bias=inp.base_bias,
                           scale=0.7, activation="relu", expert_bias=(ba, bb), tokens_per_sample=4, backend="triton")

    assert torch.autograd.gradcheck(f, tuple(inp.leaves()), fast_mode=True, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------ low precision vs eager
def check_lowp(case, device, dtype, param_dtype=None, **features):
    inp = make_moe_lora_inputs(case, dtype=dtype, param_dtype=param_dtype, device=device, per_sample=True,
                               **features)
    dy = output_grad(case, device, dtype)
    mixed = param_dtype is not None and param_dtype != dtype
    with torch.autocast(device.type, dtype=dtype, enabled=mixed):  # fp32 master weights: the autocast layout
        y, grads = run(inp, dy)
    eager = inp.to(dtype, "cpu", param_dtype=param_dtype)
    y_eager = moe_lora_loop(eager.x, eager.A, eager.B, eager.topk_idx, eager.topk_w, **eager.ref_kwargs())
    grads_eager = torch.autograd.grad(y_eager, eager.leaves(), dy.cpu())
    y_ref, grads_ref = reference64(inp, dy)
    atol, _ = tolerance(dtype, max(case.d_in, case.d_out, case.T))
    assert y.dtype == dtype
    assert_close_lowp(y.cpu(), y_ref, y_eager, atol, "y")
    for name, g, ge, gr, leaf in zip(inp.leaf_names(), grads, grads_eager, grads_ref, inp.leaves()):
        assert g.dtype == leaf.dtype, f"d{name} has dtype {g.dtype}, its input {leaf.dtype}"
        assert_close_lowp(g.cpu(), gr, ge, atol, f"d{name}")


@pytest.mark.parametrize("case_name", ["odd_L", "zero_gate"])
def test_float16_relative_to_eager(case_name, device):
    check_lowp(CASES[case_name], device, torch.float16, base=True, expert_bias=True)


def test_bfloat16_relative_to_eager(device):
    # Under the interpreter bf16 operands are widened to fp32; on a GPU this is the bf16 tensor-core path.
    check_lowp(CASES["long_L"], device, torch.bfloat16, base=True, expert_bias=True, activation="relu")


def test_autocast_fp32_master_weights(device):
    # What the trainer passes: fp32 A / B / biases and an fp32 frozen base under autocast, activations in the
    # autocast dtype. y and dx in that dtype, dA / dB / biases in fp32; the base weight reaches the kernels as its
    # cached low-precision copy.
    dtype = torch.bfloat16
    case = CASES["odd_L"]
    inp = make_moe_lora_inputs(case, dtype=dtype, param_dtype=torch.float32, device=device, per_sample=True,
                               base=True, expert_bias=True)
    inp.base_weight, inp.base_bias = inp.base_weight.float(), inp.base_bias.float()
    check = make_moe_lora_inputs(case, dtype=dtype, param_dtype=torch.float32, device=device, per_sample=True,
                                 base=True, expert_bias=True)
    dy = output_grad(case, device, dtype)
    with torch.autocast(device.type, dtype=dtype):
        y, grads = run(inp, dy)
        y_low, grads_low = run(check, dy)  # the same op with the base already in the compute dtype
    assert y.dtype == dtype and [g.dtype for g in grads] == [t.dtype for t in inp.leaves()]
    torch.testing.assert_close(y, y_low, atol=0, rtol=0)  # bitwise: the kernels saw the same bf16/fp16 weight
    for g, h in zip(grads, grads_low):
        torch.testing.assert_close(g, h, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("plan", PLANS)
def test_weight_gradients_are_deterministic(plan, device, monkeypatch):
    # Expert-major weight gradients written in a fixed order, no atomics: two backward passes agree bitwise.
    monkeypatch.setitem(ms.TUNING_OVERRIDES, "plan", plan)
    inp = make_moe_lora_inputs(CASES["odd_L"], device=device, expert_bias=True, per_sample=True)
    dy = output_grad(CASES["odd_L"], device)
    first = run(inp, dy)[1]
    second = run(inp, dy)[1]
    for name, a, b in zip(inp.leaf_names(), first, second):
        assert torch.equal(a, b), f"d{name} differs between two identical backward passes"


@pytest.mark.parametrize("plan", PLANS)
def test_only_requested_gradients(plan, device, no_tf32, monkeypatch):
    # x without grad (the first adapted layer) and a frozen A: no dx / dA launch work, the rest stays right; then
    # B alone (a fixed router) and the gates alone (frozen experts: only the rank pass runs).
    monkeypatch.setitem(ms.TUNING_OVERRIDES, "plan", plan)
    case = CASES["odd_L"]
    inp = make_moe_lora_inputs(case, device=device, expert_bias=True, per_sample=True)
    ref = inp.to(torch.float64, "cpu")
    inp.x.requires_grad_(False)
    inp.A.requires_grad_(False)
    atol, rtol = tolerance(torch.float32, 64)
    y_ref = moe_lora_ref(ref.x, ref.A, ref.B, ref.topk_idx, ref.topk_w, **ref.ref_kwargs())
    for names in (["B", "topk_w", "bias_a", "bias_b"], ["B"], ["topk_w"], ["bias_a"]):
        wanted = [getattr(inp, n) for n in names]
        y = ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="triton", **inp.kwargs())
        got = torch.autograd.grad(y.sum(), wanted)
        want = torch.autograd.grad(y_ref.sum(), [getattr(ref, n) for n in names], retain_graph=True)
        for n, g, g_ref in zip(names, got, want):
            torch.testing.assert_close(g.cpu().double(), g_ref, atol=atol, rtol=rtol, msg=lambda m, n=n: f"d{n}: {m}")


def test_non_contiguous_input(device, no_tf32):
    # x as a row-strided view (a slice of a wider activation): made contiguous in one place.
    case = CASES["odd_L"]
    inp = make_moe_lora_inputs(case, device=device, per_sample=True)
    x = torch.randn(case.T, case.d_in + 7, device=device)[:, 3:3 + case.d_in]
    y = ik.moe_lora(x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="triton", **inp.kwargs())
    ref = inp.to(torch.float64, "cpu")
    y_ref = moe_lora_ref(x.cpu().double(), ref.A, ref.B, ref.topk_idx, ref.topk_w, **ref.ref_kwargs())
    atol, rtol = tolerance(torch.float32, case.d_in)
    torch.testing.assert_close(y.cpu().double(), y_ref, atol=atol, rtol=rtol)


def test_unsupported_shapes_take_the_token_path(device, no_tf32, monkeypatch):
    # L = 2 with k = 8: 9 samples x 8 slots per 16-row tile would not fit the slot axis, so the op expands the
    # routing to tokens and runs the general kernels; the result is the same.
    case = MoELoRACase("tiny_L", 20, 24, 20, 4, 8, 8, routing="all_experts", tokens_per_sample=2)
    assert not ms.supports(case.T, 2, 8, 4)
    calls = uses_sample_kernels(monkeypatch)
    check_exact(case, device, base=True, expert_bias=True)
    assert calls[0] == 0


def test_tokens_per_sample_must_divide_T(device):
    inp = make_moe_lora_inputs(CASES["odd_L"], device=device, per_sample=True)
    with pytest.raises(ValueError, match=r"tokens_per_sample=7 must divide the number of rows of x \(T = x.shape"
                                         r"\[0\] = 39\)"):
        ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="triton", tokens_per_sample=7)


def test_pair_metadata_is_a_stable_sort_by_expert(device):
    # The one-launch counting sort: pairs grouped by expert in sample order, offsets = exclusive counts.
    idx = torch.tensor([[3, 0], [1, 3], [0, 2], [3, 1], [2, 0]], dtype=torch.int32, device=device)
    pairs, off = ms.sample_pairs(idx, 5)
    flat = idx.reshape(-1).long().cpu()
    want = torch.sort(flat, stable=True).indices
    assert torch.equal(pairs.long().cpu(), want)
    counts = torch.bincount(flat, minlength=5)
    assert off.long().cpu().tolist() == [0, *torch.cumsum(counts, 0).tolist()]
    # many chunks (300 samples x 3 pairs over 7 experts, CHUNK = 64 under the interpreter) and int64 indices
    g = torch.Generator().manual_seed(0)
    big = torch.randint(0, 7, (300, 3), generator=g)
    pairs, off = ms.sample_pairs(big.to(device), 7)
    assert torch.equal(pairs.long().cpu(), torch.sort(big.reshape(-1), stable=True).indices)
    assert off.long().cpu().tolist() == [0, *torch.cumsum(torch.bincount(big.reshape(-1), minlength=7), 0).tolist()]


def test_module_routing_sample_uses_the_per_sample_kernels(device, no_tf32, monkeypatch):
    # MoELoRALinear(routing="sample") passes (B, k) routing with tokens_per_sample: the per-sample Function runs and
    # no (T, k) routing tensor is built; batch_first=False takes the token path and gives the same output.
    calls = uses_sample_kernels(monkeypatch)
    torch.manual_seed(0)
    layer = ik.MoELoRALinear.from_linear(torch.nn.Linear(24, 20), num_experts=4, rank=4, top_k=2, scale=0.5,
                                         routing="sample", backend="triton").to(device)
    layer.add_router("t0")
    layer.set_task("t0")
    with torch.no_grad():
        layer.B_train.normal_(std=0.3)
    x = torch.randn(3, 13, 24, device=device)
    y = layer(x)
    assert calls[0] == 1
    layer.batch_first = False
    y_seq = layer(x.transpose(0, 1).contiguous()).transpose(0, 1)
    assert calls[0] == 1
    torch.testing.assert_close(y, y_seq, atol=1e-5, rtol=1e-5)
