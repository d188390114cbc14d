"""Router-convergence detection: when phase 1 (Subspace Identification) may end (METHOD.md section 3, step 3).

Statistic. Every `check_every` optimizer steps each routing layer's expert-usage distribution u (the mean
top-k routing weight per expert over the window since the last read, renormalised to sum 1) is compared with
the previous window's by total-variation distance TV(u, u') = 0.5 * sum_e |u_e - u'_e| (in [0, 1]).

Noise floor (`noise_floor="permutation"`, the default). Two windows of a *fixed* router still differ, because
they route different samples: at a 1,280-sample window the TV of a fixed router is ~0.04 with E = 6 experts and
~0.07 with E = 22, so a fixed threshold eps = 0.05 sits inside the noise for large pools and convergence is
never detected. So each check is a test of "the router did not change between the two windows" against the
statistic's own sampling noise at this window and pool size: the per-step usage increments of both windows are
exchangeable under that hypothesis (steps are batches of the task's data), so we permute the steps of the two
windows (`permutations` times, the same permutation for every layer, from a generator seeded by (seed, step):
deterministic, DDP-consistent, and it leaves the global RNG alone) and recompute every layer's TV. The layers
are combined by the max-T procedure (Westfall & Young): each layer's null TVs are scaled by their median
m_l, the (1 - alpha) quantile c of max_l TV_l / m_l over the permutations bounds all layers at once with
family-wise error alpha, and a layer is stable when TV_l <= max(eps, c * m_l). `eps` is now the smallest change
that counts as movement at all (with large windows the floor is tiny, and a drift of 0.001 is not worth waiting
for). The distance logged is max_l TV_l; `ratio` = max_l TV_l / threshold_l (<= 1: stable).

Fixed inputs (the text tower). Training encodes the same class prompts every step, so a text layer's usage has no
sampling noise: it changes only when the router changes. Layers named in `fixed_inputs` go through the same
permutation test (a stationary jitter of the router is exchangeable across steps, a trend is not) and get their
resolution as a floor: a layer of n prompts is stable when TV_l <= max(eps, c * m_l, 1 / n), i.e. one prompt
changing its experts is tolerated. Measured on the digits stream, though, a text router does not settle at the
training learning rate: Adam moves every coordinate by ~lr per step whatever the gradient's size, and with a
deterministic gradient it overshoots and oscillates (a text layer's gate split between its two selected
experts swings between 0.2/0.8 and 0.75/0.25 with a period of ~50 steps, trend reversals included, while the
vision routers of the same run settle by step ~70-90). A criterion that waits for the text tower therefore
waits for the cap. Layers named in `monitor_only` (the engine passes the text tower's when the vision tower is
adapted, `method.converge_on = "vision"`) are read, reset, compared and logged every window like the others but
do not decide convergence and do not enter the max-T quantile.

`noise_floor="none"`: the first implementation's rule, a fixed threshold: stable when max_l TV_l < eps.

A check counts towards convergence only at step >= min_steps; converged when `patience` consecutive counted
checks are stable. The first check has no previous window and never counts, so the earliest possible
convergence is the end of window patience + 1. Hard cap: at step >= ceil(max_fraction * total_steps)
convergence is forced (history records `forced: True`), the fallback the log marks.

Why the top-k weight (usage) and not the softmax probability (usage_prob): an expert's gradient is scaled by
its gate weight after top-k; an expert outside the top-k gets no gradient at all whatever its softmax
probability. The routing *weight* is therefore the gradient-flow indicator that pruning reads too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["NOISE_FLOORS", "RouterConvergence", "total_variation"]

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


NOISE_FLOORS = ("permutation", "none")


class RouterConvergence:
    """Detects the early convergence of the task routers from windowed expert-usage distributions.

    Args:
        check_every: steps per usage window (a check every `check_every` steps), >= 1.
        eps: smallest TV distance that counts as a change, in (0, 1] (with noise_floor="none": the threshold).
        patience: consecutive stable checks needed, >= 1.
        min_steps: checks before this step never count (the router is still moving away from its init).
        max_fraction: hard cap at ceil(max_fraction * total_steps) steps, in (0, 1].
        total_steps: the task's optimizer steps, >= 1.
        noise_floor: "permutation" (compare with the statistic's sampling noise, module docstring) or "none".
        alpha: family-wise false-alarm rate of a check of a fixed router under "permutation", in (0, 1).
        permutations: permutations per check, >= 20.
        fixed_inputs: names of layers whose every step routes the same inputs (the text tower's prompts).
        monitor_only: names of layers whose distances are computed and logged but do not decide convergence
            (their usage is still read and reset every window, for pruning).
        seed: seeds the permutations (with the step).
    The layers passed to `step` need usage(), reset_usage() and, for "permutation", the usage_weight (E,) and
    usage_rows () buffers of MoELoRALinear.
    Attributes:
        history: one dict per check: {"step", "distance" (max TV over the gating layers, None without a
            previous window),
            "per_layer" {name: TV | None}, "thresholds" {name: float}, "ratio" (max TV / threshold), "noise_c",
            "streak", "converged", "forced"}: the convergence curve.
        converged_at: the step at which convergence was declared (or forced), else None.
        forced: True when the cap, not the criterion, ended phase 1.
        last_usage: {name: (E,) fp32 CPU tensor} usage of the most recent window: the converged
            distribution that pruning reads.
    """

    def __init__(self, check_every: int = 20, eps: float = 0.05, patience: int = 3, min_steps: int = 50,
                 max_fraction: float = 0.5, total_steps: int = 1000, *, noise_floor: str = "permutation",
                 alpha: float = 0.05, permutations: int = 500, fixed_inputs: Iterable[str] = (),
                 monitor_only: Iterable[str] = (), seed: int = 0) -> None:
        self.check_every = _int("check_every", check_every, 1)
        self.patience = _int("patience", patience, 1)
        self.min_steps = _int("min_steps", min_steps, 0)
        self.total_steps = _int("total_steps", total_steps, 1)
        self.permutations = _int("permutations", permutations, 20)
        self.seed = _int("seed", seed, 0)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps <= 1.0:
            raise ValueError(f"eps must be a float in (0, 1] (a total-variation distance), got {eps!r}")
        if (isinstance(max_fraction, bool) or not isinstance(max_fraction, (int, float))
                or not 0.0 < max_fraction <= 1.0):
            raise ValueError(f"max_fraction must be a float in (0, 1], got {max_fraction!r}")
        if noise_floor not in NOISE_FLOORS:
            raise ValueError(f"noise_floor must be one of {NOISE_FLOORS}, got {noise_floor!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be a float in (0, 1), got {alpha!r}")
        for arg, names in (("fixed_inputs", fixed_inputs), ("monitor_only", monitor_only)):
            if isinstance(names, str):
                raise TypeError(f"{arg} must be a collection of layer names, got the string {names!r}")
        self.eps = float(eps)
        self.max_fraction = float(max_fraction)
        self.noise_floor = noise_floor
        self.alpha = float(alpha)
        self.fixed_inputs = frozenset(fixed_inputs)
        self.monitor_only = frozenset(monitor_only)
        self.cap_step = max(1, math.ceil(self.max_fraction * self.total_steps))
        if self.min_steps > self.cap_step:
            logger.warning("min_steps=%d exceeds the cap %d (max_fraction * total_steps): phase 1 always ends at "
                           "the cap", self.min_steps, self.cap_step)
        self.history: list[dict[str, Any]] = []
        self.converged_at: int | None = None
        self.forced = False
        self.last_usage: dict[str, torch.Tensor] = {}
        self._prev: dict[str, torch.Tensor] = {}
        self._prev_steps: dict[str, torch.Tensor] = {}  # previous window: per step [usage increments | rows]
        self._snaps: list[torch.Tensor] = []  # this window: cumulative [w_1 | rows_1 | w_2 | rows_2 ...] per step
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

    def _snapshot(self, layers: list[tuple[str, _UsageLayer]]) -> None:
        """Cumulative usage sums of this window after a step: one device tensor (no host sync until the check)."""
        parts = []
        for name, layer in layers:
            w, rows = getattr(layer, "usage_weight", None), getattr(layer, "usage_rows", None)
            if not isinstance(w, torch.Tensor) or not isinstance(rows, torch.Tensor):
                raise TypeError(f"noise_floor='permutation' reads usage_weight and usage_rows of every layer; "
                                f"{name!r} ({type(layer).__name__}) has none (use noise_floor='none')")
            parts += [w.detach().float().reshape(-1), rows.detach().float().reshape(1)]
        self._snaps.append(torch.cat(parts))

    def _window_steps(self, layers: list[tuple[str, _UsageLayer]]) -> dict[str, torch.Tensor]:
        """{name: (n, E + 1) fp64 per-step [usage weight increments | rows routed]} of the window just ended."""
        if not self._snaps:
            return {}
        cum = torch.stack(self._snaps).double().cpu()  # (n, total)
        self._snaps = []
        inc = torch.diff(cum, dim=0, prepend=torch.zeros_like(cum[:1]))  # the window starts from a reset: 0
        out, off = {}, 0
        for name, layer in layers:
            E = int(layer.usage_weight.numel())
            out[name] = inc[:, off:off + E + 1]
            off += E + 1
        return out

    def _thresholds(self, step: int, steps: dict[str, torch.Tensor], names: list[str]) -> tuple[dict[str, float],
                                                                                                 float | None]:
        """Per-layer stability thresholds of this check and the max-T quantile c (None without permutation)."""
        eps = self.eps
        if self.noise_floor == "none":
            return {n: eps for n in names}, None
        out: dict[str, float] = {}
        sampled = []
        for n in names:
            cur, prev = steps.get(n), self._prev_steps.get(n)
            floor = eps
            if n in self.fixed_inputs:  # one input's worth of routing mass: the layer's resolution
                rows = float(cur[:, -1].mean()) if cur is not None and cur.shape[0] else 0.0
                floor = max(eps, 1.0 / rows) if rows > 0 else eps
            out[n] = floor
            if cur is not None and prev is not None and cur.shape[1] == prev.shape[1] and cur.shape[0] \
                    and prev.shape[0]:
                sampled.append(n)
        if not sampled:
            return out, None
        n_cur = steps[sampled[0]].shape[0]
        m = n_cur + self._prev_steps[sampled[0]].shape[0]
        # NumPy for these small arrays (permutations x 2 windows x E): single-threaded, ~10x faster than torch's
        # thread pool on a busy 2-core machine. The generator is seeded by (seed, step): deterministic.
        rng = np.random.default_rng([self.seed, step])
        perm = rng.random((self.permutations, m)).argsort(axis=1)
        sel = np.zeros((self.permutations, m))
        np.put_along_axis(sel, perm[:, :n_cur], 1.0, axis=1)
        null, scale = [], []
        for n in sampled:
            pooled = torch.cat([steps[n], self._prev_steps[n]])[:, :-1].double().numpy()  # (m, E) increments
            s1 = sel @ pooled
            s2 = pooled.sum(0) - s1
            p1 = s1 / np.maximum(s1.sum(1, keepdims=True), 1e-300)
            p2 = s2 / np.maximum(s2.sum(1, keepdims=True), 1e-300)
            tv = 0.5 * np.abs(p1 - p2).sum(1)  # (permutations,) TV of two windows of the same router
            null.append(tv)
            scale.append(float(np.median(tv)))
        # A deterministic layer has no sampling noise; a monitor-only layer must not widen the gating layers' floor.
        keep = [i for i, (n, med) in enumerate(zip(sampled, scale)) if med > 1e-12 and n not in self.monitor_only]
        c = 0.0
        if keep:
            ratios = np.stack([null[i] / scale[i] for i in keep])  # (layers, permutations)
            c = float(np.quantile(ratios.max(axis=0), 1.0 - self.alpha))
        for n, med in zip(sampled, scale):
            out[n] = max(out[n], c * med)
        return out, c

    def step(self, step: int, layers: Any) -> bool:
        """Call after each optimizer step with the number of steps done (1-based). True once converged.

        Reads (and resets) layer.usage() at checks: every `check_every` steps, and at the cap; with
        noise_floor="permutation" it also keeps a device copy of the usage sums after every step.
        `layers`: (name, layer) pairs of the layers that route (MoELoRALinear, or a test double).
        """
        _int("step", step, 0)
        if self.converged:
            return True
        layers = _usage_layers(layers)
        if self.noise_floor == "permutation":
            self._snapshot(layers)
        at_cap = step >= self.cap_step
        if step - self._last_check < self.check_every and not at_cap:
            return False
        self._last_check = step
        steps = self._window_steps(layers) if self.noise_floor == "permutation" else {}
        usage = self._read(layers)
        per_layer: dict[str, float | None] = {}
        for name, u in usage.items():
            prev = self._prev.get(name)
            if u is None:  # nothing routed in this window: keep the previous distribution, no distance
                per_layer[name] = None
                continue
            per_layer[name] = total_variation(u, prev) if prev is not None and prev.shape == u.shape else None
        thresholds, c = self._thresholds(step, steps, list(per_layer))
        for name, u in usage.items():
            if u is not None:
                self._prev[name] = u
                self.last_usage[name] = u
                if name in steps:
                    self._prev_steps[name] = steps[name]
        gating = [n for n in per_layer if n not in self.monitor_only] or list(per_layer)
        known = [per_layer[n] for n in gating if per_layer[n] is not None]
        # A check whose layers have no previous window (the first one) has no distance and cannot count.
        complete = bool(known) and len(known) == len(gating)
        distance = max(known) if complete else None
        ratio = max(per_layer[n] / thresholds[n] for n in gating) if complete else None
        if self.noise_floor == "none":
            stable = distance is not None and distance < self.eps
        else:
            stable = ratio is not None and ratio <= 1.0
        if stable and step >= self.min_steps:
            self._streak += 1
        else:
            self._streak = 0
        converged = self._streak >= self.patience
        forced = at_cap and not converged
        if converged or forced:
            self.converged_at = step
            self.forced = forced
            logger.info("router convergence at step %d (%s, distance %s, ratio to threshold %s)", step,
                        "forced by the cap" if forced else f"{self.patience} stable checks", distance, ratio)
        self.history.append({"step": step, "distance": distance, "per_layer": per_layer,
                             "thresholds": thresholds, "ratio": ratio, "noise_c": c, "streak": self._streak,
                             "converged": converged or forced, "forced": forced})
        return self.converged

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values and CPU tensors (checkpoint-friendly)."""
        return {"history": self.history, "converged_at": self.converged_at, "forced": self.forced,
                "last_usage": dict(self.last_usage), "prev": dict(self._prev), "streak": self._streak,
                "last_check": self._last_check, "prev_steps": dict(self._prev_steps),
                "snaps": [t.detach().cpu() for t in self._snaps]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.history = list(sd["history"])
        self.converged_at = sd["converged_at"]
        self.forced = bool(sd["forced"])
        self.last_usage = dict(sd["last_usage"])
        self._prev = dict(sd["prev"])
        self._streak = int(sd["streak"])
        self._last_check = int(sd["last_check"])
        # Absent in checkpoints written before the noise floor existed (their detectors used a fixed eps).
        self._prev_steps = dict(sd.get("prev_steps", {}))
        self._snaps = list(sd.get("snaps", []))

    def to(self, device: torch.device | str) -> RouterConvergence:
        """Move the in-window snapshots to `device` (after a checkpoint load), in place; returns self."""
        self._snaps = [t.to(device) for t in self._snaps]
        return self
