"""The igsp options of issue 12 end to end on the tiny preset: activation bases, the decoupled regularizer and
block routers in one run; their state (bases, detector windows) survives a checkpoint bit for bit."""

from __future__ import annotations

import shutil

import pytest
import torch
from trainer_helpers import read_log, resume_in_process, run_tiny, same_adapters

# Two tasks of 16 steps (phase 1 ends by step 8 at the latest): enough for a basis to grow twice and for a
# regularized phase 1 with history, at about half the cost of the full tiny preset.
OPTIONS = ["method.basis=activations", "method.reg_mode=decoupled", "method.lam=4",
           "adapters.router_placement=block", "method.basis_samples=24", "data.num_tasks=2", "train.iterations=16"]


@pytest.fixture(scope="module")
def options_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("options") / "run"
    return run_dir, run_tiny(run_dir, OPTIONS)


def test_activation_bases_grow_and_are_checkpointed(options_run):
    run_dir, res = options_run
    log = read_log(run_dir)
    basis = [r for r in log if r["event"] == "basis"]
    assert [r["task"] for r in basis] == [0, 1] and all(r["source"] == "activations" for r in basis)
    # GPM growth: a layer's basis never shrinks from one task to the next, and the first task creates one.
    for prev, cur in zip(basis, basis[1:]):
        for name, (m_in, m_out) in cur["m_in_m_out"].items():
            assert m_in >= prev["m_in_m_out"][name][0] and m_out >= prev["m_in_m_out"][name][1]
    assert all(m_in > 0 and m_out > 0 for m_in, m_out in basis[0]["m_in_m_out"].values())
    ck = torch.load(run_dir / "checkpoints" / "task0_phase2.pt", weights_only=True)
    for name, (m_in, m_out) in basis[0]["m_in_m_out"].items():
        U = ck["method_state"]["bases"][name]
        assert (U["U_in"].shape[1], U["U_out"].shape[1]) == (m_in, m_out)
        torch.testing.assert_close(U["U_in"].T @ U["U_in"], torch.eye(m_in), atol=1e-5, rtol=0)
    assert [b["task"] for b in res["bases"]] == [0, 1]


def test_decoupled_regularizer_and_diagnostics(options_run):
    run_dir, res = options_run
    # Nothing is added to the loss in decoupled mode; the out-of-subspace fractions are logged for every task
    # with history, per candidate, with the random-matrix reference.
    steps = [r for r in read_log(run_dir) if r["event"] == "step"]
    assert all(r["reg"] == 0.0 for r in steps)
    sub = res["subspace"]
    assert [s["task"] for s in sub] == [1]
    for s in sub:
        assert 0.0 <= s["A_outside"] <= 1.0 and 0.0 < s["A_random"] <= 1.0
    events = [r for r in read_log(run_dir) if r["event"] == "subspace"]
    assert all(len(v["A"]) == 4 for e in events for v in e["outside"].values())  # C = 4 candidates per layer
    # Block routing: c_proj layers have no routers, c_fc's is the block's; pools mirror each other.
    ck = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["adapters"]
    assert not any(".mlp.c_proj.routers." in k for k in ck)
    for k in ck:
        if k.endswith("mlp.c_fc.A_frozen"):
            assert ck[k].shape[0] == ck[k.replace("c_fc", "c_proj")].shape[0]


def test_options_resume_bit_for_bit(options_run, tmp_path):
    # Resume from the end of task 0 (its activation bases exist only in the checkpoint: nothing could recompute
    # them) and from the start of task 1's phase 2 (bases, anchor). Mid-window detector state (its per-step
    # snapshots) is covered by test_resume.py's kill at step 9 (last checkpoint at step 6).
    ref_dir, ref = options_run
    for ckpt in ("task0_phase2.pt", "task1_phase1.pt"):
        run = tmp_path / ckpt
        shutil.copytree(ref_dir, run)
        shutil.copy(ref_dir / "checkpoints" / ckpt, run / "checkpoints" / "latest.pt")
        (run / "results.json").unlink()
        res = resume_in_process(run)
        assert res["acc"] == ref["acc"]
        assert res["subspace"] == ref["subspace"] and res["bases"] == ref["bases"]
        assert [c["converged_at"] for c in res["convergence"]] == [c["converged_at"] for c in ref["convergence"]]
        assert same_adapters(run, ref_dir)
