"""Reference routing: softmax over the active experts, top-k, weights renormalised to sum 1.

Semantics: p = softmax(z + noise) over active experts; (idx, w) = topk(p, k); w = w / w.sum(-1).
"""

from __future__ import annotations

import torch

__all__ = ["expand_sample_routing", "route_topk_ref"]


def route_topk_ref(
    logits: torch.Tensor,
    k: int,
    *,
    active: torch.Tensor | None = None,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k gating. logits (N, E); active bool (E,) or (N, E).

    Returns topk_idx int32 (N, k), topk_w (N, k) fp32 summing to 1 per row, probs (N, E) fp32 (zero on inactive).
    Gradients flow from topk_w and probs to logits.
    """
    z = logits.float()
    if noise_std > 0.0:
        z = z + noise_std * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    if active is not None:
        z = z.masked_fill(~active.to(torch.bool), float("-inf"))
    probs = torch.softmax(z, dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)
    top_w = top_p / top_p.sum(dim=-1, keepdim=True)
    return top_i.to(torch.int32), top_w, probs


def expand_sample_routing(
    topk_idx: torch.Tensor, topk_w: torch.Tensor, tokens_per_sample: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample routing (B, k) -> per-token rows (B * L, k) of a (B, L, d) input flattened to (B * L, d).

    All L tokens of sample b share its experts and weights (MoE-Adapters' per-sample routing).
    """
    Bn, k = topk_idx.shape
    idx = topk_idx.unsqueeze(1).expand(Bn, tokens_per_sample, k).reshape(Bn * tokens_per_sample, k)
    w = topk_w.unsqueeze(1).expand(Bn, tokens_per_sample, k).reshape(Bn * tokens_per_sample, k)
    return idx, w
