"""The offline-mtil stream: task design (pairs of tasks over the same images, tasks sharing labels), disjointness
from the pretraining corpus, determinism, few-shot, normalisation and the stream entry point."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from igsp.data import OFFLINE_MTIL_TASKS, TaskStreamConfig, build_task_stream, offline_mtil_benchmark
from igsp.data.base import CLIP_MEAN, CLIP_STD
from igsp.data.offline_mtil import render_source
from igsp.data.procedural import (
    COLOURS,
    SHAPES,
    aileron_glyph,
    glyph_mask,
    pixel_glyph,
    shape_mask,
    shape_polygon,
)

UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # no normalisation: pixels in [0, 1]


def _by_name(tasks):
    return {t.name: t for t in tasks}


def _tensors(task):
    ds = task.dataset
    if hasattr(ds, "tensors"):
        return ds.tensors()
    return ds.images, ds.labels


@pytest.fixture(scope="module")
def train():
    return _by_name(offline_mtil_benchmark(**UNIT))


@pytest.fixture(scope="module")
def test():
    return _by_name(offline_mtil_benchmark(split="test", **UNIT))


def test_stream_has_the_issue_s_shape(train, test):
    # >= 6 tasks; every item (3, 32, 32) float32 in [0, 1] with an int label that matches `targets`.
    assert len(OFFLINE_MTIL_TASKS) >= 6 and list(train) == list(OFFLINE_MTIL_TASKS) == list(test)
    for name, task in train.items():
        x, y = task.dataset[3]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
        assert isinstance(y, int) and y == task.targets[3] and task.num_classes == len(OFFLINE_MTIL_TASKS[name]
                                                                                       .classnames)
        assert all(t.count("{}") == 1 for t in task.templates) and len(task.templates) >= 2
        # every class occurs in both splits: a test split per class exists for the accuracy matrix
        assert set(task.targets) == set(test[name].targets) == set(range(task.num_classes))


def test_same_images_other_labelling_rule(train, test):
    # Visually identical, logically distinct: digits/parity and shapes/colours share every pixel, item by item.
    for split in (train, test):
        xd, yd = _tensors(split["digits"])
        xp, yp = _tensors(split["parity"])
        assert torch.equal(xd, xp) and torch.equal(yp, yd % 2)
        xs, ys = _tensors(split["shapes"])
        xc, yc = _tensors(split["colours"])
        assert torch.equal(xs, xc) and not torch.equal(ys, yc)


def test_shape_and_colour_are_crossed_not_confounded(train):
    # Fully crossed design: every (shape, colour) pair occurs equally often (8 times in 800 train items), so
    # neither label predicts the other.
    ys = torch.tensor(train["shapes"].targets)
    yc = torch.tensor(train["colours"].targets)
    counts = torch.bincount(ys * 10 + yc, minlength=100)
    assert counts.min() == counts.max() == 8


def test_visually_different_tasks_share_labels(train, test):
    # digits (handwriting) and pixel_digits (bitmap font over photos) share classes and prompts; shapes and
    # outlines share classes. Their images differ: a linear pixel classifier tells digits from pixel_digits on
    # held-out images (> 95%), and an outline differs from the same shape filled in a fifth of its area or more.
    from sklearn.linear_model import LogisticRegression

    assert train["digits"].classnames == train["pixel_digits"].classnames
    assert train["digits"].templates == train["pixel_digits"].templates
    assert train["shapes"].classnames == train["outlines"].classnames

    def pixels(split, name):
        return _tensors(split[name])[0].flatten(1).numpy()

    xa, xb = pixels(train, "digits"), pixels(train, "pixel_digits")
    clf = LogisticRegression(max_iter=200).fit(np.concatenate([xa, xb]), np.r_[np.zeros(len(xa)), np.ones(len(xb))])
    ta, tb = pixels(test, "digits"), pixels(test, "pixel_digits")
    assert clf.score(np.concatenate([ta, tb]), np.r_[np.zeros(len(ta)), np.ones(len(tb))]) > 0.95
    for name in SHAPES:
        filled = shape_mask(name, 32, cx=0.5, cy=0.5, radius=0.4)
        outline = shape_mask(name, 32, cx=0.5, cy=0.5, radius=0.4, outline=0.07)
        assert np.abs(filled - outline).sum() > 0.2 * filled.sum(), name


def test_class_means_separate_classes(train, test):
    # Sanity of the labels where a raw-pixel class mean can see them: colour is a pixel statistic, and the
    # handwritten digits are centred and grey (~90% for this classifier). Shapes and glyphs in random colours at
    # random places over photos are not linearly visible in pixels; the pretrained model's zero-shot accuracy on
    # them (tests/pretrain) is their sanity check.
    for name, floor in (("digits", 0.8), ("colours", 0.5)):
        x, y = _tensors(train[name])
        means = torch.stack([x[y == c].mean(0).flatten() for c in range(train[name].num_classes)])
        xt, yt = _tensors(test[name])
        acc = float((torch.cdist(xt.flatten(1), means).argmin(1) == yt).float().mean())
        assert acc > max(floor, 2.0 / train[name].num_classes), (name, acc)


def test_deterministic_and_seeded():
    # A procedural source is a pure function of (source, split, seed, size): rebuilt from scratch (cache cleared)
    # it is bit-identical; another seed gives other images; train and test are different draws.
    a, la = render_source("outlines", "test", 0, 32)
    render_source.cache_clear()
    b, lb = render_source("outlines", "test", 0, 32)
    assert torch.equal(a, b) and all(torch.equal(la[k], lb[k]) for k in la)
    c, _ = render_source("outlines", "test", 1, 32)
    assert (a - c).abs().mean() > 0.05
    d, _ = render_source("outlines", "train", 0, 32)
    assert (a - d[: a.shape[0]]).abs().mean() > 0.05


def test_disjoint_from_the_corpus_rendering():
    # The stream never draws with the corpus' font or clean polygons: its glyphs come from the bitmap font
    # (a different typeface from Aileron) and its outlines are jittered. Same glyph, same placement: the masks
    # differ substantially.
    for ch in "08AK":
        a = glyph_mask(aileron_glyph(ch), 32, cx=0.5, cy=0.5, height=0.7)
        p = glyph_mask(pixel_glyph(ch), 32, cx=0.5, cy=0.5, height=0.7, smooth=False)
        assert np.abs(a - p).mean() > 0.05, ch
    rng = random.Random(0)
    for name in SHAPES:
        clean = shape_mask(name, 32, cx=0.5, cy=0.5, radius=0.4, outline=0.07)
        drawn = shape_mask(name, 32, cx=0.5, cy=0.5, radius=0.4, outline=0.07, jitter=0.06, rng=rng)
        assert np.abs(clean - drawn).mean() > 0.01, name


def test_shapes_are_distinct_polygons():
    # Every pair of shapes differs in its filled mask by > 8% of the image (square vs diamond included).
    masks = {n: shape_mask(n, 32, cx=0.5, cy=0.5, radius=0.4) for n in SHAPES}
    for i, a in enumerate(SHAPES):
        for b in SHAPES[i + 1:]:
            assert np.abs(masks[a] - masks[b]).mean() > 0.08, (a, b)
    assert len(shape_polygon("moon")) > 10
    with pytest.raises(ValueError, match="shape must be one of"):
        shape_polygon("blob")


def test_colours_are_what_their_names_say(train):
    # The subject's pixels (mask > 0.5) are near the palette colour of the label: the colour task is well defined.
    x, y = _tensors(train["colours"])
    palette = torch.tensor([rgb for _, rgb in COLOURS])
    images, labels = render_source("shapes", "train", 0, 32)
    assert torch.equal(labels["colour"], y) and torch.equal(images, x)
    for i in range(0, 800, 37):
        name = SHAPES[int(labels["shape"][i])]
        m = torch.from_numpy(shape_mask(name, 32, cx=0.5, cy=0.5, radius=0.2)) > 0.5  # the centre is inside
        centre = x[i][:, m].mean(1)
        nearest = int(torch.cdist(centre[None], palette).argmin())
        assert nearest == int(y[i]) or name in ("moon", "ring"), (i, name, centre, int(y[i]))


def test_few_shot_normalisation_and_size():
    few = _by_name(offline_mtil_benchmark(tasks=["letters", "digits"], few_shot=2))
    assert len(few["letters"]) == 52 and len(few["digits"]) == 20
    raw = offline_mtil_benchmark(tasks=["shapes"], image_size=16, **UNIT)[0]
    norm = offline_mtil_benchmark(tasks=["shapes"], image_size=16)[0]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert raw.dataset.images.shape[-2:] == (16, 16)
    assert_close(norm.dataset.images, (raw.dataset.images - mean) / std, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="few_shot applies to the train split only"):
        offline_mtil_benchmark(split="test", few_shot=2)
    with pytest.raises(ValueError, match="tasks must be"):
        offline_mtil_benchmark(tasks=["digits", "mnist"])
    with pytest.raises(ValueError, match="image_size"):
        offline_mtil_benchmark(image_size=4)


def test_build_task_stream_kind_offline_mtil():
    cfg = TaskStreamConfig(kind="offline-mtil", tasks=["parity", "outlines"], few_shot=3)
    stream = build_task_stream(cfg)
    assert [(tr.name, len(tr), len(te)) for tr, te in stream] == [("parity", 6, 539), ("outlines", 30, 400)]
    assert TaskStreamConfig(kind="offline-mtil").task_names() == list(OFFLINE_MTIL_TASKS)
    with pytest.raises(ValueError, match="tasks must be distinct names"):
        TaskStreamConfig(kind="offline-mtil", tasks=["digits_rotated"])
