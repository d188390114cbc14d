"""Router-convergence detection: when phase 1 (Subspace Identification) may end (METHOD.md section 3, step 3).

Every `check_every` optimizer steps each layer's expert-usage distribution u (layer.usage(): the mean top-k
routing weight per expert over the window since the last read, renormalised to sum 1) is compared with the
previous window's by total-variation distance TV(u, u') = 0.5 * sum_e |u_e - u'_e| (in [0, 1]). The check's
distance is the max over layers. A check counts towards convergence only at step >= min_steps; converged
when `patience` consecutive counted checks have distance < eps. Hard cap: at step >= ceil(max_fraction *
total_steps) convergence is forced (history records `forced: True`).

Why the top-k weight (usage) and not the softmax probability (usage_prob): an expert's gradient is scaled by
its gate weight after top-k; an expert outside the top-k gets no gradient at all whatever its softmax
probability. The routing *weight* is therefore the gradient-flow indicator that pruning reads too.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

import torch

__all__ = ["RouterConvergence", "total_variation"]

logger = logging.getLogger(__name__)


class _UsageLayer(Protocol):
    def usage(self) -> torch.Tensor: ...

    def reset_usage(self) -> None: ...


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """0.5 * sum |p - q| of two distributions (E,) (each renormalised to sum 1)."""
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    ps, qs = float(p.double().sum()), float(q.double().sum())
    if not ps > 0 or not qs > 0:
        raise ValueError(f"p and q must have a positive sum (distributions), got sums {ps} and {qs}")
    p = p.double() / ps
    q = q.double() / qs
    return 0.5 * float((p - q).abs().sum())


def _usage_layers(layers: Any) -> list[tuple[str, _UsageLayer]]:
    """(name, layer) pairs whose layers have usage() and reset_usage() (MoELoRALinear, or a test double)."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be a list of (name, MoELoRALinear) pairs, got {type(layers).__name__}")
    out = []
    for i, item in enumerate(layers):
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
            raise TypeError(f"layers[{i}] must be a (name, layer) pair, got {item!r}")
        if not (callable(getattr(item[1], "usage", None)) and callable(getattr(item[1], "reset_usage", None))):
            raise TypeError(f"layers[{i}][1] ({item[0]!r}) must have usage() and reset_usage() "
                            f"(a MoELoRALinear), got {type(item[1]).__name__}")
        out.append((item[0], item[1]))
    if not out:
        raise ValueError("layers must hold at least one (name, layer) pair, got none")
    return out


def _int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


class RouterConvergence:
    """Detects the early convergence of the task routers from windowed expert-usage distributions.

    Args:
        check_every: steps per usage window (a check every `check_every` steps), >= 1.
        eps: TV distance below which a check counts as stable, in (0, 1].
        patience: consecutive stable checks needed, >= 1.
        min_steps: checks before this step never count (the router is still moving away from its init).
        max_fraction: hard cap at ceil(max_fraction * total_steps) steps, in (0, 1].
        total_steps: the task's optimizer steps, >= 1.
    Attributes:
        history: one dict per check: {"step", "distance" (float | None for the first window), "per_layer"
            {name: float | None}, "streak", "converged", "forced"}: the convergence curve.
        converged_at: the step at which convergence was declared (or forced), else None.
        forced: True when the cap, not the criterion, ended phase 1.
        last_usage: {name: (E,) fp32 CPU tensor} usage of the most recent window: the converged
            distribution that pruning reads.
    """

    def __init__(self, check_every: int = 20, eps: float = 0.05, patience: int = 3, min_steps: int = 50,
                 max_fraction: float = 0.5, total_steps: int = 1000) -> None:
        self.check_every = _int("check_every", check_every, 1)
        self.patience = _int("patience", patience, 1)
        self.min_steps = _int("min_steps", min_steps, 0)
        self.total_steps = _int("total_steps", total_steps, 1)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps <= 1.0:
            raise ValueError(f"eps must be a float in (0, 1] (a total-variation distance), got {eps!r}")
        if (isinstance(max_fraction, bool) or not isinstance(max_fraction, (int, float))
                or not 0.0 < max_fraction <= 1.0):
            raise ValueError(f"max_fraction must be a float in (0, 1], got {max_fraction!r}")
        self.eps = float(eps)
        self.max_fraction = float(max_fraction)
        self.cap_step = max(1, math.ceil(self.max_fraction * self.total_steps))
        if self.min_steps > self.cap_step:
            logger.warning("min_steps=%d exceeds the cap %d (max_fraction * total_steps): phase 1 always ends at "
                           "the cap", self.min_steps, self.cap_step)
        self.history: list[dict[str, Any]] = []
        self.converged_at: int | None = None
        self.forced = False
        self.last_usage: dict[str, torch.Tensor] = {}
        self._prev: dict[str, torch.Tensor] = {}
        self._streak = 0
        self._last_check = 0

    @property
    def converged(self) -> bool:
        return self.converged_at is not None

    def _read(self, layers: list[tuple[str, _UsageLayer]]) -> dict[str, torch.Tensor | None]:
        """Each layer's window usage, renormalised (None when nothing was routed), then reset the window."""
        out: dict[str, torch.Tensor | None] = {}
        for name, layer in layers:
            u = layer.usage().detach().float().cpu()
            layer.reset_usage()
            total = float(u.sum())
            out[name] = u / total if total > 0 else None
        return out

    def step(self, step: int, layers: Any) -> bool:
        """Call after each optimizer step with the number of steps done (1-based). True once converged.

        Reads (and resets) layer.usage() only at checks: every `check_every` steps, and at the cap.
        `layers`: (name, layer) pairs; a layer needs usage() and reset_usage() (MoELoRALinear has both).
        """
        _int("step", step, 0)
        if self.converged:
            return True
        layers = _usage_layers(layers)
        at_cap = step >= self.cap_step
        if step - self._last_check < self.check_every and not at_cap:
            return False
        self._last_check = step
        usage = self._read(layers)
        per_layer: dict[str, float | None] = {}
        for name, u in usage.items():
            prev = self._prev.get(name)
            if u is None:  # nothing routed in this window: keep the previous distribution, no distance
                per_layer[name] = None
                continue
            per_layer[name] = total_variation(u, prev) if prev is not None and prev.shape == u.shape else None
            self._prev[name] = u
            self.last_usage[name] = u
        known = [d for d in per_layer.values() if d is not None]
        # A check whose layers have no previous window (the first one) has no distance and cannot count.
        distance = max(known) if known and len(known) == len(per_layer) else None
        if distance is not None and step >= self.min_steps and distance < self.eps:
            self._streak += 1
        else:
            self._streak = 0
        converged = self._streak >= self.patience
        forced = at_cap and not converged
        if converged or forced:
            self.converged_at = step
            self.forced = forced
            logger.info("router convergence at step %d (%s, distance %s)", step,
                        "forced by the cap" if forced else f"{self.patience} checks < eps={self.eps}", distance)
        self.history.append({"step": step, "distance": distance, "per_layer": per_layer, "streak": self._streak,
                             "converged": converged or forced, "forced": forced})
        return self.converged

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values and CPU tensors (checkpoint-friendly)."""
        return {"history": self.history, "converged_at": self.converged_at, "forced": self.forced,
                "last_usage": dict(self.last_usage), "prev": dict(self._prev), "streak": self._streak,
                "last_check": self._last_check}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.history = list(sd["history"])
        self.converged_at = sd["converged_at"]
        self.forced = bool(sd["forced"])
        self.last_usage = dict(sd["last_usage"])
        self._prev = dict(sd["prev"])
        self._streak = int(sd["streak"])
        self._last_check = int(sd["last_check"])
