"""The compiled C++ CPU backend (`igsp_kernels._C`, csrc/cpu) against the reference: forward and every gradient,
edge shapes, both routing plans, dtypes, validation, dispatch and `torch.library.opcheck` (STYLE F3, G1-G5).

The oracle is `moe_lora_ref` on float64 copies of the inputs; bf16 is judged relative to the eager loop
(`moe_lora_loop`) run in bf16 (STYLE rule 8). Skipped, with the loader's reason, when the extension is not built.
The kernel picks one of two plans from the routing (csrc/cpu/moe_lora/moe_lora.cpp): "runs" when runs of
identical routing rows average >= 32 tokens (per-sample routing), "experts" otherwise; the cases below cover both.
"""

from __future__ import annotations

import pytest
import torch

import igsp_kernels as ik
from igsp_kernels import _cpp
from igsp_kernels.backends import BackendNotSupportedError, select_backend
from igsp_kernels.reference import (
    moe_lora_loop,
    moe_lora_ref,
    project_grad_ref_,
    subspace_penalty_ref,
)
from igsp_kernels.testing import (
    MOE_LORA_EDGE_CASES,
    MOE_LORA_SAMPLE_CASES,
    SUBSPACE_EDGE_CASES,
    MoELoRACase,
    assert_close_lowp,
    make_moe_lora_inputs,
    make_subspace_inputs,
    tolerance,
)

pytestmark = pytest.mark.skipif(
    not _cpp.is_available(), reason=f"the C++ CPU extension is not available: {_cpp.load_error()}"
)

OPS = torch.ops.igsp_kernels_cpp
CASES = {c.name: c for c in MOE_LORA_EDGE_CASES}
# Cases of the "runs" plan (the shared edge cases have runs of <= 10 tokens, so they all take the expert plan).
RUN_CASES = (
    MoELoRACase("runs", 99, 24, 20, 4, 6, 2, routing="sample", tokens_per_sample=33,
                why="3 samples of 33 tokens: runs plan, 3 runs >= 2 threads so the runs spread over threads"),
    MoELoRACase("one_run", 40, 17, 23, 3, 4, 1, routing="one_expert",
                why="every row on expert 0 with k = 1: a single run of 40 rows (the serial, threaded-BLAS path)"),
    MoELoRACase("runs_k_equals_E", 64, 9, 11, 5, 3, 3, routing="sample", tokens_per_sample=32,
                why="k = E under per-sample routing: every run concatenates all experts"),
)
ALL_CASES = (*MOE_LORA_EDGE_CASES, *RUN_CASES)


def run(inp, dy, fn=None):
    """(y, grads of every leaf) of `fn` (default: the cpp backend), with dy as the shared output gradient (G1)."""
    if fn is None:
        y = ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="cpp", **inp.kwargs())
    else:
        y = fn(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, **inp.ref_kwargs())
    return y, torch.autograd.grad(y, inp.leaves(), dy.to(y.dtype))


def output_grad(case: MoELoRACase, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(case.T, case.d_out, generator=torch.Generator().manual_seed(1)).to(dtype)


def check_exact(case: MoELoRACase, dtype=torch.float32, **features) -> None:
    """ours vs the float64 reference with the per-dtype tolerance (fp32, fp64); per_sample=True passes the routing
    natively as (T / L, k) sample rows."""
    inp = make_moe_lora_inputs(case, dtype=dtype, **features)
    dy = output_grad(case, dtype)
    y, grads = run(inp, dy)
    y_ref, grads_ref = run(inp.to(torch.float64), dy.double(), moe_lora_ref)
    atol, rtol = tolerance(dtype, max(case.d_in, case.d_out, case.T))
    assert y.dtype == dtype and y.shape == (case.T, case.d_out)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol, msg=lambda m: f"y: {m}")
    for name, g, g_ref, leaf in zip(inp.leaf_names(), grads, grads_ref, inp.leaves()):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


# ----------------------------------------------------------------------------------- fp32 against the reference
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_edge_cases_fp32(case):
    # base linear + bias + expert biases: every gradient path of the op is live (each case says why it is here)
    check_exact(case, base=True, expert_bias=True)


@pytest.mark.parametrize("case", MOE_LORA_SAMPLE_CASES, ids=lambda c: c.name)
def test_native_per_sample_routing_fp32(case):
    # topk_idx (B, k) with tokens_per_sample = L: each sample is one run, its gates broadcast over the run and
    # d topk_w summed over its rows (each case says which boundary it hits)
    check_exact(case, base=True, expert_bias=True, activation="relu", per_sample=True)


@pytest.mark.parametrize("features", [
    dict(base=False, expert_bias=True, activation="relu"),  # MoE-Adapters parity: parallel adapter, ReLU, biases
    dict(base=True, expert_bias=False, activation="identity"),  # plain LoRA on a frozen linear, no expert biases
    dict(base=False, expert_bias=False, activation="relu"),  # no base and no biases: the LoRA path alone
], ids=["adapter_relu", "lora", "relu_only"])
@pytest.mark.parametrize("case_name", ["odd", "runs"])  # one case per plan: experts, runs
def test_feature_combinations_fp32(case_name, features):
    check_exact({**CASES, **{c.name: c for c in RUN_CASES}}[case_name], **features)


def test_base_bias_without_weight():
    # base_bias alone (no base_weight): the runs plan fuses b0 into its GEMMs as a ones column, it must still add.
    inp = make_moe_lora_inputs(RUN_CASES[0], base=True, expert_bias=True)
    inp.base_weight = None
    dy = output_grad(RUN_CASES[0], torch.float32)
    y, grads = run(inp, dy)
    y_ref, grads_ref = run(inp.to(torch.float64), dy.double(), moe_lora_ref)
    atol, rtol = tolerance(torch.float32, 99)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=rtol)


def test_repeated_expert_in_a_run():
    # The same expert twice in one routing row under per-sample routing: the run's two blocks use one expert and
    # both contributions (and both dA/dB blocks) must add up, as the reference's scatter_add does.
    case = RUN_CASES[0]
    inp = make_moe_lora_inputs(case, base=True, expert_bias=True)
    inp.topk_idx[:, 1] = inp.topk_idx[:, 0]
    dy = output_grad(case, torch.float32)
    y, grads = run(inp, dy)
    y_ref, grads_ref = run(inp.to(torch.float64), dy.double(), moe_lora_ref)
    atol, rtol = tolerance(torch.float32, case.T)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    for name, g, g_ref in zip(inp.leaf_names(), grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


def test_empty_batch():
    # T = 0 (an empty micro-batch): an empty output and zero expert gradients, no crash in either plan.
    case = MoELoRACase("empty", 0, 8, 6, 2, 3, 2)
    inp = make_moe_lora_inputs(case, base=True, expert_bias=True)
    y, grads = run(inp, torch.zeros(0, 6))
    assert y.shape == (0, 6)
    for name, g in zip(inp.leaf_names(), grads):
        assert torch.count_nonzero(g) == 0, name


def test_float64():
    # fp64 computes in fp64 end to end: agreement to ~1e-11 shows no hidden fp32 step, in both plans.
    check_exact(CASES["per_sample"], dtype=torch.float64, base=True, expert_bias=True, activation="relu")
    check_exact(RUN_CASES[0], dtype=torch.float64, base=True, expert_bias=True, activation="relu")


@pytest.mark.parametrize("case,per_sample", [
    (MoELoRACase("tiny", 5, 6, 7, 3, 3, 2), False),
    (MoELoRACase("tiny_runs", 64, 5, 4, 2, 3, 2, routing="sample", tokens_per_sample=32), False),
    (MoELoRACase("tiny_samples", 12, 5, 4, 2, 3, 2, routing="sample", tokens_per_sample=4), True),
], ids=["experts", "runs", "native_sample"])
def test_gradcheck_float64(case, per_sample):
    # The registered autograd formula in fp64 against finite differences (fast mode: random projections).
    inp = make_moe_lora_inputs(case, dtype=torch.float64, base=True, expert_bias=True, activation="relu",
                               per_sample=per_sample)
    with torch.no_grad():  # keep the ReLU inputs away from 0 so finite differences never straddle the kink
        inp.bias_a.add_(torch.sign(inp.bias_a) * 2.0)

    def f(x, A, B, w, ba, bb):
        return ik.moe_lora(x, A, B, inp.topk_idx, w, base_weight=inp.base_weight, base_bias=inp.base_bias,
                           scale=0.7, activation="relu", expert_bias=(ba, bb), backend="cpp",
                           tokens_per_sample=inp.tokens_per_sample)

    assert torch.autograd.gradcheck(f, tuple(inp.leaves()), fast_mode=True, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------ low precision vs eager
def check_lowp(case: MoELoRACase, dtype, param_dtype=None, **features) -> None:
    inp = make_moe_lora_inputs(case, dtype=dtype, param_dtype=param_dtype, **features)
    dy = output_grad(case, dtype)
    # fp32 master parameters with low-precision activations is the autocast layout (outside autocast it is refused)
    with torch.autocast("cpu", dtype=dtype, enabled=param_dtype is not None and param_dtype != dtype):
        y, grads = run(inp, dy)
    y_eager, grads_eager = run(inp.to(dtype, param_dtype=param_dtype), dy, moe_lora_loop)
    y_ref, grads_ref = run(inp.to(torch.float64), dy.double(), moe_lora_ref)
    atol, _ = tolerance(dtype, max(case.d_in, case.d_out, case.T))
    assert y.dtype == dtype
    assert_close_lowp(y, y_ref, y_eager, atol, "y")
    for name, g, ge, gr, leaf in zip(inp.leaf_names(), grads, grads_eager, grads_ref, inp.leaves()):
        assert g.dtype == leaf.dtype, f"d{name} has dtype {g.dtype}, its input {leaf.dtype}"
        assert_close_lowp(g, gr, ge, atol, f"d{name}")


@pytest.mark.parametrize("case_name", ["odd", "empty_expert", "runs"])
def test_bfloat16_relative_to_eager(case_name):
    # bf16 in and out, fp32 inside (the rank intermediate too): at least as close to fp64 as the bf16 eager loop.
    check_lowp({**CASES, **{c.name: c for c in RUN_CASES}}[case_name], torch.bfloat16, base=True, expert_bias=True,
               activation="relu")


@pytest.mark.parametrize("case_name", ["per_sample", "runs", "odd_L"])
def test_fp32_params_with_bf16_activations(case_name):
    # The autocast layout: fp32 expert parameters, bf16 activations. y and dx in bf16, dA/dB/biases in fp32.
    cases = {**CASES, **{c.name: c for c in (*RUN_CASES, *MOE_LORA_SAMPLE_CASES)}}
    check_lowp(cases[case_name], torch.bfloat16, param_dtype=torch.float32, base=True, expert_bias=True,
               per_sample=case_name == "odd_L")


# ------------------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("case", [CASES["odd"], RUN_CASES[0]], ids=["experts", "runs"])
def test_deterministic(case):
    # No atomics; expert-gradient contributions are summed in group order: two passes agree bitwise.
    inp = make_moe_lora_inputs(case, expert_bias=True)
    dy = output_grad(case, torch.float32)
    first = run(inp, dy)
    second = run(inp, dy)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(inp.leaf_names(), first[1], second[1]):
        assert torch.equal(a, b), f"d{name} differs between two identical backward passes"


@pytest.mark.parametrize("case", [CASES["odd"], RUN_CASES[0]], ids=["experts", "runs"])
def test_single_thread_matches_multi_thread(case):
    # Groups (experts or runs) are spread over threads in waves when there are enough; on one thread they run in
    # order with BLAS threads instead. Both must give the same result (up to BLAS rounding).
    inp = make_moe_lora_inputs(case, expert_bias=True)
    dy = output_grad(case, torch.float32)
    multi = run(inp, dy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run(inp, dy)
    finally:
        torch.set_num_threads(threads)
    atol, rtol = tolerance(torch.float32, case.T)
    for a, b in zip((multi[0], *multi[1]), (single[0], *single[1])):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", [CASES["odd"], RUN_CASES[0]], ids=["experts", "runs"])
def test_only_requested_gradients(case):
    # x without grad (the first adapted layer) and frozen A: output_mask skips dx / dA and the rest stays right.
    inp = make_moe_lora_inputs(case, expert_bias=True)
    inp.x.requires_grad_(False)
    inp.A.requires_grad_(False)
    y = ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="cpp", **inp.kwargs())
    dB, dw, dbb = torch.autograd.grad(y.sum(), [inp.B, inp.topk_w, inp.bias_b])
    ref = inp.to(torch.float64)
    y_ref = moe_lora_ref(ref.x, ref.A, ref.B, ref.topk_idx, ref.topk_w, **ref.ref_kwargs())
    dB_ref, dw_ref, dbb_ref = torch.autograd.grad(y_ref.sum(), [ref.B, ref.topk_w, ref.bias_b])
    atol, rtol = tolerance(torch.float32, case.T)
    torch.testing.assert_close(dB.double(), dB_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(dw.double(), dw_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(dbb.double(), dbb_ref, atol=atol, rtol=rtol)


def test_non_contiguous_input_and_int64_indices():
    # x as a row-strided view (a slice of a wider activation) and int64 routing indices.
    case = RUN_CASES[0]
    inp = make_moe_lora_inputs(case)
    x = torch.randn(case.T, case.d_in + 7)[:, 3:3 + case.d_in]
    assert not x.is_contiguous()
    idx = inp.topk_idx.long()
    y = ik.moe_lora(x, inp.A, inp.B, idx, inp.topk_w, backend="cpp", **inp.kwargs())
    ref = inp.to(torch.float64)
    y_ref = moe_lora_ref(x.double(), ref.A, ref.B, idx, ref.topk_w, **ref.ref_kwargs())
    atol, rtol = tolerance(torch.float32, case.d_in)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("mutate, exc, match", [
    (lambda i: setattr(i, "A", i.A[:, :-1]), ValueError, r"A must have shape \(E, 40, r\)"),
    (lambda i: setattr(i, "topk_idx", i.topk_idx + 5), IndexError, r"topk_idx values must lie in \[0, 5\)"),
    (lambda i: setattr(i, "topk_w", i.topk_w[:, :1]), ValueError, r"topk_w must have shape \(37, 2\)"),
    (lambda i: setattr(i, "activation", "gelu"), ValueError, r"activation must be one of"),
    (lambda i: setattr(i, "base_weight", i.base_weight.t()), ValueError, r"base_weight must have shape \(36, 40\)"),
], ids=["A_shape", "index_range", "w_shape", "activation", "base_shape"])
def test_validation_errors_through_public_api(mutate, exc, match):
    # Bad input is caught by igsp_kernels.moe_lora before the kernel, with the argument named (backend forced).
    inp = make_moe_lora_inputs(CASES["odd"])
    mutate(inp)
    with pytest.raises(exc, match=match):
        ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="cpp", **inp.kwargs())


def test_kernel_checks_indices_on_direct_calls():
    # A direct torch.ops call skips the Python validation; the kernel's own TORCH_CHECK stops an out-of-range
    # index before any memory is read with it.
    inp = make_moe_lora_inputs(CASES["odd"], base=False)
    bad = inp.topk_idx.clone()
    bad[3, 1] = 99
    with pytest.raises(RuntimeError, match=r"topk_idx values must lie in \[0, 5\), got 99"):
        OPS.moe_lora_fwd(inp.x.detach(), inp.A.detach(), inp.B.detach(), bad, inp.topk_w.detach(), None, None, None,
                         None, 1.0, "identity", 1)


def test_forced_cpp_refuses_float16_with_reason():
    inp = make_moe_lora_inputs(CASES["odd"], dtype=torch.float16)
    with pytest.raises(BackendNotSupportedError, match=r"backend 'cpp' cannot run .*dtype float16 not in supported"):
        ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="cpp", **inp.kwargs())


# ------------------------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("op", ["moe_lora", "subspace_penalty", "project_grad"])
def test_auto_picks_cpp_on_cpu(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("IGSP_KERNELS_DISABLE_CPP", raising=False)
    assert select_backend(ik.OpRequest(op, torch.device("cpu"), torch.float32)).name == "cpp"


def test_disable_flag_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("IGSP_KERNELS_DISABLE_CPP", "1")
    request = ik.OpRequest("moe_lora", torch.device("cpu"), torch.float32)
    assert select_backend(request).name == "reference"
    assert ik.explain(request)["cpp"] == ["disabled by IGSP_KERNELS_DISABLE_CPP=1"]
    assert not _cpp.is_available() and _cpp.load_error() == "disabled by IGSP_KERNELS_DISABLE_CPP=1"
    inp = make_moe_lora_inputs(CASES["odd"])
    with pytest.raises(BackendNotSupportedError, match="disabled by IGSP_KERNELS_DISABLE_CPP=1"):
        ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="cpp", **inp.kwargs())


def test_auto_dispatch_result_matches_reference(monkeypatch):
    # The public op with backend="auto" on CPU runs the extension and agrees with the reference.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check = CASES["per_sample"]
    inp = make_moe_lora_inputs(check, expert_bias=True)
    y = ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, **inp.kwargs())
    assert y.grad_fn is not None and "igsp_kernels_cpp" in type(y.grad_fn).__name__
    ref = inp.to(torch.float64)
    atol, rtol = tolerance(torch.float32, check.d_in)
    torch.testing.assert_close(y.double(), moe_lora_ref(ref.x, ref.A, ref.B, ref.topk_idx, ref.topk_w,
                                                        **ref.ref_kwargs()), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------- subspace
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_subspace_penalty_value_and_gradient(dtype):
    mats, bases, leaves = make_subspace_inputs(SUBSPACE_EDGE_CASES, dtype=dtype)
    lam = 0.37
    value = ik.subspace_penalty(mats, bases, lam, backend="cpp")
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_mats = [L.transpose(1, 2) if c.transposed else L for L, c in zip(ref_leaves, SUBSPACE_EDGE_CASES)]
    ref = subspace_penalty_ref(ref_mats, [U.double() for U in bases], lam)
    atol, rtol = tolerance(dtype, max(c.d for c in SUBSPACE_EDGE_CASES))
    assert value.dtype == dtype and value.dim() == 0
    torch.testing.assert_close(value.double(), ref, atol=atol, rtol=rtol)
    g_out = 1.7  # a grad_output != 1 checks the backward's scaling of the forward-computed gradient
    ours = torch.autograd.grad(value * g_out, leaves)
    want = torch.autograd.grad(ref * g_out, ref_leaves)
    for c, a, b, leaf in zip(SUBSPACE_EDGE_CASES, ours, want, leaves):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, c.name
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m, n=c.name: f"{n}: {m}")


def test_subspace_penalty_bf16_and_no_grad():
    # bf16 candidates with fp32 bases: the value in fp32, gradients in bf16; under no_grad no gradient is built.
    mats, bases, leaves = make_subspace_inputs(SUBSPACE_EDGE_CASES[:2], dtype=torch.bfloat16)
    bases = [U.float() for U in bases]
    value = ik.subspace_penalty(mats, bases, 0.5, backend="cpp")
    ref = subspace_penalty_ref([M.float() for M in mats], bases, 0.5)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ref, atol=1e-4, rtol=1e-5)
    grads = torch.autograd.grad(value, leaves)
    want = torch.autograd.grad(subspace_penalty_ref(mats, bases, 0.5), leaves)
    for g, w in zip(grads, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=1e-2)
    with torch.no_grad():
        v = ik.subspace_penalty(mats, bases, 0.5, backend="cpp")
    assert v.grad_fn is None and torch.equal(v, value.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_project_grad_in_place(dtype):
    # Every subspace case, a transposed view among them (written through) and m = 0 (left untouched).
    mats, bases, leaves = make_subspace_inputs(SUBSPACE_EDGE_CASES, dtype=dtype)
    grads = [M.detach().clone() if not c.transposed else M.detach().transpose(1, 2).clone().transpose(1, 2)
             for M, c in zip(mats, SUBSPACE_EDGE_CASES)]
    expected = [G.clone() for G in grads]
    project_grad_ref_(expected, bases)
    ptrs = [G.data_ptr() for G in grads]
    ik.project_grad_(grads, bases, backend="cpp")
    atol, rtol = tolerance(dtype, max(c.d for c in SUBSPACE_EDGE_CASES))
    for c, G, want, p in zip(SUBSPACE_EDGE_CASES, grads, expected, ptrs):
        assert G.data_ptr() == p, f"{c.name}: not in place"
        torch.testing.assert_close(G.double(), want.double(), atol=atol, rtol=rtol,
                                   msg=lambda m, n=c.name: f"{n}: {m}")
    # the projected gradients are orthogonal to their bases
    for c, G, U in zip(SUBSPACE_EDGE_CASES, grads, bases):
        if c.m and dtype != torch.bfloat16:
            assert (U.transpose(0, 1) @ G).abs().max() < 1e-4, c.name


# ---------------------------------------------------------------------------------------------------- opcheck
def _moe_op_args(case: MoELoRACase, relu: bool, per_sample: bool = False):
    inp = make_moe_lora_inputs(case, expert_bias=True, activation="relu" if relu else "identity",
                               per_sample=per_sample)
    return inp, tuple(t.detach() for t in (inp.x, inp.A, inp.B, inp.topk_w, inp.bias_a, inp.bias_b))


@pytest.mark.parametrize("case,per_sample", [(CASES["odd"], False), (RUN_CASES[0], False), (RUN_CASES[0], True)],
                         ids=["experts", "runs", "native_sample"])
def test_opcheck_moe_lora_fwd(case, per_sample):
    inp, (x, A, B, w, ba, bb) = _moe_op_args(case, relu=False, per_sample=per_sample)
    # requires_grad inputs so test_autograd_registration sees the registered backward
    args = (x.requires_grad_(), A.requires_grad_(), B, inp.topk_idx, w, inp.base_weight, inp.base_bias, ba, bb,
            0.5, "identity", inp.tokens_per_sample or 1)
    torch.library.opcheck(OPS.moe_lora_fwd.default, args)


@pytest.mark.parametrize("mask", [[True] * 6, [False, True, False, True, False, False]], ids=["all", "some"])
def test_opcheck_moe_lora_bwd(mask):
    case = CASES["odd"]
    inp, (x, A, B, w, ba, bb) = _moe_op_args(case, relu=True)
    dy = output_grad(case, torch.float32)
    _, hpre = OPS.moe_lora_fwd(x, A, B, inp.topk_idx, w, inp.base_weight, inp.base_bias, ba, bb, 0.5, "relu", 1)
    torch.library.opcheck(OPS.moe_lora_bwd.default, (dy, x, A, B, inp.topk_idx, w, hpre, inp.base_weight, ba, bb,
                                                      0.5, "relu", 1, mask))


@pytest.mark.parametrize("case", [CASES["odd"], RUN_CASES[0]], ids=["experts", "runs"])
def test_saved_pre_activation(case):
    # The forward's second output hpre, which the backward reads instead of recomputing x A: row t k + j must be
    # x[t] A[e] + ba[e] for e = topk_idx[t, j], written by both plans (a run in place, an expert group by its
    # sorted assignment positions), in fp32 for bf16 x (the accumulation dtype).
    for dtype in (torch.float32, torch.bfloat16):
        inp, (x, A, B, w, ba, bb) = _moe_op_args(case, relu=True)
        x, A = x.to(dtype), A.to(dtype)
        _, hpre = OPS.moe_lora_fwd(x, A, B, inp.topk_idx, w, None, None, ba, bb, 0.5, "relu", 1)
        T, k = inp.topk_idx.shape
        e = inp.topk_idx.long().reshape(-1)
        want = torch.einsum("ad,adr->ar", x.double().repeat_interleave(k, 0), A.double()[e]) + ba.double()[e]
        assert hpre.dtype == torch.float32 and hpre.shape == (T * k, A.shape[2])
        atol, rtol = tolerance(torch.float32, x.shape[1])
        torch.testing.assert_close(hpre.double(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("compute_grads", [True, False])
def test_opcheck_subspace_penalty(compute_grads):
    mats, bases, _ = make_subspace_inputs(SUBSPACE_EDGE_CASES)
    torch.library.opcheck(OPS.subspace_penalty.default, ([M.detach() for M in mats], bases, 0.3, compute_grads))


def test_opcheck_project_grad():
    mats, bases, _ = make_subspace_inputs(SUBSPACE_EDGE_CASES)
    torch.library.opcheck(OPS.project_grad_.default, ([M.detach().clone() for M in mats], bases))


def test_torch_compile_fullgraph():
    # The op traces into one graph (fake implementation + registered autograd), forward and backward; aot_eager
    # keeps the test fast (no inductor codegen) while exercising the same dispatch path.
    case = CASES["odd"]
    inp = make_moe_lora_inputs(case, expert_bias=True, activation="relu")

    def f(x, A, B, w, ba, bb):
        return _cpp.moe_lora_cpp(x, A, B, inp.topk_idx, w, inp.base_weight, inp.base_bias, 0.5, "relu", ba, bb)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    dy = output_grad(case, torch.float32)
    y = compiled(*inp.leaves())
    grads = torch.autograd.grad(y, inp.leaves(), dy)
    y_eager = f(*inp.leaves())
    grads_eager = torch.autograd.grad(y_eager, inp.leaves(), dy)
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)
