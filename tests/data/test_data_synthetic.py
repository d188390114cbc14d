"""The synthetic stream: cheap, deterministic, tasks separable by colour, classes by stripe frequency."""

from __future__ import annotations

import pytest
import torch

from igsp.data import synthetic_benchmark


def _xy(task):
    ds = task.dataset
    return ds.images, ds.labels


def test_shapes_names_and_determinism():
    # names, shapes, class-ordered items, distinct class texts across tasks, same seed = same pixels
    tr = synthetic_benchmark(num_tasks=3, num_classes=4, image_size=32, samples_per_class=5, seed=0)
    assert [t.name for t in tr] == ["synthetic_0", "synthetic_1", "synthetic_2"]
    for t in tr:
        x, y = t.dataset[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
        assert len(t) == 20 and t.num_classes == 4 and t.targets == sorted(t.targets)
    assert len({c for t in tr for c in t.classnames}) == 12  # distinct text across tasks
    again = synthetic_benchmark(num_tasks=3, num_classes=4, image_size=32, samples_per_class=5, seed=0)
    assert all(torch.equal(a.dataset.images, b.dataset.images) for a, b in zip(tr, again))
    te = synthetic_benchmark(num_tasks=3, num_classes=4, image_size=32, samples_per_class=5, seed=0, split="test")
    assert not torch.equal(tr[0].dataset.images, te[0].dataset.images)  # train and test are different draws


def test_tasks_and_classes_are_separable():
    # A selector must tell tasks apart (nearest task-mean image) and a classifier classes within a task
    # (nearest class-mean image); both from train prototypes, scored on test. 5 tasks, 6 classes: more
    # crowded than the default so the test can fail.
    kw = dict(num_tasks=5, num_classes=6, image_size=32, samples_per_class=8, seed=1)
    tr = synthetic_benchmark(**kw)
    te = synthetic_benchmark(split="test", **kw)
    task_protos = torch.stack([_xy(t)[0].mean(0).flatten() for t in tr])
    for k, t in enumerate(te):
        x, y = _xy(t)
        assert (torch.cdist(x.flatten(1), task_protos).argmin(1) == k).all()
        xtr, ytr = _xy(tr[k])
        class_protos = torch.stack([xtr[ytr == c].mean(0).flatten() for c in range(6)])
        acc = (torch.cdist(x.flatten(1), class_protos).argmin(1) == y).float().mean()
        assert acc >= 0.95, (k, acc)


def test_validation():
    # beyond the palette, stripe periods under 4 px, empty classes, a bad split: refused naming the argument
    with pytest.raises(ValueError, match="num_tasks"):
        synthetic_benchmark(num_tasks=9)
    with pytest.raises(ValueError, match="num_classes"):
        synthetic_benchmark(num_classes=9, image_size=32)  # period < 4 px
    with pytest.raises(ValueError, match="samples_per_class"):
        synthetic_benchmark(samples_per_class=0)
    with pytest.raises(ValueError, match="split"):
        synthetic_benchmark(split="val")  # type: ignore[arg-type]
