"""Config loading and validation: presets, overrides, errors that name the field, value and allowed values."""

from __future__ import annotations

import json

import pytest

from igsp.config import Config, ConfigError, config_from_dict, list_presets, load_config, save_config

# The reference scripts' learning rates, Order-I datasets (MoE-Adapters mtil/scripts/train/*.sh); a dataset keeps
# its rate in Order II.
MTIL_DATASETS = ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet",
                 "cars", "sun397"]
MTIL_LRS = dict(zip(MTIL_DATASETS, [5e-3, 1e-3, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3]))
MTIL_FEW_SHOT_LRS = dict(zip(MTIL_DATASETS, [8e-3, 5e-4, 2e-4, 5e-3, 1e-3, 1e-3, 1e-2, 1e-4, 1e-2, 1e-2, 1e-2]))


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads(name):
    # Every bundled preset (MTIL x {full, few} x {I, II} x 3 methods, tiny, digits) must validate as shipped.
    config = load_config(name)
    assert isinstance(config, Config)
    assert config.name == name


def test_preset_list_is_complete():
    # The issue asks for these presets; a missing one would break docs and `make demo`.
    presets = set(list_presets())
    for shots in ("full", "fewshot"):
        for order in ("I", "II"):
            for method in ("igsp", "moe-adapters", "zeroshot"):
                assert f"mtil-{shots}-order{order}-{method}" in presets
    assert {"tiny", "digits-igsp", "digits-moe-adapters", "digits-zeroshot"} <= presets


@pytest.mark.parametrize("order", ["I", "II"])
def test_mtil_presets_follow_the_protocol(order):
    # METHOD.md section 5: 1000 iterations, batch 64, 100 warm-up, label smoothing 0.2, each dataset's own lr
    # whatever its position; few-shot: 5 shots, 500 iterations, the few-shot script's lrs.
    full = load_config(f"mtil-full-order{order}-igsp")
    few = load_config(f"mtil-fewshot-order{order}-igsp")
    for c, lrs in ((full, MTIL_LRS), (few, MTIL_FEW_SHOT_LRS)):
        assert (c.model.name, c.model.pretrained) == ("ViT-B-16", "openai")
        assert c.train.batch_size == 64 and c.train.warmup == 100 and c.train.label_smoothing == 0.2
        assert [c.train.lr_for_task(i, n) for i, n in enumerate(c.task_names())] == [lrs[n] for n in c.task_names()]
        assert c.data.kind == "mtil" and c.data.order == order and c.data.augment
    assert full.train.iterations == 1000 and full.data.few_shot is None
    assert few.train.iterations == 500 and few.data.few_shot == 5


def test_moe_adapters_preset_matches_the_baseline():
    # METHOD.md section 4: 22 ReLU experts, rank 64, scale 0.1, beside the MLP of both towers, top-2 per sample,
    # 2 experts frozen per task.
    c = load_config("mtil-full-orderI-moe-adapters")
    a = c.adapters
    assert a.targets == ["mlp_parallel"] and set(a.towers) == {"visual", "text"}
    assert (a.num_experts, a.rank, a.scale, a.activation, a.top_k, a.routing) == (22, 64, 0.1, "relu", 2, "sample")
    assert c.method.name == "moe-adapters" and c.method.freeze_per_task == 2


def test_overrides_parse_json_strings_and_comma_lists():
    # JSON values (numbers, lists, null) and plain strings; a list field also takes "a,b".
    c = load_config("tiny", ["train.iterations=7", "train.lr=[0.1,0.2]", "model.pretrained=null",
                             "data.kind=digits", "data.tasks=digits,parity", "method.rank_energy=0.9"])
    assert c.train.iterations == 7 and c.train.lr == [0.1, 0.2]
    assert c.model.pretrained is None
    assert c.data.kind == "digits" and c.data.tasks == ["digits", "parity"]
    assert c.method.rank_energy == 0.9


@pytest.mark.parametrize("override, field, value, allowed", [
    # A choice field: the message lists the allowed values.
    ("train.precision=fp16", "train.precision", "'fp16'", "'bf16'"),
    ("method.name=ewc", "method.name", "'ewc'", "'moe-adapters'"),
    ("data.order=III", "data.order", "'III'", "'II'"),
    # A range: the message gives the interval.
    ("method.tau=1.5", "method.tau", "1.5", "[0.0, 1.0]"),
    ("train.batch_size=0", "train.batch_size", "0", "an int in [1"),
    # A type error on an int field.
    ("train.iterations=\"many\"", "train.iterations", "'many'", "an int"),
    # A field validated by igsp.adapters.AdapterConfig itself keeps its section in the message.
    ("adapters.activation=gelu", "adapters.activation", "'gelu'", "relu"),
    # A cross-field rule.
    ("adapters.num_experts=3", "adapters.num_experts", "3", "0 with method.name='igsp'"),
])
def test_bad_values_name_field_value_and_allowed(override, field, value, allowed):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    msg = str(info.value)
    assert field in msg and value in msg and allowed in msg, msg


def test_unknown_keys_are_rejected_by_name():
    # A typo in a section key, a top-level key and an override section are all named.
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*allowed keys of train: iterations"):
        load_config("tiny", ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'epochs'"):
        config_from_dict({"epochs": 3})
    with pytest.raises(ConfigError, match=r"unknown section 'optim'"):
        load_config("tiny", ["optim.lr=0.1"])
    with pytest.raises(ConfigError, match=r"'adapters\.experts'"):
        load_config("tiny", ["adapters.experts=3"])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no-such-preset")


def test_per_task_lr_list_too_short_names_the_field():
    # A run with 3 tasks and 2 learning rates must fail when the engine asks for task 2's.
    c = load_config("tiny", ["train.lr=[0.1,0.2]"])
    assert c.train.lr_for_task(1) == 0.2
    with pytest.raises(ConfigError, match=r"train\.lr.*at least 3"):
        c.train.lr_for_task(2)


def test_saved_config_round_trips(tmp_path):
    # config.json in a run directory is loadable as-is (no "extends"), and equal to the source config.
    c = load_config("mtil-fewshot-orderII-moe-adapters", ["data.root=/data/mtil"])
    save_config(c, tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "extends" not in raw
    again = load_config(tmp_path)
    assert again.to_dict() == c.to_dict()
