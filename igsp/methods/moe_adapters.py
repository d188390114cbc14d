"""The MoE-Adapters baseline (METHOD.md section 4): a fixed pool of adapter experts (from `adapters.num_experts`),
a new router per task over the whole pool, one phase, and after each task the `method.freeze_per_task` most
used trainable experts of each layer (routing weight over the whole task) are frozen.
"""

from __future__ import annotations

from typing import Any

from igsp.methods.base import Method, PlanLayer

__all__ = ["MoEAdaptersMethod"]


class MoEAdaptersMethod(Method):
    name = "moe-adapters"

    @classmethod
    def validate_config(cls, config: Any) -> None:
        from igsp.config import _bad

        if config.adapters.num_experts < 1:
            raise _bad("adapters.num_experts", config.adapters.num_experts,
                       "an int >= 1 with method.name='moe-adapters' (a fixed pool, e.g. 22)")

    @classmethod
    def plan_task(cls, config: Any, layers: list[PlanLayer], survival: float) -> dict[str, int | None]:
        out = super().plan_task(config, layers, survival)
        for lay in layers:
            lay.frozen += min(config.method.freeze_per_task, lay.pool - lay.frozen)
        return out

    def end_task(self, t: int) -> None:
        k = self.trainer.config.method.freeze_per_task
        chosen: dict[str, list[int]] = {}
        for name, layer in self.routing_layers():
            u = layer.usage()
            ids = sorted(layer.trainable_expert_ids(), key=lambda e: (-float(u[e]), e))
            chosen[name] = ids[:k]
        follows = self.followers
        for name, layer in self.layers:  # a follower freezes its leader's choice (block routing: expert pairs)
            layer.freeze_experts(chosen[follows.get(name, name)])
