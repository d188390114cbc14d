"""torch.compile and torch.export of injected models (issue 13 item 2): one graph, zero breaks, same outputs.

Tracing is checked with `torch._dynamo.explain` and `fullgraph=True` on the `aot_eager` backend (Dynamo and AOT
autograd, forward and backward, without Inductor's C++ build: seconds, not minutes); one test compiles with
Inductor end to end. Speed against eager is a benchmark (benchmarks/cpu/test_cpu_compile.py), not a test.
"""

from __future__ import annotations

import pytest
import torch
from embedding_helpers import injected_mlp, tiny_vit

import igsp_kernels as ik


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # graph counts of one test never depend on another's cache
    yield
    torch._dynamo.reset()


def graphs_and_breaks(model, *args):
    ex = torch._dynamo.explain(model)(*args)
    return ex.graph_count, ex.graph_break_count, [b.reason for b in ex.break_reasons]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_injected_mlp_is_one_graph(train):
    net = injected_mlp().train(train)
    assert graphs_and_breaks(net, torch.randn(2, 5, 16)) == (1, 0, [])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_injected_tiny_vit_is_one_graph(train):
    pytest.importorskip("timm")
    vit = tiny_vit().train(train)
    assert len(list(ik.moe_lora_layers(vit))) == 8  # 2 blocks x (qkv, proj, fc1, fc2)
    assert graphs_and_breaks(vit, torch.randn(2, 3, 32, 32)) == (1, 0, [])


@pytest.mark.parametrize("options", [
    {},
    dict(routing="token"),  # per-token routing
    dict(noise="learned", expert_dropout=0.1, router_init_std=0.0),  # the MoE-Adapters baseline's gating
    dict(noise_std=0.5, backend="reference"),
])
def test_fullgraph_forward_and_backward_match_eager(options):
    net = injected_mlp(**options).train()
    x = torch.randn(3, 4, 16)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    y = compiled(x)
    y.square().mean().backward()
    got = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    net.zero_grad()
    torch.manual_seed(5)
    want = net(x)
    want.square().mean().backward()
    torch.testing.assert_close(y, want)
    for g, p in zip(got, [p for p in net.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad)


def test_precomputed_routing_and_sample_tasks_trace_in_one_graph():
    net = injected_mlp().eval()
    ik.add_router(net, 1)
    ik.set_sample_tasks(net, torch.tensor([0, -1, 1]))

    def block(x):
        d = net.fc1.route(x)
        return net.fc2(net.act(net.fc1(x, routing=d)), routing=d)

    x = torch.randn(3, 4, 16)
    assert graphs_and_breaks(block, x) == (1, 0, [])
    torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="aot_eager")(x), block(x))


def test_inductor_end_to_end():
    net = injected_mlp().train()
    x = torch.randn(2, 6, 16)
    compiled = torch.compile(net, fullgraph=True)
    y = compiled(x)
    y.square().mean().backward()
    dA = net.fc1.A_train.grad.clone()
    net.zero_grad()
    want = net(x)
    want.square().mean().backward()
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dA, net.fc1.A_train.grad, atol=1e-5, rtol=1e-5)


def test_export_round_trip(tmp_path):
    net = injected_mlp().eval()
    x = torch.randn(3, 5, 16)
    ep = torch.export.export(net, (x,))
    torch.testing.assert_close(ep.module()(x), net(x))
    path = tmp_path / "mlp.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    x2 = torch.randn(3, 5, 16)
    torch.testing.assert_close(loaded.module()(x2), net(x2))


def test_export_of_tiny_vit():
    pytest.importorskip("timm")
    vit = tiny_vit().eval()
    img = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.export.export(vit, (img,)).module()(img), vit(img))


M = torch.randn(8, 5)
U = torch.linalg.qr(torch.randn(8, 3))[0]
# (name, function of no argument): every public op, traced whole.
OPS = [
    ("route_topk", lambda: ik.route_topk(torch.randn(4, 6), 2, active=torch.ones(6, dtype=torch.bool))),
    ("moe_lora", lambda: ik.moe_lora(torch.randn(4, 8), torch.randn(3, 8, 2), torch.randn(3, 2, 5),
                                     torch.randint(0, 3, (4, 2)), torch.rand(4, 2), base_weight=torch.randn(5, 8))),
    ("expand_sample_routing", lambda: ik.expand_sample_routing(torch.randint(0, 3, (2, 2)), torch.rand(2, 2), 3)),
    ("project_out", lambda: ik.project_out(M, U)),
    ("subspace_penalty", lambda: ik.subspace_penalty([M], [U], 0.5)),
    ("project_grad_", lambda: ik.project_grad_([M.clone()], [U])),
    ("subspace_basis", lambda: ik.subspace_basis(M, 0.9)),  # a data-dependent output width
]


@pytest.mark.parametrize("name,fn", OPS, ids=[o[0] for o in OPS])
def test_every_public_op_traces_fullgraph(name, fn):
    torch.manual_seed(0)
    want = fn()
    torch.manual_seed(0)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")()
    torch.testing.assert_close(got, want)


def test_subspace_basis_op_is_a_constant_of_its_input():
    # An opaque op now (for its dynamic output width); as before, the basis is never differentiated through.
    U = ik.subspace_basis(torch.randn(6, 3, requires_grad=True))
    assert not U.requires_grad and U.shape == (6, 3)


def test_subspace_penalty_gradient_compiles():
    Mg = torch.randn(8, 5, requires_grad=True)
    fn = torch.compile(lambda m: ik.subspace_penalty([m], [U], 0.5) * 3.0, fullgraph=True, backend="aot_eager")
    fn(Mg).backward()
    g = Mg.grad.clone()
    Mg.grad = None
    (ik.subspace_penalty([Mg], [U], 0.5) * 3.0).backward()
    torch.testing.assert_close(g, Mg.grad)


def test_autocast_traces_in_one_graph():
    net = injected_mlp().train()
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert graphs_and_breaks(net, x) == (1, 0, [])
        torch._dynamo.reset()
        y = torch.compile(net, fullgraph=True, backend="aot_eager")(x)
        want = net(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want)
