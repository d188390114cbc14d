"""Pruning at the end of phase 1: routing mass as the gradient-flow indicator (METHOD.md section 3, step 4).

Share. For layer l with pool usage u (E,) (RouterConvergence.last_usage or layer.usage(): mean top-k
routing weight per expert), the share of expert e is s_e = u_e / sum_e' u_e': its fraction of the layer's
*total* routed mass, historical experts included. dL/dA_e and dL/dB_e are sums over the rows routed to e,
each scaled by its gate weight, so s_e bounds the fraction of the layer's expert gradient flow that reaches
e. A candidate with s_c < tau is removed (parameters freed, router columns dropped). Using the total (not the
share among candidates) is deliberate: when the historical experts carry the task (high reuse), every
candidate's share is small and all of them go, which is the knowledge reuse iGSP aims for.

Floor. The task router must keep at least top_k active experts (route_topk needs k of them), so a layer
keeps max(min_keep, top_k - active historical experts) candidates, the highest-share ones, whatever tau says.

Rank pruning (optional, `rank_energy`). For each surviving candidate, component j has energy
e_j = ||A[:, j]|| * ||B[j, :]||; the components outside the smallest set (largest first) that holds
`rank_energy` of sum_j e_j^2 are zeroed in A and B. A zeroed component stays zero under training: its
gradients are dA[:, j] = f(B[j, :]) = 0 and dB[j, :] = f(x A[:, j]) = 0, and weight decay of 0 is 0. The rank
dimension r is shared by the stacked (C, d_in, r) tensor, so a single expert cannot physically shrink: the
zeros still occupy memory, and parameter counts report them separately (igsp.metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from igsp.method._layers import Layers, check_layers
from igsp_kernels import MoELoRALinear

__all__ = ["expert_grad_norms", "prune_candidates", "prune_rank_components", "usage_shares"]

logger = logging.getLogger(__name__)


def usage_shares(layer: MoELoRALinear, usage: torch.Tensor, *, name: str = "layer") -> torch.Tensor:
    """Share of the layer's total routed mass per pool expert: (E,) fp64 summing to 1 (zeros if no mass)."""
    if not isinstance(usage, torch.Tensor) or usage.dim() != 1:
        raise TypeError(f"usage[{name!r}] must be a 1-D tensor (E,), got {usage!r}")
    if usage.shape[0] != layer.num_experts:
        raise ValueError(f"usage[{name!r}] must have {layer.num_experts} entries (the layer's pool), got "
                         f"{usage.shape[0]}; read it after the last pool change")
    u = usage.detach().double().cpu()
    if not torch.isfinite(u).all() or (u < 0).any():
        raise ValueError(f"usage[{name!r}] must be finite and >= 0, got {u.tolist()}")
    total = float(u.sum())
    return u / total if total > 0 else u


def _active_frozen(layer: MoELoRALinear) -> int:
    """Historical experts usable by the current task's router (all of them when no task is set)."""
    task = layer.active_task
    if task is not None and task in layer.routers:
        return int(layer.routers[task].active[: layer.num_frozen].sum())
    return layer.num_frozen


@torch.no_grad()
def prune_rank_components(layer: MoELoRALinear, energy: float, ids: list[int] | None = None) -> dict[int, list[int]]:
    """Zero the low-energy rank components of trainable experts `ids` (pool ids; default all trainable).

    Component j of expert e has energy ||A_e[:, j]|| * ||B_e[j, :]||; the components outside the smallest
    set (largest first) holding `energy` of the squared energies are zeroed in A_train and B_train.
    Returns {pool id: [zeroed components]} for experts with at least one zeroed component.
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"rank_energy must be a float in (0, 1], got {energy!r}")
    F = layer.num_frozen
    ids = layer.trainable_expert_ids() if ids is None else ids
    zeroed: dict[int, list[int]] = {}
    for e in ids:
        c = e - F
        if not 0 <= c < layer.num_trainable:
            raise IndexError(f"expert {e} is not a trainable expert of this layer "
                             f"(ids {layer.trainable_expert_ids()})")
        A, B = layer.A_train[c], layer.B_train[c]  # (d_in, r), (r, d_out)
        comp = (A.double().norm(dim=0) * B.double().norm(dim=1)).square()  # (r,) squared component energies
        total = float(comp.sum())
        if total <= 0:
            continue  # B still zero (never trained): no ranking is meaningful, leave the expert as is
        order = torch.argsort(comp, descending=True)
        cum = torch.cumsum(comp[order], 0) / total
        keep = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype))) + 1
        drop = sorted(int(j) for j in order[keep:])
        if drop:
            A[:, drop] = 0
            B[drop, :] = 0
            zeroed[e] = drop
    return zeroed


def prune_candidates(layers: Layers, usage: Mapping[str, torch.Tensor], tau: float, *,
                     rank_energy: float | None = None, min_keep: int = 0,
                     report: dict[str, Any] | None = None,
                     followers: Mapping[str, str] | None = None) -> dict[str, list[int]]:
    """Remove every candidate whose share of its layer's routed mass is below `tau`; optionally rank-prune.

    Args:
        layers: (name, MoELoRALinear) pairs; candidates are each layer's trainable experts.
        usage: {name: (E,) usage over the layer's current pool}, e.g. RouterConvergence.last_usage.
            Layers missing from `usage` are left untouched (logged).
        tau: share threshold in [0, 1] (share = u_c / sum over the whole pool, see the module docstring).
        rank_energy: if given, in (0, 1]: zero the survivors' rank components beyond that energy fraction.
        min_keep: keep at least this many candidates per layer (the highest-share ones).
        report: optional dict filled with {name: {"share": [E floats], "removed": [...], "kept": [...],
            "rank_zeroed": {new pool id: [components]}}} for the log.
        followers: {follower name: leader name} (igsp.adapters.route_followers: block routing). A follower's
            expert e is used exactly when its leader's is, so it loses exactly the leader's removed candidates
            (its own usage is not read; rank pruning still looks at its own components).
    Returns:
        {name: removed pool ids (numbered before the removal)}, in the order of `layers`. The pool changed:
        rebuild the optimizer.
    """
    layers = check_layers(layers)
    if not isinstance(usage, Mapping):
        raise TypeError(f"usage must be a dict name -> (E,) tensor, got {type(usage).__name__}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be a float in [0, 1], got {tau!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"min_keep must be an int >= 0, got {min_keep!r}")
    if rank_energy is not None and (isinstance(rank_energy, bool) or not isinstance(rank_energy, (int, float))
                                    or not 0.0 < rank_energy <= 1.0):
        raise ValueError(f"rank_energy must be None or a float in (0, 1], got {rank_energy!r}")
    followers = dict(followers or {})
    by_name = dict(layers)
    for f, leader in followers.items():
        if f not in by_name or leader not in by_name or leader in followers:
            raise ValueError(f"followers[{f!r}] = {leader!r}: both must be layers in `layers`, the leader not a "
                             "follower itself")
        fl, ld = by_name[f], by_name[leader]
        if (fl.num_experts, fl.num_frozen) != (ld.num_experts, ld.num_frozen):
            raise ValueError(f"follower {f!r} has {fl.num_experts} experts ({fl.num_frozen} frozen) but its leader "
                             f"{leader!r} {ld.num_experts} ({ld.num_frozen}): the pools must mirror each other")
    removed_all: dict[str, list[int]] = {}
    # Leaders (and independent layers) first: their decisions are what the followers copy.
    for name, layer in sorted(layers, key=lambda item: item[0] in followers):
        if name in followers:
            removed = removed_all[followers[name]]
            cand = layer.trainable_expert_ids()
            kept = [e for e in cand if e not in set(removed)]
            if removed:
                layer.remove_experts(removed)
            new_ids = [layer.num_frozen + i for i in range(len(kept))]
            zeroed = prune_rank_components(layer, rank_energy, new_ids) if rank_energy is not None else {}
            removed_all[name] = list(removed)
            if report is not None:
                report[name] = {"share": report.get(followers[name], {}).get("share", []), "removed": list(removed),
                                "kept": kept, "rank_zeroed": zeroed, "follows": followers[name]}
            continue
        if layer.num_trainable == 0:
            removed_all[name] = []
            continue
        if name not in usage:
            logger.warning("prune_candidates: no usage for layer %s; its %d candidates are kept", name,
                           layer.num_trainable)
            removed_all[name] = []
            continue
        share = usage_shares(layer, usage[name], name=name)
        cand = layer.trainable_expert_ids()
        floor = min(len(cand), max(min_keep, layer.top_k - _active_frozen(layer)))
        by_share = sorted(cand, key=lambda e: (-float(share[e]), e))  # ties: the lower id first, deterministic
        protected = set(by_share[:floor])
        removed = [e for e in cand if float(share[e]) < tau and e not in protected]
        kept = [e for e in cand if e not in set(removed)]
        if removed:
            layer.remove_experts(removed)
        # New pool ids of the survivors: the frozen block is unchanged, candidates keep their order.
        new_ids = [layer.num_frozen + i for i in range(len(kept))]
        zeroed = prune_rank_components(layer, rank_energy, new_ids) if rank_energy is not None else {}
        removed_all[name] = removed
        logger.info("prune %s: removed %d/%d candidates (shares %s), kept %s", name, len(removed), len(cand),
                    [round(float(share[e]), 4) for e in cand], kept)
        if report is not None:
            report[name] = {"share": [float(s) for s in share], "removed": removed, "kept": kept,
                            "rank_zeroed": zeroed}
    return {name: removed_all[name] for name, _ in layers}


@torch.no_grad()
def expert_grad_norms(layers: Layers) -> dict[str, list[float]]:
    """{name: [||dA_c||_F + ||dB_c||_F for each trainable expert c]} from A_train.grad / B_train.grad.

    A missing .grad counts as 0. Logged side by side with the usage shares (one host sync per layer).
    """
    layers = check_layers(layers)
    out: dict[str, list[float]] = {}
    for name, layer in layers:
        C = layer.num_trainable
        norms = torch.zeros(C, dtype=torch.float64, device=layer.device)
        for p in (layer.A_train, layer.B_train):
            if p.grad is not None and C:
                norms += p.grad.detach().double().reshape(C, -1).norm(dim=1)
        out[name] = norms.tolist()
    return out
