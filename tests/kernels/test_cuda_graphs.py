"""CUDA-graph safety (issue 9 item 6): a training step of MoELoRALinear on the Triton kernels is captured once and
replayed, and the replays train exactly like eager steps.

The ops never synchronise with the host and copy nothing from it after their first call for a set of shapes (the
subspace pointer tables are cached; the frozen weight's compute-dtype copy is cached; routing metadata is built on
the device), and their temporaries come from torch's caching allocator, i.e. from the graph's private pool during
capture. GPU only (marker `gpu`): it runs in benchmarks/gpu_suite.sh.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="CUDA graphs need CUDA and compiled kernels"),
]

from igsp_kernels import MoELoRALinear, subspace_penalty  # noqa: E402


def make_model(device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for d_in, d_out, routing in ((64, 96, "sample"), (96, 64, "token")):
        layer = MoELoRALinear.from_linear(nn.Linear(d_in, d_out), num_experts=4, rank=8, top_k=2, scale=0.5,
                                          routing=routing, backend="triton")
        layer.add_router("t0")
        layer.set_task("t0")
        with torch.no_grad():
            layer.B_train.normal_(std=0.1)  # LoRA's zero B would give a zero gradient to A
        layers.append(layer)
    return nn.Sequential(layers[0], nn.GELU(), layers[1]).to(device)


def step(model: nn.Sequential, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
         bases: list[torch.Tensor]) -> torch.Tensor:
    """One training step in the trainer's layout: bf16 autocast, fp32 master weights, the subspace penalty on the
    first layer's candidate A (one launch over its matrices) added to the loss."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    loss = nn.functional.mse_loss(out.float(), target)
    loss = loss + subspace_penalty([model[0].A_train], bases, 0.1, backend="triton")
    loss.backward()
    opt.step()
    return loss


def test_training_step_captures_and_replays(monkeypatch):
    monkeypatch.setenv("IGSP_KERNELS_AUTOTUNE", "0")  # one config per kernel: the warm-up compiles everything
    dev = torch.device("cuda")
    graphed = make_model(dev)
    eager = copy.deepcopy(graphed)
    basis = torch.linalg.qr(torch.randn(64, 8, device=dev))[0]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (graphed, eager)]
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [(torch.randn(3, 17, 64, device=dev, generator=g), torch.randn(3, 17, 64, device=dev, generator=g))
               for _ in range(6)]
    static_x, static_t = (t.clone() for t in batches[0])

    # warm-up on a side stream (compiles, caches the pointer tables and the bf16 weight copies), as torch's docs ask
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            opts[0].zero_grad(set_to_none=False)
            step(graphed, opts[0], static_x, static_t, [basis])
            opts[1].zero_grad(set_to_none=False)
            step(eager, opts[1], static_x, static_t, [basis])
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opts[0].zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = step(graphed, opts[0], static_x, static_t, [basis])

    for x, t in batches:
        static_x.copy_(x)
        static_t.copy_(t)
        for p in graphed.parameters():  # the captured step accumulates into .grad: zero it outside the graph
            if p.grad is not None:
                p.grad.zero_()
        graph.replay()
        opts[1].zero_grad(set_to_none=False)
        loss = step(eager, opts[1], x, t, [basis])
        torch.testing.assert_close(static_loss, loss, atol=1e-5, rtol=1e-4)
    params = dict(eager.named_parameters())
    for name, p in graphed.named_parameters():
        torch.testing.assert_close(p, params[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
