"""igsp_kernels: fused mixture-of-LoRA-experts ops, routing and subspace ops, and drop-in adapter modules.

Imports only torch (and triton, lazily, when present): never `igsp` or `open_clip` (STYLE A1).

Two import paths:
- the curated API below (`igsp_kernels.moe_lora`, `igsp_kernels.MoELoRALinear`, ...), validated and dispatched;
- the submodules for power users: `igsp_kernels.reference` (eager ground truth), `igsp_kernels.backends`
  (dispatch and its reasons), `igsp_kernels.ops` (Triton kernels, needs triton).
"""

from igsp_kernels.backends import BackendNotSupportedError, OpRequest, available_backends, explain
from igsp_kernels.functional import (
    expand_sample_routing,
    moe_lora,
    project_grad_,
    project_out,
    route_topk,
    subspace_basis,
    subspace_penalty,
)
from igsp_kernels.modules import (
    MoELoRALinear,
    RoutingDecision,
    TaskRouter,
    add_router,
    count_parameters,
    inject_moe_lora,
    moe_lora_layers,
    set_sample_tasks,
    set_task,
)

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "MoELoRALinear",
    "RoutingDecision",
    "TaskRouter",
    "add_router",
    "count_parameters",
    "inject_moe_lora",
    "moe_lora_layers",
    "set_sample_tasks",
    "set_task",
    "OpRequest",
    "available_backends",
    "expand_sample_routing",
    "explain",
    "moe_lora",
    "project_grad_",
    "project_out",
    "route_topk",
    "subspace_basis",
    "subspace_penalty",
]
