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
task-agnostic deployment path).

Usage statistics (`usage_weight`, `usage_prob`, `usage_rows`) are buffers updated on the device under no_grad:
no host sync in forward.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

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
from igsp_kernels.reference.moe_lora import ACTIVATIONS
from igsp_kernels.reference.routing import expand_sample_routing

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


def _task_key(task: str | int) -> str:
    key = str(task)
    if not key or "." in key:
        raise ValueError(f"task must be a non-empty name without '.', got {task!r}")
    return key


class TaskRouter(nn.Module):
    """One task's router: logits = x_route @ weight^T over the expert pool, `active` masks usable experts.

    weight: (E, d_route) fp32; active: (E,) bool buffer.
    """

    def __init__(self, in_features: int, num_experts: int, *, init_std: float = 0.02,
                 active: torch.Tensor | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device))
        nn.init.normal_(self.weight, std=init_std) if init_std > 0 else nn.init.zeros_(self.weight)
        mask = torch.ones(num_experts, dtype=torch.bool, device=device) if active is None else active.clone()
        self.register_buffer("active", mask)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, x_route: torch.Tensor) -> torch.Tensor:
        """x_route (N, d_route) -> logits (N, E) in fp32 (routing decisions are precision-sensitive)."""
        return F.linear(x_route.float(), self.weight.float())

    def _reindex(self, order: torch.Tensor, new_active: torch.Tensor | None = None) -> None:
        """Keep/permute columns: new expert i = old expert order[i] (order[i] = -1: a new, inactive expert)."""
        with torch.no_grad():
            keep = order.clamp(min=0)
            if self.weight.shape[0]:
                w = self.weight.detach()[keep].clone()
                a = self.active[keep].clone()
            else:  # a router made before any expert existed: every column is new
                w = self.weight.new_zeros(order.shape[0], self.weight.shape[1])
                a = torch.zeros(order.shape[0], dtype=torch.bool, device=self.active.device)
            fresh = order < 0
            w[fresh] = 0.0
            a[fresh] = False
            if new_active is not None:
                a |= new_active
        self.weight = nn.Parameter(w, requires_grad=self.weight.requires_grad)
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
        router_init_std: float = 0.02,
        backend: BackendName = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank),
                            ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 0:
            raise ValueError(f"num_experts must be an int >= 0, got {num_experts!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if routing not in ("sample", "token"):
            raise ValueError(f"routing must be 'sample' or 'token', got {routing!r}")
        if route_token not in ("first", "mean"):
            raise ValueError(f"route_token must be 'first' or 'mean', got {route_token!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
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
        self.router_init_std = float(router_init_std)
        self.backend = backend
        self.base_layer = base
        self.routers = nn.ModuleDict()
        self.active_task: str | None = None
        self._sample_tasks: torch.Tensor | None = None
        dev = torch.device(device) if device is not None else None
        for group in _GROUPS:
            self._set_group(group, *self._empty_experts(0, dev))
        self.register_buffer("usage_weight", torch.zeros(0, device=dev), persistent=False)
        self.register_buffer("usage_prob", torch.zeros(0, device=dev), persistent=False)
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

    def _empty_experts(self, n: int, device: torch.device | None) -> tuple[torch.Tensor, ...]:
        A = torch.zeros(n, self.in_features, self.rank, device=device)
        B = torch.zeros(n, self.rank, self.out_features, device=device)
        ba = torch.zeros(n, self.rank, device=device) if self.expert_bias else None
        bb = torch.zeros(n, self.out_features, device=device) if self.expert_bias else None
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

    # nn.Linear's attributes, so code that reads `layer.weight` (open_clip's cast-dtype probe, say) still works.
    @property
    def weight(self) -> torch.Tensor:
        if self.base_layer is None:
            raise AttributeError("this MoELoRALinear has no base layer (parallel adapter), hence no .weight")
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.base_layer is None else self.base_layer.bias

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
        for buf in ("usage_weight", "usage_prob"):
            old_buf = getattr(self, buf)
            val = old_buf[order_t.clamp(min=0)] if old_buf.numel() else torch.zeros(len(order), device=dev)
            setattr(self, buf, torch.where(fresh, torch.zeros_like(val), val))

    def add_experts(self, n: int, *, active_in: Iterable[str | int] | None = None) -> list[int]:
        """Append `n` trainable experts (A Kaiming-uniform, B zero: the output is unchanged) and return their ids.

        They become active in the routers of `active_in` (default: the current task's router, if one is set).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
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
        moving = [i for i in ids if i >= self.num_frozen]
        frozen = list(range(self.num_frozen)) + moving
        rest = [i for i in range(self.num_frozen, self.num_experts) if i not in set(moving)]
        order = frozen + rest
        self._reindex(order, len(frozen))
        return [order.index(i) for i in ids]

    def remove_experts(self, ids: Iterable[int]) -> None:
        """Delete experts `ids` (their parameters are freed; routers lose their columns)."""
        ids = set(self._check_ids(ids, "ids"))
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
        router = TaskRouter(self.in_features, E, init_std=self.router_init_std, active=active, device=self.device)
        self.routers[key] = router
        return router

    # --------------------------------------------------------------------------------------------- state
    def set_task(self, task: str | int | None) -> None:
        """Route the whole batch with `task`'s router; None turns the adapters off (base output only)."""
        self._sample_tasks = None
        if task is None:
            self.active_task = None
            return
        key = _task_key(task)
        if key not in self.routers:
            raise ValueError(f"task {key!r} has no router; routers: {self.task_names}")
        self.active_task = key

    def set_sample_tasks(self, task_ids: torch.Tensor | None) -> None:
        """A task per sample: task_ids (B,) long indices into `task_names`, -1 = adapters off for that sample."""
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
        if tasks is None:
            router = self.routers[self.active_task]
            return router(xr), router.active
        weights = torch.stack([r.weight for r in self.routers.values()])  # (n_tasks, E, d)
        masks = torch.stack([r.active for r in self.routers.values()])  # (n_tasks, E)
        sel = tasks.clamp(min=0)
        logits = torch.einsum("nd,ned->ne", xr.float(), weights.float()[sel])
        return logits, masks[sel] | (tasks < 0).unsqueeze(1)  # an off row keeps every expert (weight 0 later)

    def _routing_on(self) -> bool:
        return self.num_experts > 0 and (self.active_task is not None or self._sample_tasks is not None)

    def route(self, x: torch.Tensor) -> RoutingDecision:
        """This layer's routing decision for input `x` (what `forward(x)` would use), without applying it.

        Per-sample routing of a 3-D input gives one row per sample: topk_idx and topk_w (B, k), probs (B, E);
        per-token routing (or a 2-D input) one row per token: (N, k) and (N, E), N = x.numel() // in_features.
        A sample whose task is -1 under `set_sample_tasks` gets zero weights (adapters off for it). In training
        the configured router noise is drawn, so two calls differ; usage statistics are not recorded (the layer
        that applies the decision records them). Share one decision between layers with `forward(x, routing=)`.
        """
        self._check_input(x)
        if not self._routing_on():
            raise RuntimeError(f"this MoELoRALinear has nothing to route: {self._why_off()}")
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

    def _why_off(self) -> str:
        if self.num_experts == 0:
            return "it has no experts (add_experts)"
        return f"no task is set (set_task(task) or set_sample_tasks(ids); routers: {self.task_names})"

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
        """
        self._check_input(x)
        base = self.base_layer
        if routing is None and not self._routing_on():
            return base(x) if base is not None else x.new_zeros(*x.shape[:-1], self.out_features)
        if self.num_experts == 0:
            raise ValueError("routing was given but this MoELoRALinear has no experts")
        if routing is None:
            idx, w, probs = self.route(x)
            _, L = self._route_input(x)
        else:
            idx, w, probs, L = self._check_decision(routing, x)
        if self.training:
            self._record_usage(idx, w, probs)
        if L > 1:
            if self.batch_first:
                idx, w = expand_sample_routing(idx, w, L)
            else:  # rows of an (L, B, d) input are ordered l * B + b
                idx, w = idx.repeat(L, 1), w.repeat(L, 1)
        A, B, eb = self.expert_weights()
        x2 = x.reshape(-1, self.in_features)
        y = moe_lora(
            x2, A, B, idx, w,
            base_weight=None if base is None else base.weight,
            base_bias=None if base is None else base.bias,
            scale=self.scale, activation=self.activation, expert_bias=eb, backend=self.backend,
        )
        return y.reshape(*x.shape[:-1], self.out_features)

    def _route_backend(self) -> BackendName:
        # The C++ extension has no routing op: let routing dispatch on its own when cpp is forced.
        return "auto" if self.backend == "cpp" else self.backend

    @torch.no_grad()
    def _record_usage(self, idx: torch.Tensor, w: torch.Tensor, probs: torch.Tensor | None) -> None:
        self.usage_weight.index_add_(0, idx.reshape(-1).long(), w.reshape(-1).float())
        if probs is not None:
            self.usage_prob.add_(probs.sum(0))
        self.usage_rows.add_(idx.shape[0])

    # ------------------------------------------------------------------------------------- checkpointing
    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Resize the pool and create missing routers so a checkpoint loads into a freshly built layer."""
        sizes = {}
        for group in _GROUPS:
            key = f"{prefix}A_{group}"
            if key in state_dict:
                sizes[group] = state_dict[key].shape[0]
        if sizes:
            dev = self.device
            for group in _GROUPS:
                n = sizes.get(group, getattr(self, f"A_{group}").shape[0])
                if n != getattr(self, f"A_{group}").shape[0]:
                    self._set_group(group, *self._empty_experts(n, dev))
            E = self.num_experts
            for buf in ("usage_weight", "usage_prob"):
                if getattr(self, buf).shape[0] != E:
                    setattr(self, buf, torch.zeros(E, device=dev))
            pattern = re.compile(re.escape(prefix) + r"routers\.([^.]+)\.weight$")
            for key in state_dict:
                m = pattern.match(key)
                if m and m.group(1) not in self.routers:
                    self.routers[m.group(1)] = TaskRouter(self.in_features, E, init_std=0.0, device=dev)
                elif m and self.routers[m.group(1)].num_experts != E:
                    self.routers[m.group(1)] = TaskRouter(self.in_features, E, init_std=0.0, device=dev)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"base={self.base_layer is not None}, "
                f"experts={self.num_experts} (frozen {self.num_frozen}), rank={self.rank}, top_k={self.top_k}, "
                f"scale={self.scale}, activation={self.activation}, routing={self.routing}, tasks={self.task_names}")


# ------------------------------------------------------------------------------------------------ injection
def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject_moe_lora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    freeze_base_model: bool = True,
    **expert_options: Any,
) -> list[str]:
    """Replace every `nn.Linear` of `model` matched by `target_modules` with a `MoELoRALinear` wrapping it.

    Args:
        model: any torch model (modified in place).
        target_modules: a regex (full match against the qualified module name) or a list of name suffixes
            (`"fc1"` matches `"encoder.0.fc1"`).
        freeze_base_model: freeze every parameter that is not an adapter parameter (the usual PEFT setup).
        expert_options: keyword arguments of `MoELoRALinear` (num_experts, rank, top_k, scale, routing, ...).
    Returns:
        The qualified names of the wrapped modules, in `named_modules()` order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(target_modules, str) and (
        not isinstance(target_modules, Sequence) or not all(isinstance(t, str) for t in target_modules)
    ):
        raise TypeError(f"target_modules must be a regex string or a list of name suffixes, got {target_modules!r}")
    if freeze_base_model:
        model.requires_grad_(False)
    targets = [(n, m) for n, m in model.named_modules() if n and _matches(n, target_modules)]
    targets = [(n, m) for n, m in targets if not isinstance(m, MoELoRALinear)]
    wrong = [f"{n} ({type(m).__name__})" for n, m in targets if not isinstance(m, nn.Linear)]
    if wrong:
        raise ValueError(f"target_modules={target_modules!r} matched modules that are not nn.Linear: {wrong}")
    if not targets:
        sample = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"target_modules={target_modules!r} matched no module; nn.Linear names include {sample}")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoELoRALinear.from_linear(linear, **expert_options))
    logger.info("wrapped %d linear layers with MoELoRALinear", len(targets))
    return [n for n, _ in targets]


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
