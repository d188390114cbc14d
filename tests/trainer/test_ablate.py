"""`igsp ablate`: grid planning, aggregation (mean ± sd), idempotent reruns and resuming killed runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from igsp.ablate import aggregate, markdown, parse_grid, plan_runs
from igsp.cli import main
from igsp.engine import KILL_ENV


def test_parse_grid_and_plan():
    grid = parse_grid(["method.lam=0,0.1", "adapters.router_placement=layer,block"])
    assert grid == [("method.lam", ["0", "0.1"]), ("adapters.router_placement", ["layer", "block"])]
    runs = plan_runs(Path("/x"), grid, [0, 1], ["train.iterations=3"], "train.seed")
    assert len(runs) == 8
    first = runs[0]
    assert first.run_dir == Path("/x/runs/method.lam=0__adapters.router_placement=layer/seed0")
    assert first.overrides == ["train.iterations=3", "method.lam=0", "adapters.router_placement=layer",
                               "train.seed=0"]
    assert [r.seed for r in runs[:2]] == [0, 1]
    for bad in (["lam=0,1"], ["method.lam="], ["method.lam=0,0"], ["method.lam=0", "method.lam=1"]):
        with pytest.raises(ValueError, match="--grid"):
            parse_grid(bad)
    with pytest.raises(ValueError, match="seed-key"):
        plan_runs(Path("/x"), parse_grid(["train.seed=1,2"]), [0], [], "train.seed")


def _fake_results(run_dir: Path, transfer: float, avg: float, last: float, forced: list[bool]) -> None:
    run_dir.mkdir(parents=True)
    res = {"complete": True, "metrics": {"transfer": transfer, "avg": avg, "last": last},
           "params": {"trainable_avg": 1000.0, "total_added": 5000},
           "convergence": [{"task": i, "converged_at": 100 if f else 60, "forced": f} for i, f in enumerate(forced)],
           "subspace": [{"task": 1, "A_outside": transfer / 100, "B_outside": 0.25}]}
    (run_dir / "results.json").write_text(json.dumps(res))
    # cap = ceil(0.5 * 200) = 100: a phase 1 converged at 60 ended before it, a forced one at it
    (run_dir / "config.json").write_text(json.dumps({"method": {"max_fraction": 0.5}, "train": {"iterations": 200}}))


def test_aggregate_mean_and_sample_sd(tmp_path):
    runs = plan_runs(tmp_path, parse_grid(["method.lam=0,1"]), [0, 1, 2], [], "train.seed")
    vals = [(10.0, 20.0, 30.0), (12.0, 22.0, 33.0), (14.0, 24.0, 36.0)]
    for run, (t, a, l_) in zip(runs[:3], vals):
        _fake_results(run.run_dir, t, a, l_, [True, False])
    _fake_results(runs[3].run_dir, 50.0, 60.0, 70.0, [False, False])  # cell lam=1: one run of three
    cells = aggregate(runs, failed={str(runs[4].run_dir): "exit code 75"})
    lam0, lam1 = cells
    s = lam0["summary"]
    assert s["runs"] == 3 and s["planned"] == 3
    assert s["transfer"]["mean"] == pytest.approx(12.0) and s["transfer"]["sd"] == pytest.approx(2.0)
    assert s["last"]["sd"] == pytest.approx(3.0)
    assert s["phase1_steps"]["mean"] == pytest.approx(80.0)
    assert (s["early"], s["forced"], s["phase1s"]) == (3, 3, 6)
    assert lam1["summary"]["runs"] == 1 and lam1["summary"]["transfer"]["sd"] is None
    assert [r["status"] for r in lam1["runs"]] == ["done", "failed", "missing"]
    text = markdown("tiny", cells, [0, 1, 2], "igsp ablate tiny")
    row = "| `0` | 3/3 | 12.0 ± 2.0 | 22.0 ± 2.0 | 33.0 ± 3.0 | 1,000 | 5,000 | 80 ± 0 | 3 / 3 / 6 | 0.12 / 0.25 |"
    assert row in text
    assert "| `1` | 1/3 | 50.0 |" in text
    assert "method.lam=1 seed 1 (failed)" in text and "seed 2 (missing)" in text


@pytest.mark.slow
def test_ablate_resumes_killed_runs_and_is_idempotent(tmp_path, monkeypatch, capsys):
    # Two cells x one seed of the tiny preset, 4 steps per task, 2 tasks. First every run is killed at step 3
    # (the engine's test hook, inherited by the children): exit 1, nothing finished. The same command then
    # resumes both from their phase-1 checkpoint (step 2) and aggregates; a third call trains nothing.
    args = ["ablate", "tiny", "--seeds", "1", "--grid", "method.reg_mode=loss,decoupled", "--jobs", "2",
            "--set", "train.iterations=4", "--set", "data.num_tasks=2", "--output", str(tmp_path)]
    monkeypatch.setenv(KILL_ENV, "3")
    assert main(args) == 1
    report = json.loads((tmp_path / "ablation.json").read_text())
    assert all(r["status"] == "failed" for c in report["cells"] for r in c["runs"])
    monkeypatch.delenv(KILL_ENV)
    assert main(args) == 0
    report = json.loads((tmp_path / "ablation.json").read_text())
    assert [c["summary"]["runs"] for c in report["cells"]] == [1, 1]
    for c in report["cells"]:
        run_dir = Path(c["runs"][0]["run_dir"])
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        assert sum(r["event"] == "resume" for r in log) == 1
        res = json.loads((run_dir / "results.json").read_text())
        assert c["runs"][0]["last"] == res["metrics"]["last"] and math.isfinite(res["metrics"]["last"])
        assert json.loads((run_dir / "config.json").read_text())["method"]["reg_mode"] == c["cell"]["method.reg_mode"]
    table = (tmp_path / "ablation.md").read_text()
    assert "| `loss` | 1/1 |" in table and "| `decoupled` | 1/1 |" in table
    assert f"Command: `igsp ablate tiny --seeds 1 --grid method.reg_mode=loss,decoupled --set train.iterations=4 " \
           f"--set data.num_tasks=2 --jobs 2 --output {tmp_path}`" in table
    mtimes = {p: p.stat().st_mtime for p in tmp_path.rglob("results.json")}
    capsys.readouterr()
    assert main(args) == 0
    assert {p: p.stat().st_mtime for p in tmp_path.rglob("results.json")} == mtimes
    assert "| `loss` | 1/1 |" in capsys.readouterr().out


def test_ablate_rejects_a_bad_grid_before_running(tmp_path, capsys):
    assert main(["ablate", "tiny", "--grid", "method.reg_mode=loss,sideways", "--output", str(tmp_path)]) == 2
    assert "method.reg_mode" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("flag", "value", "expected"), [("--seeds", "0", ">= 1"), ("--jobs", "0", ">= 1"),
                                                      ("--first-seed", "-1", ">= 0")])
def test_ablate_names_a_bad_count(tmp_path, capsys, flag, value, expected):
    assert main(["ablate", "tiny", flag, value, "--output", str(tmp_path)]) == 2
    assert f"igsp ablate: error: {flag}: got {value}; expected an int {expected}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing started


def test_each_run_gets_one_device_to_itself(tmp_path, monkeypatch):
    # --devices 3,5: two runs at a time, each child process sees exactly one GPU id (CUDA_VISIBLE_DEVICES) that
    # no other running child has. The children are stubs that record their environment (no training), so the
    # runs end "missing" (no results.json).
    import subprocess
    import threading
    import time

    from igsp import ablate

    seen, active, lock = [], set(), threading.Lock()

    def fake_run(argv, stdout, stderr, env):
        device = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert device not in active, f"device {device} given to two runs at once"
            active.add(device)
            seen.append(device)
        time.sleep(0.05)
        with lock:
            active.discard(device)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(ablate.subprocess, "run", fake_run)
    report = ablate.run_ablation("tiny", parse_grid(["method.lam=0,1"]), [0, 1], tmp_path, devices=["3", "5"])
    assert len(seen) == 4 and set(seen) == {"3", "5"}
    assert all(r["status"] == "missing" for c in report["cells"] for r in c["runs"])
