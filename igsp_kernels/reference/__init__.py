"""Eager PyTorch ground truth for every op (STYLE E1): the CPU fallback, the test oracle, the benchmark baselines.

Nothing here validates its inputs: the public functions in `igsp_kernels.functional` do that once, for every
backend. Import these directly only when you already trust the inputs (tests, benchmarks).
"""

from igsp_kernels.reference.moe_lora import (
    moe_lora_dense,
    moe_lora_loop,
    moe_lora_ref,
    moe_lora_smart_dense,
)
from igsp_kernels.reference.routing import expand_sample_routing, route_topk_ref
from igsp_kernels.reference.subspace import (
    project_grad_ref_,
    project_out_ref,
    subspace_basis_ref,
    subspace_penalty_ref,
)

__all__ = [
    "expand_sample_routing",
    "moe_lora_dense",
    "moe_lora_loop",
    "moe_lora_ref",
    "moe_lora_smart_dense",
    "project_grad_ref_",
    "project_out_ref",
    "route_topk_ref",
    "subspace_basis_ref",
    "subspace_penalty_ref",
]
