"""Pruning by routing mass, rank pruning, and per-expert gradient norms (igsp/method/pruning.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from igsp.method import expert_grad_norms, prune_candidates, prune_rank_components


def _one_layer(make_history, **kw):
    model, layers = make_history(**kw)
    return model, layers[:1], layers[0][1]


def test_prune_removes_low_mass_candidates_and_router_columns_follow(make_history):
    # Pool: 2 historical + 4 candidates (ids 2..5). Shares 0.01 (ids 3, 5) < tau = 0.05 -> removed.
    _, layers, layer = _one_layer(make_history, n_hist=2, n_cand=4)
    name = layers[0][0]
    A, B = layer.A_train.detach().clone(), layer.B_train.detach().clone()
    W1 = layer.routers["1"].weight.detach().clone()
    W0, act0 = layer.routers["0"].weight.detach().clone(), layer.routers["0"].active.clone()
    usage = torch.tensor([0.30, 0.30, 0.25, 0.01, 0.13, 0.01])
    report = {}
    removed = prune_candidates(layers, {name: usage}, 0.05, report=report)
    assert removed == {name: [3, 5]}
    assert layer.num_frozen == 2 and layer.num_trainable == 2
    assert torch.equal(layer.A_train.detach(), A[[0, 2]]) and torch.equal(layer.B_train.detach(), B[[0, 2]])
    assert torch.equal(layer.routers["1"].weight.detach(), W1[[0, 1, 2, 4]])
    assert torch.equal(layer.routers["0"].weight.detach(), W0[[0, 1, 2, 4]])
    assert torch.equal(layer.routers["0"].active, act0[[0, 1, 2, 4]])
    assert report[name]["kept"] == [2, 4] and report[name]["removed"] == [3, 5]
    assert report[name]["share"] == pytest.approx(usage.tolist())


def test_share_is_of_the_total_routed_mass(make_history):
    # Unnormalised usage: shares are u / sum(u). Candidate 3 has 0.072 / 1.2 = 0.06 (kept at tau = 0.05),
    # candidate 2 has 0.03 / 1.2 = 0.025 (removed): the total includes the historical experts. (Shares among
    # candidates only, 0.29 and 0.71, would keep both.)
    _, layers, layer = _one_layer(make_history, n_hist=2, n_cand=2)
    removed = prune_candidates(layers, {layers[0][0]: torch.tensor([0.6, 0.498, 0.03, 0.072])}, 0.05)
    assert removed[layers[0][0]] == [2]


def test_min_keep_protects_the_highest_share_candidates(make_history):
    # Same shares as above; min_keep = 3 keeps ids 2, 4 and (the tie 3 vs 5 broken by the lower id) 3.
    _, layers, _ = _one_layer(make_history, n_hist=2, n_cand=4)
    usage = torch.tensor([0.30, 0.30, 0.25, 0.01, 0.13, 0.01])
    assert prune_candidates(layers, {layers[0][0]: usage}, 0.05, min_keep=3)[layers[0][0]] == [5]


def test_first_task_keeps_top_k_candidates(make_history):
    # No history and top_k = 2: the router needs 2 active experts, so the floor keeps 2 candidates even
    # though two shares are below tau; the layer still runs afterwards.
    model, layers, layer = _one_layer(make_history, n_hist=0, n_cand=3, top_k=2)
    removed = prune_candidates(layers, {layers[0][0]: torch.tensor([0.96, 0.02, 0.02])}, 0.05)
    assert removed[layers[0][0]] == [2]
    assert layer.num_trainable == 2
    model(torch.randn(3, 12))


def test_all_candidates_go_when_history_carries_the_task(make_history):
    # High reuse: the 2 historical experts take 99% of the mass, top_k = 1 -> every candidate is pruned.
    model, layers, layer = _one_layer(make_history, n_hist=2, n_cand=2)
    removed = prune_candidates(layers, {layers[0][0]: torch.tensor([0.6, 0.39, 0.005, 0.005])}, 0.05)
    assert removed[layers[0][0]] == [2, 3] and layer.num_trainable == 0
    model(torch.randn(3, 12))


def test_prune_rejects_bad_usage(make_history):
    _, layers, _ = _one_layer(make_history, n_hist=2, n_cand=2)
    with pytest.raises(ValueError, match="4 entries"):
        prune_candidates(layers, {layers[0][0]: torch.ones(3)}, 0.05)
    with pytest.raises(ValueError, match="tau"):
        prune_candidates(layers, {layers[0][0]: torch.ones(4)}, 1.5)
    with pytest.raises(ValueError, match="finite"):
        prune_candidates(layers, {layers[0][0]: torch.tensor([1.0, -1.0, 0.5, 0.5])}, 0.05)


def test_routing_mass_is_the_gradient_flow_indicator(make_history):
    # End to end: candidate 4 is never routed (its router row points away from every positive input), so
    # its usage is 0 and its gradient is exactly 0; the pruning removes it and keeps the routed ones.
    model, layers, layer = _one_layer(make_history, n_hist=2, n_cand=3, top_k=1, cand_b_std=0.3)
    name = layers[0][0]
    with torch.no_grad():
        w = layer.routers["1"].weight
        w.copy_(torch.randn_like(w) * 0.1)
        w[4] = -10.0
    x = torch.rand(32, 12) + 0.1
    model.train()
    layer.reset_usage()
    F.mse_loss(model(x), torch.randn(32, 10)).backward()
    usage = layer.usage()
    norms = expert_grad_norms(layers)[name]
    assert float(usage[4]) == 0.0 and norms[2] == 0.0
    assert all(n > 0 for n, u in zip(norms, usage[2:]) if u > 0)
    # The norms are ||dA_c|| + ||dB_c|| of each trainable expert.
    expected = [float(layer.A_train.grad[c].norm() + layer.B_train.grad[c].norm()) for c in range(3)]
    assert norms == pytest.approx(expected, rel=1e-6)
    removed = prune_candidates(layers, {name: usage}, 1e-3)
    assert 4 in removed[name]


def test_rank_pruning_zeroes_negligible_components_and_they_stay_zero(make_history):
    # Expert with unit A columns and B rows of norm 1, 1, 1e-3: component 2 holds 1e-6 / 2 of the squared
    # energy -> zeroed at rank_energy 0.99; the two others hold it all and are untouched.
    model, layers, layer = _one_layer(make_history, n_hist=2, n_cand=2, rank=3)
    with torch.no_grad():
        layer.A_train.copy_(F.normalize(torch.randn_like(layer.A_train), dim=1))
        layer.B_train.copy_(F.normalize(torch.randn_like(layer.B_train), dim=2))
        layer.B_train[0, 2] *= 1e-3
    before = (layer.A_train.detach().clone(), layer.B_train.detach().clone())
    report = {}
    prune_candidates(layers, {layers[0][0]: torch.full((4,), 0.25)}, 0.05, rank_energy=0.99, report=report)
    assert report[layers[0][0]]["rank_zeroed"] == {2: [2]}
    A, B = layer.A_train.detach(), layer.B_train.detach()
    assert float(A[0, :, 2].abs().max()) == 0.0 and float(B[0, 2].abs().max()) == 0.0
    assert torch.equal(A[0, :, :2], before[0][0, :, :2]) and torch.equal(A[1], before[0][1])
    # A zeroed component has zero gradients and zero weight decay: it stays zero under AdamW while the
    # expert's other components train (its router row makes it win every positive input).
    with torch.no_grad():
        layer.routers["1"].weight[2] = 10.0
    opt = torch.optim.AdamW([layer.A_train, layer.B_train], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(torch.rand(16, 12) + 0.1).square().mean().backward()
        opt.step()
    A, B = layer.A_train.detach(), layer.B_train.detach()
    assert float(A[0, :, 2].abs().max()) == 0.0 and float(B[0, 2].abs().max()) == 0.0
    assert float((A[0, :, :2] - before[0][0, :, :2]).abs().max()) > 1e-3


def test_rank_pruning_skips_untrained_experts(make_history):
    # B = 0 (fresh candidates): no energy at all, nothing to rank, nothing zeroed.
    _, _, layer = _one_layer(make_history, n_hist=0, n_cand=2)
    A = layer.A_train.detach().clone()
    assert prune_rank_components(layer, 0.9) == {}
    assert_close(layer.A_train.detach(), A, atol=0, rtol=0)
