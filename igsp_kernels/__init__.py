"""igsp_kernels: fused mixture-of-LoRA-experts ops, routing and subspace ops, and drop-in adapter modules.

Imports only torch (and triton, lazily, when present): never `igsp` or `open_clip` (STYLE A1).

Two import paths:
- the curated API below (`igsp_kernels.moe_lora`, `igsp_kernels.MoELoRALinear`, ...), validated and dispatched;
- the submodules for power users: `igsp_kernels.reference` (eager ground truth), `igsp_kernels.backends`
  (dispatch and its reasons), `igsp_kernels.ops` (Triton kernels, needs triton).

Embedding in another project (docs/embedding.md), with PEFT's shape: `MoELoRAConfig` + `inject_moe_lora`,
`save_adapters` / `load_adapters`, `print_trainable_parameters`, `merge_` / `unmerge_` / `merge_and_unload`,
`disable_adapters`, `modules_to_save`.
"""

from igsp_kernels.adapters import (
    adapter_state_dict,
    disable_adapters,
    get_nb_trainable_parameters,
    load_adapter_state_dict,
    load_adapters,
    merge_,
    merge_and_unload,
    print_trainable_parameters,
    save_adapters,
    unmerge_,
)
from igsp_kernels.backends import BackendNotSupportedError, OpRequest, available_backends, explain
from igsp_kernels.config import MoELoRAConfig
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
    AdaptedMultiheadAttention,
    ModulesToSaveWrapper,
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
    "AdaptedMultiheadAttention",
    "BackendNotSupportedError",
    "ModulesToSaveWrapper",
    "MoELoRAConfig",
    "MoELoRALinear",
    "OpRequest",
    "RoutingDecision",
    "TaskRouter",
    "adapter_state_dict",
    "add_router",
    "available_backends",
    "count_parameters",
    "disable_adapters",
    "expand_sample_routing",
    "explain",
    "get_nb_trainable_parameters",
    "inject_moe_lora",
    "load_adapter_state_dict",
    "load_adapters",
    "merge_",
    "merge_and_unload",
    "moe_lora",
    "moe_lora_layers",
    "print_trainable_parameters",
    "project_grad_",
    "project_out",
    "route_topk",
    "save_adapters",
    "set_sample_tasks",
    "set_task",
    "subspace_basis",
    "subspace_penalty",
    "unmerge_",
]
