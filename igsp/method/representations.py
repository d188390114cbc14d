"""Historical subspaces from what the layers see (`method.basis = "activations"`), as gradient projection does.

Why. A linear layer's weight gradient is dW = sum_rows g_row^T x_row: its row space lies in the span of the
layer's inputs x and its column space in the span of its output gradients g. In LoRA terms, dA (d_in x r) lies in
span(x) and dB^T (d_out x r) in span(g). The span of past tasks' inputs and output gradients is therefore the
subspace in which past tasks' learning happened, whatever the (nearly random) historical A matrices are. This
is GPM's representation matrix (Saha et al., ICLR 2021) on the input side, and its dual on the output side.

What is collected. At the end of each task, over a fixed, seeded sample budget of the task's training set, with
the task's own routing, each adapted layer accumulates
- K_in = sum_rows x^T x over the rows whose output gradient is non-zero (a row the loss does not see, e.g. a
  text token after the end-of-text token under the causal mask, contributes nothing to dW, so it is left out),
- K_out = sum_rows g^T g,
Gram matrices (d x d) rather than the representation matrices themselves: the left singular vectors of
R = [x_1 ... x_n] are the eigenvectors of R R^T = K, with the squared singular values as eigenvalues, so the
Gram is exact and its memory does not grow with the budget.

Growing a basis (GPM's criterion). With the current basis U (d x m) and this task's Gram K:
total = tr(K); captured = tr(U^T K U) (the energy U already holds); the residual Gram
K_r = (I - U U^T) K (I - U U^T) is eigendecomposed, and its top directions are added until
captured + sum_i lambda_i >= energy * total. A task whose inputs U already covers adds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from igsp.method._layers import Layers, check_layers

__all__ = ["grow_basis", "representation_grams"]

logger = logging.getLogger(__name__)


def grow_basis(U: torch.Tensor, gram: torch.Tensor, energy: float, *, max_rank: int | None = None) -> torch.Tensor:
    """GPM's basis update: U (d, m) orthonormal plus the residual directions of `gram` (d, d) needed to hold
    `energy` of its trace (module docstring). Returns (d, m') fp32 on U's device, m' >= m, orthonormal.

    Args:
        U: the current basis (d, m), m may be 0.
        gram: a symmetric positive semi-definite (d, d) matrix (a sum of x^T x).
        energy: fraction of tr(gram) the new basis must hold, in (0, 1].
        max_rank: cap on m'.
    """
    if U.dim() != 2 or gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] != U.shape[0]:
        raise ValueError(f"U must be (d, m) and gram (d, d) with the same d, got {tuple(U.shape)} and "
                         f"{tuple(gram.shape)}")
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a float in (0, 1], got {energy!r}")
    if not torch.isfinite(gram).all():
        raise ValueError("gram must be finite (a non-finite activation or gradient reached the collector)")
    d, m = U.shape
    K = gram.detach().double().to(U.device)
    K = 0.5 * (K + K.T)
    total = float(torch.diagonal(K).sum())
    cap = d if max_rank is None else min(d, max_rank)
    if total <= 0.0 or m >= cap:
        return U
    Ud = U.detach().double()
    captured = float(torch.diagonal(Ud.T @ K @ Ud).sum()) if m else 0.0
    need = energy * total - captured
    if need <= 1e-12 * total:
        return U
    P = torch.eye(d, dtype=torch.float64, device=K.device) - Ud @ Ud.T if m else None
    Kr = P @ K @ P if P is not None else K
    evals, evecs = torch.linalg.eigh(0.5 * (Kr + Kr.T))
    evals, evecs = evals.flip(0).clamp(min=0.0), evecs.flip(1)
    positive = int((evals > 1e-12 * total).sum())
    cum = torch.cumsum(evals, 0)
    r = int(torch.searchsorted(cum, torch.tensor(need, dtype=cum.dtype, device=cum.device))) + 1
    r = min(r, positive, cap - m)
    if r <= 0:
        return U
    new = evecs[:, :r]
    if m:  # the residual's eigenvectors are orthogonal to U up to rounding: re-orthonormalise the union
        new = new - Ud @ (Ud.T @ new)
        Q, _ = torch.linalg.qr(torch.cat([Ud, new], dim=1))
        out = torch.cat([Ud, Q[:, m:]], dim=1)  # U's own columns unchanged: earlier phases' projections stay valid
    else:
        out = new
    return out.to(U.dtype)


def representation_grams(layers: Layers, losses: Iterable[Callable[[], torch.Tensor]], *,
                         all_reduce: Callable[[torch.Tensor], Any] | None = None
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (K_in (d_in, d_in), K_out (d_out, d_out))} fp64 Gram matrices of every layer's inputs (rows with a
    non-zero output gradient) and output gradients, over the batches whose losses `losses` compute.

    Args:
        layers: (name, MoELoRALinear) pairs; their outputs must depend on something that requires grad (the
            current task's router or candidates do), so that the loss reaches them.
        losses: callables, each running one forward pass of the model and returning a scalar loss.
        all_reduce: sums a tensor over DDP ranks in place (None: one process).
    Each loss is differentiated with torch.autograd.grad with respect to the captured layer outputs only: no
    parameter's .grad changes.
    """
    layers = check_layers(layers)
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n, _ in layers}
    grams = {n: (torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=layer.device),
                 torch.zeros(layer.out_features, layer.out_features, dtype=torch.float64, device=layer.device))
             for n, layer in layers}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if out.requires_grad:
                captured[name].append((args[0].detach(), out))
        return hook

    handles = [layer.register_forward_hook(make_hook(n)) for n, layer in layers]
    try:
        for make_loss in losses:
            for v in captured.values():
                v.clear()
            with torch.enable_grad():
                loss = make_loss()
            pairs = [(n, x, y) for n, items in captured.items() for x, y in items]
            if not pairs:
                raise RuntimeError("no adapted layer output requires grad: representation_grams needs the current "
                                   "task's router or candidates to be trainable while it runs")
            grads = torch.autograd.grad(loss, [y for _, _, y in pairs], allow_unused=True)
            for (n, x, y), g in zip(pairs, grads):
                if g is None:
                    continue
                K_in, K_out = grams[n]
                # fp32 products accumulated in fp64: a ViT-B/16 c_proj sees 3072-wide rows, 50k of them for 256
                # images; fp64 GEMMs would be ~30x slower on most GPUs for no useful precision.
                g2 = g.detach().reshape(-1, g.shape[-1]).float()
                x2 = x.reshape(-1, x.shape[-1]).float()
                seen = g2.abs().amax(dim=1) > 0  # rows the loss depends on
                xs = x2[seen]
                K_in += (xs.T @ xs).double()
                K_out += (g2.T @ g2).double()
            for v in captured.values():
                v.clear()
    finally:
        for h in handles:
            h.remove()
    if all_reduce is not None:
        for K_in, K_out in grams.values():
            all_reduce(K_in)
            all_reduce(K_out)
    return grams
