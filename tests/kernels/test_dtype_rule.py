"""The dtype rule of moe_lora (issue 14 item 3) on the CPU backends, and the frozen weight's compute-dtype copy
(issue 9 item 3): one dtype outside autocast, autocast-op semantics inside it, the same on every backend.

The Triton backend's half of these semantics runs under the interpreter in test_triton_moe_lora_sample.py
(test_autocast_fp32_master_weights) and test_triton_moe_lora.py (test_fp32_params_with_low_precision_activations).
"""

from __future__ import annotations

import gc

import pytest
import torch

import igsp_kernels as ik
from igsp_kernels import _dtypes
from igsp_kernels.backends import available_backends
from igsp_kernels.reference import moe_lora_ref
from igsp_kernels.testing import MOE_LORA_SAMPLE_CASES, assert_close_lowp, make_moe_lora_inputs, tolerance

CASE = MOE_LORA_SAMPLE_CASES[0]  # odd_L: 3 samples of 13 tokens
BACKENDS = [b for b in ("reference", "cpp")
            if b in available_backends(ik.OpRequest("moe_lora", torch.device("cpu"), torch.float32))]


def inputs(**kw):
    return make_moe_lora_inputs(CASE, base=True, expert_bias=True, per_sample=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field", ["A", "B", "base_weight", "base_bias", "bias_a", "bias_b"])
def test_mixed_dtypes_are_refused_outside_autocast(field, backend):
    # x fp32 with one fp64 operand: torch.matmul refuses mixed dtypes, so does moe_lora (never a silent promotion)
    inp = inputs()
    setattr(inp, field, getattr(inp, field).detach().double())
    name = {"bias_a": "expert_bias\\[0\\]", "bias_b": "expert_bias\\[1\\]"}.get(field, field)
    with pytest.raises(TypeError, match=rf"{name} must have the dtype of x \(float32\), got float64: outside "
                                        r"torch.autocast, x, A, B, base_weight, base_bias and expert_bias must share"):
        ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend=backend, **inp.kwargs())


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_w_may_be_any_float_dtype(backend):
    # routers compute in fp32; a bf16 or fp64 topk_w beside fp32 activations is accepted and its gradient keeps
    # its dtype
    for dt in (torch.bfloat16, torch.float64):
        inp = inputs()
        inp.topk_w = inp.topk_w.detach().to(dt).requires_grad_()
        y = ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend=backend, **inp.kwargs())
        (gw,) = torch.autograd.grad(y.sum(), [inp.topk_w])
        assert y.dtype == torch.float32 and gw.dtype == dt


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_semantics(backend):
    # Under CPU bf16 autocast with fp32 activations, fp32 master A / B and an fp32 frozen base: y is bf16, every
    # gradient in its input's dtype, and the result is the reference's on bf16-rounded x / W0 / b0 with fp32 A / B
    # (computed in fp64 here), within the bf16 output rounding.
    inp = make_moe_lora_inputs(CASE, dtype=torch.float32, base=True, expert_bias=True, per_sample=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend=backend, **inp.kwargs())
        grads = torch.autograd.grad(y.float().sum(), inp.leaves())
    assert y.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [t.dtype for t in inp.leaves()]
    ref = inp.to(torch.float64)
    for name in ("x", "base_weight", "base_bias"):  # what autocast rounds
        setattr(ref, name, getattr(ref, name).detach().bfloat16().double().requires_grad_(name == "x"))
    want = moe_lora_ref(ref.x, ref.A, ref.B, ref.topk_idx, ref.topk_w, **ref.ref_kwargs())
    atol, _ = tolerance(torch.bfloat16, CASE.d_in)
    assert_close_lowp(y, want, want.bfloat16(), atol, "y")


def test_float64_activations_are_not_autocast():
    # autocast never casts float64: an fp64 call under autocast follows the one-dtype rule (and computes in fp64)
    inp = inputs(dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="reference", **inp.kwargs())
        assert y.dtype == torch.float64
        inp.A = inp.A.detach().float()
        with pytest.raises(TypeError, match=r"A must have the dtype of x \(float64\), got float32"):
            ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="reference", **inp.kwargs())


def test_every_backend_declares_autocast_and_per_sample_support():
    req = ik.OpRequest("moe_lora", torch.device("cpu"), torch.bfloat16, tokens_per_sample=197, mixed_dtypes=True)
    assert "reference" in available_backends(req)
    for backend in ik.backends._BACKENDS.values():
        assert backend.per_sample_routing and backend.mixed_dtypes, backend.name


def test_frozen_weight_is_cast_once_until_it_changes():
    _dtypes.clear_cast_cache()
    w = torch.randn(20, 24)
    first = _dtypes.cast_frozen(w, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, w.bfloat16())
    assert _dtypes.cast_frozen(w, torch.bfloat16) is first  # reused: no cast per call
    assert _dtypes.cast_frozen(w, torch.float32) is w  # already in the dtype
    with torch.no_grad():
        w.mul_(2)  # an in-place update bumps the version: a fresh copy
    second = _dtypes.cast_frozen(w, torch.bfloat16)
    assert second is not first and torch.equal(second, w.bfloat16())
    w.data = torch.randn(20, 24)  # new storage: a fresh copy
    assert torch.equal(_dtypes.cast_frozen(w, torch.bfloat16), w.bfloat16())
    del w, first, second
    gc.collect()
    assert not _dtypes._CACHE  # the entry dies with its weight


def test_moe_lora_under_autocast_reuses_the_cached_weight(monkeypatch):
    # Three calls under autocast hand the backend the same bf16 copy of the frozen fp32 weight: one cast in all.
    import igsp_kernels.reference as ref

    _dtypes.clear_cast_cache()
    inp = make_moe_lora_inputs(CASE, dtype=torch.float32, base=True, per_sample=True)
    seen = []
    orig = ref.moe_lora_ref

    def recording(*args, **kwargs):
        seen.append(kwargs["base_weight"])
        return orig(*args, **kwargs)

    monkeypatch.setattr(ref, "moe_lora_ref", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            ik.moe_lora(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, backend="reference", **inp.kwargs())
    assert len(seen) == 3 and all(w is seen[0] for w in seen) and seen[0].dtype == torch.bfloat16
    assert len(_dtypes._CACHE) == 2  # the weight and the bias
