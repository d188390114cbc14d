"""`torch.library.opcheck` on every custom op of the `igsp_kernels` namespace (schema, fake tensors, autograd
registration, AOT dispatch with dynamic shapes), plus a `torch.compile` smoke test of the fused op (STYLE D5).

Interpreter (CPU) and GPU halves through the `device` fixture.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA device", allow_module_level=True)

import igsp_kernels.ops  # noqa: E402,F401  (registers the ops)
from igsp_kernels.ops.moe_lora import sort_block_size  # noqa: E402
from igsp_kernels.ops.routing import routing_metadata  # noqa: E402
from igsp_kernels.testing import (  # noqa: E402
    ROUTE_EDGE_CASES,
    SUBSPACE_EDGE_CASES,
    MoELoRACase,
    make_moe_lora_inputs,
    make_route_inputs,
    make_subspace_inputs,
)

OPS = torch.ops.igsp_kernels
# Small but multi-block: 13 tokens x 2 slots over 3 experts, rank 3 (padded to 16), d spanning two tiles.
CASE = MoELoRACase("opcheck", 13, 33, 20, 3, 3, 2)


def moe_args(device, *, relu=False):
    inp = make_moe_lora_inputs(CASE, device=device, expert_bias=True, activation="relu" if relu else "identity")
    x, A, B = (t.detach() for t in (inp.x, inp.A, inp.B))
    gate = (inp.topk_w.detach() * 0.5).contiguous()
    block = sort_block_size(CASE.T * CASE.k, CASE.r, x.device)
    sorted_assign, _, block_expert, blk_off, order, tokens = routing_metadata(inp.topk_idx, CASE.E, block)
    return inp, x, A, B, gate, (sorted_assign, block_expert, blk_off, order, tokens)


def test_opcheck_routing_metadata(device):
    inp = make_moe_lora_inputs(CASE, device=device)
    torch.library.opcheck(OPS.routing_metadata.default, (inp.topk_idx, CASE.E, 16))


def test_opcheck_moe_lora_fwd(device):
    inp, x, A, B, gate, (sorted_assign, block_expert, _, order, tokens) = moe_args(device)
    args = (x, A, B, inp.topk_idx, gate, sorted_assign, block_expert, order, tokens, inp.base_weight, inp.base_bias,
            inp.bias_a.detach(), inp.bias_b.detach(), "identity")
    torch.library.opcheck(OPS.moe_lora_fwd.default, args)


@pytest.mark.parametrize("needs", [(True,) * 6, (False, True, False, True, False, False)], ids=["all", "some"])
def test_opcheck_moe_lora_bwd(needs, device):
    inp, x, A, B, gate, (sorted_assign, block_expert, blk_off, order, tokens) = moe_args(device, relu=True)
    ba, bb = inp.bias_a.detach(), inp.bias_b.detach()
    _, hpre = OPS.moe_lora_fwd(x, A, B, inp.topk_idx, gate, sorted_assign, block_expert, order, tokens,
                               inp.base_weight, inp.base_bias, ba, bb, "relu")
    dy = torch.randn(CASE.T, CASE.d_out, device=device)
    args = (dy, x, A, B, inp.topk_idx, gate, hpre, sorted_assign, block_expert, blk_off, order, tokens,
            inp.base_weight, ba, bb, "relu", *needs)
    torch.library.opcheck(OPS.moe_lora_bwd.default, args)


def test_opcheck_route_topk(device):
    logits, active = make_route_inputs(ROUTE_EDGE_CASES[3], device=device)
    z = logits.detach()
    torch.library.opcheck(OPS.route_topk_fwd.default, (z, active, 2))
    idx, w, probs = OPS.route_topk_fwd(z, active, 2)
    dw, dp = torch.randn_like(w), torch.randn_like(probs)
    torch.library.opcheck(OPS.route_topk_bwd.default, (dw, dp, idx, w, probs))


def test_opcheck_subspace_ops(device):
    mats, bases, _ = make_subspace_inputs(SUBSPACE_EDGE_CASES[:3], device=device)
    mats = [M.detach() for M in mats]
    torch.library.opcheck(OPS.subspace_penalty_fwd.default, (mats, bases))
    grads = [M.clone() for M in mats]
    torch.library.opcheck(OPS.project_grad_.default, (grads, bases))


def test_torch_compile_traces_the_fused_op(device):
    # The custom ops with fake impls let dynamo/AOT trace the op without graph breaks inside it (the eager backend
    # keeps the test fast; the point is tracing, not codegen).
    from igsp_kernels.ops.moe_lora import moe_lora_triton

    inp = make_moe_lora_inputs(CASE, device=device)

    def f(x, A, B, w):
        return moe_lora_triton(x, A, B, inp.topk_idx, w, inp.base_weight, inp.base_bias, 0.5, "identity", None, None)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = compiled(inp.x, inp.A, inp.B, inp.topk_w)
    y_eager = f(inp.x, inp.A, inp.B, inp.topk_w)
    torch.testing.assert_close(y, y_eager)
    g = torch.autograd.grad(y.sum(), [inp.A])[0]
    g_eager = torch.autograd.grad(y_eager.sum(), [inp.A])[0]
    torch.testing.assert_close(g, g_eager)


# ---------------------------------------------------------------------------------------------- per-sample path
SAMPLE_CASE = MoELoRACase("opcheck_sample", 26, 33, 20, 3, 4, 2, routing="sample", tokens_per_sample=13)


def sample_args(device):
    inp = make_moe_lora_inputs(SAMPLE_CASE, device=device, expert_bias=True, activation="relu", per_sample=True)
    x, A, B, w = (t.detach() for t in (inp.x, inp.A, inp.B, inp.topk_w))
    return inp, x, A, B, w, inp.bias_a.detach(), inp.bias_b.detach()


def test_opcheck_moe_lora_sample_fwd(device):
    inp, x, A, B, w, ba, bb = sample_args(device)
    args = (x, A, B, inp.topk_idx, w, 0.5, inp.base_weight, inp.base_bias, ba, bb, "relu", 13)
    torch.library.opcheck(OPS.moe_lora_sample_fwd.default, args)


@pytest.mark.parametrize("needs", [(True,) * 6, (False, True, False, True, False, True)], ids=["all", "some"])
def test_opcheck_moe_lora_sample_bwd(needs, device):
    inp, x, A, B, w, ba, bb = sample_args(device)
    _, hpre = OPS.moe_lora_sample_fwd(x, A, B, inp.topk_idx, w, 0.5, inp.base_weight, inp.base_bias, ba, bb, "relu",
                                      13)
    dy = torch.randn(SAMPLE_CASE.T, SAMPLE_CASE.d_out, device=device)
    args = (dy, x, A, B, inp.topk_idx, w, 0.5, hpre, inp.base_weight, ba, bb, "relu", 13, *needs)
    torch.library.opcheck(OPS.moe_lora_sample_bwd.default, args)


def test_torch_compile_traces_the_per_sample_op(device):
    from igsp_kernels.ops.moe_lora import moe_lora_triton

    inp, *_ = sample_args(device)

    def f(x, A, B, w):
        return moe_lora_triton(x, A, B, inp.topk_idx, w, inp.base_weight, inp.base_bias, 0.5, "relu", None, None, 13)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = compiled(inp.x, inp.A, inp.B, inp.topk_w)
    y_eager = f(inp.x, inp.A, inp.B, inp.topk_w)
    torch.testing.assert_close(y, y_eager)
    g = torch.autograd.grad(y.sum(), [inp.A, inp.topk_w])
    g_eager = torch.autograd.grad(y_eager.sum(), [inp.A, inp.topk_w])
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)
