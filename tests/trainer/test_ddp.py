"""Distributed data parallel: `torchrun --nproc_per_node 2 -m igsp.cli train` on CPU (gloo) reproduces the
one-process run: each rank computes half of every global batch; gradients and usage counts are summed.

The two computations differ only by fp32 summation order (~1e-7 relative), but top-k routing is discrete:
once a near tie between two experts' logits flips for one sample, the runs take different (equally valid)
paths (measured: 0.4% apart in gradient norm 4 steps after a flip, 20-60% apart in weights after a task).
So the comparison is split where the computation is continuous:
1. A whole 2-task run, DDP vs one process. Task 0 uses top_k = candidates = 2: every sample routes to every
   candidate, so its end state (experts, routers, selector prototypes built from all-gathered features),
   its losses and gradient norms must match tightly, and so must the structural decisions and counts.
2. Task 1 (4 experts, top-2: discrete) from one common checkpoint (task 1, phase 1, step 3): one process
   and two ranks each resume it for one step, computed from identical parameters; loss, regularizer,
   gradient norm (pre-clip: Adam is blind to a gradient's scale, so a sum-instead-of-mean error shows only
   there), per-expert gradient norms and usage must match tightly. (One step only: AdamW turns fp32 noise on
   coordinates whose true gradient is ~0 into O(lr) moves, so even step 5 already differs by 1e-3 in usage.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import read_log, run_tiny

from igsp.engine import KILL_ENV, KILL_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
ITERS = 12
SHORT = ["data.num_tasks=2", f"train.iterations={ITERS}", "method.check_every=3", "method.min_steps=3",
         "train.checkpoint_every=3", "train.log_every=1", "method.candidates=2", "adapters.top_k=2",
         "method.tau=0.0"]
SETS = [a for o in SHORT for a in ("--set", o)]
STEP_KEYS = ("loss", "ce", "reg", "grad_norm")


def _env(kill_at: int | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    return env


def _torchrun(*args: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "igsp.cli", "-q", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(kill_at), capture_output=True, text=True, timeout=400)


def _single(*args: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "igsp", "-q", *args], cwd=REPO, env=_env(kill_at),
                          capture_output=True, text=True, timeout=300)


def _steps(run_dir: Path, task: int) -> list[dict]:
    return [r for r in read_log(run_dir) if r["event"] == "step" and r["task"] == task]


@pytest.mark.slow
def test_whole_run_two_gloo_ranks_match_one_process(tmp_path):
    ref_dir = tmp_path / "one"
    ref = run_tiny(ref_dir, SHORT)
    out = tmp_path / "ddp"
    proc = _torchrun("train", "tiny", "--output", str(out), *SETS)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and len(res["acc"]) == 2
    # Same structural decisions (convergence step, survivors) and the same parameter counts.
    assert [c["converged_at"] for c in res["convergence"]] == [c["converged_at"] for c in ref["convergence"]]
    assert [p["survivors_per_layer"] for p in res["prune"]] == [p["survivors_per_layer"] for p in ref["prune"]]
    assert res["params"]["total_added"] == ref["params"]["total_added"]
    # Task 0 (continuous routing). 12 AdamW steps at lr 5e-3: a rank training on the wrong shard moves weights
    # by ~1e-2 (checked by mutation); the measured summation-order noise is 7e-6 (Adam amplifies it where
    # gradients are tiny), hence atol 1e-4.
    a = torch.load(out / "checkpoints" / "task0_phase2.pt", weights_only=True)
    b = torch.load(ref_dir / "checkpoints" / "task0_phase2.pt", weights_only=True)
    assert a["adapters"].keys() == b["adapters"].keys()
    for k in a["adapters"]:
        torch.testing.assert_close(a["adapters"][k], b["adapters"][k], rtol=1e-4, atol=1e-4, msg=k)
    torch.testing.assert_close(a["selector"]["prototypes"], b["selector"]["prototypes"], rtol=1e-4, atol=1e-5)
    s0 = [[[r[k] for k in STEP_KEYS] for r in _steps(d, 0)] for d in (out, ref_dir)]
    assert len(s0[0]) == len(s0[1]) == ITERS
    torch.testing.assert_close(torch.tensor(s0[0]), torch.tensor(s0[1]), rtol=1e-3, atol=1e-6)
    # Accuracy after task 0 (evaluated with all_reduced counts over the two ranks' shards): one test image
    # (of 64: 1.5625 points) may flip on a near tie.
    assert all(abs(x - y) <= 100 / 64 + 1e-9 for x, y in zip(res["acc"][0], ref["acc"][0]))
    # Only rank 0 wrote: one step record per step.
    assert len(_steps(out, 1)) == len(_steps(ref_dir, 1)) == ITERS


@pytest.mark.slow
def test_task1_steps_from_a_common_checkpoint_match(tmp_path):
    base = tmp_path / "base"
    # One process, killed after step 4 of task 1: latest.pt is task 1, phase 1, step 3 (checkpoint_every=3).
    proc = _single("train", "tiny", "--output", str(base), *SETS, kill_at=ITERS + 4)
    assert proc.returncode == KILL_EXIT_CODE, proc.stderr[-3000:]
    ck = torch.load(base / "checkpoints" / "latest.pt", weights_only=True)
    assert (ck["progress"]["task"], ck["progress"]["phase"], ck["progress"]["step"]) == (1, 1, 3)
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(base, one)
    shutil.copytree(base, two)
    p1 = _single("train", "--resume", str(one), kill_at=ITERS + 4)
    assert p1.returncode == KILL_EXIT_CODE, p1.stderr[-3000:]
    p2 = _torchrun("train", "--resume", str(two), kill_at=ITERS + 4)
    assert p2.returncode != 0  # the hook exits both ranks with 75; torchrun reports the failure
    r1 = [r for r in _steps(one, 1) if r["step"] >= 4]
    r2 = [r for r in _steps(two, 1) if r["step"] >= 4]
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [4], p2.stderr[-3000:]
    assert all(r["phase"] == 1 and r["reg"] > 0 for r in r1)  # the regularizer is part of what is compared
    for x, y in zip(r1, r2):
        torch.testing.assert_close(torch.tensor([x[k] for k in STEP_KEYS]), torch.tensor([y[k] for k in STEP_KEYS]),
                                   rtol=1e-4, atol=1e-7)
        for name in x["usage"]:
            torch.testing.assert_close(torch.tensor(x["usage"][name]), torch.tensor(y["usage"][name]),
                                       rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(torch.tensor(x["grad_norms"][name]), torch.tensor(y["grad_norms"][name]),
                                       rtol=1e-3, atol=1e-7, msg=name)


@pytest.mark.slow
def test_ddp_run_into_a_locked_folder_stops_every_rank(tmp_path):
    # Only rank 0 locks; it broadcasts the refusal, so rank 1 stops with the same error instead of waiting in a
    # collective for a rank 0 that has gone (torchrun would otherwise only notice at its timeout).
    from igsp.runlock import RunLock

    run = tmp_path / "run"
    with RunLock(run):  # this test process plays the live run holding the folder
        proc = _torchrun("train", "tiny", "--output", str(run), *SETS)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("igsp train")]
    assert any(line.startswith("igsp train: error: cannot start a run in") and str(run) in line for line in lines)
    assert any(line.startswith("igsp train (rank 1): error: cannot start a run in") for line in lines), lines
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"]  # nothing written
