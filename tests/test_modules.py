"""MoELoRALinear and inject_moe_lora on plain torch models (no open_clip)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import igsp_kernels as ik
from igsp_kernels import MoELoRALinear


def layer(E=4, k=2, **kw):
    torch.manual_seed(0)
    m = MoELoRALinear.from_linear(nn.Linear(10, 7), num_experts=E, rank=3, top_k=k, scale=0.5, **kw)
    m.add_router("t0")
    m.set_task("t0")
    with torch.no_grad():
        m.B_train.normal_()
    return m


def test_one_expert_k1_equals_plain_lora():
    m = layer(E=1, k=1)
    x = torch.randn(2, 5, 10)
    want = m.base_layer(x) + 0.5 * (x @ m.A_train[0]) @ m.B_train[0]
    torch.testing.assert_close(m(x), want)


def test_zero_init_experts_leave_output_unchanged():
    base = nn.Linear(10, 7)
    m = MoELoRALinear.from_linear(base, num_experts=3, rank=4, top_k=2)
    m.add_router(0)
    m.set_task(0)
    x = torch.randn(3, 10)
    torch.testing.assert_close(m(x), base(x))


def test_per_sample_routing_shares_experts_across_tokens():
    m = layer()
    x = torch.randn(3, 6, 10)
    y = m(x)
    # Recompute sample 1 alone, routed on its first token, with every token forced to that routing.
    logits = m.routers["t0"](x[1, :1])
    idx, w, _ = ik.route_topk(logits, 2)
    A, B, _ = m.expert_weights()
    want = ik.moe_lora(x[1], A, B, idx.expand(6, 2), w.expand(6, 2), base_weight=m.base_layer.weight,
                       base_bias=m.base_layer.bias, scale=0.5)
    torch.testing.assert_close(y[1], want)


def test_seq_first_layout_matches_batch_first():
    m = layer()
    x = torch.randn(3, 6, 10)
    y_bf = m(x)
    m.batch_first = False
    torch.testing.assert_close(m(x.transpose(0, 1)).transpose(0, 1), y_bf)


def test_per_token_routing_routes_each_row():
    m = layer(routing="token")
    x = torch.randn(2, 4, 10)
    y = m(x)
    rows = x.reshape(-1, 10)
    idx, w, _ = ik.route_topk(m.routers["t0"](rows), 2)
    A, B, _ = m.expert_weights()
    want = ik.moe_lora(rows, A, B, idx, w, base_weight=m.base_layer.weight, base_bias=m.base_layer.bias, scale=0.5)
    torch.testing.assert_close(y.reshape(-1, 7), want)


def test_freeze_moves_experts_and_keeps_outputs():
    m = layer(E=4)
    x = torch.randn(3, 5, 10)
    before = m(x)
    new_ids = m.freeze_experts([2])
    assert new_ids == [0] and m.num_frozen == 1 and m.num_trainable == 3
    assert not m.A_frozen.requires_grad and m.A_train.requires_grad
    torch.testing.assert_close(m(x), before)  # routers were permuted with the experts


def test_remove_experts_frees_parameters_and_are_never_chosen():
    m = layer(E=5)
    m.remove_experts([1, 3])
    assert m.num_experts == 3 and m.A_train.shape == (3, 10, 3)
    assert m.routers["t0"].weight.shape == (3, 10)
    m.train()
    m(torch.randn(20, 4, 10))
    assert m.usage_weight.shape == (3,)
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 3\) \(the expert pool\), got \[3\]"):
        m.remove_experts([3])


def test_new_experts_active_only_in_named_router():
    m = layer(E=2)
    m.add_router("t1")
    ids = m.add_experts(2, active_in=["t1"])
    assert ids == [2, 3]
    assert m.routers["t0"].active.tolist() == [True, True, False, False]
    assert m.routers["t1"].active.tolist() == [True, True, True, True]
    m.set_task("t0")
    m.train()
    m(torch.randn(30, 3, 10))
    assert m.usage_weight[2:].sum() == 0  # t0 never routes to t1's experts


def test_usage_is_recorded_on_device_in_training_only():
    m = layer()
    m.eval()
    m(torch.randn(4, 3, 10))
    assert m.usage_rows.item() == 0
    m.train()
    m(torch.randn(4, 3, 10))
    assert m.usage_rows.item() == 4  # per-sample routing: one routed row per sample
    torch.testing.assert_close(m.usage().sum(), torch.tensor(1.0))


def test_sample_tasks_route_each_sample_with_its_router_and_minus_one_is_off():
    m = layer()
    m.add_router("t1")
    with torch.no_grad():
        m.routers["t1"].weight.normal_()
    x = torch.randn(3, 4, 10)
    m.set_task("t0")
    y0 = m(x)
    m.set_task("t1")
    y1 = m(x)
    m.set_sample_tasks(torch.tensor([1, -1, 0]))
    y = m(x)
    torch.testing.assert_close(y[0], y1[0])
    torch.testing.assert_close(y[1], m.base_layer(x[1]))
    torch.testing.assert_close(y[2], y0[2])
    with pytest.raises(IndexError, match=r"task_ids must lie in \[-1, 2\)"):
        m.set_sample_tasks(torch.tensor([2]))


def test_state_dict_round_trip_into_fresh_layer():
    m = layer(E=3)
    m.freeze_experts([0])
    m.add_router("t1")
    m.add_experts(1, active_in=["t1"])
    fresh = MoELoRALinear.from_linear(nn.Linear(10, 7), rank=3, top_k=2, scale=0.5)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 10)
    for task in ("t0", "t1"):
        m.set_task(task)
        fresh.set_task(task)
        torch.testing.assert_close(fresh(x), m(x))


def test_historical_experts_bitwise_unchanged_by_adamw():
    m = layer(E=3)
    m.freeze_experts([0, 1])
    frozen = m.A_frozen.detach().clone(), m.B_frozen.detach().clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    m.train()
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(4, 3, 10)).square().mean().backward()
        opt.step()
    assert torch.equal(m.A_frozen, frozen[0]) and torch.equal(m.B_frozen, frozen[1])


def test_parallel_adapter_form_has_no_base():
    m = MoELoRALinear(6, 6, num_experts=2, rank=2, top_k=1, activation="relu", expert_bias=True)
    m.add_router(0)
    m.set_task(0)
    with torch.no_grad():
        m.B_train.normal_()
        m.bb_train.normal_()
    y = m(torch.randn(3, 6))
    assert y.abs().sum() > 0
    m.set_task(None)
    assert m(torch.randn(3, 6)).abs().sum() == 0
    with pytest.raises(AttributeError, match="weight"):
        m.weight


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(rank=0), r"rank must be an int >= 1, got 0"),
    (dict(activation="tanh"), r"activation must be one of"),
    (dict(routing="batch"), r"routing must be 'sample' or 'token', got 'batch'"),
    (dict(num_experts=-1), r"num_experts must be an int >= 0, got -1"),
])
def test_constructor_validates(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoELoRALinear(4, 4, **kwargs)


def test_task_errors_name_the_routers():
    m = layer()
    with pytest.raises(ValueError, match=r"task 'nope' has no router; routers: \['t0'\]"):
        m.set_task("nope")
    with pytest.raises(ValueError, match=r"task 't0' already has a router"):
        m.add_router("t0")
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., 10\), got \(2, 9\)"):
        m(torch.randn(2, 9))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)


# (name, target_modules, expected wrapped names): suffix lists and regexes (STYLE G10).
INJECTION_CASES = [
    ("suffix-list", ["head"], ["head"]),
    ("suffix-index", ["0", "2"], ["encoder.0", "encoder.2"]),
    ("regex", r"encoder\.[02]", ["encoder.0", "encoder.2"]),
]


@pytest.mark.parametrize("name,targets,expected", INJECTION_CASES, ids=[c[0] for c in INJECTION_CASES])
def test_inject_moe_lora_on_plain_model(name, targets, expected):
    net = TinyNet()
    wrapped = ik.inject_moe_lora(net, targets, num_experts=2, rank=2, top_k=1)
    assert wrapped == expected
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".A_train" in n or ".B_train" in n or ".routers." in n for n in trainable)
    ik.add_router(net, 0)
    ik.set_task(net, 0)
    x = torch.randn(5, 8)
    out = net.head(net.encoder(x))
    out.sum().backward()
    assert all(net.get_submodule(n).A_train.grad is not None for n in wrapped) or all(
        net.get_submodule(n).B_train.grad is not None for n in wrapped)


def test_inject_moe_lora_errors():
    with pytest.raises(ValueError, match=r"matched no module; nn.Linear names include \['encoder.0'"):
        ik.inject_moe_lora(TinyNet(), ["decoder"])
    with pytest.raises(ValueError, match=r"matched modules that are not nn.Linear: \['encoder \(Sequential\)'\]"):
        ik.inject_moe_lora(TinyNet(), ["encoder"])


def test_router_created_before_any_expert_gets_the_new_experts():
    # The iGSP order on the first task: a router over an empty pool, then the candidates.
    m = MoELoRALinear(4, 4, rank=2, top_k=1)
    m.add_router("0")
    m.set_task("0")
    assert m.add_experts(2) == [0, 1]
    assert m.routers["0"].active.tolist() == [True, True]
    assert m(torch.randn(3, 4)).shape == (3, 4)


# ------------------------------------------------------------------------------ route() and forward(routing=)
@pytest.mark.parametrize("routing,shape,rows", [
    ("sample", (3, 5, 10), 3),  # per-sample: one decision per sample of a (B, L, d) input
    ("token", (3, 5, 10), 15),  # per-token: one per token row
    ("sample", (4, 10), 4),  # a 2-D input routes each row as its own sample
])
def test_route_gives_the_decision_forward_uses(routing, shape, rows):
    m = layer(routing=routing)
    m.eval()
    x = torch.randn(*shape)
    decision = m.route(x)
    assert isinstance(decision, ik.RoutingDecision)
    assert decision.topk_idx.shape == (rows, 2) and decision.topk_w.shape == (rows, 2)
    assert decision.probs.shape == (rows, 4)
    torch.testing.assert_close(m(x, routing=decision), m(x))


def test_one_decision_shared_by_two_layers_of_a_block():
    # c_fc routes once; c_proj (same pool size) applies the same experts and weights.
    fc, proj = layer(E=4), MoELoRALinear.from_linear(nn.Linear(7, 10), num_experts=4, rank=3, top_k=2)
    with torch.no_grad():
        proj.B_train.normal_()
    x = torch.randn(2, 6, 10)
    d = fc.route(x)
    h = fc(x, routing=d)
    y = proj(h, routing=d)  # proj has no router and no task: the decision is enough
    A, B, _ = proj.expert_weights()
    idx, w = ik.expand_sample_routing(d.topk_idx, d.topk_w, 6)
    want = ik.moe_lora(h.reshape(-1, 7), A, B, idx, w, base_weight=proj.base_layer.weight,
                       base_bias=proj.base_layer.bias)
    torch.testing.assert_close(y, want.reshape(2, 6, 10))


def test_per_token_decision_on_a_per_sample_layer_and_tuple_form():
    m = layer()
    x = torch.randn(2, 3, 10)
    rows = x.reshape(-1, 10)
    idx, w, _ = ik.route_topk(torch.randn(6, 4), 2)
    A, B, _ = m.expert_weights()
    want = ik.moe_lora(rows, A, B, idx, w, base_weight=m.base_layer.weight, base_bias=m.base_layer.bias, scale=0.5)
    torch.testing.assert_close(m(x, routing=(idx, w)).reshape(-1, 7), want)


def test_precomputed_routing_records_usage_in_the_applying_layer():
    m = layer()
    m.train()
    d = m.route(torch.randn(4, 3, 10))
    assert m.usage_rows.item() == 0  # route() alone records nothing
    m(torch.randn(4, 3, 10), routing=d)
    assert m.usage_rows.item() == 4
    torch.testing.assert_close(m.usage_prob, d.probs.sum(0))


def test_route_of_sample_tasks_zeroes_off_samples():
    m = layer()
    m.set_sample_tasks(torch.tensor([0, -1, 0]))
    d = m.route(torch.randn(3, 4, 10))
    assert d.topk_w[1].abs().sum() == 0 and torch.allclose(d.topk_w[[0, 2]].sum(-1), torch.ones(2))


@pytest.mark.parametrize("bad,exc,pattern", [
    ("idx", TypeError, r"routing must be a RoutingDecision or a \(topk_idx, topk_w\[, probs\]\) tuple, got Tensor"),
    ((torch.zeros(5, 2, dtype=torch.int32), torch.ones(5, 2)), ValueError,
     r"routing has 5 rows; input \(2, 3, 10\) needs 2 \(one per routed sample\) or 6 \(one per token\)"),
    ((torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 1)), ValueError,
     r"routing.topk_w must have the shape of routing.topk_idx \(2, 2\), got \(2, 1\)"),
    ((torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 2), torch.ones(2, 3)), ValueError,
     r"routing.probs must have shape \(2, 4\)"),
    ((torch.full((2, 2), 4, dtype=torch.int32), torch.ones(2, 2)), IndexError,
     r"routing.topk_idx values must lie in \[0, 4\) \(the experts of this layer\), got 4"),
])
def test_precomputed_routing_is_validated(bad, exc, pattern):
    m = layer()
    x = torch.randn(2, 3, 10)
    if bad == "idx":
        bad = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(exc, match=pattern):
        m(x, routing=bad)


def test_route_without_a_task_says_what_to_call():
    m = MoELoRALinear.from_linear(nn.Linear(10, 7), num_experts=2, rank=2)
    with pytest.raises(RuntimeError, match=r"no task is set \(set_task\(task\) or set_sample_tasks"):
        m.route(torch.randn(2, 10))
