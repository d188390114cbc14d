"""Activation bases (GPM-style growth from input / output-gradient Grams), the decoupled regularizer and the
out-of-subspace diagnostics."""

from __future__ import annotations

import pytest
import torch

from igsp.method import (
    LayerBasis,
    compute_bases,
    grow_basis,
    outside_fractions,
    representation_grams,
    subspace_decay_,
    subspace_regularizer,
)


def _orth(d: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))[0]


# ----------------------------------------------------------------------------------------------- grow_basis
def test_basis_of_low_rank_inputs_is_their_span():
    # Inputs confined to a 3-dim subspace of R^10 (plus nothing else): with energy 1.0 the basis is exactly that
    # span (3 columns, projector equal), with 0.95 at most 3 columns and at least the dominant direction.
    S = _orth(10, 3, 0)
    X = torch.randn(200, 3, dtype=torch.float64) * torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64) @ S.T
    U = grow_basis(torch.zeros(10, 0), X.T @ X, 1.0)
    assert U.shape == (10, 3)
    torch.testing.assert_close((U @ U.T).double(), S @ S.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(3), atol=1e-5, rtol=0)
    assert 1 <= grow_basis(torch.zeros(10, 0), X.T @ X, 0.95).shape[1] <= 3


def test_gpm_criterion_counts_the_energy_the_basis_already_holds():
    # Hand example in R^4 with an orthogonal Gram: energies 8, 4, 2, 1 on e1..e4 (total 15). U = [e1] already
    # holds 8; energy 0.9 needs 13.5: the residual's largest (e2: 4, e3: 2) bring 14 >= 13.5 -> adds e2, e3.
    K = torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0]))
    U0 = torch.eye(4)[:, :1]
    U = grow_basis(U0, K, 0.9)
    assert U.shape == (4, 3)
    torch.testing.assert_close(U[:, 0], U0[:, 0])  # the old columns stay as they were
    spanned = (U @ U.T).diagonal()
    torch.testing.assert_close(spanned, torch.tensor([1.0, 1.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    # Already enough: nothing added.
    assert grow_basis(torch.eye(4)[:, :2], K, 0.75).shape == (4, 2)


def test_second_task_adds_only_its_new_directions():
    # Task A's inputs span S_a (2 dims), task B's span S_a + one new direction: the basis grows by one column.
    S = _orth(8, 3, 1)
    Xa = torch.randn(100, 2, dtype=torch.float64) @ S[:, :2].T
    Xb = torch.randn(100, 3, dtype=torch.float64) @ S.T
    Ua = grow_basis(torch.zeros(8, 0), Xa.T @ Xa, 1.0)
    Ub = grow_basis(Ua, Xb.T @ Xb, 1.0)
    assert (Ua.shape[1], Ub.shape[1]) == (2, 3)
    torch.testing.assert_close((Ub @ Ub.T).double(), S @ S.T, atol=1e-5, rtol=0)


def test_grow_basis_rejects_bad_input():
    with pytest.raises(ValueError, match="same d"):
        grow_basis(torch.zeros(4, 0), torch.eye(5), 0.9)
    with pytest.raises(ValueError, match="energy"):
        grow_basis(torch.zeros(4, 0), torch.eye(4), 0.0)
    with pytest.raises(ValueError, match="finite"):
        grow_basis(torch.zeros(4, 0), torch.full((4, 4), float("nan")), 0.9)


# ------------------------------------------------------------------------------------ representation_grams
def test_grams_are_input_and_output_gradient_gram_matrices(make_history):
    # Against explicit autograd: K_in = X^T X over the rows whose output gradient is non-zero, K_out = G^T G.
    model, layers = make_history(n_hist=1, n_cand=2, cand_b_std=0.3)
    x = torch.randn(6, 12)
    target = torch.randn(6, 10)
    # Rows 4, 5 of the output are cut from the loss: their gradients are zero in every layer (row-wise MLP).
    mask = torch.tensor([1.0, 1, 1, 1, 0, 0])[:, None]

    def loss() -> torch.Tensor:
        return ((model(x) - target) * mask).square().sum()

    grams = representation_grams(layers, [loss, loss])  # two batches: everything counted twice
    inputs, outputs = {}, {}

    def keep(name):
        def hook(module, args, out):
            inputs[name], outputs[name] = args[0], out
        return hook

    hooks = [layer.register_forward_hook(keep(n)) for n, layer in layers]
    out = loss()
    gs = torch.autograd.grad(out, [outputs[n] for n, _ in layers])
    for h in hooks:
        h.remove()
    for (n, _), g in zip(layers, gs):
        X, G = inputs[n].double(), g.double()
        Xs = X[:4]  # the rows the loss sees
        torch.testing.assert_close(grams[n][0], 2 * Xs.T @ Xs, rtol=1e-5, atol=1e-5)  # fp32 products
        torch.testing.assert_close(grams[n][1], 2 * G.T @ G, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient was accumulated


def test_grams_need_a_trainable_path(make_history):
    model, layers = make_history(n_hist=1, n_cand=0)
    model.requires_grad_(False)
    with pytest.raises(RuntimeError, match="requires grad"):
        representation_grams(layers, [lambda: model(torch.randn(2, 12)).sum()])


# ---------------------------------------------------------------------------------- decoupled regularizer
def test_decoupled_decay_shrinks_only_the_outside_part(make_history):
    # M <- M - rate (I - UU^T) M: the outside part scales by (1 - rate), the inside part is unchanged; five
    # steps at rate 0.1 leave 0.9^5 of the outside norm, whatever the magnitude of M.
    _, layers = make_history(n_hist=2, n_cand=3, cand_b_std=0.5)
    bases = compute_bases(layers, 0.95)
    before = outside_fractions(layers, bases)
    A0 = {n: layer.A_train.detach().clone() for n, layer in layers}
    for _ in range(5):
        subspace_decay_(layers, bases, 0.1, backend="reference")
    for n, layer in layers:
        U = bases[n].U_in.double()
        a0, a1 = A0[n].double(), layer.A_train.detach().double()
        torch.testing.assert_close(U.T @ a1, U.T @ a0, atol=1e-5, rtol=0)
        out0, out1 = a0 - U @ (U.T @ a0), a1 - U @ (U.T @ a1)
        torch.testing.assert_close(out1, 0.9**5 * out0, atol=1e-5, rtol=0)
    after = outside_fractions(layers, bases)
    for n in before:
        assert all(b < a for a, b in zip(before[n]["A"], after[n]["A"]))


def test_decoupled_rate_one_is_the_hard_projection_and_no_history_is_untouched(make_history):
    _, layers = make_history(n_hist=2, n_cand=2, cand_b_std=0.5)
    bases = compute_bases(layers, 0.95)
    subspace_decay_(layers, bases, 5.0, backend="reference")  # clamped to 1
    assert subspace_regularizer(layers, bases, 1.0, backend="reference").item() == pytest.approx(0.0, abs=1e-8)
    _, fresh = make_history(n_hist=0, n_cand=2, cand_b_std=0.5)
    empty = compute_bases(fresh, 0.95)
    A = [layer.A_train.detach().clone() for _, layer in fresh]
    subspace_decay_(fresh, empty, 0.5, backend="reference")
    assert all(torch.equal(a, layer.A_train) for a, (_, layer) in zip(A, fresh))
    with pytest.raises(ValueError, match="rate"):
        subspace_decay_(fresh, empty, -1.0)


def test_outside_fractions_of_random_candidates_match_the_random_reference(make_history):
    # For random A (Kaiming) the expected squared fraction outside an m-dim subspace of R^d is 1 - m/d; over
    # 400 candidates the mean fraction is within a few percent of sqrt(1 - m/d). B = 0 gives None.
    _, layers = make_history(n_hist=2, n_cand=400)
    d = layers[0][1].in_features
    U = _orth(d, 5, 3).float()
    bases = {n: LayerBasis(U if layer.in_features == d else torch.zeros(layer.in_features, 0),
                           torch.zeros(layer.out_features, 0)) for n, layer in layers}
    fr = outside_fractions(layers, bases)
    name = layers[0][0]
    mean = sum(fr[name]["A"]) / len(fr[name]["A"])
    assert mean == pytest.approx(fr[name]["A_random"], rel=0.05)
    assert fr[name]["A_random"] == pytest.approx((1 - 5 / d) ** 0.5)
    assert all(v is None for v in fr[name]["B"])


def test_grams_are_summed_over_ranks(make_history):
    # Under DDP each rank sees its share of the sample budget; `all_reduce` sums the Grams (here a fake world
    # of two identical ranks: every Gram doubles).
    model, layers = make_history(n_hist=1, n_cand=2, cand_b_std=0.3)
    x = torch.randn(5, 12)

    def loss() -> torch.Tensor:
        return model(x).square().sum()

    one = representation_grams(layers, [loss])
    two = representation_grams(layers, [loss], all_reduce=lambda t: t.mul_(2))
    for n in one:
        torch.testing.assert_close(two[n][0], 2 * one[n][0])
        torch.testing.assert_close(two[n][1], 2 * one[n][1])
