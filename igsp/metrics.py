"""MTIL metrics (METHOD.md section 5) and parameter accounting (METHOD.md section 6).

Accuracy matrix A (T x T): row i = after training task i, column j = dataset j (both in stream order).
- Transfer_j = mean_{i<j} A[i, j] for j = 2..T (zero-shot-ish accuracy on datasets not trained yet; the first
  dataset has none); Transfer = mean over those j. T = 1 has no Transfer: None.
- Avg_j = mean_i A[i, j]; Avg = mean over j.
- Last_j = A[T, j]; Last = mean over j.
Per-task lists have one entry per dataset (column), so `transfer_per_task[0]` is None.

Parameter accounting. Counts are of stored numbers (elements), from the model state:
- trainable_adapter_params: what a task trains now: its router (active columns x d_route, for every matrix the
  router holds: the gate, and the noise gate of learned noisy gating) + the trainable experts (A, B and biases).
  A layer without routers of its own (igsp.adapters.RouteFollower: c_proj under block routing) adds none.
  Called at the start of phase 1 (router + candidates) and of phase 2 (router + survivors).
- added_params: what deployment stores beyond the backbone: every expert in the pools, every router (active
  columns only: a column of an expert added after the router's task is never used and need not be stored),
  and the selector's prototypes and thresholds. The historical bases U are not counted: they are a training
  aid, recomputable from the stored experts.
A router with learned gating noise (MoE-Adapters' noisy top-k gating) stores a noise weight beside its gate
weight: twice the elements per active column (`_router_numel`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from igsp.method._layers import as_layers

__all__ = ["added_params", "mtil_metrics", "parameter_report", "trainable_adapter_params"]


# -------------------------------------------------------------------------------------------------- accuracy
def _as_matrix(acc: object) -> np.ndarray:
    if isinstance(acc, torch.Tensor):
        acc = acc.detach().cpu().double().numpy()
    try:
        A = np.asarray(acc, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"acc must be a T x T array-like of numbers, got {type(acc).__name__}: {exc}") from exc
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"acc must be a square T x T matrix (rows: after task i, columns: dataset j), "
                         f"got shape {A.shape}")
    if A.shape[0] < 1:
        raise ValueError("acc must be at least 1 x 1, got an empty matrix")
    if not np.isfinite(A).all():
        bad = np.argwhere(~np.isfinite(A))[0]
        raise ValueError(f"acc must be finite; acc[{bad[0]}][{bad[1]}] = {A[bad[0], bad[1]]}")
    return A


def mtil_metrics(acc: object) -> dict[str, Any]:
    """Transfer, Avg and Last of an MTIL accuracy matrix, overall and per dataset (in the input's units).

    Args:
        acc: T x T array-like (list of lists, numpy array or tensor), finite, T >= 1.
    Returns:
        {"transfer": float | None, "avg": float, "last": float,
         "transfer_per_task": [None, float x (T-1)], "avg_per_task": [float x T], "last_per_task": [float x T]}
    """
    A = _as_matrix(acc)
    T = A.shape[0]
    transfer_per = [None] + [float(A[:j, j].mean()) for j in range(1, T)]
    avg_per = [float(v) for v in A.mean(axis=0)]
    last_per = [float(v) for v in A[T - 1]]
    known = [v for v in transfer_per if v is not None]
    return {
        "transfer": float(np.mean(known)) if known else None,
        "avg": float(np.mean(avg_per)),
        "last": float(np.mean(last_per)),
        "transfer_per_task": transfer_per,
        "avg_per_task": avg_per,
        "last_per_task": last_per,
    }


# ------------------------------------------------------------------------------------------------ parameters
def _effective_expert_numel(A: torch.Tensor, B: torch.Tensor) -> int:
    """Elements of the rank components that are not zeroed: (d_in + d_out) per live component of each expert."""
    if A.shape[0] == 0:
        return 0
    live = (A.detach().abs().amax(dim=1) > 0) | (B.detach().abs().amax(dim=2) > 0)  # (E, r)
    return int(live.sum()) * (A.shape[1] + B.shape[2])


def _bias_numel(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() for t in ts if t is not None)


def _router_numel(router: nn.Module, *, active_only: bool = True) -> int:
    """Elements a router holds: per parameter (E, d...) the active experts' rows (all rows if not active_only).

    Generic over what a router holds (the gate weight; also the noise gate of learned noisy gating).
    """
    rows = int(router.active.sum()) if active_only else None
    total = 0
    for p in router.parameters():
        per_row = p[0].numel() if p.dim() and p.shape[0] else 0
        total += (rows if rows is not None else p.shape[0]) * per_row if p.dim() else p.numel()
    return total


def trainable_adapter_params(model: nn.Module | Sequence, *, task: str | int | None = None) -> dict[str, int]:
    """What the current task trains: {"router", "experts", "experts_effective", "total"} (element counts).

    Args:
        model: the model (every MoELoRALinear inside) or a (name, layer) list.
        task: the task whose router is trained (default: each layer's active task; none set: routers with
            requires_grad).
    router = active columns x d_route of the task's router; experts = A_train, B_train (+ biases);
    experts_effective = the same without rank components zeroed by rank pruning; total = router + experts.
    """
    layers = as_layers(model)
    router = experts = effective = 0
    for _, layer in layers:
        key = str(task) if task is not None else layer.active_task
        if not layer.routers:  # routes with another layer's decision (block routing): no router of its own
            routers = []
        elif key is not None:
            if key not in layer.routers:
                raise KeyError(f"task {key!r} has no router in this layer (routers: {layer.task_names})")
            routers = [layer.routers[key]]
        else:
            routers = [r for r in layer.routers.values() if r.weight.requires_grad]
        router += sum(_router_numel(r) for r in routers)
        bias = _bias_numel(layer.ba_train, layer.bb_train)
        experts += layer.A_train.numel() + layer.B_train.numel() + bias
        effective += _effective_expert_numel(layer.A_train, layer.B_train) + bias
    return {"router": router, "experts": experts, "experts_effective": effective, "total": router + experts}


def added_params(model: nn.Module | Sequence, selector: Any = None) -> dict[str, int]:
    """What deployment stores beyond the backbone (element counts).

    Returns {"experts" (every pool expert: A, B, biases), "experts_effective" (without zeroed rank
    components), "routers" (active columns x d_route of every matrix of every router), "routers_physical"
    (full router parameters),
    "selector" (selector.num_parameters(), 0 without one), "total" = experts + routers + selector}.
    """
    layers = as_layers(model)
    experts = effective = routers = physical = 0
    for _, layer in layers:
        for g in ("frozen", "train"):
            A, B = getattr(layer, f"A_{g}"), getattr(layer, f"B_{g}")
            bias = _bias_numel(getattr(layer, f"ba_{g}"), getattr(layer, f"bb_{g}"))
            experts += A.numel() + B.numel() + bias
            effective += _effective_expert_numel(A, B) + bias
        for r in layer.routers.values():
            routers += _router_numel(r)
            physical += _router_numel(r, active_only=False)
    sel = 0
    if selector is not None:
        if not callable(getattr(selector, "num_parameters", None)):
            raise TypeError(f"selector must have num_parameters() (a TaskSelector), got {type(selector).__name__}")
        sel = int(selector.num_parameters())
    return {"experts": experts, "experts_effective": effective, "routers": routers, "routers_physical": physical,
            "selector": sel, "total": experts + routers + sel}


def _count(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("total")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an int >= 0 (or a dict with 'total'), got {value!r}")
    return value


def parameter_report(per_task: Sequence[Mapping[str, Any]], added: Mapping[str, int] | None = None, *,
                     baseline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per-task trainable and final total added parameters (METHOD.md section 6), with ratios to a baseline.

    Args:
        per_task: one entry per task: {"phase1": int | trainable_adapter_params(...) dict, "phase2": same or
            None (methods without a phase 2), "phase1_steps": int | None, "phase2_steps": int | None}.
        added: added_params(model, selector) after the last task.
        baseline: another parameter_report (e.g. moe-adapters' run) for the reductions.
    Returns:
        {"trainable_per_task": phase-1 counts (every parameter the task trains at some point: the headline,
         conservative), "trainable_phase2_per_task", "trainable_weighted_per_task" (step-weighted mean of the
         two phases; None without steps), "trainable_avg", "trainable_weighted_avg", "total_added",
         "added" (breakdown), and with a baseline "trainable_reduction" = 1 - ours/theirs (avg) and
         "total_reduction" = 1 - ours/theirs (total added)}.
    """
    if isinstance(per_task, (str, bytes)) or not isinstance(per_task, Sequence):
        raise TypeError(f"per_task must be a list of dicts, got {type(per_task).__name__}")
    p1s: list[int] = []
    p2s: list[int | None] = []
    weighted: list[float | None] = []
    for i, entry in enumerate(per_task):
        if not isinstance(entry, Mapping) or "phase1" not in entry:
            raise ValueError(f"per_task[{i}] must be a dict with 'phase1', got {entry!r}")
        p1 = _count(entry["phase1"], f"per_task[{i}]['phase1']")
        p2 = _count(entry.get("phase2"), f"per_task[{i}]['phase2']")
        s1, s2 = entry.get("phase1_steps"), entry.get("phase2_steps")
        p1s.append(p1)
        p2s.append(p2)
        if s1 is not None and (p2 is None or s2 is not None) and (s1 or s2):
            steps2 = s2 or 0
            weighted.append((p1 * s1 + (p2 or 0) * steps2) / (s1 + steps2))
        else:
            weighted.append(None)
    report: dict[str, Any] = {
        "trainable_per_task": p1s,
        "trainable_phase2_per_task": p2s,
        "trainable_weighted_per_task": weighted,
        "trainable_avg": float(np.mean(p1s)) if p1s else None,
        "trainable_weighted_avg": float(np.mean(weighted)) if weighted and None not in weighted else None,
        "total_added": None if added is None else int(added["total"]),
        "added": None if added is None else dict(added),
    }
    if baseline is not None:
        def reduction(ours: float | None, theirs: float | None) -> float | None:
            if ours is None or theirs is None or theirs == 0 or not math.isfinite(theirs):
                return None
            return 1.0 - ours / theirs
        report["trainable_reduction"] = reduction(report["trainable_avg"], baseline.get("trainable_avg"))
        report["total_reduction"] = reduction(report["total_added"], baseline.get("total_added"))
    return report
