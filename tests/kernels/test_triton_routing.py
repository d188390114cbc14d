"""Fused top-k gating kernel against `route_topk_ref`: choices, weights, probabilities and the logits gradient.

Interpreter (CPU) and GPU halves through the `device` fixture (tests/kernels/conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA device", allow_module_level=True)

import igsp_kernels as ik  # noqa: E402
from igsp_kernels.reference import route_topk_ref  # noqa: E402
from igsp_kernels.testing import ROUTE_EDGE_CASES, make_route_inputs  # noqa: E402

ATOL, RTOL = 1e-6, 1e-5  # fp32 softmax of E <= 64 logits: a few ulps


def grads(logits, w, probs, seed=2):
    g = torch.Generator().manual_seed(seed)
    dw = torch.randn(w.shape, generator=g).to(w.device)
    dp = torch.randn(probs.shape, generator=g).to(probs.device)
    return torch.autograd.grad((w * dw).sum() + (probs * dp).sum(), logits)[0]


@pytest.mark.parametrize("case", ROUTE_EDGE_CASES, ids=lambda c: c.name)
def test_matches_reference(case, device):
    logits, active = make_route_inputs(case, device=device)
    idx, w, probs = ik.route_topk(logits, case.k, active=active, backend="triton")
    ref_logits = logits.detach().cpu().requires_grad_()
    idx_r, w_r, probs_r = route_topk_ref(ref_logits, case.k, active=None if active is None else active.cpu())
    assert idx.dtype == torch.int32 and w.dtype == torch.float32 and probs.dtype == torch.float32
    assert torch.equal(idx.cpu(), idx_r), "chosen experts differ (order is by decreasing probability)"
    torch.testing.assert_close(w.cpu(), w_r, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(probs.cpu(), probs_r, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(w.sum(-1).cpu(), torch.ones(case.N), atol=ATOL, rtol=0)
    if active is not None:  # pruned experts are never chosen and carry no probability
        mask = active if active.dim() == 2 else active.expand(case.N, -1)
        assert bool(mask.gather(1, idx.long()).all())
        assert float(probs.detach()[~mask].abs().max()) == 0.0
    torch.testing.assert_close(grads(logits, w, probs).cpu(), grads(ref_logits, w_r, probs_r), atol=ATOL, rtol=RTOL)


def test_noisy_routing_matches_reference_with_same_generator(device):
    # Noise is drawn in torch with the reference's exact call: the same generator state gives the same choice.
    case = ROUTE_EDGE_CASES[0]
    logits, _ = make_route_inputs(case, device=device)
    g1 = torch.Generator(device=device).manual_seed(5)
    g2 = torch.Generator(device=device).manual_seed(5)
    idx, w, probs = ik.route_topk(logits, case.k, noise_std=1.0, generator=g1, backend="triton")
    idx_r, w_r, probs_r = route_topk_ref(logits, case.k, noise_std=1.0, generator=g2)
    assert torch.equal(idx, idx_r)
    torch.testing.assert_close(w, w_r, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(probs, probs_r, atol=ATOL, rtol=RTOL)


def test_half_precision_logits_route_in_fp32(device):
    # bf16 / fp16 router logits are upcast before the softmax, like the reference; outputs are fp32.
    case = ROUTE_EDGE_CASES[0]
    logits, _ = make_route_inputs(case, device=device)
    half = logits.detach().to(torch.float16).requires_grad_()
    idx, w, probs = ik.route_topk(half, case.k, backend="triton")
    idx_r, w_r, _ = route_topk_ref(half.detach(), case.k)
    assert torch.equal(idx, idx_r) and w.dtype == torch.float32
    torch.testing.assert_close(w, w_r, atol=ATOL, rtol=RTOL)
    g = grads(half, w, probs)
    assert g.dtype == torch.float16 and bool(torch.isfinite(g).all())
