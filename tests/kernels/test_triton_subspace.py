"""Subspace penalty (value + gradient) and in-place gradient projection kernels against the reference.

All layers' matrices go through one launch; the cases mix shapes, a transposed view (B^T), an empty basis (m = 0)
and a full basis (m = d). Interpreter (CPU) and GPU halves through the `device` fixture.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA device", allow_module_level=True)

import igsp_kernels as ik  # noqa: E402
from igsp_kernels.ops import subspace as sub  # noqa: E402
from igsp_kernels.reference import project_grad_ref_, subspace_penalty_ref  # noqa: E402
from igsp_kernels.testing import SUBSPACE_EDGE_CASES, SubspaceCase, make_subspace_inputs, tolerance  # noqa: E402

CASES = list(SUBSPACE_EDGE_CASES)


def count_launches(monkeypatch) -> list[int]:
    calls = [0]
    orig = sub._PROJECT.__class__.__call__

    def counted(self, grid, **kw):
        calls[0] += 1
        return orig(self, grid, **kw)

    monkeypatch.setattr(sub._PROJECT.__class__, "__call__", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_penalty_value_and_gradient(dtype, device, no_tf32, monkeypatch):
    calls = count_launches(monkeypatch)
    mats, bases, leaves = make_subspace_inputs(CASES, dtype=dtype, device=device)
    lam = 0.37
    value = ik.subspace_penalty(mats, bases, lam, backend="triton")
    assert calls[0] == 1, "every layer's matrices must go through one launch"
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref_mats = [L.transpose(1, 2) if c.transposed else L for L, c in zip(ref_leaves, CASES)]
    ref = subspace_penalty_ref(ref_mats, [U.cpu().double() for U in bases], lam)
    atol, rtol = tolerance(dtype, max(c.d for c in CASES))
    assert value.dtype == dtype and value.dim() == 0
    torch.testing.assert_close(value.cpu().double(), ref, atol=atol, rtol=rtol)
    g_out = 1.7  # a grad_output != 1 checks the backward's scaling of the forward-computed gradient
    ours = torch.autograd.grad(value * g_out, leaves)
    want = torch.autograd.grad(ref * g_out, ref_leaves)
    for c, a, b, leaf in zip(CASES, ours, want, leaves):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, c.name
        torch.testing.assert_close(a.cpu().double(), b, atol=atol, rtol=rtol, msg=lambda m, n=c.name: f"{n}: {m}")


def test_penalty_low_precision_matrices(device):
    # bf16 candidates with fp32 bases: computed in fp32, the value in fp32 and the gradients in bf16.
    mats, bases, leaves = make_subspace_inputs(CASES[:2], dtype=torch.bfloat16, device=device)
    bases = [U.float() for U in bases]
    value = ik.subspace_penalty(mats, bases, 0.5, backend="triton")
    ref = subspace_penalty_ref([M.detach().cpu().double() for M in mats], [U.cpu().double() for U in bases], 0.5)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.cpu().double(), ref, atol=1e-4, rtol=1e-5)  # exact inputs, fp32 accumulation
    grads = torch.autograd.grad(value, leaves)
    assert all(g.dtype == torch.bfloat16 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_project_grad_in_place(dtype, device, no_tf32, monkeypatch):
    calls = count_launches(monkeypatch)
    mats, bases, leaves = make_subspace_inputs(CASES, dtype=dtype, device=device)
    grads = [M.detach().clone() if not c.transposed else L.detach().clone().transpose(1, 2)
             for M, L, c in zip(mats, leaves, CASES)]
    storages = [G.data_ptr() for G in grads]
    want = [G.detach().cpu().double().clone() for G in grads]
    project_grad_ref_(want, [U.cpu().double() for U in bases])
    ik.project_grad_(grads, bases, backend="triton")
    assert calls[0] == 1, "every layer's gradients must go through one launch"
    atol, rtol = tolerance(dtype, max(c.d for c in CASES))
    for c, G, W, ptr in zip(CASES, grads, want, storages):
        assert G.data_ptr() == ptr, f"{c.name}: projected out of place"
        torch.testing.assert_close(G.cpu().double(), W, atol=atol, rtol=rtol, msg=lambda m, n=c.name: f"{n}: {m}")
    # projecting twice changes nothing (idempotent up to rounding): the result lies in the complement
    again = [G.clone() for G in grads]
    ik.project_grad_(again, bases, backend="triton")
    for G, A in zip(grads, again):
        torch.testing.assert_close(A, G, atol=atol, rtol=rtol)


def test_project_grad_non_mergeable_batch_dims(device, no_tf32):
    # (2, 3, d, n) whose leading dims cannot be merged into one stride: projected on a copy, written back in place.
    case = SubspaceCase("4d", 6, 20, 4, 5)
    (M,), (U,), _ = make_subspace_inputs([case], device=device)
    G = M.detach().reshape(3, 2, 20, 4).transpose(0, 1)
    with pytest.raises(RuntimeError):
        G.view(-1, 20, 4)
    want = G.cpu().double().clone()
    project_grad_ref_([want], [U.cpu().double()])
    ik.project_grad_([G], [U], backend="triton")
    atol, rtol = tolerance(torch.float32, 20)
    torch.testing.assert_close(G.cpu().double(), want, atol=atol, rtol=rtol)
