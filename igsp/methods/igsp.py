"""iGSP (METHOD.md section 3): candidates per task, a subspace-regularized phase 1 that ends when the routers
converge, pruning, an orthogonally projected phase 2, survivors frozen and the historical bases recomputed.

- begin_task: C candidate experts per layer join the pool, active only in the new task's router (which also
  sees every historical expert); a fresh router-convergence detector.
- phase 1: the subspace regularizer (none for the first task), either added to the loss (`reg_mode="loss"`)
  or applied to the parameters after each optimizer step (`"decoupled"`: the out-of-subspace part of every
  candidate shrinks by lr_t * lam per step, igsp.method.subspace.subspace_decay_); per-expert gradient norms
  accumulated over each convergence window (logged beside the usage when pruning); the detector runs after
  every step (every check is logged: the convergence curve).
- end of phase 1: the fraction of each candidate's A and B outside the historical subspace is logged
  ("subspace" event, records["subspace"]); candidates whose routing mass share is below tau are pruned; the
  anchor of phase 2 is taken.
- phase 2: the candidates' gradients are projected onto the orthogonal complement of the historical subspace
  before each step and the parameter change since phase 2 began after each step (Adam's scaling and weight
  decay would otherwise leave the complement).
- end_task: the orthogonality error is recorded, survivors frozen, the historical bases updated: recomputed
  from all frozen experts (`basis="weights"`) or grown, GPM-style, with the task's representations collected
  over a fixed sample budget (`"activations"`: inputs and output gradients, igsp.method.representations).
"""

from __future__ import annotations

from typing import Any

import torch

from igsp.method.convergence import RouterConvergence
from igsp.method.pruning import prune_candidates
from igsp.method.representations import grow_basis, representation_grams
from igsp.method.subspace import (
    LayerBasis,
    compute_bases,
    orthogonality_error,
    outside_fractions,
    project_candidates_,
    snapshot_candidates,
    subspace_decay_,
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
    def _new_detector(self, t: int) -> RouterConvergence:
        cfg = self.trainer.config
        m = cfg.method
        # The text tower encodes the same prompts every step: without router noise its usage has no sampling noise,
        # and its routers oscillate under Adam instead of settling, so by default it is only monitored, unless
        # nothing else routes (RouterConvergence, "Fixed inputs"; docs/method.md section 3).
        names = [n for n, _ in self.routing_layers()]
        text = [n for n in names if not n.startswith("visual.")]
        noisy = cfg.adapters.noise_std > 0 or getattr(cfg.adapters, "noise", "fixed") == "learned"
        monitor = text if m.converge_on == "vision" and len(text) < len(names) else []
        return RouterConvergence(m.check_every, m.eps, m.patience, m.min_steps, m.max_fraction, cfg.train.iterations,
                                 noise_floor=m.noise_floor, alpha=m.alpha, fixed_inputs=[] if noisy else text,
                                 monitor_only=monitor, seed=cfg.train.seed * 1009 + t)

    def begin_task(self, t: int) -> None:
        C = self.trainer.config.method.candidates
        for _, layer in self.layers:
            # Candidates first (inactive in every existing router), then the task's router over the whole pool:
            # it sees the historical experts and the candidates.
            layer.add_experts(C, active_in=[])
            layer.add_router(t)
        self.detector = self._new_detector(t)
        self._gn = {"acc": {}, "count": 0, "last": {}}

    def loss_terms(self, t: int, phase: int) -> torch.Tensor | None:
        m = self.trainer.config.method
        if phase == 1 and t > 0 and m.reg_mode == "loss":
            return subspace_regularizer(self.layers, self.bases, m.lam)
        return None

    def before_step(self, t: int, phase: int) -> None:
        if phase == 1:
            self._accumulate_grad_norms()
        else:
            project_candidates_(self.layers, self.bases, grads=True)

    def after_step(self, t: int, phase: int) -> None:
        m = self.trainer.config.method
        if phase == 2:
            project_candidates_(self.layers, self.bases, anchor=self.anchor, grads=False)
        elif t > 0 and m.reg_mode == "decoupled" and m.lam > 0:
            opt = self.trainer.optimizer
            assert opt is not None
            subspace_decay_(self.layers, self.bases, opt.param_groups[0]["lr"] * m.lam)

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
                                        "per_layer": rec["per_layer"], "thresholds": rec["thresholds"],
                                        "ratio": rec["ratio"], "streak": rec["streak"],
                                        "converged": rec["converged"], "forced": rec["forced"]})
        return converged

    def end_phase(self, t: int, phase: int, step: int) -> None:
        """End of phase 1: prune on the converged usage, record convergence and pruning, take the anchor."""
        cfg = self.trainer.config
        det = self.detector
        assert det is not None
        report: dict[str, Any] = {}
        grad_norms = dict(self._gn["last"])
        outside = outside_fractions(self.layers, self.bases)  # before pruning: every candidate
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
        if outside:
            self._record_outside(t, step, outside, {n: r["kept"] for n, r in report.items()})
        self.anchor = snapshot_candidates(self.layers)

    def _record_outside(self, t: int, step: int, outside: dict[str, dict[str, Any]],
                        kept: dict[str, list[int]]) -> None:
        """Log each candidate's out-of-subspace fractions and record their means (all, survivors, random)."""
        self.trainer.log.write({"event": "subspace", "task": t, "task_name": self.trainer.task_names[t],
                                "step": step, "phase": 1, "outside": outside, "kept": kept})
        frozen = {n: layer.num_frozen for n, layer in self.layers}

        def mean(side: str, survivors: bool) -> float | None:
            vals = [v for n, e in outside.items() for c, v in enumerate(e[side])
                    if v is not None and (not survivors or frozen[n] + c in kept.get(n, []))]
            return sum(vals) / len(vals) if vals else None

        self.trainer.records.setdefault("subspace", []).append({
            "task": t, "step": step,
            "A_outside": mean("A", False), "B_outside": mean("B", False),
            "A_outside_survivors": mean("A", True), "B_outside_survivors": mean("B", True),
            "A_random": sum(e["A_random"] for e in outside.values()) / len(outside),
            "B_random": sum(e["B_random"] for e in outside.values()) / len(outside)})

    def end_task(self, t: int) -> None:
        m = self.trainer.config.method
        if self.anchor is not None and t > 0:
            err = orthogonality_error(self.layers, self.bases, self.anchor)
            self.trainer.records["orthogonality"].append({"task": t, "max_relative_inside": err})
        # Representations before freezing: the task's router and survivors still require grad, so the loss
        # reaches every adapted layer's output.
        grams = self._representation_grams(t) if m.basis == "activations" else None
        for _, layer in self.layers:
            layer.freeze_experts(layer.trainable_expert_ids())
        if grams is None:
            self.bases = compute_bases(self.layers, m.energy)
        else:
            self.bases = {n: LayerBasis(grow_basis(self.bases[n].U_in, K_in, m.energy),
                                        grow_basis(self.bases[n].U_out, K_out, m.energy))
                          for n, (K_in, K_out) in grams.items()}
        sizes = {n: [b.m_in, b.m_out] for n, b in self.bases.items()}
        self.trainer.log.write({"event": "basis", "task": t, "task_name": self.trainer.task_names[t],
                                "source": m.basis, "m_in_m_out": sizes})
        dims = {n: [layer.in_features, layer.out_features] for n, layer in self.layers}
        self.trainer.records.setdefault("bases", []).append({
            "task": t, "source": m.basis,
            "m_in_fraction": sum(v[0] for v in sizes.values()) / sum(d[0] for d in dims.values()),
            "m_out_fraction": sum(v[1] for v in sizes.values()) / sum(d[1] for d in dims.values())})
        self.anchor, self.detector = None, None

    def _representation_grams(self, t: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Input / output-gradient Grams of every layer over task t's basis sample budget (eval mode: no router
        noise, no usage recorded; the global RNG is not drawn from)."""
        trainer = self.trainer
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            def losses() -> Any:
                for images, labels, n in trainer.task_batches(t, trainer.config.method.basis_samples):
                    yield lambda images=images, labels=labels, n=n: trainer.task_loss(t, images, labels, n)

            return representation_grams(self.layers, losses(), all_reduce=trainer.all_reduce_)
        finally:
            model.train(was_training)

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
                self.detector = self._new_detector(progress["task"])
                self.detector.load_state_dict(state["detector"])
                self.detector.to(dev)
            if state["anchor"] is not None:
                self.anchor = {n: (a.to(dev), b.to(dev)) for n, (a, b) in state["anchor"].items()}
