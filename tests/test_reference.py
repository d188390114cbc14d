"""Reference ops against independent loops written here (never against themselves), plus float64 gradcheck.

The loops below are deliberately naive (one token, one assignment at a time) so they share no code or
formulation with `igsp_kernels.reference`.
"""

from __future__ import annotations

import pytest
import torch

import igsp_kernels as ik
from igsp_kernels.reference import moe_lora_dense, moe_lora_loop, moe_lora_ref, moe_lora_smart_dense


def naive_moe_lora(x, A, B, idx, w, *, base_weight=None, base_bias=None, scale=1.0, activation="identity",
                   bias_a=None, bias_b=None, hidden_mask=None):
    x, A, B, w = x.double(), A.double(), B.double(), w.double()
    T = x.shape[0]
    y = torch.zeros(T, B.shape[2], dtype=torch.float64)
    for t in range(T):
        if base_weight is not None:
            y[t] += base_weight.double() @ x[t]
        if base_bias is not None:
            y[t] += base_bias.double()
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = x[t] @ A[e]
            if bias_a is not None:
                h = h + bias_a[e].double()
            if activation == "relu":
                h = h.clamp(min=0)
            if hidden_mask is not None:
                h = h * hidden_mask[t, j].double()
            out = h @ B[e]
            if bias_b is not None:
                out = out + bias_b[e].double()
            y[t] += scale * w[t, j] * out
    return y


def make_inputs(T, d_in, d_out, E, r, k, *, routing="random", dtype=torch.float32, base=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g, dtype=dtype)
    A = torch.randn(E, d_in, r, generator=g, dtype=dtype) / d_in**0.5
    B = torch.randn(E, r, d_out, generator=g, dtype=dtype) / r**0.5
    if routing == "random":
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    elif routing == "one_expert":  # every row's first choice is expert 0
        rest = [1 + torch.randperm(E - 1, generator=g)[: k - 1] for _ in range(T)]
        idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), r]) for r in rest]).int()
    elif routing == "skip_last":  # expert E-1 gets no rows
        idx = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)]).int()
    else:
        raise ValueError(routing)
    w = torch.softmax(torch.randn(T, k, generator=g, dtype=dtype), -1)
    kw = {}
    if base:
        kw["base_weight"] = torch.randn(d_out, d_in, generator=g, dtype=dtype) / d_in**0.5
        kw["base_bias"] = torch.randn(d_out, generator=g, dtype=dtype)
    if bias:
        kw["bias_a"] = torch.randn(E, r, generator=g, dtype=dtype)
        kw["bias_b"] = torch.randn(E, d_out, generator=g, dtype=dtype)
    return x, A, B, idx, w, kw


# Named shapes (T, d_in, d_out, E, r, k, routing): each carries the boundary it hits.
CASES = [
    pytest.param(7, 12, 10, 4, 3, 2, "random", id="small-random"),
    pytest.param(1, 5, 3, 3, 2, 1, "random", id="T=1,k=1"),  # a single token; one expert per row
    pytest.param(9, 13, 11, 5, 7, 2, "random", id="odd-dims"),  # non-power-of-two everywhere
    pytest.param(6, 8, 8, 3, 4, 3, "random", id="k=E"),  # every expert chosen by every row
    pytest.param(8, 8, 6, 4, 2, 2, "skip_last", id="empty-expert"),  # an expert with no rows
    pytest.param(8, 8, 6, 4, 2, 2, "one_expert", id="all-rows-on-expert-0"),  # one expert takes every row
]
FORMULATIONS = [moe_lora_ref, moe_lora_loop, moe_lora_dense, moe_lora_smart_dense]


@pytest.mark.parametrize("fn", FORMULATIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("T,d_in,d_out,E,r,k,routing", CASES)
@pytest.mark.parametrize("activation,base,bias", [("identity", True, False), ("relu", False, True),
                                                  ("relu", True, True)])
def test_formulations_match_naive_loop(fn, T, d_in, d_out, E, r, k, routing, activation, base, bias):
    x, A, B, idx, w, kw = make_inputs(T, d_in, d_out, E, r, k, routing=routing, base=base, bias=bias,
                                      dtype=torch.float64)
    y = fn(x, A, B, idx, w, scale=0.7, activation=activation, **kw)
    torch.testing.assert_close(y, naive_moe_lora(x, A, B, idx, w, scale=0.7, activation=activation, **kw))


@pytest.mark.parametrize("T,d_in,d_out,E,r,k,routing", CASES[:4])
def test_public_moe_lora_gradients_match_naive(T, d_in, d_out, E, r, k, routing):
    x, A, B, idx, w, kw = make_inputs(T, d_in, d_out, E, r, k, routing=routing, bias=True, dtype=torch.float64)
    leaves = [x, A, B, w, kw["bias_a"], kw["bias_b"]]
    for t in leaves:
        t.requires_grad_(True)
    dy = torch.randn(T, d_out, dtype=torch.float64)
    args = dict(base_weight=kw["base_weight"], base_bias=kw["base_bias"], scale=0.5, activation="relu")
    y = ik.moe_lora(x, A, B, idx, w, expert_bias=(kw["bias_a"], kw["bias_b"]), backend="reference", **args)
    ref = naive_moe_lora(x, A, B, idx, w, bias_a=kw["bias_a"], bias_b=kw["bias_b"], **args)
    got = torch.autograd.grad(y, leaves, dy)
    want = torch.autograd.grad(ref, leaves, dy)
    for name, g, h in zip(["x", "A", "B", "topk_w", "bias_a", "bias_b"], got, want):
        torch.testing.assert_close(g, h, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("T,d_in,d_out,E,r,k,routing", CASES)
def test_hidden_mask_scales_each_assignments_activation(T, d_in, d_out, E, r, k, routing):
    # Expert dropout's semantics: mask[t, j] multiplies phi(x A_e + ba_e) of assignment j of row t only.
    x, A, B, idx, w, kw = make_inputs(T, d_in, d_out, E, r, k, routing=routing, bias=True)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(T, k, r, generator=g) > 0.3).float() / 0.7
    if k > 1:
        idx[0, 1] = idx[0, 0]  # a repeated expert in a row: its two assignments keep their own masks
    leaves = [t.clone().requires_grad_() for t in (x, A, B, w, kw["bias_a"], kw["bias_b"])]
    lx, lA, lB, lw, lba, lbb = leaves
    args = dict(base_weight=kw["base_weight"], base_bias=kw["base_bias"], scale=0.7, activation="relu")
    y = moe_lora_ref(lx, lA, lB, idx, lw, bias_a=lba, bias_b=lbb, hidden_mask=mask, **args)
    want = naive_moe_lora(x, A, B, idx, w, bias_a=kw["bias_a"], bias_b=kw["bias_b"], hidden_mask=mask, **args)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    dleaves = [t.double().clone().requires_grad_() for t in (x, A, B, w, kw["bias_a"], kw["bias_b"])]
    dx, dA, dB, dw, dba, dbb = dleaves
    naive = naive_moe_lora(dx, dA, dB, idx, dw, bias_a=dba, bias_b=dbb, hidden_mask=mask, **args)
    for name, got, ref in zip("x A B w ba bb".split(), grads, torch.autograd.grad(naive, dleaves, dy.double())):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_dw_identity_from_method_spec():
    # METHOD.md: dw_tj = s * <phi(x_t A_e), dy_t B_e^T>, so expert outputs need not be stored.
    x, A, B, idx, w, _ = make_inputs(5, 6, 4, 3, 2, 2, base=False, dtype=torch.float64)
    w.requires_grad_(True)
    dy = torch.randn(5, 4, dtype=torch.float64)
    (gw,) = torch.autograd.grad(moe_lora_ref(x, A, B, idx, w, scale=0.3), [w], dy)
    e = idx.long()
    h = torch.einsum("td,tkdr->tkr", x, A[e])
    t = torch.einsum("to,tkro->tkr", dy, B[e])
    torch.testing.assert_close(gw, 0.3 * (h * t).sum(-1))


def test_gradcheck_float64_reference_backend():
    x, A, B, idx, w, kw = make_inputs(4, 5, 3, 3, 2, 2, bias=True, dtype=torch.float64)
    ba, bb = kw.pop("bias_a"), kw.pop("bias_b")

    def f(x, A, B, w, ba, bb):
        return ik.moe_lora(x, A, B, idx, w, expert_bias=(ba, bb), scale=0.9, activation="relu", backend="reference",
                           **kw)

    inputs = [t.clone().requires_grad_(True) for t in (x, A, B, w, ba, bb)]
    assert torch.autograd.gradcheck(f, inputs)


def test_low_precision_accumulates_in_fp32():
    # The reference upcasts: its bf16 result is within bf16 output rounding of the fp32 result,
    # while the no-upcast loop in bf16 is measurably worse (that loop is the "eager" bound of STYLE rule 8).
    x, A, B, idx, w, kw = make_inputs(64, 256, 32, 4, 16, 2)
    ref32 = moe_lora_ref(x, A, B, idx, w, **kw)
    low = [t.bfloat16() for t in (x, A, B)]
    kw16 = {k: v.bfloat16() for k, v in kw.items()}
    ours = moe_lora_ref(low[0], low[1], low[2], idx, w, **kw16).float()
    eager = moe_lora_loop(low[0], low[1], low[2], idx, w, **kw16).float()
    err_ours = (ours - ref32).abs().max()
    err_eager = (eager - ref32).abs().max()
    assert err_ours <= 2 * err_eager + 1e-2


def test_empty_batch_returns_empty():
    x, A, B, idx, w, kw = make_inputs(3, 4, 5, 2, 2, 1)
    y = ik.moe_lora(x[:0], A, B, idx[:0], w[:0], backend="reference", **kw)
    assert y.shape == (0, 5)


# ----------------------------------------------------------------------------------------------- routing
def test_route_topk_matches_naive_and_renormalises():
    logits = torch.randn(6, 5)
    idx, w, probs = ik.route_topk(logits, 2)
    for n in range(6):
        p = torch.softmax(logits[n], -1)
        order = torch.argsort(p, descending=True)[:2]
        assert idx[n].tolist() == order.tolist()
        torch.testing.assert_close(w[n], p[order] / p[order].sum())
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    assert idx.dtype == torch.int32 and w.dtype == torch.float32


def test_route_topk_never_picks_inactive_experts():
    # Inactive (pruned / other tasks') experts get the highest logits and must still never be chosen.
    logits = torch.zeros(50, 6)
    logits[:, [1, 4]] = 10.0
    active = torch.tensor([True, False, True, True, False, True])
    idx, w, probs = ik.route_topk(logits, 3, active=active)
    assert not torch.isin(idx, torch.tensor([1, 4], dtype=torch.int32)).any()
    assert (probs[:, [1, 4]] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(50))


def test_route_topk_noise_is_seeded_and_differentiable():
    logits = torch.randn(4, 5, requires_grad=True)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = ik.route_topk(logits, 2, noise_std=1.0, generator=g1)
    b = ik.route_topk(logits, 2, noise_std=1.0, generator=g2)
    assert torch.equal(a[0], b[0])
    a[1][:, 0].sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_expand_sample_routing_repeats_per_token():
    idx = torch.tensor([[0, 2], [1, 0]], dtype=torch.int32)
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    ei, ew = ik.expand_sample_routing(idx, w, 3)
    assert ei.shape == (6, 2)
    assert ei[:3].eq(idx[0]).all() and ei[3:].eq(idx[1]).all()
    assert ew[4].tolist() == [0.5, 0.5]


# ---------------------------------------------------------------------------------------------- subspace
def test_subspace_basis_energy_threshold():
    # Columns built from 3 orthogonal directions with energies 100, 10, 1 (share 0.900, 0.090, 0.009).
    Q, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))
    M = Q @ torch.diag(torch.tensor([10.0, 10**0.5, 1.0], dtype=torch.float64)) @ torch.eye(3, 5, dtype=torch.float64)
    assert ik.subspace_basis(M, 0.85).shape == (8, 1)
    assert ik.subspace_basis(M, 0.95).shape == (8, 2)
    U = ik.subspace_basis(M, 1.0)
    assert U.shape == (8, 3)
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(ik.project_out(M, U), torch.zeros_like(M))  # full energy spans M
    assert ik.subspace_basis(torch.zeros(8, 4), 0.95).shape == (8, 0)
    assert ik.subspace_basis(torch.zeros(8, 0), 0.95).shape == (8, 0)


def test_penalty_and_projection_against_direct_formula():
    U, _ = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))
    U2, _ = torch.linalg.qr(torch.randn(4, 3, dtype=torch.float64))
    M1 = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)  # a batch of 3 candidates (C, d, r)
    M2 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    P = torch.eye(6, dtype=torch.float64) - U @ U.T
    P2 = torch.eye(4, dtype=torch.float64) - U2 @ U2.T
    want = 0.3 * ((P @ M1).square().sum() + (P2 @ M2).square().sum())
    got = ik.subspace_penalty([M1, M2], [U, U2], 0.3, backend="reference")
    torch.testing.assert_close(got, want)
    g1, g2 = torch.autograd.grad(got, [M1, M2])
    torch.testing.assert_close(g1, 2 * 0.3 * P @ M1.detach())
    torch.testing.assert_close(g2, 2 * 0.3 * P2 @ M2.detach())
    G1, G2 = M1.detach().clone(), M2.detach().clone()
    ik.project_grad_([G1, G2], [U, U2], backend="reference")
    torch.testing.assert_close(G1, P @ M1.detach())
    torch.testing.assert_close(G2, P2 @ M2.detach())


def test_project_grad_writes_through_transposed_view():
    # B_c (C, r, d_out) is projected on its transpose: the in-place op must write through the view.
    U, _ = torch.linalg.qr(torch.randn(7, 2, dtype=torch.float64))
    Bc = torch.randn(2, 3, 7, dtype=torch.float64)
    want = (Bc.transpose(1, 2) - U @ (U.T @ Bc.transpose(1, 2))).transpose(1, 2)
    ik.project_grad_([Bc.transpose(1, 2)], [U], backend="reference")
    torch.testing.assert_close(Bc, want)


def test_empty_basis_is_no_constraint():
    M = torch.randn(5, 3, requires_grad=True)
    U = torch.zeros(5, 0)
    torch.testing.assert_close(ik.subspace_penalty([M], [U], 2.0), 2.0 * M.detach().square().sum())
    G = M.detach().clone()
    ik.project_grad_([G], [U])
    torch.testing.assert_close(G, M.detach())
