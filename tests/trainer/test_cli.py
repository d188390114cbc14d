"""The `igsp` command line: help for every subcommand, `params` on the ViT-B/16 presets (counted by hand),
`eval` of a finished run, error messages and exit codes, and a short `demo`."""

from __future__ import annotations

import json

import pytest

from igsp.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: igsp {command}" in out and COMMANDS[command].help in out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "eval", "params", "demo"))


# ------------------------------------------------------------------------------------------------- params
# ViT-B/16: 12 blocks per tower, visual width 768, text width 512, MLP ratio 4, embed dim 512; 11 MTIL tasks.
WIDTHS = (768, 512)
BLOCKS, TASKS, EMBED, PROTOTYPES = 12, 11, 512, 5
SELECTOR = TASKS * (PROTOTYPES * EMBED + 1)


def _igsp_counts(C=2, r=8, block=True):
    # Per block and tower of width w, targets c_fc (w -> 4w) and c_proj (4w -> w): an expert pair costs
    # r * (w + 4w) in each linear. Per-layer routers read each linear's input (w, then 4w: 5w a block); block
    # routing (the preset's) has c_fc's router alone, on the w-wide MLP input, shared with c_proj.
    route = 1 if block else 5
    per_task = []
    for t in range(TASKS):
        experts = sum(BLOCKS * C * 2 * r * 5 * w for w in WIDTHS)
        router = sum(BLOCKS * (C * (t + 1)) * route * w for w in WIDTHS)  # all survive: C(t+1) active experts
        per_task.append(experts + router)
    experts = sum(BLOCKS * C * TASKS * 2 * r * 5 * w for w in WIDTHS)
    routers = sum(BLOCKS * route * w * C * sum(t + 1 for t in range(TASKS)) for w in WIDTHS)
    return per_task, experts + routers + SELECTOR


def _moe_counts(E=22, r=64, frozen_per_task=2):
    # Per block and tower: a parallel adapter w -> w with E ReLU experts (A, B, both biases) and a router of two
    # E x w matrices (w_gate and the learned noise's w_noise, as MoE-Adapters).
    expert = lambda w: 2 * r * w + r + w
    router = lambda w: 2 * E * w
    per_task = [sum(BLOCKS * ((E - frozen_per_task * t) * expert(w) + router(w)) for w in WIDTHS)
                for t in range(TASKS)]
    total = sum(BLOCKS * (E * expert(w) + TASKS * router(w)) for w in WIDTHS) + SELECTOR
    return per_task, total


@pytest.mark.parametrize("preset, expected", [
    # iGSP (C = 2 rank-8 candidates per layer) with every candidate surviving (--survival 1.0, the default):
    # the worst case of its accounting.
    ("mtil-full-orderI-igsp", _igsp_counts()),
    # MoE-Adapters: 22 experts, 2 frozen per task, so a task trains 22 - 2t experts plus its router.
    ("mtil-fewshot-orderII-moe-adapters", _moe_counts()),
])
def test_params_on_vit_b16_presets_match_hand_counts(preset, expected, capsys):
    assert main(["params", preset, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    per_task, total = expected
    assert rep["tasks"] and len(rep["tasks"]) == TASKS
    assert rep["trainable_per_task"] == per_task
    assert rep["total_added"] == total
    assert rep["backbone"] > 100_000_000  # ViT-B/16 CLIP: ~150 M frozen parameters


def test_params_with_per_layer_routers_match_hand_counts(capsys):
    assert main(["params", "mtil-full-orderI-igsp", "--json", "--set", "adapters.router_placement=layer"]) == 0
    rep = json.loads(capsys.readouterr().out)
    per_task, total = _igsp_counts(block=False)
    assert rep["trainable_per_task"] == per_task
    assert rep["total_added"] == total


def test_params_of_zeroshot_is_zero(capsys):
    assert main(["params", "mtil-full-orderI-zeroshot", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["trainable_per_task"] == [0] * TASKS and rep["total_added"] == 0


def test_params_survival_and_baseline_table(capsys):
    # Half the candidates survive: phase 2 trains fewer parameters than phase 1; the table prints a reduction.
    assert main(["params", "mtil-full-orderI-igsp", "--survival", "0.5", "--set", "data.tasks=aircraft,dtd",
                 "--baseline", "mtil-full-orderI-moe-adapters"]) == 0
    out = capsys.readouterr().out
    assert "phase 2" in out and "reduction vs baseline" in out and "task  1 dtd" in out


# --------------------------------------------------------------------------------------------- train/eval
def test_eval_reproduces_the_last_row_and_writes_nothing_else(tiny_run, capsys):
    run_dir, results = tiny_run
    log_before = (run_dir / "log.jsonl").read_bytes()
    results_before = (run_dir / "results.json").read_bytes()
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "synthetic_2" in out
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["acc"] == results["acc"][-1]  # same checkpoint, same deterministic evaluation
    assert ev["finished_tasks"] == len(results["tasks"])
    assert (run_dir / "log.jsonl").read_bytes() == log_before
    assert (run_dir / "results.json").read_bytes() == results_before


def test_eval_oracle_selector_uses_each_datasets_own_router(tiny_run, capsys):
    run_dir, _ = tiny_run
    assert main(["eval", str(run_dir), "--selector", "oracle"]) == 0
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["selector_mode"] == "oracle"
    assert all(s["own_task"] == 1.0 and s["zero_shot"] == 0.0 for s in ev["selector"])


def test_bad_config_value_exits_2_naming_the_field(capsys, tmp_path):
    assert main(["train", "tiny", "--output", str(tmp_path / "x"), "--set", "train.precision=fp16"]) == 2
    err = capsys.readouterr().err
    assert "train.precision" in err and "'fp16'" in err and "'bf16'" in err


def test_train_refuses_to_overwrite_a_run(tiny_run, capsys):
    run_dir, _ = tiny_run
    assert main(["train", "tiny", "--output", str(run_dir)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_three_methods_side_by_side(tmp_path, capsys):
    # Shortened (2 digits tasks, 3 steps each): the full demo is `make demo` (< 10 minutes on 2 cores).
    assert main(["-q", "demo", "--stream", "digits", "--output", str(tmp_path), "--set", "train.iterations=3",
                 "--set", "data.tasks=digits,parity"]) == 0
    out = capsys.readouterr().out
    for method in ("igsp", "moe-adapters", "zeroshot"):
        assert f"method {method}" in out
        res = json.loads((tmp_path / f"digits-{method}" / "results.json").read_text())
        assert res["complete"] and len(res["acc"]) == 2
    assert "Transfer" in out and "total added" in out
    # The zero-shot run leaves a checkpoint too, so `igsp eval` works on every run directory.
    assert main(["eval", str(tmp_path / "digits-zeroshot")]) == 0
    zs = json.loads((tmp_path / "digits-zeroshot" / "results.json").read_text())
    assert json.loads((tmp_path / "digits-zeroshot" / "eval.json").read_text())["acc"] == zs["acc"][-1]
    # `igsp params` (integer bookkeeping, no training) predicts the real runs' accounting: exactly for
    # moe-adapters (its structure does not depend on the data), phase 1 of the first task for igsp (later
    # tasks depend on how many candidates survive).
    from igsp.config import load_config
    from igsp.engine import parameter_plan

    sets = ["train.iterations=3", "data.tasks=digits,parity"]
    moe = json.loads((tmp_path / "digits-moe-adapters" / "results.json").read_text())["params"]
    plan = parameter_plan(load_config("digits-moe-adapters", sets))
    assert plan["trainable_per_task"] == moe["trainable_per_task"]
    assert plan["total_added"] == moe["total_added"]
    igsp = json.loads((tmp_path / "digits-igsp" / "results.json").read_text())["params"]
    plan = parameter_plan(load_config("digits-igsp", sets))
    assert plan["trainable_per_task"][0] == igsp["trainable_per_task"][0]
