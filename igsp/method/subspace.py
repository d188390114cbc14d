"""Historical subspaces, the phase-1 regularizer and the phase-2 orthogonal projection (METHOD.md section 3).

Orientation (shared with igsp_kernels.reference.subspace). For a layer with frozen experts A_f (F, d_in, r),
B_f (F, r, d_out):
- U_in (d_in, m_in) spans the columns of [A_1 | ... | A_F] (d_in x F*r);
- U_out (d_out, m_out) spans the columns of [B_1^T | ... | B_F^T] (d_out x F*r);
each truncated to an `energy` fraction of the squared singular values (GPM's criterion). A candidate A_c
(d_in, r) is projected by U_in on the left; B_c (r, d_out) is projected by U_out on its transpose, for which
we pass the view `B_train.transpose(1, 2)` (C, d_out, r) that the in-place kernels write through.

A basis with m = 0 (no history in that layer: the first task) means "no constraint": the regularizer skips
it and the projection leaves the matrix alone. (The kernel op itself would read m = 0 as "the subspace is
{0}" and penalise ||M||^2, i.e. weight decay; METHOD.md says the first task has no regularization.)

Phase 2 with Adam (METHOD.md section 3, "Mind the optimizer"): projecting the gradient alone is not enough.
Adam divides each coordinate by its own sqrt(v), which rotates a complement-only gradient out of the
complement, and AdamW's decoupled weight decay -lr*wd*theta has an in-subspace part whenever theta has one
(phase 1 pulled the candidates *into* the subspace, so it does). So we also take a snapshot (anchor) of the
candidates when phase 2 starts and, after every optimizer step, set theta = anchor + P_perp(theta - anchor).
tests/method/test_method_subspace.py shows both halves: with the anchor the change stays orthogonal to U to
~1e-7 relative; with the gradient projection alone it leaves the complement by > 1e-2 relative.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from igsp.method._layers import Layers, check_layers
from igsp_kernels import MoELoRALinear, project_grad_, subspace_basis, subspace_penalty
from igsp_kernels.functional import BackendName

__all__ = [
    "LayerBasis",
    "OrthogonalProjector",
    "candidate_mats",
    "compute_bases",
    "orthogonality_error",
    "out_of_subspace_norms",
    "outside_fractions",
    "project_candidates_",
    "snapshot_candidates",
    "subspace_decay_",
    "subspace_regularizer",
]

logger = logging.getLogger(__name__)

Anchor = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LayerBasis:
    """Orthonormal bases of one layer's historical subspace: U_in (d_in, m_in), U_out (d_out, m_out), fp32."""

    U_in: torch.Tensor
    U_out: torch.Tensor

    @property
    def m_in(self) -> int:
        return self.U_in.shape[1]

    @property
    def m_out(self) -> int:
        return self.U_out.shape[1]

    @property
    def empty(self) -> bool:
        """True when the layer has no history (both bases have 0 columns)."""
        return self.m_in == 0 and self.m_out == 0

    def to(self, device: torch.device | str) -> LayerBasis:
        return LayerBasis(self.U_in.to(device), self.U_out.to(device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (checkpoint-friendly, loadable with torch.load(weights_only=True))."""
        return {"U_in": self.U_in.detach().cpu(), "U_out": self.U_out.detach().cpu()}


def _historical_mats(layer: MoELoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """[A_1 | ... | A_F] (d_in, F*r) and [B_1^T | ... | B_F^T] (d_out, F*r) of the frozen experts, fp32."""
    A = layer.A_frozen.detach().float()  # (F, d_in, r)
    B = layer.B_frozen.detach().float()  # (F, r, d_out)
    F, d_in, r = A.shape
    M_in = A.permute(1, 0, 2).reshape(d_in, F * r)  # column f*r + j = A_f[:, j]
    M_out = B.permute(2, 0, 1).reshape(B.shape[2], F * r)  # column f*r + j = B_f[j, :]
    return M_in, M_out


def compute_bases(layers: Layers, energy: float = 0.95, *, max_rank: int | None = None) -> dict[str, LayerBasis]:
    """Bases of every layer's historical subspace from its frozen experts (fp32, on the layer's device).

    Args:
        layers: (name, MoELoRALinear) pairs (igsp.adapters.adapter_layers(model)).
        energy: fraction of the squared singular values kept, in (0, 1] (GPM's threshold; 0.95 by default).
        max_rank: optional cap on m_in and m_out (None: no cap).
    Returns:
        {name: LayerBasis(U_in (d_in, m_in), U_out (d_out, m_out))}; m = 0 for a layer without frozen experts.
    """
    layers = check_layers(layers)
    bases: dict[str, LayerBasis] = {}
    for name, layer in layers:
        M_in, M_out = _historical_mats(layer)
        U_in = subspace_basis(M_in, energy, max_rank=max_rank)
        U_out = subspace_basis(M_out, energy, max_rank=max_rank)
        bases[name] = LayerBasis(U_in, U_out)
        if layer.num_frozen:
            # m / d near 1 means the complement is almost empty: phase 2 can barely move the candidates.
            logger.debug("basis %s: F=%d, m_in=%d/%d, m_out=%d/%d", name, layer.num_frozen, U_in.shape[1],
                         layer.in_features, U_out.shape[1], layer.out_features)
    return bases


def candidate_mats(layer: MoELoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates in the projection orientation: A_train (C, d_in, r) and the view B_train^T (C, d_out, r)."""
    return layer.A_train, layer.B_train.transpose(1, 2)


def _basis(bases: Mapping[str, LayerBasis], name: str) -> LayerBasis:
    if not isinstance(bases, Mapping):
        raise TypeError(f"bases must be a dict name -> LayerBasis (from compute_bases), got {type(bases).__name__}")
    if name not in bases:
        raise KeyError(f"bases has no entry for layer {name!r}; recompute them with compute_bases(layers) "
                       f"(known: {sorted(bases)[:4]}...)")
    basis = bases[name]
    if not isinstance(basis, LayerBasis):
        raise TypeError(f"bases[{name!r}] must be a LayerBasis, got {type(basis).__name__}")
    return basis


def _pairs(layers: Layers, bases: Mapping[str, LayerBasis], mats: list[tuple[torch.Tensor, torch.Tensor]]
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Flatten per-layer (A-like (C, d_in, r), B^T-like (C, d_out, r)) into the kernel's lists, skipping m = 0."""
    ms: list[torch.Tensor] = []
    us: list[torch.Tensor] = []
    for (name, layer), (a, bt) in zip(layers, mats):
        basis = _basis(bases, name)
        if basis.U_in.shape[0] != layer.in_features or basis.U_out.shape[0] != layer.out_features:
            raise ValueError(f"bases[{name!r}] has U_in {tuple(basis.U_in.shape)}, U_out {tuple(basis.U_out.shape)}; "
                             f"expected ({layer.in_features}, m), ({layer.out_features}, m) for this layer")
        if a is None or a.shape[0] == 0:
            continue
        if basis.m_in:
            ms.append(a)
            us.append(basis.U_in.to(device=a.device, dtype=a.dtype))
        if basis.m_out:
            ms.append(bt)
            us.append(basis.U_out.to(device=bt.device, dtype=bt.dtype))
    return ms, us


def subspace_regularizer(layers: Layers, bases: Mapping[str, LayerBasis], lam: float, *,
                         backend: BackendName = "auto") -> torch.Tensor:
    """R = lam * sum_layers sum_c (||(I - U_out U_out^T) B_c^T||_F^2 + ||(I - U_in U_in^T) A_c||_F^2).

    One igsp_kernels.subspace_penalty call covers every layer. Layers or sides with an empty basis contribute
    nothing (no history: no regularization).

    Returns:
        A 0-d fp32 tensor, differentiable in every A_train / B_train; a 0-d zero that needs no grad when no
        layer has both candidates and history (the first task), so `loss + R` is always valid.
    """
    layers = check_layers(layers)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ValueError(f"lam must be a float >= 0, got {lam!r}")
    mats = [candidate_mats(layer) for _, layer in layers]
    ms, us = _pairs(layers, bases, mats)
    if not ms or lam == 0:
        device = layers[0][1].device if layers else torch.device("cpu")
        return torch.zeros((), device=device)
    return subspace_penalty(ms, us, float(lam), backend=backend)


def snapshot_candidates(layers: Layers) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Detached copies {name: (A_train (C, d_in, r), B_train (C, r, d_out))}: the phase-2 anchor."""
    layers = check_layers(layers)
    return {name: (layer.A_train.detach().clone(), layer.B_train.detach().clone()) for name, layer in layers}


def _check_anchor(anchor: Anchor, name: str, layer: MoELoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in anchor:
        raise KeyError(f"anchor has no entry for layer {name!r}; take it with snapshot_candidates(layers) "
                       "after pruning, when phase 2 starts")
    a0, b0 = anchor[name]
    if a0.shape != layer.A_train.shape or b0.shape != layer.B_train.shape:
        raise ValueError(f"anchor[{name!r}] has shapes {tuple(a0.shape)}, {tuple(b0.shape)} but the layer's "
                         f"candidates are {tuple(layer.A_train.shape)}, {tuple(layer.B_train.shape)}; the pool "
                         "changed since the snapshot: take a new one with snapshot_candidates")
    return a0, b0


@torch.no_grad()
def project_candidates_(layers: Layers, bases: Mapping[str, LayerBasis], *, anchor: Anchor | None = None,
                        grads: bool = True, backend: BackendName = "auto") -> None:
    """Phase-2 orthogonal projection of every layer's candidates, in place (one project_grad_ call per kind).

    Args:
        layers: (name, MoELoRALinear) pairs.
        bases: from compute_bases (the historical subspaces of this task).
        anchor: the snapshot taken when phase 2 began (snapshot_candidates). Given: the parameters become
            anchor + P_perp(params - anchor), so their change since phase 2 began lies in the complement.
            Call it right after optimizer.step().
        grads: project A_train.grad and B_train.grad (G <- G - U U^T G). Call it between backward() and
            optimizer.step(). Parameters without a .grad are skipped.
    Call the two separately (grads=True before the step, anchor=..., grads=False after it), or use
    OrthogonalProjector, which does both.
    """
    layers = check_layers(layers)
    if grads:
        gmats = []
        for _, layer in layers:
            ga, gb = layer.A_train.grad, layer.B_train.grad
            gmats.append((ga, gb.transpose(1, 2) if gb is not None else None))
        # A missing .grad (no backward through that layer) is skipped side by side.
        ms: list[torch.Tensor] = []
        us: list[torch.Tensor] = []
        for (name, layer), (ga, gbt) in zip(layers, gmats):
            basis = _basis(bases, name)
            if ga is not None and ga.shape[0] and basis.m_in:
                ms.append(ga)
                us.append(basis.U_in.to(device=ga.device, dtype=ga.dtype))
            if gbt is not None and gbt.shape[0] and basis.m_out:
                ms.append(gbt)
                us.append(basis.U_out.to(device=gbt.device, dtype=gbt.dtype))
        if ms:
            project_grad_(ms, us, backend=backend)
    if anchor is not None:
        if not isinstance(anchor, Mapping):
            raise TypeError(f"anchor must be the dict from snapshot_candidates, got {type(anchor).__name__}")
        deltas = []
        for name, layer in layers:
            a0, b0 = _check_anchor(anchor, name, layer)
            deltas.append((layer.A_train - a0, (layer.B_train - b0).transpose(1, 2)))  # fresh tensors
        ms, us = _pairs(layers, bases, deltas)
        if not ms:
            return
        project_grad_(ms, us, backend=backend)  # the deltas are now in the complement
        for (name, layer), (da, dbt) in zip(layers, deltas):
            if layer.num_trainable == 0:
                continue
            a0, b0 = anchor[name]
            basis = bases[name]
            # Only the projected sides are written back: a side without history keeps its value bit for bit.
            if basis.m_in:
                layer.A_train.copy_(a0 + da)
            if basis.m_out:
                layer.B_train.copy_(b0 + dbt.transpose(1, 2))


@torch.no_grad()
def out_of_subspace_norms(layers: Layers, bases: Mapping[str, LayerBasis], *, anchor: Anchor | None = None
                          ) -> dict[str, tuple[float, float]]:
    """{name: (||(I - U_in U_in^T) A||_F, ||(I - U_out U_out^T) B^T||_F)} over the layer's candidates.

    With `anchor`, of the change since the anchor instead of the parameters. An empty basis counts the whole
    matrix as outside. A diagnostic for logs and tests (host sync per layer).
    """
    layers = check_layers(layers)
    out = {}
    for name, layer in layers:
        basis = _basis(bases, name)
        a, bt = (t.detach().double() for t in candidate_mats(layer))
        if anchor is not None:
            a0, b0 = _check_anchor(anchor, name, layer)
            a, bt = a - a0.double(), bt - b0.double().transpose(1, 2)
        Ui, Uo = basis.U_in.double().to(a.device), basis.U_out.double().to(a.device)
        ra = a - Ui @ (Ui.T @ a)
        rb = bt - Uo @ (Uo.T @ bt)
        out[name] = (float(ra.norm()), float(rb.norm()))
    return out


@torch.no_grad()
def orthogonality_error(layers: Layers, bases: Mapping[str, LayerBasis], anchor: Anchor) -> float:
    """max over layers and sides of ||U^T (theta - anchor)||_F / ||theta - anchor||_F (0 where nothing moved).

    The phase-2 invariant: ~1e-7 in fp32 when project_candidates_(anchor=...) runs after every step.
    """
    layers = check_layers(layers)
    worst = 0.0
    for name, layer in layers:
        basis = _basis(bases, name)
        a0, b0 = _check_anchor(anchor, name, layer)
        da = (layer.A_train.detach() - a0).double()
        dbt = (layer.B_train.detach() - b0).double().transpose(1, 2)
        for d, U in ((da, basis.U_in), (dbt, basis.U_out)):
            n = float(d.norm())
            if U.shape[1] == 0 or n == 0.0:
                continue
            inside = float((U.double().to(d.device).T @ d).norm())
            worst = max(worst, inside / n)
    return worst


class OrthogonalProjector:
    """Phase-2 helper: `before_step()` projects the gradients, `after_step()` projects the change since start.

    Usage (after pruning, with a freshly built optimizer):
        proj = OrthogonalProjector(layers, bases)        # takes the anchor now
        loss.backward(); proj.before_step(); opt.step(); proj.after_step()
    """

    def __init__(self, layers: Layers, bases: Mapping[str, LayerBasis], *, backend: BackendName = "auto",
                 project_grads: bool = True) -> None:
        self.layers = check_layers(layers)
        for name, _ in self.layers:
            _basis(bases, name)
        self.bases = dict(bases)
        self.backend = backend
        self.project_grads = project_grads
        self.anchor = snapshot_candidates(self.layers)

    def before_step(self) -> None:
        """G <- G - U U^T G on every candidate gradient (keeps Adam's first moment in the complement)."""
        if self.project_grads:
            project_candidates_(self.layers, self.bases, grads=True, backend=self.backend)

    def after_step(self) -> None:
        """theta <- anchor + P_perp(theta - anchor) (undoes what Adam's scaling and weight decay add inside U)."""
        project_candidates_(self.layers, self.bases, anchor=self.anchor, grads=False, backend=self.backend)

    def error(self) -> float:
        """orthogonality_error of the change since the anchor (0 to fp32 rounding after after_step)."""
        return orthogonality_error(self.layers, self.bases, self.anchor)


@torch.no_grad()
def subspace_decay_(layers: Layers, bases: Mapping[str, LayerBasis], rate: float, *,
                    backend: BackendName = "auto") -> None:
    """The decoupled phase-1 regularizer: M <- M - rate * (I - U U^T) M for every candidate's A and B^T, in place.

    Applied after the optimizer step with rate = lr_t * lam (as AdamW decouples weight decay from the gradient),
    the part of a candidate outside the historical subspace shrinks by the factor (1 - lr_t * lam) per step,
    whatever Adam's per-coordinate scaling does to the task gradient; the part inside is untouched. Sides
    without history (m = 0) are left alone. `rate` is clamped to [0, 1] (1: the hard projection onto span(U)).
    """
    layers = check_layers(layers)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0:
        raise ValueError(f"rate must be a float >= 0, got {rate!r}")
    rate = min(float(rate), 1.0)
    if rate == 0.0:
        return
    mats = [(layer.A_train.detach().clone(), layer.B_train.detach().transpose(1, 2).clone()) for _, layer in layers]
    ms, us = _pairs(layers, bases, mats)
    if not ms:
        return
    project_grad_(ms, us, backend=backend)  # the copies are now (I - U U^T) M
    for (name, layer), (pa, pbt) in zip(layers, mats):
        if layer.num_trainable == 0:
            continue
        basis = bases[name]
        if basis.m_in:
            layer.A_train.sub_(rate * pa)
        if basis.m_out:
            layer.B_train.sub_(rate * pbt.transpose(1, 2))


@torch.no_grad()
def outside_fractions(layers: Layers, bases: Mapping[str, LayerBasis]) -> dict[str, dict[str, Any]]:
    """Per candidate, the fraction of its norm outside the historical subspace (a diagnostic, one host sync a layer).

    Returns {name: {"A": [||(I - U_in U_in^T) A_c||_F / ||A_c||_F], "B": [same for B_c^T; None while B_c = 0],
    "A_random": sqrt(1 - m_in / d_in), "B_random": sqrt(1 - m_out / d_out)}}: the *_random values are what a
    random matrix would show (the expected fraction of its squared norm outside an m-dimensional subspace is
    1 - m / d), the reference for "pulled into the subspace". Layers without candidates or history are skipped.
    """
    layers = check_layers(layers)
    out: dict[str, dict[str, Any]] = {}
    for name, layer in layers:
        basis = _basis(bases, name)
        if layer.num_trainable == 0 or basis.empty:
            continue
        entry: dict[str, Any] = {}
        for side, M, U, d in (("A", layer.A_train, basis.U_in, layer.in_features),
                              ("B", layer.B_train.transpose(1, 2), basis.U_out, layer.out_features)):
            M = M.detach().double()
            Ud = U.double().to(M.device)
            perp = M - Ud @ (Ud.T @ M) if U.shape[1] else M
            norms = M.flatten(1).norm(dim=1).tolist()
            outs = perp.flatten(1).norm(dim=1).tolist()
            entry[side] = [o / n if n > 0 else None for o, n in zip(outs, norms)]
            entry[f"{side}_random"] = (1.0 - U.shape[1] / d) ** 0.5
        out[name] = entry
    return out
