"""Plain LoRA fine-tuning, continued task after task (the forgetting baseline of the demo).

Each adapted linear holds `adapters.num_experts` LoRA experts (1: one LoRA of rank `adapters.rank`, i.e.
`y = W0 x + b0 + s * B A x`, as peft's LoraLayer) that every task trains further; nothing is ever frozen, so each
task overwrites what the previous ones learned. The engine still adds one router per task (the interface's
default `begin_task`); over a single expert with `top_k = 1` its softmax is the constant 1, so it routes nothing
and receives no gradient (it costs `d_route` stored elements per layer and task in the parameter counts).
Evaluation goes through the task selector like every method: a sample routed to any trained task sees the
current LoRA, a sample below the selector's threshold sees the frozen CLIP.
"""

from __future__ import annotations

from typing import Any

from igsp.methods.base import Method

__all__ = ["LoRAMethod"]


class LoRAMethod(Method):
    name = "lora"

    @classmethod
    def validate_config(cls, config: Any) -> None:
        from igsp.config import _bad

        # (top_k <= num_experts is AdapterConfig's own check.)
        if config.adapters.num_experts < 1:
            raise _bad("adapters.num_experts", config.adapters.num_experts,
                       "an int >= 1 with method.name='lora' (1 = one LoRA per layer, trained by every task)")
