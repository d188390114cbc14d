"""iGSP (METHOD.md section 3): candidates per task, a subspace-regularized phase 1 that ends when the routers
converge, pruning, an orthogonally projected phase 2, survivors frozen and the historical bases recomputed.

- begin_task: C candidate experts per layer join the pool, active only in the new task's router (which also
  sees every historical expert); a fresh router-convergence detector.
- phase 1: loss + the subspace regularizer (none for the first task); per-expert gradient norms accumulated
  over each convergence window (logged beside the usage when pruning); the detector runs after every step
  (every check is logged: the convergence curve).
- end of phase 1: candidates whose routing mass share is below tau are pruned; the anchor of phase 2 is taken.
- phase 2: the candidates' gradients are projected onto the orthogonal complement of the historical subspace
  before each step and the parameter change since phase 2 began after each step (Adam's scaling and weight
  decay would otherwise leave the complement).
- end_task: the orthogonality error is recorded, survivors frozen, bases recomputed.
"""

from __future__ import annotations

from typing import Any

import torch

from igsp.method.convergence import RouterConvergence
from igsp.method.pruning import prune_candidates
from igsp.method.subspace import (
    LayerBasis,
    compute_bases,
    orthogonality_error,
    project_candidates_,
    snapshot_candidates,
    subspace_regularizer,
)
from igsp.methods.base import Method, PlanLayer, TrainerView

__all__ = ["IGSPMethod"]


class IGSPMethod(Method):
    name = "igsp"
    phases = 2

    def __init__(self, trainer: TrainerView) -> None:
        super().__init__(trainer)
        self.bases: dict[str, LayerBasis] = compute_bases(self.layers, trainer.config.method.energy)
        self.anchor: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.detector: RouterConvergence | None = None
        # Per-expert gradient norms summed over the current convergence window ("acc", "count") and the mean
        # of the last finished window ("last"): logged beside the usage shares when pruning.
        self._gn: dict[str, Any] = {"acc": {}, "count": 0, "last": {}}

    # ------------------------------------------------------------------------------ configuration
    @classmethod
    def validate_config(cls, config: Any) -> None:
        from igsp.config import _bad

        if config.adapters.num_experts != 0:
            raise _bad("adapters.num_experts", config.adapters.num_experts,
                       "0 with method.name='igsp' (candidates come per task: method.candidates)")
        if config.method.candidates < config.adapters.top_k:
            raise _bad("method.candidates", config.method.candidates,
                       f"an int >= adapters.top_k ({config.adapters.top_k}): the first task routes over candidates "
                       "only")

    @classmethod
    def plan_task(cls, config: Any, layers: list[PlanLayer], survival: float) -> dict[str, int | None]:
        """C candidates per layer, `round(survival * C)` survive (at least what top_k needs without history)."""
        C, top_k = config.method.candidates, config.adapters.top_k
        p1 = p2 = 0
        for lay in layers:
            F_, keep = lay.frozen, min(C, max(round(survival * C), top_k - lay.frozen, 0))
            p1 += (F_ + C) * lay.router_size + C * lay.expert_size
            p2 += (F_ + keep) * lay.router_size + keep * lay.expert_size
            lay.routers.append(F_ + keep)
            lay.frozen += keep
            lay.pool = lay.frozen
        return {"phase1": p1, "phase2": p2}

    # ------------------------------------------------------------------------------ the task loop
    def _new_detector(self) -> RouterConvergence:
        m, iters = self.trainer.config.method, self.trainer.config.train.iterations
        return RouterConvergence(m.check_every, m.eps, m.patience, m.min_steps, m.max_fraction, iters)

    def begin_task(self, t: int) -> None:
        C = self.trainer.config.method.candidates
        for _, layer in self.layers:
            # Candidates first (inactive in every existing router), then the task's router over the whole pool:
            # it sees the historical experts and the candidates.
            layer.add_experts(C, active_in=[])
            layer.add_router(t)
        self.detector = self._new_detector()
        self._gn = {"acc": {}, "count": 0, "last": {}}

    def loss_terms(self, t: int, phase: int) -> torch.Tensor | None:
        if phase == 1 and t > 0:
            return subspace_regularizer(self.layers, self.bases, self.trainer.config.method.lam)
        return None

    def before_step(self, t: int, phase: int) -> None:
        if phase == 1:
            self._accumulate_grad_norms()
        else:
            project_candidates_(self.layers, self.bases, grads=True)

    def after_step(self, t: int, phase: int) -> None:
        if phase == 2:
            project_candidates_(self.layers, self.bases, anchor=self.anchor, grads=False)

    @torch.no_grad()
    def _accumulate_grad_norms(self) -> None:
        """Per-expert ||dA||+||dB|| summed over the convergence window (on the device: no host sync)."""
        acc = self._gn["acc"]
        for name, layer in self.layers:
            C = layer.num_trainable
            if C == 0:
                continue
            n = torch.zeros(C, dtype=torch.float64, device=layer.device)
            for p in (layer.A_train, layer.B_train):
                if p.grad is not None:
                    n += p.grad.detach().double().reshape(C, -1).norm(dim=1)
            acc[name] = acc[name] + n if name in acc and acc[name].shape == n.shape else n
        self._gn["count"] += 1

    def phase_done(self, t: int, phase: int, step: int) -> bool:
        """Run the detector after a phase-1 step and log its new checks; True when it fires."""
        det = self.detector
        assert det is not None
        before = len(det.history)
        converged = det.step(step, self.routing_layers())
        if len(det.history) > before:
            count = max(self._gn["count"], 1)
            self._gn["last"] = {n: [float(v) / count for v in a.tolist()] for n, a in self._gn["acc"].items()}
            self._gn["acc"], self._gn["count"] = {}, 0
            for rec in det.history[before:]:
                self.trainer.log.write({"event": "convergence", "task": t, "task_name": self.trainer.task_names[t],
                                        "step": rec["step"], "phase": 1, "distance": rec["distance"],
                                        "per_layer": rec["per_layer"], "streak": rec["streak"],
                                        "converged": rec["converged"], "forced": rec["forced"]})
        return converged

    def end_phase(self, t: int, phase: int, step: int) -> None:
        """End of phase 1: prune on the converged usage, record convergence and pruning, take the anchor."""
        cfg = self.trainer.config
        det = self.detector
        assert det is not None
        report: dict[str, Any] = {}
        grad_norms = dict(self._gn["last"])
        removed = prune_candidates(self.layers, dict(det.last_usage), cfg.method.tau,
                                   rank_energy=cfg.method.rank_energy, min_keep=cfg.method.min_keep, report=report,
                                   followers=self.followers)
        self.trainer.log.write({"event": "prune", "task": t, "task_name": self.trainer.task_names[t], "step": step,
                                "phase": 1, "tau": cfg.method.tau,
                                "usage": {n: r["share"] for n, r in report.items()},
                                "grad_norms": grad_norms, "removed": removed,
                                "kept": {n: r["kept"] for n, r in report.items()},
                                "rank_zeroed": {n: r["rank_zeroed"] for n, r in report.items() if r["rank_zeroed"]}})
        n_cand = cfg.method.candidates * len(self.layers)
        n_removed = sum(len(v) for v in removed.values())
        records = self.trainer.records
        records["prune"].append({"task": t, "step": step, "candidates": n_cand, "removed": n_removed,
                                 "survivors": n_cand - n_removed,
                                 "survivors_per_layer": {n: layer.num_trainable for n, layer in self.layers}})
        records["convergence"].append({"task": t, "converged_at": det.converged_at, "forced": det.forced,
                                       "history": det.history})
        self.anchor = snapshot_candidates(self.layers)

    def end_task(self, t: int) -> None:
        if self.anchor is not None and t > 0:
            err = orthogonality_error(self.layers, self.bases, self.anchor)
            self.trainer.records["orthogonality"].append({"task": t, "max_relative_inside": err})
        for _, layer in self.layers:
            layer.freeze_experts(layer.trainable_expert_ids())
        self.bases = compute_bases(self.layers, self.trainer.config.method.energy)
        self.anchor, self.detector = None, None

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "bases": {n: b.state_dict() for n, b in self.bases.items()},
            "anchor": ({n: [a.cpu(), b.cpu()] for n, (a, b) in self.anchor.items()}
                       if self.anchor is not None else None),
            "detector": self.detector.state_dict() if self.detector is not None else None,
            "grad_window": {"acc": {n: a.cpu() for n, a in self._gn["acc"].items()}, "count": self._gn["count"],
                            "last": self._gn["last"]},
        }

    def load_state_dict(self, state: dict[str, Any], progress: dict[str, Any]) -> None:
        dev = self.trainer.device
        self.bases = {n: LayerBasis(b["U_in"].to(dev), b["U_out"].to(dev)) for n, b in state["bases"].items()}
        gw = state["grad_window"]
        self._gn = {"acc": {n: a.to(dev) for n, a in gw["acc"].items()}, "count": int(gw["count"]),
                    "last": dict(gw["last"])}
        self.anchor, self.detector = None, None
        if progress["stage"] == "train":
            if progress["phase"] == 1:
                self.detector = self._new_detector()
                self.detector.load_state_dict(state["detector"])
            if state["anchor"] is not None:
                self.anchor = {n: (a.to(dev), b.to(dev)) for n, (a, b) in state["anchor"].items()}
