"""Shared by the embedding tests: small models as a new user would build them, injected, and the backends to sweep."""

from __future__ import annotations

import torch
from torch import nn

import igsp_kernels as ik
from igsp_kernels.backends import available_backends


def backends_for(device: str, dtype: torch.dtype = torch.float32) -> list[str]:
    """The backends able to run moe_lora on `device` in `dtype` in this process (auto-dispatch order)."""
    return available_backends(ik.OpRequest("moe_lora", torch.device(device), dtype))


class MLP(nn.Module):
    """A plain two-layer MLP, the smallest thing a user injects into."""

    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def injected_mlp(seed: int = 0, **options) -> MLP:
    """An MLP with fc1 and fc2 wrapped (4 experts, rank 4, top-2), a router for task 0, non-zero B (live experts)."""
    torch.manual_seed(seed)
    net = MLP()
    kw = dict(num_experts=4, rank=4, top_k=2)
    kw.update(options)
    ik.inject_moe_lora(net, ["fc1", "fc2"], **kw)
    ik.add_router(net, 0)
    ik.set_task(net, 0)
    with torch.no_grad():
        for _, layer in ik.moe_lora_layers(net):
            layer.B_train.normal_(std=0.3)
            layer.routers["0"].weight.normal_()
    return net


def tiny_vit(depth: int = 2, **options) -> nn.Module:
    """timm's ViT-tiny at 32 px (16 tokens + class token), `depth` blocks (12 in the real one; every block is the
    same code, so 2 show what 12 do at a sixth of the tracing time), every attention and MLP linear injected."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                            depth=depth)
    kw = dict(num_experts=4, rank=4, top_k=2)
    kw.update(options)
    ik.inject_moe_lora(vit, ["qkv", "attn.proj", "fc1", "fc2"], **kw)
    ik.add_router(vit, 0)
    ik.set_task(vit, 0)
    return vit
