"""Reference subspace ops of iGSP (METHOD.md section 3).

Orientation: a matrix M (..., d, n) is projected along its row dimension d by a basis U (d, m) with
orthonormal columns. For a candidate A_c (d_in, r) pass A_c with U_in; for B_c (r, d_out) pass B_c^T (a
transposed view, which the in-place op writes through) with U_out.

- subspace_basis(M, energy): U = the left singular vectors of M whose squared singular values reach the
  `energy` fraction of the total (GPM's criterion).
- project_out(M, U) = M - U (U^T M).
- subspace_penalty(mats, bases, lam) = lam * sum_i ||(I - U_i U_i^T) M_i||_F^2; its gradient is
  2 lam (I - U U^T) M, which pulls each candidate into the historical subspace.
- project_grad_(grads, bases): G_i <- G_i - U_i (U_i^T G_i), in place (phase-2 orthogonal projection).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from igsp_kernels.reference.moe_lora import acc_dtype

__all__ = ["project_grad_ref_", "project_out_ref", "subspace_basis_ref", "subspace_penalty_ref"]


def subspace_basis_ref(M: torch.Tensor, energy: float = 0.95, max_rank: int | None = None) -> torch.Tensor:
    """Orthonormal basis U (d, m) of the column space of M (d, n) to an energy threshold; m may be 0."""
    d = M.shape[0]
    if M.numel() == 0:
        return M.new_zeros(d, 0)
    Mf = M.detach().to(torch.float64)  # SVD in fp64: bases are computed once per task, accuracy is free
    U, S, _ = torch.linalg.svd(Mf, full_matrices=False)
    sq = S.square()
    total = sq.sum()
    if total <= 0:
        return M.new_zeros(d, 0)
    cum = torch.cumsum(sq, 0) / total
    # The smallest m with cum[m-1] >= energy; a tiny slack keeps energy=1.0 from failing on rounding.
    m = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1
    m = min(m, int((S > S[0] * 1e-10).sum().item()))  # never keep numerically-null directions
    if max_rank is not None:
        m = min(m, max_rank)
    return U[:, :m].to(M.dtype).contiguous()


def project_out_ref(M: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """M - U (U^T M) for M (..., d, n) and U (d, m)."""
    if U.shape[-1] == 0:
        return M.clone()
    return M - U @ (U.transpose(0, 1) @ M)


def subspace_penalty_ref(mats: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], lam: float) -> torch.Tensor:
    """lam * sum_i ||M_i - U_i U_i^T M_i||_F^2 as a scalar in the accumulation dtype, differentiable in M_i."""
    acc = acc_dtype(mats[0].dtype)
    total = torch.zeros((), dtype=acc, device=mats[0].device)
    for M, U in zip(mats, bases):
        r = project_out_ref(M.to(acc), U.to(acc))
        total = total + r.square().sum()
    return lam * total


@torch.no_grad()
def project_grad_ref_(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    """G_i <- G_i - U_i (U_i^T G_i) in place, computed in the accumulation dtype."""
    for G, U in zip(grads, bases):
        if U.shape[-1] == 0:
            continue
        acc = acc_dtype(G.dtype)
        Ga = G.to(acc)
        Ua = U.to(acc)
        G.copy_(Ga - Ua @ (Ua.transpose(0, 1) @ Ga))
