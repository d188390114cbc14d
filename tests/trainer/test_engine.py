"""The engine end to end on the tiny preset (igsp-tiny, 3 synthetic tasks): phases, pruning, orthogonality,
frozen history, selector, results and checkpoints. All tests read one shared run (conftest.tiny_run)."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_helpers import read_log

from igsp.config import load_config
from igsp.engine import StepBatchSampler, lr_at
from igsp.metrics import mtil_metrics

CONFIG = load_config("tiny")
T = CONFIG.data.num_tasks
ITERS = CONFIG.train.iterations
C = CONFIG.method.candidates


def _ckpt(run_dir, name):
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def _layers(adapters: dict) -> list[str]:
    return sorted({k[: -len(".A_frozen")] for k in adapters if k.endswith(".A_frozen")})


# ---------------------------------------------------------------------------------------------- unit parts
def test_lr_schedule_warmup_then_cosine():
    # ZSCL's cosine_lr: (step + 1) / warmup ramp, then cosine from the base lr to 0 at the last step.
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_step_batches_are_a_pure_function_of_the_step():
    # Resume correctness rests on this: a sampler started at step 5 yields what a full one yields from step 5;
    # rank shares partition the global batch; every epoch is a permutation (n = 10 not divisible by B = 4).
    full = list(StepBatchSampler(10, 4, seed=3, start=0, stop=8))
    late = list(StepBatchSampler(10, 4, seed=3, start=5, stop=8))
    assert late == full[5:]
    flat = [i for b in full[:5] for i in b]  # 20 positions = epochs 0 and 1
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    r0 = list(StepBatchSampler(10, 4, seed=3, start=0, stop=8, rank=0, world=2))
    r1 = list(StepBatchSampler(10, 4, seed=3, start=0, stop=8, rank=1, world=2))
    for g, a, b in zip(full, r0, r1):
        assert sorted(a + b) == sorted(g) and len(a) == len(b) == 2


# --------------------------------------------------------------------------------------------- whole run
def test_phases_happen_in_order_and_are_logged(tiny_run):
    run_dir, _ = tiny_run
    log = read_log(run_dir)
    for t in range(T):
        ev = [r for r in log if r.get("task") == t]
        kinds = [(r["event"], r.get("action"), r.get("phase")) for r in ev]
        start1 = kinds.index(("phase", "start", 1))
        prune = next(i for i, r in enumerate(ev) if r["event"] == "prune")
        start2 = kinds.index(("phase", "start", 2))
        end = kinds.index(("phase", "end", 2))
        evaluation = next(i for i, r in enumerate(ev) if r["event"] == "eval")
        task_end = next(i for i, r in enumerate(ev) if r["event"] == "task_end")
        assert start1 < prune < start2 < end < evaluation < task_end
        p1_step = ev[prune]["step"]
        steps = [r for r in ev if r["event"] == "step"]
        assert [r["step"] for r in steps] == list(range(CONFIG.train.log_every, ITERS + 1, CONFIG.train.log_every))
        for r in steps:
            assert r["phase"] == (1 if r["step"] <= p1_step else 2)
            for key in ("loss", "lr", "usage", "grad_norms", "images_per_s", "peak_mem_mb"):
                assert key in r, key
            # The regularizer acts in phase 1 of tasks with history only.
            if r["phase"] == 1 and t > 0:
                assert r["reg"] > 0
            else:
                assert r["reg"] == 0
        # The convergence curve: a check every check_every steps until phase 1 ends, logged before pruning.
        checks = [r for r in ev[start1:prune] if r["event"] == "convergence"]
        every = CONFIG.method.check_every
        assert [c["step"] for c in checks] == list(range(every, p1_step + 1, every))
        assert checks[-1]["converged"] and checks[-1]["step"] == p1_step
        assert all("distance" in c and "per_layer" in c for c in checks)


def test_pruning_removes_the_low_mass_candidates(tiny_run):
    run_dir, _ = tiny_run
    log = read_log(run_dir)
    tau = CONFIG.method.tau
    total_removed = 0
    for t in range(T):
        prune = next(r for r in log if r.get("task") == t and r["event"] == "prune")
        start2 = next(r for r in log if r.get("task") == t and r["event"] == "phase" and r["phase"] == 2)
        for name, share in prune["usage"].items():
            removed, kept = prune["removed"][name], prune["kept"][name]
            n_frozen = start2["pool"][name][0]
            candidates = list(range(n_frozen, n_frozen + C))
            assert sorted(removed + kept) == candidates
            assert all(share[e] < tau for e in removed), (name, share, removed)
            # A low-mass candidate survives only as the router's floor (top_k experts when there is no history).
            floor = max(CONFIG.method.min_keep, CONFIG.adapters.top_k - n_frozen)
            by_share = sorted(candidates, key=lambda e: (-share[e], e))[:floor]
            assert all(share[e] >= tau or e in by_share for e in kept), (name, share, kept)
            assert start2["pool"][name][1] == len(kept)
            # Gradient norms of the same window, one per candidate, logged beside the usage.
            assert len(prune["grad_norms"][name]) == C
            total_removed += len(removed)
    assert total_removed > 0  # otherwise this test would check nothing


def test_phase2_updates_are_orthogonal_to_the_historical_bases(tiny_run):
    # Independent of the engine's own bookkeeping: the anchor and bases saved when phase 2 began versus the
    # survivors as frozen after the task. The change must have no component inside span(U).
    run_dir, results = tiny_run
    checked = 0
    for t in range(1, T):
        start = _ckpt(run_dir, f"task{t}_phase1.pt")
        end = _ckpt(run_dir, f"task{t}_phase2.pt")
        state = start["method_state"]
        for name, (a0, b0) in state["anchor"].items():
            S = a0.shape[0]
            if S == 0:
                continue
            a1 = end["adapters"][f"{name}.A_frozen"][-S:]
            b1 = end["adapters"][f"{name}.B_frozen"][-S:]
            U_in, U_out = state["bases"][name]["U_in"].double(), state["bases"][name]["U_out"].double()
            assert U_in.shape[1] > 0 and U_out.shape[1] > 0  # the layer has history: the check has teeth
            da = (a1 - a0).double()  # (S, d_in, r)
            dbt = (b1 - b0).double().transpose(1, 2)  # (S, d_out, r)
            # A survivor the phase-2 router no longer picks gets no gradient and does not move: skip it.
            for delta, U in ((da, U_in), (dbt, U_out)):
                if float(delta.norm()) == 0.0:
                    continue
                assert float((U.T @ delta).norm()) <= 1e-5 * float(delta.norm())
                checked += 1
    assert checked >= 4  # enough layers moved for the check to mean something
    assert all(o["max_relative_inside"] < 1e-5 for o in results["orthogonality"])


def test_historical_experts_are_bitwise_unchanged_by_later_tasks(tiny_run):
    run_dir, _ = tiny_run
    final = _ckpt(run_dir, "latest.pt")["adapters"]
    for t in range(T - 1):
        after = _ckpt(run_dir, f"task{t}_phase2.pt")["adapters"]
        for name in _layers(after):
            F0 = after[f"{name}.A_frozen"].shape[0]
            assert F0 > 0
            for kind in ("A_frozen", "B_frozen"):
                assert torch.equal(final[f"{name}.{kind}"][:F0], after[f"{name}.{kind}"]), (t, name, kind)
            for k in range(t + 1):  # every stored router of a finished task
                w_then = after[f"{name}.routers.{k}.weight"]
                w_now = final[f"{name}.routers.{k}.weight"]
                assert torch.equal(w_now[: w_then.shape[0]], w_then)
                active = final[f"{name}.routers.{k}.active"]
                assert torch.equal(active[: w_then.shape[0]], after[f"{name}.routers.{k}.active"])
                assert not active[w_then.shape[0]:].any()  # later experts never join an old router


def test_selector_routes_trained_tasks_and_falls_back_on_unseen_ones(tiny_run):
    # After task i, test images of a trained task j <= i go to router j; those of the tasks not trained yet
    # (other colours: far from every prototype) fall back to zero-shot (-1).
    _, results = tiny_run
    for i, stats in enumerate(results["selector"]):
        for j, st in enumerate(stats):
            if j <= i:
                assert st["own_task"] >= 0.75, (i, j, st)
            else:
                assert st["zero_shot"] >= 0.75 and st["own_task"] == 0.0, (i, j, st)


def test_results_hold_the_matrix_metrics_and_parameter_accounting(tiny_run):
    run_dir, results = tiny_run
    acc = results["acc"]
    assert len(acc) == T and all(len(r) == T for r in acc)
    assert all(0.0 <= v <= 100.0 for r in acc for v in r)
    assert results["complete"] and results["metrics"] == mtil_metrics(acc)
    assert results["tasks"] == [f"synthetic_{t}" for t in range(T)]
    assert [c["task"] for c in results["convergence"]] == list(range(T))
    # Per task: phase 1 trains router + C candidates per layer, phase 2 router + survivors (fewer or equal).
    p = results["params"]
    log = read_log(run_dir)
    starts = [r for r in log if r["event"] == "phase" and r.get("action") == "start"]
    assert p["trainable_per_task"] == [r["trainable"]["total"] for r in starts if r["phase"] == 1]
    assert p["trainable_phase2_per_task"] == [r["trainable"]["total"] for r in starts if r["phase"] == 2]
    assert all(b <= a for a, b in zip(p["trainable_per_task"], p["trainable_phase2_per_task"]))
    # Total added = stored experts + active router columns + selector, recounted from the final checkpoint.
    ck = _ckpt(run_dir, "latest.pt")
    ad = ck["adapters"]
    experts = sum(v.numel() for k, v in ad.items() if k.endswith(("A_frozen", "B_frozen", "A_train", "B_train")))
    routers = sum(int(ad[k].sum()) * ad[k[: -len("active")] + "weight"].shape[1] for k in ad
                  if k.endswith(".active"))
    selector = ck["selector"]["prototypes"].numel() + ck["selector"]["thresholds"].numel()
    assert p["total_added"] == experts + routers + selector
    assert results["images_per_s"] > 0 and results["wall_time_s"] > 0


def test_checkpoints_are_weights_only_and_hold_no_backbone(tiny_run):
    run_dir, _ = tiny_run
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    assert names == ["latest.pt"] + [f"task{t}_phase{p}.pt" for t in range(T) for p in (1, 2)]
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # atomic writes leave no temporary files
    from igsp.model import create_clip

    backbone = sum(p.numel() for p in create_clip("igsp-tiny", None)[0].parameters())
    for name in names:
        ck = _ckpt(run_dir, name)  # weights_only=True: only tensors, containers and primitives
        assert not any("base_layer" in k for k in ck["adapters"])
        assert not any(k.startswith(("visual.conv1", "token_embedding", "positional_embedding"))
                       for k in ck["adapters"])
        assert sum(v.numel() for v in ck["adapters"].values()) < 0.2 * backbone
    last = _ckpt(run_dir, "latest.pt")
    assert last["progress"]["task"] == T and last["progress"]["stage"] == "begin"
    assert len(last["acc"]) == T and math.isfinite(last["wall_time_s"])


def test_mtil_stream_trains_end_to_end_on_fake_datasets(tmp_path):
    # The MTIL path (torchvision loaders + open_clip's preprocess) on tiny fake copies of three datasets in
    # their real on-disk layouts (tests/data/mtil_fakes.py), 4 steps per task.
    from trainer_helpers import mtil_fakes, run_tiny

    fakes = mtil_fakes()
    root = tmp_path / "data"
    for make in (fakes.make_aircraft, fakes.make_dtd, fakes.make_mnist):
        make(root)
    res = run_tiny(tmp_path / "run", ["data.kind=mtil", f"data.root={root}", "data.tasks=aircraft,dtd,mnist",
                                      "train.iterations=4", "train.batch_size=4", "method.min_steps=0",
                                      "method.check_every=2", "method.selector_prototypes=2"])
    assert res["tasks"] == ["aircraft", "dtd", "mnist"]
    assert res["complete"] and len(res["acc"]) == 3 and all(len(r) == 3 for r in res["acc"])
    assert [e["dataset"] for e in res["selector"][-1]] == ["aircraft", "dtd", "mnist"]
