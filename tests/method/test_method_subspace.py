"""Historical bases, the phase-1 regularizer and the phase-2 projection (igsp/method/subspace.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from igsp.method import (
    LayerBasis,
    OrthogonalProjector,
    compute_bases,
    orthogonality_error,
    out_of_subspace_norms,
    project_candidates_,
    snapshot_candidates,
    subspace_regularizer,
)


def _hist_mats(layer):
    """Historical columns computed independently of the library: A_f[:, j] and B_f[j, :] for every f, j."""
    A = [layer.A_frozen[f, :, j] for f in range(layer.num_frozen) for j in range(layer.rank)]
    B = [layer.B_frozen[f, j, :] for f in range(layer.num_frozen) for j in range(layer.rank)]
    return torch.stack(A, 1).double(), torch.stack(B, 1).double()


def _perp(U):
    U = U.double()
    return torch.eye(U.shape[0], dtype=torch.float64) - U @ U.T


# ------------------------------------------------------------------------------------------------ bases
@pytest.mark.parametrize("energy", [0.8, 0.95, 1.0])  # a loose, the default and the full threshold
def test_bases_span_history_to_the_energy_threshold(make_history, energy):
    _, layers = make_history(n_hist=2, rank=3)
    bases = compute_bases(layers, energy=energy)
    for name, layer in layers:
        for M, U in zip(_hist_mats(layer), (bases[name].U_in, bases[name].U_out)):
            m = U.shape[1]
            assert 1 <= m <= M.shape[1]
            assert_close(U.double().T @ U.double(), torch.eye(m, dtype=torch.float64), atol=1e-5, rtol=0)
            s2 = torch.linalg.svdvals(M).square()
            cum = torch.cumsum(s2, 0) / s2.sum()
            # m is the smallest count reaching the threshold (GPM), and U keeps that energy of the columns.
            assert cum[m - 1] >= energy - 1e-9
            assert m == 1 or cum[m - 2] < energy
            kept = (U.double().T @ M).square().sum() / M.square().sum()
            assert_close(kept, cum[m - 1], atol=1e-5, rtol=0)
            if energy == 1.0:  # the full basis spans every historical column
                assert float((_perp(U) @ M).norm()) < 1e-4 * float(M.norm())


def test_bases_orientation_low_rank_history(make_history):
    # History confined to known subspaces: A columns in span(P_in) (2-D of R^12 / R^16), B rows in span(P_out)
    # (2-D of R^16 / R^10). The bases must recover exactly those planes (U_in for A, U_out for B^T).
    _, layers = make_history(n_hist=2, rank=3)
    planes = {}
    for name, layer in layers:
        P_in = torch.linalg.qr(torch.randn(layer.in_features, 2)).Q
        P_out = torch.linalg.qr(torch.randn(layer.out_features, 2)).Q
        with torch.no_grad():
            layer.A_frozen.copy_(torch.einsum("dk,fkr->fdr", P_in, torch.randn(2, 2, 3)))
            layer.B_frozen.copy_(torch.einsum("ok,fkr->fro", P_out, torch.randn(2, 2, 3)))
        planes[name] = (P_in, P_out)
    bases = compute_bases(layers, energy=0.999)
    for name, _ in layers:
        for P, U in zip(planes[name], (bases[name].U_in, bases[name].U_out)):
            assert U.shape[1] == 2
            assert_close(U @ (U.T @ P), P, atol=1e-5, rtol=0)


def test_no_history_gives_empty_bases(make_history):
    # First task: no frozen experts -> m = 0 on both sides.
    _, layers = make_history(n_hist=0, n_cand=2)
    bases = compute_bases(layers)
    assert all(b.empty and b.U_in.shape == (layer.in_features, 0) for (_, layer), b in zip(layers, bases.values()))


# ------------------------------------------------------------------------------------------- regularizer
# "auto" is the compiled C++ op where it is built, else the reference; "reference" pins the eager path.
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("lam", [1.0, 0.37])  # unit weight and an arbitrary one (R is linear in lam)
def test_regularizer_equals_hand_computation(make_history, lam, backend):
    _, layers = make_history(n_hist=2, n_cand=3, cand_b_std=0.5)
    bases = compute_bases(layers)
    R = subspace_regularizer(layers, bases, lam, backend=backend)
    expected = torch.zeros((), dtype=torch.float64)
    for name, layer in layers:
        Pi, Po = _perp(bases[name].U_in), _perp(bases[name].U_out)
        for c in range(layer.num_trainable):
            expected += (Pi @ layer.A_train[c].double()).square().sum()
            expected += (Po @ layer.B_train[c].double().T).square().sum()
    assert R.dim() == 0 and R.requires_grad
    assert_close(R.double(), lam * expected, rtol=1e-5, atol=0)


def test_regularizer_gradient_pulls_candidates_into_the_subspace(make_history):
    # SGD on R alone: dR/dM = 2 lam P_perp M, so the outside part shrinks by exactly (1 - 2 lr lam) per step
    # (0.8 with lr 0.1, lam 1: 0.8^5 = 0.328 after 5 steps) while the inside part U^T M does not move.
    _, layers = make_history(n_hist=2, n_cand=3, cand_b_std=0.5)
    bases = compute_bases(layers)
    params = [p for _, layer in layers for p in (layer.A_train, layer.B_train)]
    opt = torch.optim.SGD(params, lr=0.1)
    before = out_of_subspace_norms(layers, bases)
    inside0 = {n: (bases[n].U_in.T @ layer.A_train.detach(), bases[n].U_out.T @ layer.B_train.detach().transpose(1, 2))
               for n, layer in layers}
    for _ in range(5):
        opt.zero_grad()
        subspace_regularizer(layers, bases, 1.0).backward()
        opt.step()
    after = out_of_subspace_norms(layers, bases)
    for name, layer in layers:
        for b, a in zip(before[name], after[name]):
            assert b > 0.1
            assert_close(torch.tensor(a), torch.tensor(b * 0.8**5), rtol=1e-4, atol=0)
        assert_close(bases[name].U_in.T @ layer.A_train.detach(), inside0[name][0], atol=1e-5, rtol=1e-5)
        assert_close(bases[name].U_out.T @ layer.B_train.detach().transpose(1, 2), inside0[name][1],
                     atol=1e-5, rtol=1e-5)


def test_regularizer_is_zero_without_history(make_history):
    # First task: no history, no regularization; the zero still adds to a loss.
    model, layers = make_history(n_hist=0, n_cand=2, cand_b_std=0.5)
    R = subspace_regularizer(layers, compute_bases(layers), 1.0)
    assert R.dim() == 0 and float(R) == 0.0 and not R.requires_grad
    (model(torch.randn(4, 12)).sum() + R).backward()


def test_regularizer_rejects_bad_input(make_history):
    _, layers = make_history()
    bases = compute_bases(layers)
    with pytest.raises(ValueError, match="lam"):
        subspace_regularizer(layers, bases, -1.0)
    with pytest.raises(KeyError, match="no entry for layer"):
        subspace_regularizer(layers, {layers[0][0]: bases[layers[0][0]]}, 1.0)
    with pytest.raises(ValueError, match="U_in"):
        wrong = dict(bases)
        wrong[layers[0][0]] = LayerBasis(torch.zeros(5, 1), bases[layers[0][0]].U_out)
        subspace_regularizer(layers, wrong, 1.0)
    with pytest.raises(TypeError, match="pairs"):
        subspace_regularizer(layers[0][1], bases, 1.0)


# ----------------------------------------------------------------------------------------------- phase 2
def _train_phase2(make_history, *, anchor_projection: bool, grad_projection: bool = True, steps: int = 15):
    """AdamW with weight decay on a classification loss; returns layers, bases and the phase-2 anchor."""
    model, layers = make_history(n_hist=2, n_cand=3, cand_b_std=0.3)
    bases = compute_bases(layers)
    # Phase 1 leaves candidates partly *inside* the subspace; make that explicit so weight decay has an
    # in-subspace part to act on.
    with torch.no_grad():
        for name, layer in layers:
            layer.A_train.add_(bases[name].U_in @ torch.randn(3, bases[name].m_in, 3))
    x, y = torch.randn(64, 12), torch.randint(0, 10, (64,))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    proj = OrthogonalProjector(layers, bases, project_grads=grad_projection)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        proj.before_step()
        opt.step()
        if anchor_projection:
            proj.after_step()
    return layers, bases, proj.anchor


def _relative_inside(layers, bases, anchor):
    """Independent check: max ||U^T delta|| / ||delta|| over layers and sides, and the smallest ||delta||."""
    worst, smallest = 0.0, float("inf")
    for name, layer in layers:
        a0, b0 = anchor[name]
        for d, U in ((layer.A_train.detach() - a0, bases[name].U_in),
                     ((layer.B_train.detach() - b0).transpose(1, 2), bases[name].U_out)):
            n = float(d.double().norm())
            smallest = min(smallest, n)
            worst = max(worst, float((U.double().T @ d.double()).norm()) / n)
    return worst, smallest


def test_phase2_updates_are_orthogonal_to_history(make_history):
    layers, bases, anchor = _train_phase2(make_history, anchor_projection=True)
    worst, moved = _relative_inside(layers, bases, anchor)
    assert moved > 1e-2  # the candidates really trained (15 AdamW steps at lr 1e-2)
    assert worst < 1e-5
    assert orthogonality_error(layers, bases, anchor) == pytest.approx(worst, abs=1e-9)


def test_phase2_gradient_projection_alone_is_not_enough_with_adamw(make_history):
    # The control that justifies the anchor projection: same run, gradients projected, step not.
    # Adam's per-coordinate scaling and AdamW's decay of the in-subspace part leave the complement by > 1%.
    layers, bases, anchor = _train_phase2(make_history, anchor_projection=False)
    worst, moved = _relative_inside(layers, bases, anchor)
    assert moved > 1e-2
    assert worst > 1e-2


def test_phase2_anchor_projection_alone_suffices(make_history):
    # The parameter-change projection is the invariant; the gradient projection only keeps Adam's moments clean.
    layers, bases, anchor = _train_phase2(make_history, anchor_projection=True, grad_projection=False)
    worst, _ = _relative_inside(layers, bases, anchor)
    assert worst < 1e-5


@pytest.mark.parametrize("backend", ["auto", "reference"])  # B's projection goes through a transposed view
def test_project_grads_matches_hand_projection(make_history, backend):
    model, layers = make_history(n_hist=2, n_cand=3, cand_b_std=0.3)
    bases = compute_bases(layers)
    model(torch.randn(8, 12)).square().sum().backward()
    grads = {n: (layer.A_train.grad.clone(), layer.B_train.grad.clone()) for n, layer in layers}
    project_candidates_(layers, bases, grads=True, backend=backend)
    for name, layer in layers:
        ga, gb = grads[name]
        Pi, Po = _perp(bases[name].U_in).float(), _perp(bases[name].U_out).float()
        assert_close(layer.A_train.grad, Pi @ ga, atol=1e-6, rtol=1e-5)
        assert_close(layer.B_train.grad, (Po @ gb.transpose(1, 2)).transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_projection_leaves_first_task_alone_and_checks_the_anchor(make_history):
    # No history: the projection is the identity (no constraint on the first task).
    _, layers = make_history(n_hist=0, n_cand=2, cand_b_std=0.3)
    bases = compute_bases(layers)
    anchor = snapshot_candidates(layers)
    with torch.no_grad():
        for _, layer in layers:
            layer.A_train.add_(1.0)
    expected = {n: layer.A_train.detach().clone() for n, layer in layers}
    project_candidates_(layers, bases, anchor=anchor, grads=False)
    for name, layer in layers:
        assert torch.equal(layer.A_train.detach(), expected[name])
    # A pool change (pruning) after the snapshot is caught.
    layers[0][1].remove_experts([layers[0][1].trainable_expert_ids()[0]])
    with pytest.raises(ValueError, match="pool changed"):
        project_candidates_(layers, bases, anchor=anchor, grads=False)
