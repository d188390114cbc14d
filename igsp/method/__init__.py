"""The iGSP method (METHOD.md section 3): historical subspaces, the phase-1 regularizer, router convergence,
pruning, and the phase-2 orthogonal projection. Each function takes the adapter layers as a list of
(name, igsp_kernels.MoELoRALinear) pairs (igsp.adapters.adapter_layers(model)). Our choices where METHOD.md is
silent are recorded in docs/method.md.
"""

from igsp.method.convergence import NOISE_FLOORS, RouterConvergence, total_variation
from igsp.method.pruning import expert_grad_norms, prune_candidates, prune_rank_components, usage_shares
from igsp.method.representations import grow_basis, representation_grams
from igsp.method.subspace import (
    LayerBasis,
    OrthogonalProjector,
    candidate_mats,
    compute_bases,
    orthogonality_error,
    out_of_subspace_norms,
    outside_fractions,
    project_candidates_,
    snapshot_candidates,
    subspace_decay_,
    subspace_regularizer,
)

__all__ = [
    "LayerBasis",
    "OrthogonalProjector",
    "NOISE_FLOORS",
    "RouterConvergence",
    "candidate_mats",
    "compute_bases",
    "expert_grad_norms",
    "grow_basis",
    "orthogonality_error",
    "out_of_subspace_norms",
    "outside_fractions",
    "project_candidates_",
    "prune_candidates",
    "prune_rank_components",
    "representation_grams",
    "snapshot_candidates",
    "subspace_decay_",
    "subspace_regularizer",
    "total_variation",
    "usage_shares",
]
