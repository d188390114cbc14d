"""Training augmentation keeps resume exact: each crop is seeded by (seed, task, step, position), not by the RNG.

The tiny preset with `data.augment=true` (the reference's RandomResizedCrop on its synthetic tensors), 2 tasks,
killed once through the engine's test hook in the middle of task 0 (the last checkpoint is step 6's, so steps 7-9
are read again after the resume) and resumed: the result must equal an uninterrupted augmented run bit for bit,
as without augmentation (test_resume.py covers the other resume points).
"""

from __future__ import annotations

import json

import pytest
import torch
from trainer_helpers import TINY_OVERRIDES, read_log, run_igsp, run_tiny, step_records

from igsp.engine import KILL_ENV, KILL_EXIT_CODE

AUGMENTED = ["data.augment=true", "data.num_tasks=2"]


@pytest.mark.slow
def test_resume_with_augmentation_matches_the_uninterrupted_run(tmp_path):
    ref_dir = tmp_path / "ref"
    ref = run_tiny(ref_dir, AUGMENTED)
    run = tmp_path / "killed"
    sets = [a for o in (*TINY_OVERRIDES, *AUGMENTED) for a in ("--set", o)]
    first = run_igsp("train", "tiny", "--output", str(run), *sets, hooks={KILL_ENV: "9"})
    assert first.returncode == KILL_EXIT_CODE, first.stderr[-2000:]
    last = run_igsp("train", "--resume", str(run))
    assert last.returncode == 0, last.stderr[-2000:]

    res = json.loads((run / "results.json").read_text())
    assert json.loads((run / "config.json").read_text())["data"]["augment"] is True
    assert res["acc"] == ref["acc"]
    assert step_records(run) == step_records(ref_dir)
    a = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["adapters"]
    b = torch.load(ref_dir / "checkpoints" / "latest.pt", weights_only=True)["adapters"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_augmentation_changes_what_is_trained(tmp_path):
    # The switch is live: the same 6 steps with and without augmentation give different losses.
    short = ["data.num_tasks=1", "train.iterations=6", "train.log_every=1", "method.min_steps=0",
             "method.check_every=2", "train.checkpoint_keep=none"]
    plain = run_tiny(tmp_path / "plain", short)
    aug = run_tiny(tmp_path / "aug", [*short, "data.augment=true"])
    losses = [[r["loss"] for r in read_log(tmp_path / d) if r["event"] == "step"] for d in ("plain", "aug")]
    assert losses[0][0] != losses[1][0] and plain["tasks"] == aug["tasks"]


def test_mtil_augmentation_through_dataloader_workers(tmp_path):
    # The MTIL path with augmentation in worker processes (the dataset and its seeded transform are pickled):
    # open_clip's train preprocess crops the decoded fake images; 3 steps per task.
    from trainer_helpers import mtil_fakes

    root = tmp_path / "data"
    mtil_fakes().make_dtd(root)
    res = run_tiny(tmp_path / "run", ["data.kind=mtil", f"data.root={root}", "data.tasks=dtd", "data.augment=true",
                                      "data.few_shot=1", "train.num_workers=2", "train.iterations=3",
                                      "train.batch_size=4", "method.min_steps=0", "method.check_every=1",
                                      "method.selector_prototypes=1"])
    assert res["complete"] and res["tasks"] == ["dtd"]
