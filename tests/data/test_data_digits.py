"""The offline digits benchmark: real sklearn digits, views, labels, split, normalisation, task relations."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from igsp.data import CLIP_MEAN, CLIP_STD, DIGITS_TASKS, digits_benchmark
from igsp.data.digits import digits_split_indices, load_digits_source

UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # no normalisation: pixels in [0, 1]


def _by_name(tasks):
    return {t.name: t for t in tasks}


def test_source_is_the_real_sklearn_digits():
    # 1,797 8x8 images, gray levels 0..16 scaled to [0, 1], about 180 per digit.
    images, digits = load_digits_source()
    assert images.shape == (1797, 8, 8) and images.dtype == torch.float32
    assert images.min() == 0 and images.max() == 1
    assert torch.bincount(digits).min() >= 170


def test_split_is_stratified_disjoint_and_seeded():
    # 70% of each digit to train, no overlap, same split for the same seed, another for another seed
    _, digits = load_digits_source()
    tr, te = digits_split_indices(digits, seed=0)
    assert not set(tr) & set(te) and len(tr) + len(te) == 1797
    for d in range(10):
        n_d = int((digits == d).sum())
        assert sum(int(digits[i]) == d for i in tr) == round(0.7 * n_d)
    assert digits_split_indices(digits, seed=0) == (tr, te)
    assert digits_split_indices(digits, seed=1)[0] != tr


def test_default_stream_shapes_and_text():
    # the default stream: all tasks, (3, 32, 32) float32 items, int labels matching targets, usable templates
    train = digits_benchmark()
    test = digits_benchmark(split="test")
    assert [t.name for t in train] == list(DIGITS_TASKS) == [t.name for t in test]
    assert len(DIGITS_TASKS) >= 4
    for tr, te in zip(train, test):
        assert len(tr) + len(te) == 1797
        x, y = tr.dataset[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
        assert y == tr.targets[0] and 0 <= y < tr.num_classes
        assert all(t.count("{}") == 1 for t in tr.templates)
    names = _by_name(train)
    assert names["parity"].classnames == ["even", "odd"] and names["digits"].num_classes == 10


def test_parity_has_digit_images_and_parity_labels():
    # Visually identical, logically distinct: same pixels item by item, label = digit % 2.
    t = _by_name(digits_benchmark(tasks=["digits", "parity"], split="test"))
    xd, yd = t["digits"].dataset.tensors()
    xp, yp = t["parity"].dataset.tensors()
    assert torch.equal(xd, xp)
    assert torch.equal(yp, yd % 2)


def test_views_invert_and_rotate_the_digits():
    # Inversion commutes with the bilinear resize (weights sum to 1) and so does a 90-degree rotation of a
    # square, so the rendered views must equal 1 - x and rot90(x) of the plain rendering.
    t = _by_name(digits_benchmark(tasks=["digits", "digits_inverted", "digits_rotated"], **UNIT))
    x, y = t["digits"].dataset.tensors()
    xi, yi = t["digits_inverted"].dataset.tensors()
    xr, yr = t["digits_rotated"].dataset.tensors()
    assert torch.equal(y, yi) and torch.equal(y, yr)
    assert_close(xi, 1.0 - x, atol=1e-6, rtol=0)
    assert_close(xr, torch.rot90(x, k=1, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert (x - xr).abs().mean() > 0.1  # the rotation really changes the images


def test_size_one_to_one_at_8_pixels():
    # image_size=8 is the source resolution: the plain view must return the sklearn pixels exactly.
    images, _ = load_digits_source()
    task = digits_benchmark(image_size=8, tasks=["digits"], **UNIT)[0]
    x, _ = task.dataset.tensors()
    ids = task.dataset.ids
    assert_close(x[:, 0], images[ids], atol=1e-6, rtol=0)


def test_noise_is_visible_and_fixed_per_image():
    t = _by_name(digits_benchmark(tasks=["digits", "digits_noisy"], **UNIT))
    x, _ = t["digits"].dataset.tensors()
    xn, _ = t["digits_noisy"].dataset.tensors()
    # mid-gray pixels are not clamped: there the difference is the N(0, 0.3) noise
    mid = (x > 0.35) & (x < 0.65)
    assert 0.2 < (xn - x)[mid].std() < 0.4
    # the same image gets the same noise in a few-shot subset and across rebuilds
    few = _by_name(digits_benchmark(tasks=["digits_noisy"], few_shot=3, **UNIT))["digits_noisy"]
    pos = {int(j): i for i, j in enumerate(t["digits_noisy"].dataset.ids)}
    for k in range(len(few)):
        j = int(few.dataset.ids[k])
        assert torch.equal(few.dataset[k][0], xn[pos[j]])
    assert torch.equal(digits_benchmark(tasks=["digits_noisy"], **UNIT)[0].dataset.tensors()[0], xn)


def test_normalisation_and_image_size():
    # mean/std are applied per channel after rendering; image_size sets the side (16; 224 as for ViT-B-16)
    raw = digits_benchmark(tasks=["digits"], image_size=16, **UNIT)[0].dataset.tensors()[0]
    norm = digits_benchmark(tasks=["digits"], image_size=16)[0].dataset.tensors()[0]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert raw.shape[-2:] == (16, 16) and raw.min() >= 0 and raw.max() <= 1
    assert_close(norm, (raw - mean) / std, atol=1e-6, rtol=0)
    big = digits_benchmark(tasks=["digits"], image_size=224)[0]
    assert big.dataset[0][0].shape == (3, 224, 224)  # rendered on demand, nothing precomputed at 224


def test_task_relations_a_selector_sees():
    # The design claim: digits and parity are visually indistinguishable; the shifted views are not. A
    # nearest-prototype (mean image) task classifier, trained on train and scored on test, must separate
    # digits from each shifted view (>95%) and must be at chance for digits vs parity.
    train = _by_name(digits_benchmark())
    test = _by_name(digits_benchmark(split="test"))

    def separability(a: str, b: str) -> float:
        protos = torch.stack([train[n].dataset.tensors()[0].mean(0).flatten() for n in (a, b)])
        correct = 0
        total = 0
        for k, n in enumerate((a, b)):
            x = test[n].dataset.tensors()[0].flatten(1)
            pred = torch.cdist(x, protos).argmin(1)
            correct += int((pred == k).sum())
            total += x.shape[0]
        return correct / total

    assert separability("digits", "parity") == 0.5  # identical images: every test image goes the same way
    for shifted in ("digits_inverted", "digits_rotated", "digits_noisy"):
        assert separability("digits", shifted) > 0.95, shifted


def test_digit_task_is_learnable():
    # Real digits: a nearest-class-mean classifier already gets ~90% (a broken label/image pairing gives 10%).
    tr = digits_benchmark(tasks=["digits"])[0]
    te = digits_benchmark(tasks=["digits"], split="test")[0]
    x, y = tr.dataset.tensors()
    means = torch.stack([x[y == c].mean(0).flatten() for c in range(10)])
    xt, yt = te.dataset.tensors()
    acc = (torch.cdist(xt.flatten(1), means).argmin(1) == yt).float().mean()
    assert acc > 0.8


def test_few_shot_and_errors():
    # 5 shots of each parity class; then each bad argument is refused naming it
    t = digits_benchmark(tasks=["parity"], few_shot=5)[0]
    assert torch.bincount(torch.tensor(t.targets)).tolist() == [5, 5]
    with pytest.raises(ValueError, match="few_shot"):
        digits_benchmark(split="test", few_shot=5)
    with pytest.raises(ValueError, match="tasks"):
        digits_benchmark(tasks=["letters"])
    with pytest.raises(ValueError, match="split"):
        digits_benchmark(split="validation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size"):
        digits_benchmark(image_size=0)
    with pytest.raises(ValueError, match="std"):
        digits_benchmark(std=(1.0, 0.0, 1.0))
