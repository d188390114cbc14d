"""The `lora` method: one LoRA per adapted layer trained by every task in turn, never frozen."""

from __future__ import annotations

import pytest
import torch

from igsp.config import ConfigError, load_config
from igsp.engine import Trainer, parameter_plan

LORA = ["method.name=lora", "adapters.num_experts=1", "adapters.top_k=1", "adapters.rank=4", "data.num_tasks=2",
        "train.iterations=6", "train.checkpoint_keep=none"]


def test_lora_trains_one_expert_through_every_task(tmp_path):
    config = load_config("tiny", LORA)
    config.output_dir = str(tmp_path / "run")
    trainer = Trainer(config)
    try:
        first = {n: layer.B_train.detach().clone() for n, layer in trainer.layers}
        trainer._begin_task(0)
        trainer._train_task(0)
        after0 = {n: layer.B_train.detach().clone() for n, layer in trainer.layers}
        res = trainer.fit()
    finally:
        trainer.close()
    assert res["complete"] and len(res["acc"]) == 2
    for name, layer in trainer.layers:
        # one expert, still trainable after the last task; task 1 moved it further than task 0 left it
        assert (layer.num_frozen, layer.num_trainable) == (0, 1), name
        assert not torch.equal(after0[name], first[name])
        assert not torch.equal(layer.B_train.detach(), after0[name])
    # `igsp params` predicts the run's accounting exactly (nothing depends on the data)
    plan = parameter_plan(load_config("tiny", LORA))
    assert plan["trainable_per_task"] == res["params"]["trainable_per_task"]
    assert plan["total_added"] == res["params"]["total_added"]


def test_lora_config_checks():
    with pytest.raises(ConfigError, match=r"adapters.num_experts.*>= 1 with method.name='lora'"):
        load_config("tiny", ["method.name=lora", "adapters.num_experts=0"])
    with pytest.raises(ConfigError, match=r"adapters.top_k: got 2, expected <= num_experts \(1\)"):
        load_config("tiny", ["method.name=lora", "adapters.num_experts=1", "adapters.top_k=2"])
