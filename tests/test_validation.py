"""Every public op rejects bad input with an error naming the argument, the expected and the received value."""

from __future__ import annotations

import pytest
import torch

import igsp_kernels as ik


def good(T=4, d_in=6, d_out=5, E=3, r=2, k=2):
    return dict(
        x=torch.randn(T, d_in), A=torch.randn(E, d_in, r), B=torch.randn(E, r, d_out),
        topk_idx=torch.randint(0, E, (T, k), dtype=torch.int32), topk_w=torch.rand(T, k),
    )


def call(**over):
    args = good()
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return ik.moe_lora(args["x"], args["A"], args["B"], args["topk_idx"], args["topk_w"], **kw)


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(x=torch.randn(4, 6, 1)), ValueError, r"x must have 2 dimensions, got shape \(4, 6, 1\)"),
    (dict(x=torch.randint(0, 3, (4, 6))), TypeError, r"x must have dtype in .* got int64"),
    (dict(x=[[1.0]]), TypeError, r"x must be a torch.Tensor, got list"),
    (dict(A=torch.randn(3, 7, 2)), ValueError, r"A must have shape \(E, 6, r\) .* got \(3, 7, 2\)"),
    (dict(B=torch.randn(4, 2, 5)), ValueError, r"B must have shape \(3, 2, d_out\) .* got \(4, 2, 5\)"),
    (dict(topk_idx=torch.zeros(4, 2)), TypeError, r"topk_idx must have dtype in \['int32', 'int64'\], got float32"),
    (dict(topk_idx=torch.zeros(5, 2, dtype=torch.int32)), ValueError, r"topk_idx must have shape \(4, k\)"),
    (dict(topk_idx=torch.zeros(4, 4, dtype=torch.int32), topk_w=torch.rand(4, 4)), ValueError,
     r"k\) must lie in \[1, 3\] .* got 4"),
    (dict(topk_w=torch.rand(4, 1)), ValueError, r"topk_w must have shape \(4, 2\) \(same as topk_idx\), got \(4, 1\)"),
    (dict(topk_idx=torch.tensor([[0, 1], [2, 3], [0, 0], [1, 1]], dtype=torch.int32)), IndexError,
     r"topk_idx values must lie in \[0, 3\) .* got 3"),
    (dict(topk_idx=torch.tensor([[0, -1], [2, 1], [0, 0], [1, 1]], dtype=torch.int32)), IndexError,
     r"topk_idx values must lie in \[0, 3\) .* got -1"),
    (dict(base_weight=torch.randn(6, 5)), ValueError, r"base_weight must have shape \(5, 6\)"),
    (dict(base_weight=torch.randn(5, 6, requires_grad=True)), ValueError, r"base_weight must be frozen"),
    (dict(base_bias=torch.randn(4)), ValueError, r"base_bias must have shape \(5,\)"),
    (dict(expert_bias=torch.randn(3, 2)), TypeError, r"expert_bias must be a pair"),
    (dict(expert_bias=(torch.randn(3, 3), None)), ValueError, r"expert_bias\[0\] must have shape \(3, 2\)"),
    (dict(expert_bias=(None, torch.randn(2, 5))), ValueError, r"expert_bias\[1\] must have shape \(3, 5\)"),
    (dict(activation="gelu"), ValueError, r"activation must be one of \('identity', 'relu'\), got 'gelu'"),
    (dict(scale="1"), TypeError, r"scale must be a finite float, got str"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite float, got nan"),
    (dict(scale=float("inf")), ValueError, r"scale must be a finite float, got inf"),
    (dict(backend="cuda-magic"), ValueError, r"backend must be 'auto' or one of \['triton', 'cpp', 'reference'\]"),
    (dict(A=torch.randn(3, 6, 2, device="meta")), ValueError, r"A must be on cpu \(the device of x\), got meta"),
])
def test_moe_lora_rejects(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(**over)


def test_forced_backend_explains_every_reason(monkeypatch):
    monkeypatch.setenv("IGSP_KERNELS_DISABLE_TRITON", "1")
    with pytest.raises(ik.BackendNotSupportedError) as info:
        call(backend="triton")
    msg = str(info.value)
    assert "backend 'triton' cannot run moe_lora(device=cpu, dtype=float32)" in msg
    assert "IGSP_KERNELS_DISABLE_TRITON=1" in msg and "device 'cpu' not in supported devices" in msg


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(logits=torch.randn(3, 4), k=5), ValueError, r"k must be an int in \[1, 4\] .* got 5"),
    (dict(logits=torch.randn(3, 4), k=0), ValueError, r"k must be an int in \[1, 4\]"),
    (dict(logits=torch.randn(3, 4), k=2, active=torch.tensor([True, False, False, False])), ValueError,
     r"k=2 is larger than the number of active experts \(1\)"),
    (dict(logits=torch.randn(3, 4), k=1, active=torch.ones(3, dtype=torch.bool)), ValueError,
     r"active must have shape \(4,\) or \(3, 4\), got \(3,\)"),
    (dict(logits=torch.randn(3, 4), k=1, active=torch.ones(4)), TypeError, r"active must have dtype in \['bool'\]"),
    (dict(logits=torch.randn(3, 4), k=1, noise_std=-1.0), ValueError,
     r"noise_std must be a finite float >= 0, got -1.0"),
    (dict(logits=torch.randn(3, 4), k=1, noise_std=float("nan")), ValueError,
     r"noise_std must be a finite float >= 0, got nan"),
    (dict(logits=torch.randn(3), k=1), ValueError, r"logits must have 2 dimensions, got shape \(3,\)"),
])
def test_route_topk_rejects(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ik.route_topk(**kwargs)


def test_subspace_ops_reject():
    M, U = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"mats and bases must have the same length, got 2 and 1"):
        ik.subspace_penalty([M, M], [U], 1.0)
    with pytest.raises(ValueError, match=r"bases\[0\] must have shape \(5, m\) .* got \(4, 2\)"):
        ik.subspace_penalty([M], [torch.randn(4, 2)], 1.0)
    with pytest.raises(ValueError, match=r"mats must hold at least one tensor"):
        ik.subspace_penalty([], [], 1.0)
    with pytest.raises(TypeError, match=r"lam must be a finite float >= 0 .*, got str"):
        ik.subspace_penalty([M], [U], "big")
    with pytest.raises(ValueError, match=r"grads\[0\] must have shape \(\.\.\., d, n\), got \(5,\)"):
        ik.project_grad_([torch.randn(5)], [U])
    with pytest.raises(ValueError, match=r"energy must be a float in \(0, 1\], got 1.5"):
        ik.subspace_basis(M, 1.5)
