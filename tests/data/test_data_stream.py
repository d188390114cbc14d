"""build_task_stream: the one entry point the trainer calls, for all three kinds."""

from __future__ import annotations

import dataclasses
import json

import open_clip
import pytest
import torch

from igsp.data import DIGITS_TASKS, TaskStreamConfig, build_task_stream


def test_default_is_the_digits_stream():
    # no config: the offline digits stream, one (train, test) pair per task in DIGITS_TASKS order
    stream = build_task_stream()
    assert [tr.name for tr, _ in stream] == list(DIGITS_TASKS)
    assert all(tr.split == "train" and te.split == "test" for tr, te in stream)


def test_digits_few_shot_applies_to_train_only():
    cfg = TaskStreamConfig(kind="digits", tasks=["digits_rotated", "parity"], few_shot=2, image_size=16, seed=3)
    stream = build_task_stream(cfg)
    assert [tr.name for tr, _ in stream] == ["digits_rotated", "parity"]
    (tr0, te0), (tr1, _) = stream
    assert len(tr0) == 20 and len(tr1) == 4  # 2 shots x 10 digits, 2 shots x 2 parities
    assert len(te0) > 500 and tr0.dataset[0][0].shape == (3, 16, 16)
    json.dumps(dataclasses.asdict(cfg))  # the config is recordable with a run


def test_synthetic_via_overrides():
    # keyword overrides build the config; few_shot caps the train samples per class, test keeps all
    stream = build_task_stream(kind="synthetic", num_tasks=2, num_classes=3, samples_per_class=4, image_size=12)
    assert len(stream) == 2
    tr, te = stream[0]
    assert len(tr) == 12 and len(te) == 12 and tr.dataset[0][0].shape == (3, 12, 12)
    few = build_task_stream(kind="synthetic", num_tasks=2, num_classes=3, samples_per_class=4, few_shot=1)
    assert len(few[0][0]) == 3 and len(few[0][1]) == 12


def test_mtil_stream_from_a_data_root(fake_mtil):
    # Order II begins cars, food, mnist; an explicit task list overrides the order.
    root, metas = fake_mtil
    pre = open_clip.image_transform(16, is_train=False)
    cfg = TaskStreamConfig(kind="mtil", root=str(root), order="II", tasks=["cars", "mnist"])
    stream = build_task_stream(cfg, transform=pre)
    assert [(tr.name, len(tr), len(te)) for tr, te in stream] == [
        ("cars", metas["cars"].n_train, metas["cars"].n_test),
        ("mnist", metas["mnist"].n_train, metas["mnist"].n_test),
    ]
    x, y = stream[1][0].dataset[0]
    assert x.shape == (3, 16, 16) and isinstance(y, int)
    assert TaskStreamConfig(kind="mtil", root=str(root), order="II").task_names()[:3] == ["cars", "food", "mnist"]
    with pytest.raises(ValueError, match="transform"):
        build_task_stream(cfg)
    # a train transform that differs: the train split uses it, the test split does not
    sized = open_clip.image_transform(8, is_train=False)
    stream = build_task_stream(cfg, transform=pre, train_transform=sized)
    assert stream[0][0].dataset[0][0].shape == (3, 8, 8) and stream[0][1].dataset[0][0].shape == (3, 16, 16)


def test_config_validation():
    # each bad field is refused at config time (not deep inside a dataset), overrides included
    with pytest.raises(ValueError, match="kind"):
        TaskStreamConfig(kind="imagenet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="root"):
        TaskStreamConfig(kind="mtil")
    with pytest.raises(ValueError, match="order"):
        TaskStreamConfig(kind="mtil", root="/x", order="III")
    with pytest.raises(ValueError, match="tasks"):
        TaskStreamConfig(kind="digits", tasks=["digits", "digits"])
    with pytest.raises(ValueError, match="tasks"):
        TaskStreamConfig(kind="mtil", root="/x", tasks=["mnist", "svhn"])
    with pytest.raises(ValueError, match="few_shot"):
        TaskStreamConfig(few_shot=0)
    with pytest.raises(ValueError, match="few_shot"):
        build_task_stream(TaskStreamConfig(), few_shot=-1)  # overrides are validated too
    with pytest.raises(TypeError):
        build_task_stream(colour="red")


def test_stream_items_batch_in_a_dataloader():
    # The trainer batches with a DataLoader: items must collate to (B, 3, S, S) float32 and (B,) int64.
    tr, _ = build_task_stream(kind="digits", tasks=["digits_noisy"])[0]
    x, y = next(iter(torch.utils.data.DataLoader(tr.dataset, batch_size=8, shuffle=True)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
