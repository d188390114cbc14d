"""Injection of MoE-LoRA adapters into open_clip CLIP models (STYLE I1: inject, never fork the model).

Targets per residual block of the chosen towers:
- "mlp.c_fc", "mlp.c_proj": the MLP linears, wrapped by `MoELoRALinear` around the frozen linear.
- "attn.out_proj": `nn.MultiheadAttention` reads `out_proj.weight` directly inside
  `F.multi_head_attention_forward` and never calls `out_proj`, so wrapping `out_proj` alone would be silently
  dead. The whole attention module is replaced by `AdaptedMultiheadAttention`, the same computation
  (in-projection, scaled dot-product attention, out-projection) that *calls* the wrapped out-projection.
- "mlp_parallel": an adapter beside the MLP (no base weight). With `parallel_input="residual"` (MoE-Adapters'
  code, `mtil/clip/model.py`: x + mlp(ln_2(x)) + adapter(x)) the adapter reads the block's residual stream x;
  with "ln_2" (the default, older runs) it reads the MLP's input ln_2(x): mlp(ln_2(x)) + adapter(ln_2(x)).

Routing reads the first token of each sample in the vision tower (the class token). In the text tower the
first token is the start-of-text token, and under the causal mask its hidden state is identical for every
prompt, so per-sample routing there defaults to the token mean (`text_route_token`); MoE-Adapters routes on it
anyway ("first"): every prompt then shares its experts at evaluation, and differs in training only through the
gating noise.

Router placement (`router_placement`). "layer": every adapted linear has its own routers on its own input.
"block": the MLP's two linears share one router per block: `mlp.c_fc` routes on the MLP input (ln_2 of the
block's residual stream) and `mlp.c_proj` applies that decision (`RouteFollower`, no routers of its own).
c_proj's own input is 4x wider (3072 in ViT-B/16), so per block this removes 4/5 of the router elements;
an expert of the block is then the pair (c_fc expert e, c_proj expert e), added, pruned and frozen together.
`attn.out_proj` keeps its own router either way (it sits in the attention sub-block).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from igsp_kernels import MoELoRALinear, moe_lora_layers
from igsp_kernels.modules import AdaptedMultiheadAttention  # generic torch: lives in the kernel layer
from igsp_kernels.reference.moe_lora import ACTIVATIONS

__all__ = [
    "ROUTER_PLACEMENTS",
    "TARGETS",
    "TOWERS",
    "AdaptedMultiheadAttention",
    "AdapterConfig",
    "BlockRoutedMLP",
    "ParallelAdapter",
    "RouteFollower",
    "adapter_layers",
    "inject",
    "route_followers",
]

logger = logging.getLogger(__name__)

TARGETS = ("mlp.c_fc", "mlp.c_proj", "attn.out_proj", "mlp_parallel")
TOWERS = ("visual", "text")
ROUTER_PLACEMENTS = ("layer", "block")


@dataclass
class AdapterConfig:
    """Where adapters go and what each MoE-LoRA layer looks like."""

    targets: list[str] = field(default_factory=lambda: ["mlp.c_fc", "mlp.c_proj"],
                               metadata={"help": f"module kinds to adapt, any of {TARGETS}"})
    towers: list[str] = field(default_factory=lambda: ["visual", "text"], metadata={"help": f"any of {TOWERS}"})
    num_experts: int = field(default=0, metadata={"help": "initial experts per layer (igsp adds candidates per task)"})
    rank: int = 16
    top_k: int = 2
    scale: float = 1.0
    activation: str = field(default="identity", metadata={"help": f"one of {ACTIVATIONS}"})
    expert_bias: bool = False
    routing: str = field(default="sample", metadata={"help": "'sample' (MoE-Adapters) or 'token'"})
    route_token: str = field(default="first", metadata={"help": "vision tower route vector: 'first' or 'mean'"})
    text_route_token: str = field(default="mean", metadata={"help": "text tower route vector: 'first' or 'mean'"})
    noise_std: float = 0.0
    noise: str = field(default="fixed", metadata={
        "help": "'fixed' (Gaussian noise_std on the logits) or 'learned' (MoE-Adapters' noisy top-k gating)"})
    noise_floor: float = field(default=1e-2, metadata={"help": "learned noise: std = softplus(x W_noise) + floor"})
    expert_dropout: float = field(default=0.0, metadata={
        "help": "dropout on each expert's hidden activation in training (MoE-Adapters: 0.1)"})
    parallel_input: str = field(default="ln_2", metadata={
        "help": "mlp_parallel input: 'ln_2' (the MLP's input) or 'residual' (the block's stream, MoE-Adapters)"})
    router_init_std: float = 0.02
    router_placement: str = field(default="layer", metadata={
        "help": "'layer' (each adapted linear routes on its own input) or 'block' (c_fc and c_proj share one "
                "router per block, on the MLP input)"})
    backend: str = field(default="auto", metadata={"help": "igsp_kernels backend: auto, reference, triton, cpp"})

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"adapters.{name}: got {value!r}, expected {allowed}")

        targets = self.targets
        if not isinstance(targets, (list, tuple)) or not targets or any(t not in TARGETS for t in targets):
            raise bad("targets", self.targets, f"a non-empty list of {list(TARGETS)}")
        if "mlp_parallel" in self.targets and {"mlp.c_fc", "mlp.c_proj"} & set(self.targets):
            raise bad("targets", self.targets, "either 'mlp_parallel' or the MLP linears, not both")
        if not isinstance(self.towers, (list, tuple)) or not self.towers or any(t not in TOWERS for t in self.towers):
            raise bad("towers", self.towers, f"a non-empty list of {list(TOWERS)}")
        for name in ("num_experts", "rank", "top_k"):
            value = getattr(self, name)
            low = 0 if name == "num_experts" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, value, f"an int >= {low}")
        if self.num_experts and self.top_k > self.num_experts:
            raise bad("top_k", self.top_k, f"<= num_experts ({self.num_experts})")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", self.activation, f"one of {list(ACTIVATIONS)}")
        if self.routing not in ("sample", "token"):
            raise bad("routing", self.routing, "'sample' or 'token'")
        for name in ("route_token", "text_route_token"):
            if getattr(self, name) not in ("first", "mean"):
                raise bad(name, getattr(self, name), "'first' or 'mean'")
        if self.router_placement not in ROUTER_PLACEMENTS:
            raise bad("router_placement", self.router_placement, f"one of {list(ROUTER_PLACEMENTS)}")
        if self.router_placement == "block" and not {"mlp.c_fc", "mlp.c_proj"} <= set(self.targets):
            raise bad("router_placement", self.router_placement,
                      "'layer' unless targets holds both 'mlp.c_fc' and 'mlp.c_proj' (the block router is c_fc's, "
                      f"shared with c_proj; targets: {self.targets})")
        if self.backend not in ("auto", "reference", "triton", "cpp"):
            raise bad("backend", self.backend, "one of ['auto', 'reference', 'triton', 'cpp']")
        if self.noise not in ("fixed", "learned"):
            raise bad("noise", self.noise, "'fixed' or 'learned'")
        if self.noise == "learned" and self.noise_std:
            raise bad("noise_std", self.noise_std, "0 with noise='learned' (the std is learned per router)")
        if self.parallel_input not in ("ln_2", "residual"):
            raise bad("parallel_input", self.parallel_input, "'ln_2' or 'residual'")
        if self.parallel_input == "residual" and "mlp_parallel" not in self.targets:
            raise bad("parallel_input", self.parallel_input, "'ln_2' unless targets holds 'mlp_parallel'")
        for name in ("scale", "noise_std", "noise_floor", "expert_dropout", "router_init_std"):
            value = getattr(self, name)
            # Finite too: scale = NaN and noise_std = NaN were accepted (the latter silently ran as 0; issue 14).
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, value, "a finite number")
        if self.noise_std < 0 or self.router_init_std < 0 or self.noise_floor < 0:
            raise bad("noise_std/noise_floor/router_init_std", (self.noise_std, self.noise_floor,
                                                               self.router_init_std), "numbers >= 0")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise bad("expert_dropout", self.expert_dropout, "a number in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"adapters: unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def layer_kwargs(self, tower: str) -> dict[str, Any]:
        """Keyword arguments of `MoELoRALinear` for a layer of `tower`."""
        return dict(
            num_experts=self.num_experts, rank=self.rank, top_k=self.top_k, scale=self.scale,
            activation=self.activation, expert_bias=self.expert_bias, routing=self.routing,
            route_token=self.text_route_token if tower == "text" else self.route_token,
            noise_std=self.noise_std, noise=self.noise, noise_floor=self.noise_floor,
            expert_dropout=self.expert_dropout, router_init_std=self.router_init_std, backend=self.backend,
        )


class ParallelAdapter(nn.Module):
    """An adapter beside the MLP: mlp(norm(x)) + adapter(x), the adapter a base-less MoE-LoRA layer.

    `norm` is None when the block still applies ln_2 before calling this module (input "ln_2": the adapter sees
    ln_2(x)); for input "residual" the block's ln_2 is replaced by an identity and the norm moves here, so the
    adapter sees the residual stream x, as in MoE-Adapters (x + mlp(ln_2(x)) + adapter(x)).
    """

    def __init__(self, mlp: nn.Module, adapter: MoELoRALinear, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter
        self.norm = norm

    def __getattr__(self, name: str) -> Any:
        # open_clip reads block.mlp.c_fc (its cast-dtype probe): resolve MLP children through the wrapper.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("mlp"), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x if self.norm is None else self.norm(x)) + self.adapter(x)


class RouteFollower(MoELoRALinear):
    """A MoE-LoRA layer without routers of its own: it applies the routing decision its block's leader passes in.

    `forward(x, routing=decision)` runs the routed experts; `forward(x)` without a decision is the frozen base
    alone (the leader's adapters are off, or it routed nothing). `add_router` creates nothing, and
    `set_task`/`set_sample_tasks` only record the task (there is no router to check it against). The pool must
    mirror the leader's: expert e here is used whenever the leader picks its expert e. `route_leader` is the
    leader's qualified name in the model.
    """

    route_leader: str = ""

    def add_router(self, task: str | int, *, active: Any = None) -> None:  # type: ignore[override]
        return None

    def set_task(self, task: str | int | None) -> None:
        self._sample_tasks = None
        self.active_task = None if task is None else str(task)

    def set_sample_tasks(self, task_ids: torch.Tensor | None) -> None:
        self._sample_tasks = task_ids

    def route(self, x: torch.Tensor) -> Any:
        raise RuntimeError(f"this layer has no routers: it applies the decision of {self.route_leader!r} "
                           "(forward(x, routing=leader.route(x_block)))")

    def forward(self, x: torch.Tensor, routing: Any = None) -> torch.Tensor:
        if routing is None:
            base = self.base_layer
            return base(x) if base is not None else x.new_zeros(*x.shape[:-1], self.out_features)
        return super().forward(x, routing=routing)


class BlockRoutedMLP(nn.Sequential):
    """open_clip's MLP (c_fc, activation, c_proj) with one routing decision per block: c_fc's, applied to both.

    The children keep their names (`c_fc`, `gelu`, `c_proj`), so parameter and checkpoint names are those of the
    per-layer placement.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc, proj = self.c_fc, self.c_proj
        acts = [m for name, m in self.named_children() if name not in ("c_fc", "c_proj")]
        # c_fc routes when a task is set on it (one for the batch, or one per sample); otherwise its own forward
        # decides (the base output when the adapters are off, an error when no task was ever set) and c_proj,
        # given no decision, gives its base output.
        on = fc.num_experts > 0 and (fc.active_task is not None or getattr(fc, "_sample_tasks", None) is not None)
        decision = fc.route(x) if on else None
        h = fc(x, routing=decision) if decision is not None else fc(x)
        for act in acts:
            h = act(h)
        return proj(h, routing=decision)


def _blocks(model: nn.Module, tower: str) -> list[tuple[str, nn.Module]]:
    """The residual attention blocks of a CLIP tower, by name (open_clip: visual.transformer / transformer)."""
    found = []
    for name, module in model.named_modules():
        in_visual = name.startswith("visual.")
        if (tower == "visual") != in_visual:
            continue
        if hasattr(module, "mlp") and hasattr(module, "attn") and hasattr(module, "ln_2"):
            found.append((name, module))
    return found


def inject(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Freeze `model` and wrap the configured targets of every block of the configured towers.

    Returns the qualified names of the adapted modules (for "attn.out_proj" the wrapped out-projection, for
    "mlp_parallel" the adapter). Raises ValueError if a tower has no residual blocks.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    model.requires_grad_(False)
    wrapped: list[str] = []
    for tower in config.towers:
        blocks = _blocks(model, tower)
        if not blocks:
            raise ValueError(f"adapters.towers names {tower!r} but the model has no residual blocks there "
                             f"(expected open_clip 'visual.transformer.resblocks.*' / 'transformer.resblocks.*')")
        kwargs = config.layer_kwargs(tower)
        shared = config.router_placement == "block"
        for name, block in blocks:
            if shared:
                block.mlp = _block_routed(block.mlp, f"{name}.mlp")
            for target in config.targets:
                if target in ("mlp.c_fc", "mlp.c_proj"):
                    child = target.split(".")[1]
                    linear = getattr(block.mlp, child)
                    cls = RouteFollower if shared and child == "c_proj" else MoELoRALinear
                    layer = cls.from_linear(linear, **kwargs)
                    if isinstance(layer, RouteFollower):
                        layer.route_leader = f"{name}.mlp.c_fc"
                    setattr(block.mlp, child, layer)
                    wrapped.append(f"{name}.{target}")
                elif target == "attn.out_proj":
                    attn = block.attn
                    if not isinstance(attn, nn.MultiheadAttention):
                        raise ValueError(f"{name}.attn is {type(attn).__name__}, expected nn.MultiheadAttention")
                    out = MoELoRALinear.from_linear(attn.out_proj, **kwargs)
                    block.attn = AdaptedMultiheadAttention(attn, out)
                    wrapped.append(f"{name}.attn.out_proj")
                else:  # mlp_parallel
                    width = block.ln_2.normalized_shape[0]
                    device = next(block.parameters()).device
                    adapter = MoELoRALinear(width, width, device=device, **kwargs)
                    norm = None
                    if config.parallel_input == "residual":
                        # The block computes x + ls_2(mlp(ln_2(x))): moving ln_2 into the wrapper hands it x.
                        if not isinstance(getattr(block, "ls_2", nn.Identity()), nn.Identity):
                            raise ValueError(f"{name} scales its MLP branch (LayerScale ls_2), which would also "
                                             "scale a residual-input adapter: use adapters.parallel_input='ln_2'")
                        norm, block.ln_2 = block.ln_2, nn.Identity()
                    block.mlp = ParallelAdapter(block.mlp, adapter, norm)
                    wrapped.append(f"{name}.mlp.adapter")
    logger.info("injected %d MoE-LoRA layers (%s, %s routers) into %s", len(wrapped), ", ".join(config.targets),
                config.router_placement, ", ".join(config.towers))
    return wrapped


def _block_routed(mlp: nn.Module, name: str) -> BlockRoutedMLP:
    """open_clip's MLP Sequential (c_fc, activation, c_proj) as a BlockRoutedMLP with the same children."""
    children = dict(mlp.named_children()) if isinstance(mlp, nn.Sequential) else {}
    names = list(children)
    if len(names) < 2 or names[0] != "c_fc" or names[-1] != "c_proj":
        raise ValueError(f"adapters.router_placement='block' needs {name} to be open_clip's MLP Sequential "
                         f"(c_fc, activation, c_proj), got {type(mlp).__name__} with children {names}")
    return BlockRoutedMLP(OrderedDict(children))


def route_followers(layers: list[tuple[str, MoELoRALinear]]) -> dict[str, str]:
    """{follower name: leader name} for the layers that apply another layer's routing (RouteFollower)."""
    names = {n for n, _ in layers}
    out = {}
    for name, layer in layers:
        if isinstance(layer, RouteFollower):
            if layer.route_leader not in names:
                raise ValueError(f"layer {name!r} follows the routing of {layer.route_leader!r}, which is not among "
                                 "the given layers")
            out[name] = layer.route_leader
    return out


def adapter_layers(model: nn.Module) -> list[tuple[str, MoELoRALinear]]:
    """Every MoE-LoRA layer of `model`, in module order (stable across runs of the same config)."""
    return list(moe_lora_layers(model))
