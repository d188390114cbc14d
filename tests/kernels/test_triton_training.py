"""A short convergence test (STYLE G9): MoELoRALinear layers trained a few steps with backend="triton" follow
backend="reference" (losses and final adapter weights), routing included.

Interpreter (CPU) and GPU halves through the `device` fixture.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA device", allow_module_level=True)

from igsp_kernels import MoELoRALinear  # noqa: E402

STEPS = 4


def tiny_model(device) -> nn.Sequential:
    torch.manual_seed(0)
    # per-sample LoRA on a frozen linear, then a per-token ReLU adapter with expert biases (MoE-Adapters form)
    first = MoELoRALinear.from_linear(nn.Linear(24, 40), num_experts=4, rank=4, top_k=2, scale=0.5,
                                      routing="sample", backend="reference")
    second = MoELoRALinear.from_linear(nn.Linear(40, 12), num_experts=3, rank=3, top_k=2, scale=1.0,
                                       activation="relu", expert_bias=True, routing="token", backend="reference")
    model = nn.Sequential(first, nn.GELU(), second).to(device)
    for layer in (first, second):
        layer.add_router("t0")
        layer.set_task("t0")
        with torch.no_grad():  # B starts at zero (LoRA init); give it signal so every path trains from step 1
            layer.B_train.normal_(std=0.3)
    return model


def train(model: nn.Sequential, backend: str, x: torch.Tensor, target: torch.Tensor) -> list[float]:
    for layer in (model[0], model[2]):
        layer.backend = backend
    # SGD: the update is linear in the gradient, so parameter gaps measure gradient gaps (Adam's m / sqrt(v)
    # turns a 1e-7 gradient into a full-size step of either sign and would hide or invent differences)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_matches_reference(device, no_tf32):
    ref = tiny_model(device)
    tri = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 24, generator=g).to(device)  # 3 samples x 5 tokens
    target = torch.randn(3, 5, 12, generator=g).to(device)
    losses_ref = train(ref, "reference", x, target)
    losses_tri = train(tri, "triton", x, target)
    assert losses_ref[-1] < losses_ref[0], "the reference run must actually train"
    torch.testing.assert_close(torch.tensor(losses_tri), torch.tensor(losses_ref), atol=1e-5, rtol=1e-4)
    trained = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert any("routers" in n for n in trained) and any("A_train" in n for n in trained)
    params_tri = dict(tri.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(params_tri[name], p, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
