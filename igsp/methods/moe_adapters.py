"""The MoE-Adapters baseline (METHOD.md section 4): a fixed pool of adapter experts (from `adapters.num_experts`),
a new router per task over the whole pool, one phase, and experts frozen after each task.

Which experts freeze (`method.freeze_rule`):
- "selected", MoE-Adapters' code (`mtil/src/models/finetune.py`): per layer the `freeze_per_task` experts
  selected most often during the task (`choose_map`: top-k selections counted over every training forward,
  both towers), ranked over the *whole* pool. An expert already frozen can be among them; then fewer new
  experts freeze (their frozen list is a set of names, appended per task). Ties go to the lower expert id
  (`torch.topk` on equal counts is not specified; the choice is ours).
- "weighted" (older runs): the `freeze_per_task` trainable experts with the largest summed routing weight.
"""

from __future__ import annotations

from typing import Any

from igsp.methods.base import Method, PlanLayer

__all__ = ["REFERENCE_SETTINGS", "MoEAdaptersMethod"]

# MoE-Adapters4CL's model as our config fields (mtil/clip/model.py ResidualAttentionBlock, mtil/clip/adapter.py,
# mtil/src/args.py defaults, the train scripts' flags): 22 experts per block of both towers beside the MLP, each
# Linear(d, 64) -> ReLU -> dropout 0.1 -> Linear(64, d) with biases, scaled by 0.1 (LoRA-style init: up-projection
# and biases zero), reading the residual stream; a router per task, w_gate and w_noise both zero-initialised,
# noisy top-2 gating (noise std softplus(x w_noise) + 1e-2, training only) on the first token (class / start token);
# after each task the 2 most selected experts of each block frozen. `igsp plan` lists any departure from these;
# tests/trainer/test_moe_adapters_baseline.py checks the MTIL presets against them.
REFERENCE_SETTINGS: dict[str, Any] = {
    "adapters.targets": ["mlp_parallel"], "adapters.towers": ["visual", "text"], "adapters.num_experts": 22,
    "adapters.rank": 64, "adapters.top_k": 2, "adapters.scale": 0.1, "adapters.activation": "relu",
    "adapters.expert_bias": True, "adapters.routing": "sample", "adapters.parallel_input": "residual",
    "adapters.route_token": "first", "adapters.text_route_token": "first", "adapters.noise": "learned",
    "adapters.noise_floor": 0.01, "adapters.router_init_std": 0.0, "adapters.expert_dropout": 0.1,
    "method.freeze_per_task": 2, "method.freeze_rule": "selected",
}


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
        # Counts assume freeze_per_task new experts per task: the "selected" rule can freeze fewer (when an
        # already frozen expert is among the most selected), which only the run itself can tell.
        out = super().plan_task(config, layers, survival)
        for lay in layers:
            lay.frozen += min(config.method.freeze_per_task, lay.pool - lay.frozen)
        return out

    def end_task(self, t: int) -> None:
        method = self.trainer.config.method
        k = method.freeze_per_task
        chosen: dict[str, list[int]] = {}
        for name, layer in self.routing_layers():
            if method.freeze_rule == "selected":  # the k most selected over the whole pool, if still trainable
                counts = layer.usage_count.tolist()
                top = sorted(range(layer.num_experts), key=lambda e: (-counts[e], e))[:k]
                trainable = set(layer.trainable_expert_ids())
                chosen[name] = [e for e in top if e in trainable]
            else:
                u = layer.usage()
                chosen[name] = sorted(layer.trainable_expert_ids(), key=lambda e: (-float(u[e]), e))[:k]
        follows = self.followers
        for name, layer in self.layers:  # a follower freezes its leader's choice (block routing: expert pairs)
            layer.freeze_experts(chosen[follows.get(name, name)])
