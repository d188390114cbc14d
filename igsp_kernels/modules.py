"""Drop-in adapter modules: `MoELoRALinear` (a frozen linear plus a routed pool of LoRA experts) and injection.

Expert storage. Experts are stacked for the kernels (A: (E, d_in, r), B: (E, r, d_out)) in two groups, frozen
first: `A_frozen`/`B_frozen` (requires_grad=False) then `A_train`/`B_train`. One Parameter cannot be half
frozen: a gradient mask would still let AdamW's weight decay and momentum move the frozen rows, and
historical experts must stay bitwise unchanged. The forward concatenates the groups (E * d * r elements,
~0.4 M for E = 32, d = 768, r = 16: negligible next to the activations).

Routers. One `TaskRouter` per task, each with a (E, d_route) weight and an `active` mask over the pool.
Adding, freezing (which moves an expert into the frozen group) and removing experts re-index every router and
the usage statistics with the same permutation, so expert i always means the same expert everywhere.
Changing the pool replaces the expert Parameters: rebuild the optimizer after `add_experts`,
`freeze_experts` and `remove_experts`.

Routing. Per-sample (default, MoE-Adapters): all tokens of a sample share the experts chosen from one route
vector (its first token, or the token mean). Per-token: each row routes itself. The routing task is set by
`set_task` (one task for the batch) or `set_sample_tasks` (a task per sample, -1 = adapters off: the
task-agnostic deployment path). `route(x)` returns the decision (`RoutingDecision`) without applying it and
`forward(x, routing=decision)` applies a precomputed one, so a block can route once for several layers.

Gating noise (training only). `noise_std > 0`: fixed Gaussian noise on the logits. `noise="learned"`:
MoE-Adapters' noisy top-k gating, logits = x W_g + eps * (softplus(x W_noise) + noise_floor), eps ~ N(0, 1),
with a learned per-router W_noise (E, d) initialised to zero (MoE-Adapters' w_noise; noise_floor = its
noise_epsilon, 1e-2).

Expert dropout (`expert_dropout = p`, training only). Each assignment's hidden activation phi(x A_e + ba_e) is
multiplied by an inverted-dropout mask before the up-projection (MoE-Adapters' adapter: dropout(p = 0.1) after
its ReLU, before up_proj). The fused kernels take no mask, so a training forward with p > 0 runs the expert
term through the eager reference (`moe_lora_ref(hidden_mask=)`; said once at info level when such a layer is
built); eval mode and p = 0 run the fused kernels.

Usage statistics (`usage_weight`, `usage_prob`, `usage_count`, `usage_rows`) are buffers updated on the device
under no_grad: no host sync in forward. `usage_count` is how often each expert was selected (MoE-Adapters'
`choose_map`, which its freezing rule reads).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from igsp_kernels.backends import OpRequest, select_backend
from igsp_kernels.config import MoELoRAConfig, check_layer_options
from igsp_kernels.functional import (
    _FLOAT_DTYPES,
    _INDEX_DTYPES,
    Activation,
    BackendName,
    _check_index_range,
    _check_tensor,
    moe_lora,
    route_topk,
)
from igsp_kernels.reference.moe_lora import moe_lora_ref

__all__ = [
    "MoELoRALinear",
    "RoutingDecision",
    "TaskRouter",
    "add_router",
    "count_parameters",
    "inject_moe_lora",
    "moe_lora_layers",
    "set_sample_tasks",
    "set_task",
]

logger = logging.getLogger(__name__)

Routing = Literal["sample", "token"]
NoiseKind = Literal["fixed", "learned"]
RouteToken = Literal["first", "mean"]
_GROUPS = ("frozen", "train")
ExpertBias = tuple[torch.Tensor | None, torch.Tensor | None]


class RoutingDecision(NamedTuple):
    """A layer's routing for one input (`MoELoRALinear.route`), reusable by `forward(x, routing=...)`.

    topk_idx: (N, k) int32 experts; topk_w: (N, k) fp32 gates (rows sum to 1, or 0 for a sample whose adapters are
    off); probs: (N, E) fp32 router probabilities. N = B samples under per-sample routing of a 3-D input, else
    the number of token rows.
    """

    topk_idx: torch.Tensor
    topk_w: torch.Tensor
    probs: torch.Tensor


_LOGGED: set[str] = set()
# The routing settings a layer's state_dict carries (extra state): they define what its weights compute.
_SETTINGS = ("in_features", "out_features", "rank", "top_k", "scale", "activation", "expert_bias", "routing",
             "route_token", "batch_first", "noise_std", "noise", "noise_floor", "expert_dropout")
_STATE_FORMAT = "igsp_kernels.MoELoRALinear"
_STATE_VERSION = 1
_USAGE_BUFFERS = ("usage_weight", "usage_prob", "usage_count", "usage_rows")


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype active for x's device type, or None."""
    dev = x.device.type
    if dev in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    """A context that turns autocast off for x's device type (ops inside run in the dtypes they are given)."""
    dev = x.device.type if x.device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"
    return torch.autocast(dev, enabled=False)


def _log_once(key: str, msg: str) -> None:
    """Log `msg` at info level once per process (called from constructors, never from a traced forward)."""
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(msg)


def _task_key(task: str | int) -> str:
    key = str(task)
    if not key or "." in key:
        raise ValueError(f"task must be a non-empty name without '.', got {task!r}")
    return key


class TaskRouter(nn.Module):
    """One task's router: logits = x_route @ weight^T over the expert pool, `active` masks usable experts.

    weight: (E, d_route); active: (E,) bool buffer. With `learned_noise`, also noise_weight (E, d_route), zero at
    init as MoE-Adapters' w_noise: the noise std of noisy top-k gating is softplus(x_route @ noise_weight^T) + floor.
    """

    def __init__(self, in_features: int, num_experts: int, *, init_std: float = 0.02,
                 active: torch.Tensor | None = None, learned_noise: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=init_std) if init_std > 0 else nn.init.zeros_(self.weight)
        self.noise_weight = (nn.Parameter(torch.zeros(num_experts, in_features, device=device, dtype=dtype))
                             if learned_noise else None)
        mask = torch.ones(num_experts, dtype=torch.bool, device=device) if active is None else active.clone()
        self.register_buffer("active", mask)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, x_route: torch.Tensor) -> torch.Tensor:
        """x_route (N, d_route) -> logits (N, E) in fp32, also under autocast (routing decisions are
        precision-sensitive: a bf16 logit has 8 bits of mantissa, and near-ties flip the chosen experts)."""
        with _no_autocast(x_route):
            return F.linear(x_route.float(), self.weight.float())

    def noise_std(self, x_route: torch.Tensor, floor: float) -> torch.Tensor:
        """(N, E) fp32 learned noise std softplus(x_route @ noise_weight^T) + floor (needs learned_noise)."""
        if self.noise_weight is None:
            raise RuntimeError("this router has no learned noise (built with learned_noise=False)")
        with _no_autocast(x_route):
            return F.softplus(F.linear(x_route.float(), self.noise_weight.float())) + floor

    def _reindex(self, order: torch.Tensor, new_active: torch.Tensor | None = None) -> None:
        """Keep/permute columns: new expert i = old expert order[i] (order[i] = -1: a new, inactive expert)."""
        fresh = order < 0

        def pick(p: torch.Tensor) -> torch.Tensor:
            if p.shape[0]:
                out = p.detach()[order.clamp(min=0)].clone()
            else:  # a router made before any expert existed: every column is new
                out = p.new_zeros(order.shape[0], *p.shape[1:])
            out[fresh] = 0  # a new expert starts with zero gate (and zero noise) weights
            return out

        with torch.no_grad():
            w = pick(self.weight)
            nw = None if self.noise_weight is None else pick(self.noise_weight)
            a = pick(self.active)
            if new_active is not None:
                a |= new_active
        self.weight = nn.Parameter(w, requires_grad=self.weight.requires_grad)
        if nw is not None:
            self.noise_weight = nn.Parameter(nw, requires_grad=self.noise_weight.requires_grad)
        self.active = a

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, num_experts={self.num_experts}"


class MoELoRALinear(nn.Module):
    """y = base(x) + scale * sum_j w_j * (phi(x A_{e_j} + ba_{e_j}) B_{e_j} + bb_{e_j}), routed per sample or token.

    A drop-in for `nn.Linear(in_features, out_features)` (`from_linear` wraps an existing one, frozen). Without
    a base it is the parallel-adapter form (METHOD.md section 2): the output is the adapter term alone.

    Shapes: input (..., in_features) -> output (..., out_features). Per-sample routing reads a 3-D input as
    (B, L, d) (`batch_first=True`) or (L, B, d); a 2-D input routes each row as its own sample.
    """

    adapter_param_names = ("A_train", "B_train", "ba_train", "bb_train", "routers")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        base: nn.Linear | None = None,
        num_experts: int = 0,
        rank: int = 8,
        top_k: int = 1,
        scale: float = 1.0,
        activation: Activation = "identity",
        expert_bias: bool = False,
        routing: Routing = "sample",
        route_token: RouteToken = "first",
        batch_first: bool = True,
        noise_std: float = 0.0,
        noise: NoiseKind = "fixed",
        noise_floor: float = 1e-2,
        expert_dropout: float = 0.0,
        router_init_std: float = 0.02,
        backend: BackendName = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        opts = check_layer_options(
            num_experts=num_experts, rank=rank, top_k=top_k, scale=scale, activation=activation,
            expert_bias=expert_bias, routing=routing, route_token=route_token, batch_first=batch_first,
            noise_std=noise_std, noise=noise, noise_floor=noise_floor, expert_dropout=expert_dropout,
            router_init_std=router_init_std, backend=backend)
        scale, noise_std, noise_floor = opts["scale"], opts["noise_std"], opts["noise_floor"]
        expert_dropout, router_init_std = opts["expert_dropout"], opts["router_init_std"]
        if base is not None:
            if not isinstance(base, nn.Linear):
                raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
            if (base.in_features, base.out_features) != (in_features, out_features):
                raise ValueError(f"base must be nn.Linear({in_features}, {out_features}), got "
                                 f"nn.Linear({base.in_features}, {base.out_features})")
            base.requires_grad_(False)
            device = base.weight.device if device is None else device
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.top_k = top_k
        self.scale = float(scale)
        self.activation = activation
        self.expert_bias = expert_bias
        self.routing = routing
        self.route_token = route_token
        self.batch_first = batch_first
        self.noise_std = float(noise_std)
        self.noise = noise
        self.noise_floor = float(noise_floor)
        self.expert_dropout = float(expert_dropout)
        if expert_dropout > 0:
            _log_once("expert_dropout", "expert_dropout > 0: training forwards run the LoRA branch through the eager "
                      "reference with an explicit dropout mask (the fused kernels take none); eval mode and "
                      "expert_dropout = 0 use the fused kernels")
        self.router_init_std = float(router_init_std)
        self.backend = backend
        self.base_layer = base
        self.routers = nn.ModuleDict()
        self.active_task: str | None = None
        self._sample_tasks: torch.Tensor | None = None
        self._task_set = False  # set_task was called (None included) or a state_dict said so
        self._disabled = False  # inside `disable_adapters`: the base layer alone
        self._merged: str | None = None  # the task whose experts are folded into the base weight (`merge`)
        dev = torch.device(device) if device is not None else None
        dtype = base.weight.dtype if base is not None else None
        for group in _GROUPS:
            self._set_group(group, *self._empty_experts(0, dev, dtype))
        self.register_buffer("usage_weight", torch.zeros(0, device=dev), persistent=False)
        self.register_buffer("usage_prob", torch.zeros(0, device=dev), persistent=False)
        self.register_buffer("usage_count", torch.zeros(0, device=dev), persistent=False)
        self.register_buffer("usage_rows", torch.zeros((), device=dev), persistent=False)
        if num_experts:
            self.add_experts(num_experts)

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> MoELoRALinear:
        """Wrap `linear` (frozen in place) with an expert pool; kwargs as the constructor."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, base=linear, **kwargs)

    def _empty_experts(self, n: int, device: torch.device | None,
                       dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        kw = dict(device=device, dtype=dtype)
        A = torch.zeros(n, self.in_features, self.rank, **kw)
        B = torch.zeros(n, self.rank, self.out_features, **kw)
        ba = torch.zeros(n, self.rank, **kw) if self.expert_bias else None
        bb = torch.zeros(n, self.out_features, **kw) if self.expert_bias else None
        return A, B, ba, bb

    def _set_group(self, group: str, A: torch.Tensor, B: torch.Tensor, ba: torch.Tensor | None,
                   bb: torch.Tensor | None) -> None:
        trainable = group == "train"
        setattr(self, f"A_{group}", nn.Parameter(A.contiguous(), requires_grad=trainable))
        setattr(self, f"B_{group}", nn.Parameter(B.contiguous(), requires_grad=trainable))
        setattr(self, f"ba_{group}", None if ba is None else nn.Parameter(ba.contiguous(), requires_grad=trainable))
        setattr(self, f"bb_{group}", None if bb is None else nn.Parameter(bb.contiguous(), requires_grad=trainable))

    def _group(self, group: str) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"{n}_{group}") for n in ("A", "B", "ba", "bb"))

    @property
    def device(self) -> torch.device:
        return self.A_train.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the expert parameters (follows `.to(dtype)`; new experts and routers are made in it)."""
        return self.A_train.dtype

    # nn.Linear's attributes, so code that reads `layer.weight` (open_clip's cast-dtype probe, say) still works.
    @property
    def weight(self) -> torch.Tensor:
        if self.base_layer is None:
            raise AttributeError("this MoELoRALinear has no base layer (parallel adapter), hence no .weight")
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.base_layer is None else self.base_layer.bias

    def resolved_backend(self, dtype: torch.dtype | None = None) -> str:
        """The backend the expert op dispatches to on this layer's device for inputs of `dtype` (default: the
        layer's). Training forwards with expert_dropout > 0 run the reference instead (see the module docs)."""
        request = OpRequest("moe_lora", self.device, dtype or self.dtype, self.activation)
        return select_backend(request, self.backend).name

    @property
    def num_frozen(self) -> int:
        return self.A_frozen.shape[0]

    @property
    def num_trainable(self) -> int:
        return self.A_train.shape[0]

    @property
    def num_experts(self) -> int:
        return self.num_frozen + self.num_trainable

    @property
    def task_names(self) -> list[str]:
        return list(self.routers.keys())

    def trainable_expert_ids(self) -> list[int]:
        return list(range(self.num_frozen, self.num_experts))

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, ExpertBias | None]:
        """The stacked pool, frozen experts first: A (E, d_in, r), B (E, r, d_out), expert biases or None."""
        A = torch.cat([self.A_frozen, self.A_train]) if self.num_frozen else self.A_train
        B = torch.cat([self.B_frozen, self.B_train]) if self.num_frozen else self.B_train
        if not self.expert_bias:
            return A, B, None
        ba = torch.cat([self.ba_frozen, self.ba_train]) if self.num_frozen else self.ba_train
        bb = torch.cat([self.bb_frozen, self.bb_train]) if self.num_frozen else self.bb_train
        return A, B, (ba, bb)

    def _reindex(self, order: Sequence[int], n_frozen: int, activate: Iterable[str] = ()) -> None:
        """Rebuild the pool so that new expert i = old expert order[i] (-1: a fresh expert, LoRA-initialised).

        The first n_frozen new experts form the frozen group. Routers and usage follow the same order; fresh
        experts are active in the routers named by `activate` only.
        """
        dev = self.device
        order_t = torch.tensor(list(order), dtype=torch.long, device=dev)
        fresh = order_t < 0
        with torch.no_grad():
            old = [torch.cat([f, t]) if f is not None else None
                   for f, t in zip(self._group("frozen"), self._group("train"))]
            new = []
            for i, tensor in enumerate(old):
                if tensor is None:
                    new.append(None)
                    continue
                if tensor.shape[0]:
                    picked = tensor[order_t.clamp(min=0)]
                else:
                    picked = tensor.new_zeros(len(order), *tensor.shape[1:])
                picked = picked.clone()
                if fresh.any():
                    fill = picked[fresh]
                    if i == 0:  # A: Kaiming-uniform as nn.Linear / PEFT LoRA A (a = sqrt(5))
                        for j in range(fill.shape[0]):
                            nn.init.kaiming_uniform_(fill[j].T, a=math.sqrt(5))
                    else:  # B and biases: zero, so a fresh expert leaves the output unchanged
                        fill.zero_()
                    picked[fresh] = fill
                new.append(picked)
        self._set_group("frozen", *[None if t is None else t[:n_frozen] for t in new])
        self._set_group("train", *[None if t is None else t[n_frozen:] for t in new])
        activate = set(activate)
        for name, router in self.routers.items():
            mask = fresh if name in activate else None
            router._reindex(order_t, mask)
        for buf in ("usage_weight", "usage_prob", "usage_count"):
            old_buf = getattr(self, buf)
            val = old_buf[order_t.clamp(min=0)] if old_buf.numel() else torch.zeros(len(order), device=dev)
            setattr(self, buf, torch.where(fresh, torch.zeros_like(val), val))

    def add_experts(self, n: int, *, active_in: Iterable[str | int] | None = None) -> list[int]:
        """Append `n` trainable experts (A Kaiming-uniform, B zero: the output is unchanged) and return their ids.

        They become active in the routers of `active_in` (default: the current task's router, if one is set).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        self._check_unmerged("add_experts")
        if active_in is None:
            active_in = [self.active_task] if self.active_task is not None else []
        keys = [_task_key(t) for t in active_in]
        for key in keys:
            if key not in self.routers:
                raise ValueError(f"active_in names task {key!r}, which has no router; routers: {self.task_names}")
        E = self.num_experts
        self._reindex(list(range(E)) + [-1] * n, self.num_frozen, keys)
        return list(range(E, E + n))

    def _check_ids(self, ids: Iterable[int], what: str) -> list[int]:
        ids = sorted(set(int(i) for i in ids))
        bad = [i for i in ids if not 0 <= i < self.num_experts]
        if bad:
            raise IndexError(f"{what} must lie in [0, {self.num_experts}) (the expert pool), got {bad}")
        return ids

    def freeze_experts(self, ids: Iterable[int]) -> list[int]:
        """Move experts `ids` into the frozen group (appended after the already frozen ones).

        Returns the new ids of the experts named in `ids`, in ascending order of the old ids. Frozen experts
        stay frozen (naming one is a no-op for it).
        """
        ids = self._check_ids(ids, "ids")
        self._check_unmerged("freeze_experts")
        moving = [i for i in ids if i >= self.num_frozen]
        frozen = list(range(self.num_frozen)) + moving
        rest = [i for i in range(self.num_frozen, self.num_experts) if i not in set(moving)]
        order = frozen + rest
        self._reindex(order, len(frozen))
        return [order.index(i) for i in ids]

    def remove_experts(self, ids: Iterable[int]) -> None:
        """Delete experts `ids` (their parameters are freed; routers lose their columns)."""
        ids = set(self._check_ids(ids, "ids"))
        self._check_unmerged("remove_experts")
        order = [i for i in range(self.num_experts) if i not in ids]
        self._reindex(order, sum(1 for i in order if i < self.num_frozen))

    def add_router(self, task: str | int, *, active: torch.Tensor | Sequence[int] | None = None) -> TaskRouter:
        """Create the router of `task` over the current pool (`active`: bool mask or expert ids; default all)."""
        key = _task_key(task)
        if key in self.routers:
            raise ValueError(f"task {key!r} already has a router; routers: {self.task_names}")
        E = self.num_experts
        if active is not None and not isinstance(active, torch.Tensor):
            ids = self._check_ids(active, "active")
            active = torch.zeros(E, dtype=torch.bool)
            active[ids] = True
        if active is not None:
            if active.dtype != torch.bool or tuple(active.shape) != (E,):
                raise ValueError(f"active must be a bool mask of shape ({E},), "
                                 f"got {active.dtype} {tuple(active.shape)}")
            active = active.to(self.device)
        router = TaskRouter(self.in_features, E, init_std=self.router_init_std, active=active,
                            learned_noise=self.noise == "learned", device=self.device, dtype=self.dtype)
        self.routers[key] = router
        return router

    # --------------------------------------------------------------------------------------------- state
    def set_task(self, task: str | int | None) -> None:
        """Route the whole batch with `task`'s router; None turns the adapters off (base output only).

        Until a task (or None) is set, a forward with experts present is an error, not a silent base output.
        """
        self._check_unmerged("set_task")
        key = None if task is None else _task_key(task)
        if key is not None and key not in self.routers:
            raise ValueError(f"task {key!r} has no router; routers: {self.task_names}")
        self._sample_tasks = None
        self.active_task = key
        self._task_set = True

    def set_sample_tasks(self, task_ids: torch.Tensor | None) -> None:
        """A task per sample: task_ids (B,) long indices into `task_names`, -1 = adapters off for that sample."""
        self._check_unmerged("set_sample_tasks")
        if task_ids is None:
            self._sample_tasks = None
            return
        int_dtypes = (torch.int32, torch.int64)
        if not isinstance(task_ids, torch.Tensor) or task_ids.dim() != 1 or task_ids.dtype not in int_dtypes:
            raise TypeError(f"task_ids must be a 1-D integer tensor, got {task_ids!r}")
        if task_ids.device.type == "cpu" and task_ids.numel():
            lo, hi = int(task_ids.min()), int(task_ids.max())
            if lo < -1 or hi >= len(self.routers):
                raise IndexError(f"task_ids must lie in [-1, {len(self.routers)}) (routers {self.task_names}), "
                                 f"got {lo if lo < -1 else hi}")
        self._sample_tasks = task_ids.to(self.device, torch.long)

    def reset_usage(self) -> None:
        self.usage_weight.zero_()
        self.usage_prob.zero_()
        self.usage_count.zero_()
        self.usage_rows.zero_()

    def usage(self) -> torch.Tensor:
        """(E,) mean routing weight per expert since the last reset (sums to 1 over routed rows; 0 if none)."""
        return self.usage_weight / self.usage_rows.clamp(min=1)

    # ------------------------------------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must have shape (..., {self.in_features}), got {tuple(x.shape)}")

    def _samples(self, x: torch.Tensor) -> tuple[int, int]:
        """(routed rows N, tokens per routed row L) of input `x` under this layer's routing mode."""
        if self.routing == "token" or x.dim() <= 2:
            return x.numel() // self.in_features, 1
        if x.dim() != 3:
            raise ValueError("per-sample routing needs a 2-D (N, d) or 3-D (B, L, d) input, "
                             f"got shape {tuple(x.shape)}")
        return (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])

    def _route_input(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The rows routed and how many tokens share each route: (N, d), L."""
        if self.routing == "token" or x.dim() <= 2:
            return x.reshape(-1, self.in_features), 1
        self._samples(x)  # the shape check
        seq = x if self.batch_first else x.transpose(0, 1)  # (B, L, d)
        xr = seq[:, 0] if self.route_token == "first" else seq.mean(dim=1)
        return xr, seq.shape[1]

    def _logits(self, xr: torch.Tensor, tasks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, E) fp32 logits (with the learned gating noise drawn in training) and the (E,) or (N, E) mask."""
        learned = self.training and self.noise == "learned"
        if tasks is None:
            router = self.routers[self.active_task]
            logits = router(xr)
            if learned:
                logits = logits + torch.randn_like(logits) * router.noise_std(xr, self.noise_floor)
            return logits, router.active
        routers = list(self.routers.values())
        sel = tasks.clamp(min=0)
        weights = torch.stack([r.weight for r in routers])  # (n_tasks, E, d)
        masks = torch.stack([r.active for r in routers])  # (n_tasks, E)
        logits = torch.einsum("nd,ned->ne", xr.float(), weights.float()[sel])
        if learned:
            noise_w = torch.stack([r.noise_weight for r in routers]).float()[sel]
            std = F.softplus(torch.einsum("nd,ned->ne", xr.float(), noise_w)) + self.noise_floor
            logits = logits + torch.randn_like(logits) * std
        return logits, masks[sel] | (tasks < 0).unsqueeze(1)  # an off row keeps every expert (weight 0 later)

    def _check_on(self, what: str) -> None:
        """Raise the error that says what to call when this layer has experts but no routing state."""
        if self.num_experts and self.active_task is None and self._sample_tasks is None and not self._task_set:
            if not self.routers:
                raise RuntimeError(
                    f"{what}: this MoELoRALinear has {self.num_experts} experts but no router yet: call "
                    "add_router(task) and set_task(task) (igsp_kernels.add_router(model, task); "
                    "igsp_kernels.set_task(model, task) for a whole model), or set_task(None) for the base layer "
                    "alone")
            raise RuntimeError(
                f"{what}: no task is set on this MoELoRALinear (routers: {self.task_names}): call set_task(task) or "
                "set_sample_tasks(ids), or set_task(None) for the base layer alone")

    def route(self, x: torch.Tensor) -> RoutingDecision:
        """This layer's routing decision for input `x` (what `forward(x)` would use), without applying it.

        Per-sample routing of a 3-D input gives one row per sample: topk_idx and topk_w (B, k), probs (B, E);
        per-token routing (or a 2-D input) one row per token: (N, k) and (N, E), N = x.numel() // in_features.
        A sample whose task is -1 under `set_sample_tasks` gets zero weights (adapters off for it). In training
        the configured router noise is drawn, so two calls differ; usage statistics are not recorded (the layer
        that applies the decision records them). Share one decision between layers with `forward(x, routing=)`.
        """
        self._check_input(x)
        self._check_on("route")
        if self.num_experts == 0 or (self.active_task is None and self._sample_tasks is None):
            raise RuntimeError("route: this MoELoRALinear has nothing to route ("
                               + ("it has no experts: call add_experts" if self.num_experts == 0 else
                                  "its adapters were turned off by set_task(None): set a task") + ")")
        xr, _ = self._route_input(x)
        tasks = self._sample_tasks
        if tasks is not None:
            if xr.shape[0] != tasks.shape[0] and xr.shape[0] % max(tasks.shape[0], 1) == 0 and x.dim() == 3:
                # per-token rows of a (B, L, d) input: each sample's task for each of its tokens
                L = xr.shape[0] // tasks.shape[0]
                tasks = tasks.repeat_interleave(L) if self.batch_first else tasks.repeat(L)
            if tasks.shape[0] != xr.shape[0]:
                raise ValueError(f"set_sample_tasks gave {tasks.shape[0]} tasks but the input has {xr.shape[0]} "
                                 f"routed rows (shape {tuple(x.shape)})")
        logits, active = self._logits(xr, tasks)
        noise = self.noise_std if self.training else 0.0
        idx, w, probs = route_topk(logits, self.top_k, active=active, noise_std=noise, backend=self._route_backend())
        if tasks is not None:
            w = w * (tasks >= 0).unsqueeze(1).to(w.dtype)
        return RoutingDecision(idx, w, probs)

    def _check_decision(self, decision: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                        torch.Tensor | None, int]:
        """Validate a precomputed routing; return (idx, w, probs or None, L) with L tokens sharing each row."""
        if not isinstance(decision, (tuple, list)) or len(decision) not in (2, 3):
            raise TypeError("routing must be a RoutingDecision or a (topk_idx, topk_w[, probs]) tuple, "
                            f"got {type(decision).__name__}")
        idx, w = decision[0], decision[1]
        probs = decision[2] if len(decision) == 3 else None
        _check_tensor("routing.topk_idx", idx, ndim=2, dtypes=_INDEX_DTYPES, device=x.device)
        _check_tensor("routing.topk_w", w, ndim=2, dtypes=_FLOAT_DTYPES, device=x.device)
        if tuple(w.shape) != tuple(idx.shape):
            raise ValueError(f"routing.topk_w must have the shape of routing.topk_idx {tuple(idx.shape)}, "
                             f"got {tuple(w.shape)}")
        n_rows = x.numel() // self.in_features
        n_routed, L = self._samples(x)
        if idx.shape[0] == n_routed:
            pass
        elif idx.shape[0] == n_rows:  # a per-token decision for a per-sample layer: apply row by row
            L = 1
        else:
            raise ValueError(f"routing has {idx.shape[0]} rows; input {tuple(x.shape)} needs {n_routed} "
                             f"(one per routed {'sample' if L > 1 else 'row'}) or {n_rows} (one per token)")
        if probs is not None and (not isinstance(probs, torch.Tensor)
                                  or tuple(probs.shape) != (idx.shape[0], self.num_experts)):
            raise ValueError(f"routing.probs must have shape ({idx.shape[0]}, {self.num_experts}) "
                             f"(rows, experts of this layer), got "
                             f"{tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__}")
        _check_index_range("routing.topk_idx", idx, self.num_experts, "the experts of this layer")
        return idx, w, probs, L

    def forward(self, x: torch.Tensor, routing: RoutingDecision | tuple[torch.Tensor, ...] | None = None
                ) -> torch.Tensor:
        """y = base(x) + the routed expert term. x (..., in_features) -> (..., out_features).

        `routing`: a precomputed decision (`route()` of this or another layer with the same expert pool, or a
        block-level router's (topk_idx, topk_w[, probs])) used instead of this layer's own routers; rows are
        per routed sample (B, k) or per token (N, k). It overrides `set_task`/`set_sample_tasks`.

        The base layer alone runs when the adapters are off (`set_task(None)`), disabled (`disable_adapters`),
        merged into the base weight (`merge`), or when there are no experts. Under autocast the input and the base
        weight run in the autocast dtype and the experts in their own (fp32 accumulation), like nn.Linear.
        """
        self._check_input(x)
        base = self.base_layer
        off = self._disabled or self._merged is not None or self.num_experts == 0
        if routing is None and not off:
            self._check_on("forward")
            off = self.active_task is None and self._sample_tasks is None
        if off:
            if routing is not None and self.num_experts == 0:
                raise ValueError("routing was given but this MoELoRALinear has no experts")
            return base(x) if base is not None else x.new_zeros(*x.shape[:-1], self.out_features)
        if routing is None:
            idx, w, probs = self.route(x)
            _, L = self._route_input(x)
        else:
            idx, w, probs, L = self._check_decision(routing, x)
        if self.training:
            self._record_usage(idx, w, probs)
        tokens_per_sample = None
        if L > 1:
            if self.batch_first:  # sample b owns the contiguous rows b * L .. b * L + L - 1: per-sample kernels
                tokens_per_sample = L
            else:  # rows of an (L, B, d) input are ordered l * B + b: the token path
                idx, w = idx.repeat(L, 1), w.repeat(L, 1)
        A, B, eb = self.expert_weights()
        x2 = x.reshape(-1, self.in_features)
        base_w = None if base is None else base.weight
        base_b = None if base is None else base.bias
        if self.training and self.expert_dropout > 0:
            y = self._dropout_forward(x2, A, B, idx, w, base_w, base_b, eb, tokens_per_sample or 1)
        else:
            # Under autocast moe_lora is an autocast op (igsp_kernels/_dtypes.py): x and the frozen base in the
            # autocast dtype (a cached copy of the weight), the experts in theirs with fp32 accumulation.
            y = moe_lora(x2, A, B, idx, w, base_weight=base_w, base_bias=base_b, scale=self.scale,
                         activation=self.activation, expert_bias=eb, tokens_per_sample=tokens_per_sample,
                         backend=self.backend)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _dropout_forward(self, x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor,
                         w: torch.Tensor, base_w: torch.Tensor | None, base_b: torch.Tensor | None,
                         eb: ExpertBias | None, tokens_per_sample: int) -> torch.Tensor:
        """Training with expert dropout: each assignment's hidden activation phi(x A_e + ba_e) (T, k, r) times an
        inverted-dropout mask (MoE-Adapters: dropout(p) after the adapter's ReLU, before up_proj), computed by the
        eager reference: the fused kernels take no mask (logged once at construction). Under autocast, as
        moe_lora: x and the base in the autocast dtype, the experts in theirs (the reference accumulates in fp32)."""
        T, k = x2.shape[0], idx.shape[1]
        keep = 1.0 - self.expert_dropout
        mask = torch.empty(T, k, self.rank, device=x2.device).bernoulli_(keep).div_(keep)
        ac = _autocast_dtype(x2)
        if ac is not None and x2.dtype != torch.float64:
            x2 = x2.to(ac)
            base_w = None if base_w is None else base_w.to(ac)
            base_b = None if base_b is None else base_b.to(ac)
        with _no_autocast(x2):
            return moe_lora_ref(x2, A, B, idx, w, base_weight=base_w, base_bias=base_b, scale=self.scale,
                                activation=self.activation, bias_a=None if eb is None else eb[0],
                                bias_b=None if eb is None else eb[1], hidden_mask=mask,
                                tokens_per_sample=tokens_per_sample)

    def _route_backend(self) -> BackendName:
        # The C++ extension has no routing op: let routing dispatch on its own when cpp is forced.
        return "auto" if self.backend == "cpp" else self.backend

    @torch.no_grad()
    def _record_usage(self, idx: torch.Tensor, w: torch.Tensor, probs: torch.Tensor | None) -> None:
        self.usage_weight.index_add_(0, idx.reshape(-1).long(), w.reshape(-1).float())
        self.usage_count.index_add_(0, idx.reshape(-1).long(), torch.ones_like(w, dtype=torch.float32).reshape(-1))
        if probs is not None:
            self.usage_prob.add_(probs.sum(0))
        self.usage_rows.add_(idx.shape[0])

    # ------------------------------------------------------------------------------------------- merging
    def _check_unmerged(self, what: str) -> None:
        if self._merged is not None:
            raise RuntimeError(f"{what}: the experts of task {self._merged!r} are merged into the base weight; "
                               "call unmerge() (igsp_kernels.unmerge_(model)) first")

    def _merge_weights(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, w): the experts task `key` always routes to and their fixed weights, or a ValueError saying why
        its routing depends on the input."""
        router = self.routers[key]
        ids = torch.nonzero(router.active).flatten()
        n = ids.numel()
        if n == 0:
            raise ValueError(f"merge: the router of task {key!r} has no active expert")
        if n == 1:  # k = 1 over one expert: weight 1 whatever the input
            return ids, torch.ones(1, dtype=torch.float64, device=ids.device)
        rows = router.weight.detach()[ids]
        if self.top_k == n and bool((rows == rows[:1]).all()):  # identical logits: softmax uniform, all chosen
            return ids, torch.full((n,), 1.0 / n, dtype=torch.float64, device=ids.device)
        raise ValueError(f"merge: the routing of task {key!r} depends on the input ({n} active experts, top_k="
                         f"{self.top_k}, distinct router rows), so no single weight reproduces it; merging needs one "
                         "active expert, or top_k equal to the active experts with identical router rows")

    def _delta(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fixed routing's expert term as a weight (d_out, d_in) and bias (d_out,) delta, in fp64."""
        ids, w = self._merge_weights(key)
        A, B, eb = self.expert_weights()
        A64, B64 = A.detach()[ids].double(), B.detach()[ids].double()
        dW = self.scale * torch.einsum("e,edr,ero->od", w, A64, B64)
        db = None
        if eb is not None:
            ba, bb = (t.detach()[ids].double() for t in eb)
            db = self.scale * (torch.einsum("e,er,ero->o", w, ba, B64) + w @ bb)
        return dW, db

    def _merge_plan(self, task: str | int | None) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        """Every check of `merge` without changing anything: (task key, weight delta, bias delta or None)."""
        self._check_unmerged("merge")
        if self.base_layer is None:
            raise ValueError("merge: this MoELoRALinear has no base layer (a parallel adapter): nothing to merge into")
        if self.activation != "identity":
            raise ValueError(f"merge: activation {self.activation!r} is not linear, so the experts cannot be folded "
                             "into a weight (only 'identity' can)")
        key = self.active_task if task is None else _task_key(task)
        if key is None or key not in self.routers:
            raise ValueError(f"merge: name a task with a router (routers: {self.task_names}), got {task!r}"
                             + (" and no task is active" if task is None else ""))
        dW, db = self._delta(key)
        if db is not None and self.base_layer.bias is None:
            raise ValueError("merge: the experts have output biases but the base layer has no bias to fold them into")
        return key, dW, db

    @torch.no_grad()
    def merge(self, task: str | int | None = None) -> None:
        """Fold task `task`'s experts (default: the active task) into the base weight, W0 += s sum_e w_e (A_e B_e)^T.

        Exact only where routing is fixed: one active expert in the task's router, or top_k equal to the active
        experts with identical router rows (uniform weights); otherwise a ValueError says why. Needs a base layer
        and activation "identity" (a ReLU expert is not linear). Until `unmerge`, forward runs the merged base layer
        alone and the pool and task cannot change. Training and noise are irrelevant: merged means inference.
        """
        key, dW, db = self._merge_plan(task)
        base = self.base_layer
        base.weight.add_(dW.to(base.weight.dtype))
        if db is not None:
            base.bias.add_(db.to(base.bias.dtype))
        self._merged = key

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged experts from the base weight again (round-off aside, as PEFT's unmerge)."""
        if self._merged is None:
            return
        key, self._merged = self._merged, None
        dW, db = self._delta(key)
        self.base_layer.weight.sub_(dW.to(self.base_layer.weight.dtype))
        if db is not None:
            self.base_layer.bias.sub_(db.to(self.base_layer.bias.dtype))

    @property
    def merged(self) -> str | None:
        """The task merged into the base weight, or None."""
        return self._merged

    # ------------------------------------------------------------------------------------- checkpointing
    def settings(self) -> dict[str, Any]:
        """The routing settings that define what this layer's weights compute (carried by its state_dict)."""
        return {name: getattr(self, name) for name in _SETTINGS}

    def get_extra_state(self) -> torch.Tensor:
        """The routing settings and state as UTF-8 JSON in a uint8 tensor on this layer's device.

        A tensor, not a dict: every consumer of a state_dict that expects tensors (safetensors, DDP broadcasts,
        checkpoint utilities that `.detach().cpu()` each value) keeps working, as in Transformer Engine's extra
        state. Holds: the settings, the routers' order (per-sample task ids index it), the expert groups, and the
        routing mode (unset / off / a task / per-sample tasks) and merged task, so a reload reproduces the outputs.
        """
        sample = None if self._sample_tasks is None else self._sample_tasks.tolist()
        state = {
            "format": _STATE_FORMAT, "version": _STATE_VERSION, "settings": self.settings(),
            "routers": self.task_names, "groups": {"frozen": self.num_frozen, "train": self.num_trainable},
            "task_set": self._task_set, "active_task": self.active_task, "sample_tasks": sample,
            "merged": self._merged,
        }
        data = json.dumps(state, sort_keys=True).encode("utf-8")
        return torch.tensor(list(data), dtype=torch.uint8, device=self.device)

    @staticmethod
    def _decode_state(value: Any) -> dict[str, Any]:
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
            raise ValueError(f"expected a uint8 tensor of JSON, got {type(value).__name__}")
        state = json.loads(bytes(value.cpu().tolist()).decode("utf-8"))
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a {_STATE_FORMAT} state (format {found!r})")
        if state.get("version", 0) > _STATE_VERSION:
            raise ValueError(f"state version {state['version']} is newer than this igsp_kernels ({_STATE_VERSION})")
        return state

    def _settings_mismatch(self, saved: dict[str, Any]) -> list[str]:
        ours = self.settings()
        return [f"{k}={saved[k]!r} (this layer: {ours[k]!r})" for k in _SETTINGS if k in saved and saved[k] != ours[k]]

    def set_extra_state(self, state: Any) -> None:
        state = self._decode_state(state)
        routers = state["routers"]
        if list(self.routers.keys()) != routers and set(self.routers.keys()) == set(routers):
            self.routers = nn.ModuleDict([(k, self.routers[k]) for k in routers])  # the saved order
        self._task_set = bool(state["task_set"])
        self.active_task = state["active_task"]
        sample = state["sample_tasks"]
        self._sample_tasks = None if sample is None else torch.tensor(sample, dtype=torch.long, device=self.device)
        self._merged = state["merged"]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """Check the saved routing settings, then resize the pool and create missing routers so a checkpoint loads
        into a freshly built layer; the saved routing state is restored (no set_task needed after a reload)."""
        extra_key = f"{prefix}_extra_state"
        if extra_key in state_dict:
            try:
                saved = self._decode_state(state_dict[extra_key])
            except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                error_msgs.append(f"{extra_key}: unreadable MoELoRALinear state ({exc})")
                return
            where = prefix.rstrip(".") or "MoELoRALinear"
            bad = self._settings_mismatch(saved["settings"])
            if bad:
                error_msgs.append(f"{where}: saved with other routing settings: {', '.join(bad)}; build the layer "
                                  "with the saved settings (they define what the weights compute)")
                return
            if self._merged is not None:
                error_msgs.append(f"{where}: cannot load into a merged layer; unmerge() first")
                return
        sizes = {}
        for group in _GROUPS:
            key = f"{prefix}A_{group}"
            if key in state_dict:
                sizes[group] = state_dict[key].shape[0]
        if sizes:
            dev, dtype = self.device, self.dtype
            for group in _GROUPS:
                n = sizes.get(group, getattr(self, f"A_{group}").shape[0])
                if n != getattr(self, f"A_{group}").shape[0]:
                    self._set_group(group, *self._empty_experts(n, dev, dtype))
            E = self.num_experts
            for buf in ("usage_weight", "usage_prob", "usage_count"):
                if getattr(self, buf).shape[0] != E:
                    setattr(self, buf, torch.zeros(E, device=dev))
            pattern = re.compile(re.escape(prefix) + r"routers\.([^.]+)\.weight$")
            for key in state_dict:
                m = pattern.match(key)
                if m and (m.group(1) not in self.routers or self.routers[m.group(1)].num_experts != E):
                    self.routers[m.group(1)] = TaskRouter(self.in_features, E, init_std=0.0, device=dev, dtype=dtype,
                                                          learned_noise=self.noise == "learned")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if extra_key not in state_dict and extra_key in missing_keys:
            # A state_dict from before routing settings were saved (version 0): load the weights, keep this layer's
            # settings and leave the routing state to set_task, as then.
            missing_keys.remove(extra_key)

    def _apply(self, fn: Any, recurse: bool = True) -> MoELoRALinear:
        # `.to(bf16)` and friends convert floating buffers: the usage statistics must stay fp32 (a bf16 row count
        # stops at 256: 256 + 1 rounds back to 256) and index_add_ needs one dtype. Keep them, moved only.
        usage = {name: getattr(self, name) for name in _USAGE_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in usage.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        return self

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before scripting: fail here, clearly, not deep in TorchScript.
        raise RuntimeError("MoELoRALinear does not support torch.jit.script (TorchScript cannot express its routing "
                           "state and lazy backend dispatch); use torch.compile or torch.export instead")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"base={self.base_layer is not None}, "
                f"experts={self.num_experts} (frozen {self.num_frozen}), rank={self.rank}, top_k={self.top_k}, "
                f"scale={self.scale}, activation={self.activation}, routing={self.routing}, "
                f"noise={self._noise_repr()}, expert_dropout={self.expert_dropout}, tasks={self.task_names}")

    def _noise_repr(self) -> str:
        return f"learned (floor {self.noise_floor})" if self.noise == "learned" else str(self.noise_std)


# --------------------------------------------------------------------------------------- wrappers for injection
class AdaptedMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention`'s forward with a callable (adapted) out-projection.

    nn.MultiheadAttention never calls `out_proj`: `F.multi_head_attention_forward` reads `out_proj.weight`
    directly, so a wrapped `out_proj` alone would be silently dead. This module computes the same thing
    (in-projection, scaled dot-product attention, out-projection) and *calls* `out_proj`. Same arguments and
    result as `nn.MultiheadAttention.forward` for self- and cross-attention with a shared embedding size;
    `need_weights=True` is refused (the fused attention never forms the weights).
    """

    # nn.TransformerEncoderLayer's fast-path check reads this attribute of its self_attn.
    _qkv_same_embed_dim = True

    def __init__(self, mha: nn.MultiheadAttention, out_proj: nn.Module) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("AdaptedMultiheadAttention needs an nn.MultiheadAttention with a packed in_proj_weight")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("AdaptedMultiheadAttention does not support add_bias_kv or add_zero_attn")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("AdaptedMultiheadAttention computes no attention weights: "
                             "call it with need_weights=False")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        Bn, L, d = query.shape
        S = key.shape[1]
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q)
        k = F.linear(key, w_k, b_k)
        v = F.linear(value, w_v, b_v)
        h, dh = self.num_heads, self.head_dim
        q, k, v = (t.reshape(Bn, -1, h, dh).transpose(1, 2) for t in (q, k, v))
        mask = None
        if attn_mask is not None:
            # MHA: a bool True means "may not attend"; SDPA: True means "may attend". Float masks are additive.
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
            if mask.dim() == 3:  # (B * h, L, S)
                mask = mask.reshape(Bn, h, L, S)
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(Bn, 1, 1, S)
            kpm = ~kpm if kpm.dtype == torch.bool else kpm.to(q.dtype)
            if mask is None:
                mask = kpm
            elif mask.dtype == torch.bool and kpm.dtype == torch.bool:
                mask = mask & kpm
            else:
                mask = _additive(mask, q.dtype) + _additive(kpm, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(Bn, L, d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An SDPA mask as an additive float mask (a bool True means "may attend")."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, float("-inf"))


class ModulesToSaveWrapper(nn.Module):
    """PEFT's `modules_to_save`: a trainable copy of a module (a classifier head, say) next to the frozen original.

    forward runs the copy, or the original inside `disable_adapters`; attribute reads (`head.weight`) reach the
    module in use. `save_adapters` stores the copy. State keys: `original_module.*` and `modules_to_save.*`.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = copy.deepcopy(module).requires_grad_(True)
        self._disabled = False
        self.train(module.training)

    @property
    def active_module(self) -> nn.Module:
        return self.original_module if self._disabled else self.modules_to_save

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__["_modules"]
            return getattr(modules["original_module" if self.__dict__.get("_disabled") else "modules_to_save"], name)


# ------------------------------------------------------------------------------------------------ injection
def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _wrap(model: nn.Module, name: str, layer_kwargs: dict[str, Any]) -> MoELoRALinear:
    """Replace the nn.Linear called `name` by a MoELoRALinear around it; an nn.MultiheadAttention's out_proj (never
    called by its parent) is wrapped together with its attention by `AdaptedMultiheadAttention`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, child)
    layer = MoELoRALinear.from_linear(linear, **layer_kwargs).train(linear.training)  # the model's mode
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        try:
            adapted = AdaptedMultiheadAttention(parent, layer).train(parent.training)
        except ValueError as exc:
            raise ValueError(f"{name}: nn.MultiheadAttention reads out_proj.weight directly, so an adapter there "
                             f"needs AdaptedMultiheadAttention, which refuses this one ({exc}); target another "
                             "module") from None
        grand_name, _, attr = parent_name.rpartition(".")
        grand = model.get_submodule(grand_name) if grand_name else model
        if not parent_name:
            raise ValueError(f"{name}: the model itself is an nn.MultiheadAttention; wrap it yourself with "
                             "igsp_kernels.AdaptedMultiheadAttention(mha, MoELoRALinear.from_linear(mha.out_proj))")
        setattr(grand, attr, adapted)
    else:
        setattr(parent, child, layer)
    return layer


def _disable_fast_paths(model: nn.Module, wrapped: Sequence[str]) -> None:
    """Turn off torch's fused Transformer fast path above every wrapped layer.

    In eval mode nn.TransformerEncoderLayer (and nn.TransformerEncoder's nested-tensor path) may call
    `torch._transformer_encoder_layer_fwd` with `linear1.weight`, `self_attn.out_proj.weight`, ... read directly:
    every adapter below would be skipped, silently. Per instance, not process-wide (torch.backends.mha
    .set_fastpath_enabled would slow every other model): the layer's `activation_relu_or_gelu` flag is only read
    by that fast path, and the encoder's `use_nested_tensor` only gates its nested-tensor conversion.
    """
    layers = encoders = 0
    for name, module in model.named_modules():
        above = any(w == name or w.startswith(name + ".") for w in wrapped) if name else bool(wrapped)
        if not above:
            continue
        if isinstance(module, nn.TransformerEncoderLayer) and module.activation_relu_or_gelu:
            module.activation_relu_or_gelu = 0
            layers += 1
        elif isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
            module.use_nested_tensor = False
            encoders += 1
    if layers or encoders:
        logger.info("disabled torch's Transformer fast path of %d nn.TransformerEncoderLayer and %d "
                    "nn.TransformerEncoder modules: it reads the weights directly and would bypass the adapters",
                    layers, encoders)


def inject_moe_lora(
    model: nn.Module,
    target_modules: str | Sequence[str] | MoELoRAConfig,
    *,
    freeze_base_model: bool | None = None,
    **expert_options: Any,
) -> list[str]:
    """Replace every `nn.Linear` of `model` matched by the targets with a `MoELoRALinear` wrapping it.

    Two forms: `inject_moe_lora(model, MoELoRAConfig(...))` (PEFT's `get_peft_model`: the config names the
    targets, the layer options, `modules_to_save`, and a `task` whose router is created and made active), or
    `inject_moe_lora(model, ["fc1", "fc2"], num_experts=4, ...)` with `MoELoRALinear` keyword arguments (no
    router is created).

    Args:
        model: any torch model (modified in place).
        target_modules: a regex (full match against the qualified module name), a list of name suffixes
            (`"fc1"` matches `"encoder.0.fc1"`), or a `MoELoRAConfig`.
        freeze_base_model: freeze every parameter that is not an adapter parameter (the usual PEFT setup);
            default True (the config form takes it from the config).
        expert_options: keyword arguments of `MoELoRALinear` (num_experts, rank, top_k, scale, routing, ...).
    Returns:
        The qualified names of the wrapped linears, in `named_modules()` order.

    An nn.MultiheadAttention's `out_proj` is wrapped together with its attention (`AdaptedMultiheadAttention`),
    since nn.MultiheadAttention never calls it; torch's Transformer fast path is turned off above every wrapped
    layer (it would bypass them in eval mode).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(target_modules, MoELoRAConfig):
        config = target_modules
        extra = sorted(expert_options) + (["freeze_base_model"] if freeze_base_model is not None else [])
        if extra:
            raise TypeError(f"inject_moe_lora(model, config) takes its options from the config; got also {extra}")
        targets, freeze = config.target_modules, config.freeze_base_model
        layer_kwargs = config.layer_kwargs()
    else:
        config, targets, freeze, layer_kwargs = None, target_modules, freeze_base_model, expert_options
        if not isinstance(targets, str) and (
            not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets)
        ):
            raise TypeError("target_modules must be a regex string, a list of name suffixes or a MoELoRAConfig, "
                            f"got {targets!r}")
    # Never inside an adapter already there (a regex like "fc.*" would match "fc1.base_layer" of a wrapped fc1).
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, (MoELoRALinear, ModulesToSaveWrapper)))
    found = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets) and not n.startswith(inside)]
    found = [(n, m) for n, m in found if not isinstance(m, (MoELoRALinear, AdaptedMultiheadAttention))]
    wrong = [f"{n} ({type(m).__name__})" for n, m in found if not isinstance(m, nn.Linear)]
    if wrong:
        hint = ("; for an nn.MultiheadAttention target its out_proj (wrapped together with the attention)"
                if any(isinstance(m, nn.MultiheadAttention) for _, m in found) else "")
        raise ValueError(f"target_modules={targets!r} matched modules that are not nn.Linear: {wrong}{hint}")
    if not found:
        sample = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"target_modules={targets!r} matched no module; nn.Linear names include {sample}")
    to_save = []
    if config is not None and config.modules_to_save:
        to_save = [(n, m) for n, m in model.named_modules()
                   if n and any(n == t or n.endswith("." + t) for t in config.modules_to_save)]
        missing = [t for t in config.modules_to_save if not any(n == t or n.endswith("." + t) for n, _ in to_save)]
        if missing:
            raise ValueError(f"modules_to_save names {missing}, which match no module of the model")
        both = sorted({n for n, _ in to_save} & {n for n, _ in found})
        if both:
            raise ValueError(f"{both} are both adapter targets and modules_to_save: choose one")
    if freeze is None or freeze:
        model.requires_grad_(False)
    names = [n for n, _ in found]
    for name in names:
        _wrap(model, name, layer_kwargs)
    for name, module in to_save:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ModulesToSaveWrapper(module))
    _disable_fast_paths(model, names)
    if config is not None and config.task is not None:
        add_router(model, config.task)
        set_task(model, config.task)
    logger.info("wrapped %d linear layers with MoELoRALinear", len(names))
    return names


def moe_lora_layers(model: nn.Module) -> Iterator[tuple[str, MoELoRALinear]]:
    """Every `MoELoRALinear` inside `model` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, MoELoRALinear):
            yield name, module


def set_task(model: nn.Module, task: str | int | None) -> None:
    """`set_task` on every MoE-LoRA layer of `model`."""
    for _, layer in moe_lora_layers(model):
        layer.set_task(task)


def set_sample_tasks(model: nn.Module, task_ids: torch.Tensor | None) -> None:
    """`set_sample_tasks` on every MoE-LoRA layer of `model`."""
    for _, layer in moe_lora_layers(model):
        layer.set_sample_tasks(task_ids)


def add_router(model: nn.Module, task: str | int) -> None:
    """`add_router(task)` on every MoE-LoRA layer of `model` (all current experts active)."""
    for _, layer in moe_lora_layers(model):
        layer.add_router(task)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements of `module` (only those with requires_grad if `trainable_only`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
