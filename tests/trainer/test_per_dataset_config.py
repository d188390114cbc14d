"""Per-dataset hyperparameters: a dataset keeps its learning rate in any task order; presets combine bases."""

from __future__ import annotations

import json

import pytest

from igsp.config import ConfigError, load_config, save_config


def _lrs(config) -> dict[str, float]:
    return {n: config.train.lr_for_task(i, n) for i, n in enumerate(config.task_names())}


def test_a_dataset_keeps_its_rate_in_order_ii():
    # The bug this fixes: Order II read the Order-I list by position (MNIST got 5e-3, EuroSAT 1e-3, Cars 5e-3).
    one, two = load_config("mtil-full-orderI-moe-adapters"), load_config("mtil-full-orderII-moe-adapters")
    assert two.task_names()[:3] == ["cars", "food", "mnist"]
    assert _lrs(one) == _lrs(two)
    assert (_lrs(two)["mnist"], _lrs(two)["eurosat"], _lrs(two)["cars"]) == (1e-4, 1e-4, 1e-3)
    # data.tasks reorders or subsets the stream: the rates follow the names.
    sub = load_config("mtil-full-orderI-igsp", ["data.tasks=mnist,aircraft"])
    assert _lrs(sub) == {"mnist": 1e-4, "aircraft": 5e-3}


def test_one_dataset_rate_is_overridable_by_name():
    c = load_config("mtil-fewshot-orderII-igsp", ["train.lr.mnist=5e-4"])
    assert _lrs(c)["mnist"] == 5e-4 and _lrs(c)["food"] == 1e-2  # the others keep the few-shot script's
    with pytest.raises(ConfigError, match=r"train\.lr is 0\.005, not a mapping"):
        load_config("tiny", ["train.lr.synthetic_0=1e-3"])


def test_mapping_is_validated_by_name():
    with pytest.raises(ConfigError, match=r"train\.lr\.minst: got 0\.001; allowed: keys naming tasks"):
        load_config("mtil-full-orderI-igsp", ["train.lr.minst=1e-3"])  # a typo names itself
    with pytest.raises(ConfigError, match=r"missing aircraft, dtd"):
        load_config("mtil-full-orderI-igsp", ['train.lr={"mnist": 1e-3}', "data.tasks=aircraft,mnist,dtd"])
    with pytest.raises(ConfigError, match=r"train\.lr\.mnist: got -0\.1"):
        load_config("mtil-full-orderI-igsp", ["train.lr.mnist=-0.1"])
    with pytest.raises(ConfigError, match=r"train\.lr: got \{\}"):
        load_config("tiny", ["train.lr={}"])
    c = load_config("tiny", ['train.lr={"synthetic_0": 0.1, "synthetic_1": 0.2, "synthetic_2": 0.3}'])
    assert c.train.lr_for_task(2, "synthetic_2") == 0.3
    with pytest.raises(ConfigError, match=r"missing 'x' \(task 0\)"):
        c.train.lr_for_task(0, "x")


def test_positional_lists_of_older_run_configs_still_load(tmp_path):
    # A run directory written before per-dataset rates holds a positional list: it loads and means what it meant.
    c = load_config("mtil-full-orderII-igsp", ["data.root=/data"])
    raw = c.to_dict()
    raw["train"]["lr"] = [5e-3, 1e-3, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3]
    del raw["data"]["augment"]  # a field older configs lack: its default (off) is what they ran
    (tmp_path / "config.json").write_text(json.dumps(raw))
    old = load_config(tmp_path)
    assert old.train.lr_for_task(0, "cars") == 5e-3 and old.data.augment is False
    save_config(old, tmp_path / "again.json")
    assert load_config(tmp_path / "again.json").to_dict() == old.to_dict()


def test_extends_list_merges_in_order(tmp_path):
    # The few-shot presets are the method's base plus a fragment; a later parent and the file itself win.
    (tmp_path / "base.json").write_text(json.dumps({"train": {"iterations": 7, "batch_size": 3}}))
    (tmp_path / "frag.json").write_text(json.dumps({"train": {"iterations": 9}}))
    (tmp_path / "leaf.json").write_text(json.dumps({"extends": ["tiny", "base.json", "frag.json"],
                                                     "train": {"warmup": 1}}))
    c = load_config(tmp_path / "leaf.json")
    assert (c.train.iterations, c.train.batch_size, c.train.warmup) == (9, 3, 1)
    assert c.method.candidates == 4  # from tiny
    (tmp_path / "bad.json").write_text(json.dumps({"extends": []}))
    with pytest.raises(ConfigError, match="extends"):
        load_config(tmp_path / "bad.json")
    few = load_config("mtil-fewshot-orderI-moe-adapters")
    assert few.method.name == "moe-adapters" and few.data.few_shot == 5 and few.train.iterations == 500
