"""`igsp plan`: every MTIL preset's datasets with their reference learning rates, loading no data or weights."""

from __future__ import annotations

import json

import pytest
from test_config import MTIL_FEW_SHOT_LRS, MTIL_LRS

from igsp.cli import main
from igsp.config import list_presets
from igsp.data.mtil import MTIL_DATASETS, ORDER_I, ORDER_II

MTIL_PRESETS = [p for p in list_presets() if p.startswith("mtil-")]


def _plan(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def no_data_no_weights(monkeypatch):
    """Any attempt to build a model or read a dataset fails the test."""
    import igsp.data.mtil
    import igsp.model

    def refuse(*args, **kwargs):
        raise AssertionError("igsp plan must not build models or read data")

    monkeypatch.setattr(igsp.model, "create_clip", refuse)
    monkeypatch.setattr(igsp.data.mtil, "build_dataset", refuse)


@pytest.mark.parametrize("preset", MTIL_PRESETS)
def test_every_mtil_preset_plans_each_dataset_with_its_reference_lr(preset, capsys, no_data_no_weights):
    few = "fewshot" in preset
    plan = _plan(capsys, preset, "--set", "data.root=/nonexistent")
    order = ORDER_II if "orderII" in preset else ORDER_I
    reference = MTIL_FEW_SHOT_LRS if few else MTIL_LRS
    assert [t["name"] for t in plan["tasks"]] == list(order)
    assert all(t["lr"] == t["reference_lr"] == reference[t["name"]] for t in plan["tasks"])
    trains = not preset.endswith("zeroshot")
    for t in plan["tasks"]:
        assert t["iterations"] == ((500 if few else 1000) if trains else 0)
        assert t["batch_size"] == 64 and t["few_shot"] == (5 if few else None)
        assert t["templates"] == len(MTIL_DATASETS[t["name"]].templates)
        assert t["classes"] == MTIL_DATASETS[t["name"]].num_classes
        if trains:
            assert t["augmentation"].startswith("RandomResizedCrop(224, scale=(0.9, 1.0), bicubic)")
    caltech = next(t for t in plan["tasks"] if t["name"] == "caltech101")
    assert caltech["templates"] == 34 and caltech["train_template"] == "a photo of a {}."
    ref = plan["reference"]
    if preset.endswith("igsp"):  # the method's own choice, reported as a departure from the recipe
        assert ref["differences"] == ["train.grad_clip: 1.0 (reference: null)"]
    else:
        assert ref["matches"] and ref["differences"] == []
    assert bool(ref["deliberate"]) == preset.endswith("moe-adapters")


def test_text_plan_lists_each_dataset_and_flags_a_changed_rate(capsys):
    assert main(["plan", "mtil-full-orderII-moe-adapters", "--set", "train.lr.mnist=5e-4"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line[:4].strip().isdigit()}
    assert list(rows) == list(ORDER_II)
    assert rows["mnist"][2:4] == ["0.0005", "0.0001"] and rows["cars"][2:4] == ["0.001", "0.001"]
    assert "train.lr of mnist: 0.0005 (reference: 0.0001)" in out
    assert "deliberate difference: task selection per test sample" in out


def test_plan_of_a_non_mtil_config_has_no_reference(capsys):
    plan = _plan(capsys, "tiny", "--set", "data.augment=true")
    assert plan["reference"] is None and [t["name"] for t in plan["tasks"]] == ["synthetic_0", "synthetic_1",
                                                                               "synthetic_2"]
    assert plan["tasks"][0]["augmentation"].startswith("RandomResizedCrop(32,")
    assert plan["tasks"][0]["reference_lr"] is None and plan["tasks"][0]["templates"] == 2


def test_plan_errors_name_the_field(capsys):
    assert main(["plan", "mtil-full-orderI-igsp", "--set", "train.lr.minst=1e-3"]) == 2
    assert "train.lr.minst" in capsys.readouterr().err


def test_plan_names_each_departure_of_the_baseline(capsys):
    # Training recipe first, then the baseline's own settings; a zero-shot config is judged on the model only.
    plan = _plan(capsys, "mtil-full-orderI-moe-adapters", "--set", "adapters.expert_dropout=0", "--set",
                 "train.grad_clip=1.0", "--set", "train.precision=bf16")
    assert plan["reference"]["differences"] == ['train.grad_clip: 1.0 (reference: null)',
                                                'train.precision: "bf16" (reference: "fp32")',
                                                "adapters.expert_dropout: 0.0 (reference: 0.1)"]
    zs = _plan(capsys, "mtil-full-orderI-zeroshot", "--set", "train.precision=bf16", "--set", "model.name=RN50")
    assert zs["reference"]["differences"] == ['model.name: "RN50" (reference: "ViT-B-16")']
