"""The method interface (igsp/methods/): the registry, a new method as one class, and checkpoints written before
the methods moved out of the engine (igsp state as top-level keys) resuming bit for bit."""

from __future__ import annotations

import shutil

import pytest
import torch
from trainer_helpers import read_log, resume_in_process, same_adapters

from igsp.config import ConfigError, load_config
from igsp.engine import Trainer, method_state
from igsp.methods import METHODS, Method, get_method, method_names, register_method


def test_registry_holds_the_three_methods_and_rejects_unknown_names():
    assert method_names()[:3] == ("igsp", "moe-adapters", "zeroshot")
    assert get_method("igsp").phases == 2 and get_method("zeroshot").trains is False
    with pytest.raises(KeyError, match="registered: igsp, moe-adapters, zeroshot"):
        get_method("ewc")
    with pytest.raises(ConfigError, match=r"method.name: got 'ewc'; allowed: 'igsp' \| 'moe-adapters'"):
        load_config("tiny", ["method.name=ewc"])
    with pytest.raises(TypeError, match="Method subclass"):
        register_method(dict)  # type: ignore[arg-type]


def test_method_cross_checks_live_with_the_method():
    # Each method validates its own view of the config (moved out of Config.validate, same messages).
    with pytest.raises(ConfigError, match="adapters.num_experts.*0 with method.name='igsp'"):
        load_config("tiny", ["adapters.num_experts=2"])
    with pytest.raises(ConfigError, match="adapters.num_experts.*>= 1 with method.name='moe-adapters'"):
        load_config("tiny", ["method.name=moe-adapters"])


class _OneExpertPerTask(Method):
    """Sequential LoRA: one new trainable expert per layer per task, frozen after it; one phase."""

    name = "test-one-expert"

    def begin_task(self, t: int) -> None:
        for _, layer in self.layers:
            layer.add_experts(1, active_in=[])
            layer.add_router(t)

    def end_task(self, t: int) -> None:
        for _, layer in self.layers:
            layer.freeze_experts(layer.trainable_expert_ids())


def test_a_new_method_is_one_class(tmp_path):
    # Registered, it trains and evaluates through the unchanged engine: pools grow by one expert per task.
    register_method(_OneExpertPerTask)
    try:
        config = load_config("tiny", ["method.name=test-one-expert", "adapters.top_k=1", "data.num_tasks=2",
                                      "train.iterations=4"])
        config.output_dir = str(tmp_path / "run")
        trainer = Trainer(config)
        try:
            res = trainer.fit()
        finally:
            trainer.close()
    finally:
        METHODS.pop(_OneExpertPerTask.name)
    assert res["method"] == "test-one-expert" and res["complete"]
    assert all(layer.num_frozen == 2 and layer.num_trainable == 0 for _, layer in trainer.layers)
    assert res["params"]["trainable_phase2_per_task"] == [None, None]
    assert [p["phase1_steps"] for p in res["params"]["per_task"]] == [4, 4]


def test_checkpoint_without_method_state_resumes_bit_for_bit(tiny_run, tmp_path):
    # A checkpoint of the old layout (bases / anchor / detector / grad_window at the top level, as written
    # before igsp/methods/ existed) is converted on load. The resume point is the start of task 1's phase 2,
    # where every part of the igsp state is live (bases, anchor, the last window's gradient norms).
    ref_dir, ref = tiny_run
    run = tmp_path / "legacy"
    run.mkdir()
    for name in ("config.json", "log.jsonl"):
        shutil.copy(ref_dir / name, run / name)
    ckpt = torch.load(ref_dir / "checkpoints" / "task1_phase1.pt", weights_only=True)
    state = ckpt.pop("method_state")
    assert set(state) == {"bases", "anchor", "detector", "grad_window"} and state["anchor"] is not None
    ckpt.update(state)
    (run / "checkpoints").mkdir()
    torch.save(ckpt, run / "checkpoints" / "latest.pt")
    assert method_state(ckpt).keys() == state.keys()

    res = resume_in_process(run)
    assert res["acc"] == ref["acc"]
    assert res["orthogonality"] == ref["orthogonality"]
    assert same_adapters(run, ref_dir)
    assert _steps(run) == _steps(ref_dir)


def _steps(run_dir) -> list[dict]:
    """The step records without the timing fields."""
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "peak_mem_mb")}
            for r in read_log(run_dir) if r["event"] == "step"]
