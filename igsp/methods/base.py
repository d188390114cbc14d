"""The interface between the training loop (igsp/engine.py) and a continual-learning method.

The engine owns everything that is the same for every method: data order, the forward pass and the loss,
DDP gradient all-reduce, gradient clipping, the optimizer and its schedule, logging, checkpoints, evaluation
and the task selector. A method owns what differs: which experts and routers a task adds, extra loss terms,
what happens to gradients and parameters around the optimizer step, when a phase ends and what happens then,
what is frozen after the task, and its own checkpointable state. A new method is one new file in igsp/methods/
that subclasses `Method` and calls `register_method` (igsp/methods/__init__.py).

Per task the engine calls, in this order:

    begin_task(t)                        pools and routers grow; the engine then builds the optimizer
    per optimizer step s = 1..iterations (phase p starts at 1):
        loss = ce + loss_terms(t, p)     extra differentiable terms (None: none)
        backward; DDP all-reduce
        before_step(t, p)                gradients are final (summed over ranks), before clipping
        clip; optimizer.step()
        after_step(t, p)                 right after the step (e.g. project the parameters)
        if p < phases and phase_done(t, p, s):
            end_phase(t, p, s)           e.g. prune; the engine then starts phase p + 1 with a fresh
                                         optimizer (the trainable set changed) and checkpoints
    end_task(t)                          freeze what becomes history; the engine then freezes the task's
                                         router, adds the selector prototypes, checkpoints and evaluates

`state_dict()` / `load_state_dict(state, progress)` carry the method's state across a checkpoint (tensors on
the CPU, plain containers: `torch.load(weights_only=True)` must read them). A resumed run must reproduce the
uninterrupted one bit for bit on CPU, so everything a method reads later belongs in its state.

Methods write their results through the trainer they are given (`TrainerView`): `trainer.log.write(record)`
for log.jsonl and the lists in `trainer.records` for results.json ("convergence", "prune", "orthogonality").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from igsp.adapters import route_followers
from igsp_kernels import MoELoRALinear

if TYPE_CHECKING:
    from igsp.config import Config

__all__ = ["Method", "PlanLayer", "TrainerView"]


class _Log(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...


class TrainerView(Protocol):
    """What a method may read from the trainer (igsp.engine.Trainer satisfies it)."""

    config: Config
    model: nn.Module
    layers: list[tuple[str, MoELoRALinear]]  # every MoE-LoRA layer, module order (rebuilt on resume)
    device: torch.device
    task_names: list[str]
    records: dict[str, list[Any]]  # results.json's method records: "convergence", "prune", "orthogonality"
    log: _Log  # log.jsonl (a no-op off rank 0)
    optimizer: torch.optim.Optimizer | None  # the current phase's (lr of this step: param_groups[0]["lr"])

    def task_batches(self, t: int, max_samples: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(images, labels, subsample size) of this rank's share of a seeded subsample of task t's training set."""

    def task_loss(self, t: int, images: torch.Tensor, labels: torch.Tensor, normaliser: int) -> torch.Tensor:
        """Task t's training loss on a batch, summed over rows / normaliser."""

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over DDP ranks in place (a no-op in one process)."""


class PlanLayer:
    """Integer bookkeeping of one adapted layer for `igsp params` (no tensors): see Method.plan_task.

    Attributes:
        router_size: router elements per active expert (d_route per matrix the router holds: the gate, and the
            noise gate with learned gating noise; 0 for a layer that applies another layer's routing).
        expert_size: elements of one expert (A + B, + biases).
        frozen: historical experts; pool: experts in the pool (frozen + trainable).
        routers: active experts of each stored router, in task order.
    """

    def __init__(self, router_size: int, expert_size: int, pool: int) -> None:
        self.router_size = router_size
        self.expert_size = expert_size
        self.frozen = 0
        self.pool = pool
        self.routers: list[int] = []


class Method:
    """A continual-learning method driven by the engine's loop (see the module docstring for the call order).

    Class attributes:
        name: the registry key (`method.name` in the config).
        phases: training phases per task (the engine starts phase p + 1 when phase_done fires in phase p).
        trains: False for a method without any training (the engine evaluates the frozen model once).
    """

    name: ClassVar[str] = ""
    phases: ClassVar[int] = 1
    trains: ClassVar[bool] = True

    def __init__(self, trainer: TrainerView) -> None:
        self.trainer = trainer

    # ------------------------------------------------------------------------------ configuration
    @classmethod
    def validate_config(cls, config: Config) -> None:
        """Cross-section checks of a config using this method; raise igsp.config.ConfigError naming the field."""

    @classmethod
    def plan_task(cls, config: Config, layers: list[PlanLayer], survival: float) -> dict[str, int | None]:
        """`igsp params`: replay one task's pool bookkeeping on `layers` (in place).

        Returns {"phase1": trainable elements of phase 1, "phase2": of phase 2 or None}. The default adds one
        router over the whole pool and trains every non-frozen expert, freezing nothing.
        """
        p1 = 0
        for lay in layers:
            p1 += lay.pool * lay.router_size + (lay.pool - lay.frozen) * lay.expert_size
            lay.routers.append(lay.pool)
        return {"phase1": p1, "phase2": None}

    # ------------------------------------------------------------------------------ the task loop
    @property
    def layers(self) -> list[tuple[str, MoELoRALinear]]:
        return self.trainer.layers

    @property
    def followers(self) -> dict[str, str]:
        """{layer: the layer whose routing it applies} (block routing; empty with per-layer routers)."""
        return route_followers(self.layers)

    def routing_layers(self) -> list[tuple[str, MoELoRALinear]]:
        """The layers that route themselves (a follower's usage is its leader's: counting it twice adds nothing)."""
        follows = self.followers
        return [(n, layer) for n, layer in self.layers if n not in follows]

    def begin_task(self, t: int) -> None:
        """Grow the pools and add task t's router. Default: a router over each layer's current pool."""
        for _, layer in self.layers:
            layer.add_router(t)

    def loss_terms(self, t: int, phase: int) -> torch.Tensor | None:
        """A differentiable 0-d term added to this rank's loss (logged as "reg"), or None."""
        return None

    def before_step(self, t: int, phase: int) -> None:
        """Gradients are final (all-reduced, zero where a parameter got none); clipping and the step follow."""

    def after_step(self, t: int, phase: int) -> None:
        """Right after optimizer.step()."""

    def phase_done(self, t: int, phase: int, step: int) -> bool:
        """After step `step` (1-based) of phase `phase` < phases: True ends the phase now."""
        return False

    def end_phase(self, t: int, phase: int, step: int) -> None:
        """Phase `phase` ended at `step`: change the structure (the engine rebuilds the optimizer after)."""

    def end_task(self, t: int) -> None:
        """Training of task t is over (usage buffers still hold the task's): freeze what becomes history."""

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The method's own state (CPU tensors and plain containers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], progress: dict[str, Any]) -> None:
        """Restore `state_dict()`; `progress` is the run's {"task", "stage", "phase", "step", ...}."""
