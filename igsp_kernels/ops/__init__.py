"""Triton kernels of igsp_kernels (needs `triton`; imported lazily by `igsp_kernels.backends.TritonBackend`).

Importing this package registers the custom ops of the `igsp_kernels` torch.library namespace
(`torch.ops.igsp_kernels.*`: moe_lora_fwd/bwd (per-token routing), moe_lora_sample_fwd/bwd (per-sample routing,
`tokens_per_sample`), routing_metadata, route_topk_fwd/bwd, subspace_penalty_fwd, project_grad_), each with a fake
implementation so that `torch.compile` can trace them.

Two import paths, as in the rest of the package: the backend entry points below (inputs already validated by
`igsp_kernels.functional`), and the op modules for power users (`igsp_kernels.ops.moe_lora` has the launchers
and the autograd Function, `igsp_kernels.ops.moe_lora_sample` its per-sample path; `_*_kernels.py` hold only
`@triton.jit` code and configs).

TRITON_INTERPRET=1 must be set before this package is first imported for the kernels to run on CPU tensors.
"""

import triton  # noqa: F401  (fail here, with ImportError, when Triton is missing: the backend reports it)

from igsp_kernels.ops.moe_lora import MoELoRAFunction, moe_lora_triton
from igsp_kernels.ops.routing import RouteTopkFunction, route_topk_triton, routing_metadata
from igsp_kernels.ops.subspace import SubspacePenaltyFunction, project_grad_triton_, subspace_penalty_triton

__all__ = [
    "MoELoRAFunction",
    "RouteTopkFunction",
    "SubspacePenaltyFunction",
    "moe_lora_triton",
    "project_grad_triton_",
    "route_topk_triton",
    "routing_metadata",
    "subspace_penalty_triton",
]
