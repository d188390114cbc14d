"""Tiny MoE-LoRA models for the method tests: a 12 -> 16 -> 10 MLP whose two Linears are MoELoRALinear.

`history_model` plays one finished task ("0": `n_hist` experts trained, i.e. random, then frozen) and starts
task "1" with `n_cand` candidates (A Kaiming, B zero as add_experts makes them). Sizes are tiny on purpose:
d_in 12 / 16 and d_out 16 / 10 with F*r = 6 historical columns keep the bases strictly smaller than the space
(m <= 6 < 10), so both the subspace and its complement are non-trivial.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from igsp_kernels import MoELoRALinear, inject_moe_lora, moe_lora_layers


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_model(*, rank: int = 3, top_k: int = 1) -> tuple[nn.Module, list[tuple[str, MoELoRALinear]]]:
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))
    inject_moe_lora(model, ["0", "2"], rank=rank, top_k=top_k, backend="reference")
    return model, list(moe_lora_layers(model))


def history_model(*, n_hist: int = 2, n_cand: int = 3, rank: int = 3, top_k: int = 1,
                  cand_b_std: float = 0.0) -> tuple[nn.Module, list[tuple[str, MoELoRALinear]]]:
    """Task "0" finished (n_hist frozen experts with random A, B), task "1" set with n_cand candidates."""
    model, layers = tiny_model(rank=rank, top_k=top_k)
    for _, layer in layers:
        # Experts before the router: add_experts on an empty pool that already has a router raises IndexError
        # in TaskRouter._reindex (reported to the lead); a router created afterwards sees the whole pool.
        if n_hist:
            ids = layer.add_experts(n_hist, active_in=[])
            with torch.no_grad():
                layer.A_train.normal_()
                layer.B_train.normal_()
        if n_hist:  # without history there is no finished task, hence no router "0"
            layer.add_router("0")
            layer.routers["0"].requires_grad_(False)
            layer.freeze_experts(ids)
        if n_cand:
            layer.add_experts(n_cand, active_in=[])
            if cand_b_std:
                with torch.no_grad():
                    layer.B_train.normal_(std=cand_b_std)
        layer.add_router("1")  # active over the historical experts and the candidates
        layer.set_task("1")
    return model, layers


@pytest.fixture
def make_tiny():
    """Factory: tiny_model(rank=, top_k=) -> (model, layers)."""
    return tiny_model


@pytest.fixture
def make_history():
    """Factory: history_model(n_hist=, n_cand=, rank=, top_k=, cand_b_std=) -> (model, layers)."""
    return history_model
