"""igsp.report: tables, figures and JSON summary from run directories built the way the engine writes them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from igsp.metrics import mtil_metrics
from igsp.report import (
    PUBLISHED_MTIL,
    RunDirError,
    convergence_curves,
    load_run,
    main,
    run_report,
    usage_matrix,
)

# 3 tasks: the smallest stream where Transfer averages over more than one earlier row (column 2 has rows 0, 1)
# and every metric differs (Transfer 36.25, Avg 62.78, Last 75.00: a swapped column would show).
ACC = [[80.0, 40.0, 30.0],
       [70.0, 85.0, 35.0],
       [60.0, 75.0, 90.0]]
TASKS = ["Aircraft", "Caltech101", "CIFAR100"]


def _config(method: str, kind: str = "synthetic", **data: Any) -> dict[str, Any]:
    return {"name": f"{method}-test", "model": {"name": "igsp-tiny", "pretrained": None},
            "method": {"name": method, "eps": 0.05},
            "data": {"kind": kind, "order": "I", "tasks": None, "few_shot": None, **data},
            "train": {"iterations": 60}}


def _convergence(task: int, converged_at: int) -> dict[str, Any]:
    # The first check has no previous window: distance None (RouterConvergence.history), then a falling curve.
    steps = list(range(20, converged_at + 1, 20))
    dists = [None] + [0.5 / k for k in range(1, len(steps))]
    return {"task": task, "converged_at": converged_at,
            "history": [{"step": s, "distance": d, "per_layer": {}, "forced": False} for s, d in zip(steps, dists)]}


def make_run(root: Path, name: str, method: str = "igsp", *, acc: list[list[float]] = ACC, kind: str = "synthetic",
             convergence: list[dict] | None = None, usage: list | None = None,
             events: list[dict] | None = None, params: dict | None = None, **data: Any) -> Path:
    """A run directory with config.json, log.jsonl and results.json as TRAINER_API.md lays them out."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(_config(method, kind, **data)))
    events = events if events is not None else [
        {"event": "step", "task": 0, "task_name": TASKS[0], "step": 10, "phase": 1, "loss": 1.2, "lr": 1e-3,
         "images_per_s": 100.0}]
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    results = {"method": method, "tasks": TASKS[: len(acc[0])], "acc": acc,
               "params": params if params is not None else {
                   "trainable_per_task": [1000, 1500, 2000], "trainable_phase2_per_task": [500, 700, 900],
                   "trainable_avg": 1500.0, "total_added": 123456},
               "wall_time_s": 3725.0, "images_per_s": 812.5}
    # The engine stores metrics only for a complete (square) matrix; partial and malformed ones get null.
    square = all(len(row) == len(acc) for row in acc)
    results["complete"] = square
    results["metrics"] = mtil_metrics(acc) if square else None
    if convergence is not None:
        results["convergence"] = convergence
    if usage is not None:
        results["usage"] = usage
    (run / "results.json").write_text(json.dumps(results))
    return run


def _table_row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r} in:\n{md}")


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


USAGE = [  # per task: {layer: raw usage per expert}; layers of different sizes (pruning leaves them unequal)
    {"task": 0, "task_name": "Aircraft", "usage": {"l0": [3.0, 1.0], "l1": [1.0, 1.0]}},
    {"task": 1, "task_name": "Caltech101", "usage": {"l0": [1.0, 1.0, 2.0], "l1": [0.0, 0.0]}},
    {"task": 2, "task_name": "CIFAR100", "usage": {"l0": [1.0, 1.0, 1.0, 1.0], "l1": [1.0, 0.0, 3.0]}},
]


def test_single_run_tables_figures_and_json(tmp_path: Path) -> None:
    # One igsp run with everything: the main table, per-task table, three figures and report.json.
    run = make_run(tmp_path, "igsp-run", convergence=[_convergence(t, 60 + 20 * t) for t in range(3)], usage=USAGE)
    report = run_report([run], tmp_path / "out")
    out = tmp_path / "out"
    md = (out / "report.md").read_text()

    expected = mtil_metrics(ACC)
    # Hand check of the formula (METHOD.md section 5) so that a wrong metrics module cannot pass with us.
    assert math.isclose(expected["transfer"], (40 + (30 + 35) / 2) / 2)
    assert math.isclose(expected["avg"], np.mean(np.asarray(ACC).mean(axis=0)))
    assert math.isclose(expected["last"], 75.0)
    row = _table_row(md, "igsp-run")
    assert row[1] == "igsp"
    assert [float(x) for x in row[3:6]] == [round(expected[k], 2) for k in ("transfer", "avg", "last")]
    assert row[6] == "1,500" and row[7] == "123,456"
    assert row[8] == "1:02:05"  # 3725 s
    assert float(row[9]) == 812.5
    # Per-task table: the per-dataset metrics and both phases' trainable counts.
    for j, name in enumerate(TASKS):
        cells = _table_row(md, str(j))
        assert cells[1] == name
        tj = expected["transfer_per_task"][j]
        assert cells[2] == ("–" if tj is None else f"{tj:.2f}")
        assert float(cells[3]) == round(expected["avg_per_task"][j], 2)
        assert float(cells[4]) == round(expected["last_per_task"][j], 2)
        assert int(cells[5].replace(",", "")) == [1000, 1500, 2000][j]
        assert int(cells[6].replace(",", "")) == [500, 700, 900][j]
    # Synthetic data: no published MTIL table.
    assert "published" not in md and report["published_mtil"] is None

    for key in ("accuracy", "convergence", "usage"):
        name = report["runs"][0]["figures"][key]
        assert name and f"]({name})" in md
        _assert_png(out / name)
    assert [c["converged_at"] for c in report["runs"][0]["convergence"]] == [60, 80, 100]

    # report.json round-trips and holds the numbers of the table.
    loaded = json.loads((out / "report.json").read_text())
    assert loaded == report
    assert loaded["runs"][0]["metrics"] == expected  # JSON floats round-trip exactly (repr)
    assert loaded["runs"][0]["acc"] == ACC
    # Atomic writes leave no temporary files behind.
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_several_mtil_runs_published_table_and_skipped_plots(tmp_path: Path, monkeypatch) -> None:
    # igsp (convergence + usage in results.json), zeroshot (neither: plots skipped), moe-adapters (usage only in
    # log.jsonl prune events): the report must take each from where it is and skip what is absent.
    igsp = make_run(tmp_path, "a", "igsp", kind="mtil", convergence=[_convergence(t, 60) for t in range(3)],
                    usage=USAGE)
    zs_acc = [[50.0, 60.0, 70.0]] * 3  # frozen CLIP: every row the same
    zs = make_run(tmp_path, "b", "zeroshot", acc=zs_acc, kind="mtil",
                  params={"trainable_per_task": [0, 0, 0], "total_added": 0})
    moe_events = [{"event": "prune", "task": t, "task_name": TASKS[t], "step": 30,
                   "usage": {"l0": [float(e == t) + 1.0 for e in range(4)]}} for t in range(3)]
    moe = make_run(tmp_path, "c", "moe-adapters", kind="mtil", events=moe_events)
    monkeypatch.chdir(tmp_path)
    report = run_report([igsp, zs, moe])  # several runs: default output ./report
    out = tmp_path / "report"
    md = (out / "report.md").read_text()

    figs = {r["label"]: r["figures"] for r in report["runs"]}
    assert figs["b"]["convergence"] is None and figs["b"]["usage"] is None
    assert figs["c"]["convergence"] is None and figs["c"]["usage"] == "usage_c.png"
    assert not (out / "convergence_b.png").exists() and not (out / "usage_b.png").exists()
    for name in ("acc_a.png", "acc_b.png", "acc_c.png", "convergence_a.png", "usage_a.png", "usage_c.png"):
        _assert_png(out / name)
    # moe-adapters usage from the log: expert t is used 2/5 by task t on its one layer.
    shares = report["runs"][2]["usage"]["shares"]
    np.testing.assert_allclose(np.asarray(shares), (np.eye(3, 4) + 1.0) / 5.0, rtol=0, atol=1e-12)

    zs_metrics = mtil_metrics(zs_acc)
    assert [float(x) for x in _table_row(md, "b")[3:6]] == [round(zs_metrics[k], 2) for k in
                                                             ("transfer", "avg", "last")]
    # Published figures: present, labelled, with METHOD.md's numbers; our rows beside them.
    assert report["published_mtil"] == PUBLISHED_MTIL
    assert "published figures" in md
    pub = [line for line in md.splitlines() if line.startswith("| *published* |")]
    assert len(pub) == 3
    assert "| Zero-shot CLIP |" in pub[0] and "| 69.4 | 65.3 | 65.3 |" in pub[0]
    assert "| ZSCL |" in pub[1] and "| 68.1 | 75.4 | 83.6 |" in pub[1]
    assert "| MoE-Adapters |" in pub[2] and "| 68.9 | 76.7 | 85.0 |" in pub[2]
    ours = _table_row(md, "ours: a")
    assert "not the published setting" in ours[2]  # igsp-tiny is not ViT-B/16
    assert json.loads((out / "report.json").read_text()) == report


def test_convergence_from_log_events(tmp_path: Path) -> None:
    # No results.json 'convergence': the curve comes from log.jsonl, converged_at from the 'converged' flag or,
    # failing that, from the step where phase 2 began.
    events = [
        {"event": "convergence", "task": 0, "task_name": "Aircraft", "step": 20, "distance": None},
        {"event": "convergence", "task": 0, "task_name": "Aircraft", "step": 40, "distance": 0.3},
        {"event": "convergence", "task": 0, "task_name": "Aircraft", "step": 60, "distance": 0.01,
         "converged": True},
        {"event": "phase", "task": 0, "task_name": "Aircraft", "step": 60, "phase": 2},
        {"event": "convergence", "task": 1, "task_name": "Caltech101", "step": 20, "distance": 0.2},
        {"event": "convergence", "task": 1, "task_name": "Caltech101", "step": 40, "distance": 0.02},
        {"event": "phase", "task": 1, "task_name": "Caltech101", "step": 40, "phase": 2},
    ]
    run = load_run(make_run(tmp_path, "r", events=events))
    curves = convergence_curves(run)
    assert [c["task"] for c in curves] == [0, 1]
    assert curves[0]["steps"] == [20, 40, 60] and curves[0]["distances"] == [None, 0.3, 0.01]
    assert curves[0]["converged_at"] == 60 and curves[1]["converged_at"] == 40
    assert curves[0]["eps"] == 0.05  # from config method.eps
    report = run_report([run.run_dir], None)  # one run: default output RUN_DIR/report
    _assert_png(run.run_dir / "report" / "convergence_r.png")
    assert report["runs"][0]["usage"] is None


def test_usage_matrix_averages_shares_over_layers(tmp_path: Path) -> None:
    # Layers hold different numbers of experts and one layer routed nothing (task 1, l1): the mean share is over
    # the layers that have expert e and routed something. Hand-computed below.
    run = load_run(make_run(tmp_path, "r", usage=USAGE))
    u = usage_matrix(run)
    assert u is not None and u["tasks"] == [0, 1, 2] and u["layers"] == [2, 1, 2]
    expected = [
        [(0.75 + 0.5) / 2, (0.25 + 0.5) / 2, None, None],
        [0.25, 0.25, 0.5, None],
        [(0.25 + 0.25) / 2, (0.25 + 0.0) / 2, (0.25 + 0.75) / 2, 0.25],
    ]
    for got_row, exp_row in zip(u["shares"], expected):
        for g, e in zip(got_row, exp_row):
            assert (g is None and e is None) or math.isclose(g, e, abs_tol=1e-12), (u["shares"], expected)


def test_missing_and_malformed_run_dirs(tmp_path: Path, capsys) -> None:
    # Each failure names the path and the file (or field), and nothing is written.
    run = make_run(tmp_path, "r")
    (run / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"results\.json") as err:
        run_report([run], tmp_path / "out")
    assert str(run) in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_report([tmp_path / "nope"], tmp_path / "out")

    cfg_missing = make_run(tmp_path, "nocfg")
    (cfg_missing / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_run(cfg_missing)

    # More rows than datasets cannot come from a run (a partial run has fewer rows, never more).
    bad_acc = make_run(tmp_path, "badacc", acc=[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    with pytest.raises(RunDirError, match=r"results\.json: field 'acc' must be a T x T matrix"):
        load_run(bad_acc)
    ragged = make_run(tmp_path, "ragged", acc=[[1.0, 2.0, 3.0], [4.0, 5.0]])  # ragged rows: not a matrix
    with pytest.raises(RunDirError, match=r"results\.json: field 'acc'"):
        load_run(ragged)

    bad_json = make_run(tmp_path, "badjson")
    (bad_json / "results.json").write_text("{not json")
    with pytest.raises(RunDirError, match=r"results\.json: not valid JSON"):
        load_run(bad_json)

    bad_log = make_run(tmp_path, "badlog")
    with open(bad_log / "log.jsonl", "a") as f:
        f.write("{oops\n{\"event\": \"step\"}\n")  # a bad line in the middle, not a torn last line
    with pytest.raises(RunDirError, match=r"log\.jsonl:2: not valid JSON"):
        load_run(bad_log)

    torn = make_run(tmp_path, "torn")
    with open(torn / "log.jsonl", "a") as f:
        f.write('{"event": "st')  # a run killed mid-write: skipped with a warning
    assert len(load_run(torn).events) == 1

    # The CLI entry point reports the error on stderr and exits 2.
    assert main([str(run)]) == 2
    assert "results.json" in capsys.readouterr().err


def test_main_and_unique_labels(tmp_path: Path, capsys) -> None:
    # Two runs whose directories share a name (x/run, y/run) must not overwrite each other's figures.
    r1 = make_run(tmp_path / "x", "run")
    r2 = make_run(tmp_path / "y", "run", acc=[[10.0, 20.0, 30.0], [40.0, 50.0, 60.0], [70.0, 80.0, 90.0]])
    assert main([str(r1), str(r2), "--output", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "o" / "report.md")
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["run", "run-2"]
    _assert_png(tmp_path / "o" / "acc_run.png")
    _assert_png(tmp_path / "o" / "acc_run-2.png")
    assert report["runs"][1]["metrics"]["last"] == pytest.approx(80.0, abs=1e-12)


def test_run_in_progress_reports_partial_matrix(tmp_path: Path) -> None:
    # The engine rewrites results.json after every task: 2 of 3 rows done. The report draws the rows so far and
    # shows no Transfer / Avg / Last (defined on the full matrix) instead of numbers from a partial matrix.
    run = make_run(tmp_path, "partial", acc=ACC[:2], params={"trainable_per_task": [1000, 1500], "total_added": 7})
    report = run_report([run], tmp_path / "out")
    r = report["runs"][0]
    assert not r["complete"] and r["tasks_done"] == 2 and r["tasks"] == TASKS
    assert r["metrics"]["transfer"] is None and r["metrics"]["avg"] is None and r["metrics"]["last"] is None
    md = (tmp_path / "out" / "report.md").read_text()
    row = _table_row(md, "partial")
    assert "in progress: 2/3 tasks" in row[2] and row[3:6] == ["–", "–", "–"]
    assert _table_row(md, "2")[5] == "–"  # no trainable count for the task not yet trained
    _assert_png(tmp_path / "out" / "acc_partial.png")
    with Image.open(tmp_path / "out" / "acc_partial.png") as im:
        w, h = im.size
    assert w > h  # 2 rows x 3 columns: wider than tall (a square 3 x 3 plot would not be)


def test_report_on_real_engine_runs(tmp_path: Path) -> None:
    # End to end on what the engine really writes: the tiny preset (igsp-tiny CLIP, synthetic stream) shortened
    # to 2 tasks x 16 steps (~5 s for igsp on 2 cores; cap at step 8 so phase 1 and phase 2 both run), plus
    # zeroshot (no training: no convergence, no usage). moe-adapters is left out: ~100 s for the same preset.
    from igsp.config import load_config
    from igsp.engine import Trainer

    dirs = []
    for method in ("igsp", "zeroshot"):
        cfg = load_config("tiny", [f"method.name={method}", "data.num_tasks=2", "train.iterations=16",
                                   f"output_dir={tmp_path / method}"])
        Trainer(cfg).fit()
        dirs.append(tmp_path / method)
    report = run_report(dirs, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    for run_dir, r in zip(dirs, report["runs"]):
        results = json.loads((run_dir / "results.json").read_text())
        assert r["complete"] and r["method"] == results["method"] and r["tasks"] == results["tasks"]
        expected = mtil_metrics(results["acc"])
        assert r["metrics"] == expected
        row = _table_row(md, r["label"])
        assert [float(x) for x in row[3:6]] == [round(expected[k], 2) for k in ("transfer", "avg", "last")]
        assert r["params"]["trainable_per_task"] == results["params"]["trainable_per_task"]
        assert r["params"]["total_added"] == results["params"]["total_added"]
        _assert_png(tmp_path / "out" / r["figures"]["accuracy"])
    igsp, zs = report["runs"]
    assert [c["converged_at"] for c in igsp["convergence"]] == [c["converged_at"] for c in
                                                                 json.loads((dirs[0] / "results.json").read_text())
                                                                 ["convergence"]]
    _assert_png(tmp_path / "out" / igsp["figures"]["convergence"])
    _assert_png(tmp_path / "out" / igsp["figures"]["usage"])
    assert igsp["usage"]["tasks"] == [0, 1]
    assert zs["figures"]["convergence"] is None and zs["figures"]["usage"] is None
    assert zs["params"]["total_added"] == 0


def test_igsp_cli_report_subcommand(tmp_path: Path, capsys) -> None:
    # `igsp report` through igsp.cli: the report module registers itself via add_cli_commands.
    from igsp import cli
    run = make_run(tmp_path, "r", convergence=[_convergence(t, 60) for t in range(3)], usage=USAGE)
    assert cli.main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report" / "report.md")
    assert json.loads((run / "report" / "report.json").read_text())["runs"][0]["label"] == "r"
    (run / "results.json").unlink()
    assert cli.main(["report", str(run)]) == 2
    assert "results.json" in capsys.readouterr().err
