"""`MoELoRAConfig`: what to inject where, as one serialisable, validated dataclass (PEFT's `LoraConfig` shape).

    config = MoELoRAConfig(target_modules=["fc1", "fc2"], num_experts=4, rank=8, alpha=16, top_k=2)
    igsp_kernels.inject_moe_lora(model, config)        # like peft.get_peft_model(model, lora_config)
    MoELoRAConfig.from_dict(config.to_dict()) == config

Fields map to `MoELoRALinear`'s arguments. Scaling is PEFT's: `alpha` gives scale = alpha / rank (alpha /
sqrt(rank) with `use_rslora`), or `scale` sets it directly; neither means 1.0. `task` names the router created at
injection and made active, so the model trains right away as a PEFT model does (None: add routers yourself, the
continual-learning flow). `check_layer_options` is the one validator of the layer options, used by the layer too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from igsp_kernels.backends import get_backend
from igsp_kernels.functional import _check_number
from igsp_kernels.reference.moe_lora import ACTIVATIONS

__all__ = ["MoELoRAConfig", "check_layer_options"]


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...], what: str = "") -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be {what or 'one of ' + str(allowed)}, got {value!r}")
    return value


def check_layer_options(
    *,
    num_experts: int,
    rank: int,
    top_k: int,
    scale: float,
    activation: str,
    expert_bias: bool,
    routing: str,
    route_token: str,
    batch_first: bool,
    noise_std: float,
    noise: str,
    noise_floor: float,
    expert_dropout: float,
    router_init_std: float,
    backend: str,
) -> dict[str, Any]:
    """Validate `MoELoRALinear`'s options (ValueError/TypeError naming the option, the expected and the received
    value) and return them normalised (floats as float)."""
    _int("num_experts", num_experts, 0)
    _int("rank", rank, 1)
    _int("top_k", top_k, 1)
    _choice("activation", activation, ACTIVATIONS)
    _choice("routing", routing, ("sample", "token"), "'sample' or 'token'")
    _choice("route_token", route_token, ("first", "mean"), "'first' or 'mean'")
    _choice("noise", noise, ("fixed", "learned"), "'fixed' (noise_std) or 'learned' (noisy top-k gating)")
    for name, value in (("expert_bias", expert_bias), ("batch_first", batch_first)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    finite_pos = "a finite float >= 0"
    out = dict(
        num_experts=num_experts, rank=rank, top_k=top_k, scale=_check_number("scale", scale), activation=activation,
        expert_bias=expert_bias, routing=routing, route_token=route_token, batch_first=batch_first,
        noise_std=_check_number("noise_std", noise_std, low=0.0, what=finite_pos), noise=noise,
        noise_floor=_check_number("noise_floor", noise_floor, low=0.0, what=finite_pos),
        expert_dropout=_check_number("expert_dropout", expert_dropout, low=0.0, what="a float in [0, 1)"),
        router_init_std=_check_number("router_init_std", router_init_std, low=0.0, what=finite_pos),
        backend=backend,
    )
    if out["expert_dropout"] >= 1.0:
        raise ValueError(f"expert_dropout must be a float in [0, 1), got {expert_dropout!r}")
    if noise == "learned" and out["noise_std"]:
        raise ValueError(f"noise='learned' learns the noise std per router: noise_std must be 0, got {noise_std!r}")
    if backend != "auto":
        get_backend(backend)  # a ValueError naming the known backends: at construction, not at the first forward
    return out


@dataclass
class MoELoRAConfig:
    """Where to inject mixture-of-LoRA-experts layers and what they look like; `to_dict`/`from_dict` round-trip."""

    target_modules: list[str] | str = field(
        default_factory=list,
        metadata={"help": "nn.Linear names to wrap: a list of name suffixes ('fc1' matches 'encoder.0.fc1') or a "
                          "regex fully matching the qualified name; an nn.MultiheadAttention's out_proj is wrapped "
                          "with its attention"})
    num_experts: int = field(default=1, metadata={"help": "experts per layer (1 with top_k 1 is a plain LoRA)"})
    rank: int = field(default=8, metadata={"help": "rank r of every expert (PEFT's r)"})
    alpha: float | None = field(default=None, metadata={"help": "PEFT's lora_alpha: scale = alpha / rank"})
    scale: float | None = field(default=None, metadata={"help": "the scale itself (exclusive with alpha)"})
    use_rslora: bool = field(default=False, metadata={"help": "scale = alpha / sqrt(rank) (rank-stabilised)"})
    top_k: int = field(default=1, metadata={"help": "experts per routed row"})
    routing: str = field(default="sample", metadata={"help": "'sample' (one decision per sample) or 'token'"})
    route_token: str = field(default="first", metadata={"help": "per-sample route vector: 'first' token or 'mean'"})
    batch_first: bool = field(default=True, metadata={"help": "3-D inputs are (B, L, d) (else (L, B, d))"})
    activation: str = field(default="identity", metadata={"help": f"expert activation, one of {ACTIVATIONS}"})
    expert_bias: bool = field(default=False, metadata={"help": "per-expert biases on both projections"})
    expert_dropout: float = field(default=0.0, metadata={"help": "dropout on each expert's hidden activation"})
    noise: str = field(default="fixed", metadata={"help": "'fixed' (noise_std) or 'learned' noisy top-k gating"})
    noise_std: float = field(default=0.0, metadata={"help": "fixed router noise std in training"})
    noise_floor: float = field(default=1e-2, metadata={"help": "learned noise: std floor"})
    router_init_std: float = field(default=0.02, metadata={"help": "router weight init std (0: zeros)"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "other modules (name suffixes) trained in full and saved with the adapters"})
    task: str | None = field(
        default="default", metadata={"help": "router created and made active at injection (None: none)"})
    backend: str = field(default="auto", metadata={"help": "'auto', 'reference', 'triton' or 'cpp'"})
    freeze_base_model: bool = field(default=True, metadata={"help": "freeze every non-adapter parameter"})

    def __post_init__(self) -> None:
        t = self.target_modules
        if isinstance(t, tuple):
            self.target_modules = t = list(t)
        if not isinstance(t, str) and not (isinstance(t, list) and all(isinstance(n, str) for n in t)):
            raise TypeError(f"target_modules must be a regex string or a list of name suffixes, got {t!r}")
        if not t:
            raise ValueError("target_modules must name at least one module, got an empty value")
        if self.alpha is not None and self.scale is not None:
            raise ValueError(f"give alpha (scale = alpha / rank) or scale, not both: got alpha={self.alpha!r}, "
                             f"scale={self.scale!r}")
        if self.alpha is not None:
            _check_number("alpha", self.alpha)
        m = self.modules_to_save
        if m is not None:
            if isinstance(m, tuple):
                self.modules_to_save = m = list(m)
            if not isinstance(m, list) or not all(isinstance(n, str) and n for n in m):
                raise TypeError(f"modules_to_save must be a list of module name suffixes or None, got {m!r}")
        if self.task is not None and (not isinstance(self.task, str) or not self.task or "." in self.task):
            raise ValueError(f"task must be a non-empty name without '.' or None, got {self.task!r}")
        for name in ("use_rslora", "freeze_base_model"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        self.layer_kwargs()  # validates every layer option

    @property
    def effective_scale(self) -> float:
        """The LoRA scale the layers use: alpha / rank (alpha / sqrt(rank) with use_rslora), scale, or 1.0."""
        if self.alpha is not None:
            return float(self.alpha) / (math.sqrt(self.rank) if self.use_rslora else self.rank)
        return 1.0 if self.scale is None else float(self.scale)

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `MoELoRALinear` (validated)."""
        return check_layer_options(
            num_experts=self.num_experts, rank=self.rank, top_k=self.top_k, scale=self.effective_scale,
            activation=self.activation, expert_bias=self.expert_bias, routing=self.routing,
            route_token=self.route_token, batch_first=self.batch_first, noise_std=self.noise_std, noise=self.noise,
            noise_floor=self.noise_floor, expert_dropout=self.expert_dropout, router_init_std=self.router_init_std,
            backend=self.backend,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoELoRAConfig:
        """The config of `data` (a `to_dict` output); unknown keys are an error naming them and the known ones."""
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MoELoRAConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)
