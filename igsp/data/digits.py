"""The offline default benchmark: a continual stream of tasks over scikit-learn's bundled handwritten digits.

`sklearn.datasets.load_digits` ships with scikit-learn (1,797 real 8x8 grayscale scans, 16 gray levels, about
180 per digit), so this benchmark runs anywhere with no download. Each task shows the same pool of images under a
different *view* (identity, inverted, rotated, noisy) and asks a different *question* (which digit, even or odd),
so the stream has both kinds of task relation the iGSP abstract talks about:

| task              | images               | labels              | why it is in the stream                          |
|-------------------|----------------------|---------------------|--------------------------------------------------|
| `digits`          | as scanned           | digit 0-9           | the base task: everything later relates to it    |
| `parity`          | identical to digits  | even / odd          | visually identical, logically distinct: reusing  |
|                   |                      |                     | `digits` experts blindly is negative transfer    |
| `digits_inverted` | 1 - x (dark on light)| digit 0-9           | visually different, same label semantics: the    |
|                   |                      |                     | historical subspace should be reusable           |
| `digits_rotated`  | rotated 90 degrees   | digit 0-9           | a second, geometric shift with the same labels   |
|                   |                      |                     | (90 degrees, not 180, so 6 and 9 stay distinct)  |
| `digits_noisy`    | + Gaussian noise 0.3 | digit 0-9           | a mild shift: the most reuse, the fewest new     |
|                   |                      |                     | experts should survive pruning                   |

Images are rendered on the fly (8x8 source -> view -> bilinear resize to `image_size` -> noise -> 3 channels ->
normalise with `mean`/`std`), so the memory cost is the 8x8 source whatever the image size (at 224x224 a
precomputed task would take ~1 GB). The noise of image `j` comes from a generator seeded with `(seed, j)`, so an
image looks the same in every epoch, split and few-shot subset.

Split: stratified by digit, `train_fraction` (0.7) of each digit to train, the rest to test, drawn with a
generator seeded by `seed`; every task uses the same split, so `parity` tests on exactly the `digits` test images.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from igsp.data.base import (
    CLIP_MEAN,
    CLIP_STD,
    Split,
    TaskDataset,
    check_stream_arguments,
    few_shot_indices,
    validate_split,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DIGITS_TASKS",
    "DigitsTaskSpec",
    "DigitsViewDataset",
    "digits_benchmark",
    "digits_split_indices",
    "load_digits_source",
]

View = Literal["identity", "invert", "rot90", "noise"]
LabelRule = Literal["digit", "parity"]

# Noise std in [0, 1] pixel units for digits_noisy: at 0.3 strokes (value ~1 on ~0) stay readable to a person
# while the per-pixel statistics move well away from the clean images.
NOISE_STD = 0.3
_DIGIT_NAMES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class DigitsTaskSpec:
    """One task of the digits stream: the view of the images, the label rule and the text side."""

    name: str
    view: View
    label_rule: LabelRule
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    purpose: str


DIGITS_TASKS: dict[str, DigitsTaskSpec] = {
    "digits": DigitsTaskSpec(
        "digits", "identity", "digit", tuple(_DIGIT_NAMES),
        ("a photo of the digit {}.", 'a photo of the number: "{}".'),
        "base task: digit identity",
    ),
    "parity": DigitsTaskSpec(
        "parity", "identity", "parity", ("even", "odd"),
        ("a photo of an {} number.", "a photo of a digit that is {}."),
        "same images as digits, different labels: negative transfer if digits experts are reused blindly",
    ),
    "digits_inverted": DigitsTaskSpec(
        "digits_inverted", "invert", "digit", tuple(_DIGIT_NAMES),
        ("an inverted photo of the digit {}.", "a photo of the digit {}, dark on light."),
        "visual shift (inverted contrast), same labels: reuse should show",
    ),
    "digits_rotated": DigitsTaskSpec(
        "digits_rotated", "rot90", "digit", tuple(_DIGIT_NAMES),
        ("a rotated photo of the digit {}.", "a photo of the digit {}, turned sideways."),
        "visual shift (90-degree rotation), same labels: reuse should show",
    ),
    "digits_noisy": DigitsTaskSpec(
        "digits_noisy", "noise", "digit", tuple(_DIGIT_NAMES),
        ("a noisy photo of the digit {}.", "a grainy photo of the digit {}."),
        "mild visual shift (additive noise), same labels: the most reuse",
    ),
}


@functools.lru_cache(maxsize=1)
def load_digits_source() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 scikit-learn digits as float32 `(1797, 8, 8)` in [0, 1] (gray level / 16) and int64 `(1797,)`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the [train] extra
        raise ImportError("the digits benchmark needs scikit-learn: pip install 'igsp[train]'") from exc
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    targets = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, targets


def digits_split_indices(targets: torch.Tensor, seed: int, train_fraction: float = 0.7) -> tuple[list[int], list[int]]:
    """Stratified seeded split: for each digit, the first `round(train_fraction * n_d)` items of one seeded
    permutation go to train, the rest to test.

    Args:
        targets: int64 `(N,)` digit labels.
    Returns:
        (train, test): sorted index lists, disjoint, covering range(N).
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    perm = torch.randperm(targets.numel(), generator=torch.Generator().manual_seed(seed))
    train: list[int] = []
    test: list[int] = []
    for d in targets.unique().tolist():
        members = perm[targets[perm] == d].tolist()
        k = round(train_fraction * len(members))
        train += members[:k]
        test += members[k:]
    return sorted(train), sorted(test)


class DigitsViewDataset(Dataset):
    """Renders digit images under one view: item `i` is `(image float32 (3, S, S), label int)`.

    Args:
        source: float32 `(N, 8, 8)` in [0, 1], the images of this split.
        labels: int64 `(N,)`.
        ids: int64 `(N,)`, each image's index among the 1,797 (seeds its noise).
        view: "identity", "invert" (1 - x), "rot90" (90 degrees counter-clockwise) or "noise" (+N(0, noise_std)).
        image_size: output side S.
        mean, std: per-channel normalisation applied last.
        seed: noise seed.
    """

    def __init__(
        self,
        source: torch.Tensor,
        labels: torch.Tensor,
        ids: torch.Tensor,
        view: View,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
        noise_std: float = NOISE_STD,
    ) -> None:
        if view not in ("identity", "invert", "rot90", "noise"):
            raise ValueError(f"view must be one of identity/invert/rot90/noise, got {view!r}")
        self.source = source
        self.labels = labels
        self.ids = ids
        self.view = view
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.seed = seed
        self.noise_std = noise_std

    def __len__(self) -> int:
        return self.source.shape[0]

    def render(self, rows: torch.Tensor) -> torch.Tensor:
        """Images of the given rows as float32 `(len(rows), 3, S, S)`, normalised."""
        x = self.source[rows]
        if self.view == "invert":
            x = 1.0 - x
        elif self.view == "rot90":
            x = torch.rot90(x, k=1, dims=(-2, -1))
        s = self.image_size
        # antialias only matters when shrinking below the 8x8 source.
        x = F.interpolate(x.unsqueeze(1), size=(s, s), mode="bilinear", align_corners=False, antialias=s < 8)
        if self.view == "noise":
            noise = torch.stack([
                torch.randn(1, s, s, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + int(j)))
                for j in self.ids[rows].tolist()
            ])
            x = x + self.noise_std * noise
        x = x.clamp(0.0, 1.0).expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.render(torch.tensor([i]))[0], int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All items at once: float32 `(N, 3, S, S)` and int64 `(N,)`."""
        return self.render(torch.arange(len(self))), self.labels.clone()


def digits_benchmark(
    image_size: int = 32,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    *,
    split: Split = "train",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    train_fraction: float = 0.7,
    few_shot: int | None = None,
) -> list[TaskDataset]:
    """One split of every task of the digits stream, in stream order.

    Args:
        image_size: output side S (32 = the tiny CLIP preset; 224 for ViT-B-16).
        seed: split, few-shot and noise seed.
        tasks: task names in stream order (default: all of `DIGITS_TASKS`, in its order).
        split: "train" or "test".
        mean, std: per-channel normalisation (default CLIP's).
        train_fraction: share of each digit in train (stratified).
        few_shot: shots per class of the train split (None = full; train split only).
    Returns:
        list of TaskDataset; each `dataset` yields `(float32 (3, S, S), int label)`.
    """
    split = validate_split(split)
    names = check_stream_arguments(list(DIGITS_TASKS), tasks, image_size, mean, std, few_shot, split)

    images, digits = load_digits_source()
    train_idx, test_idx = digits_split_indices(digits, seed, train_fraction)
    base_idx = train_idx if split == "train" else test_idx
    out: list[TaskDataset] = []
    for name in names:
        spec = DIGITS_TASKS[name]
        idx = torch.tensor(base_idx, dtype=torch.int64)
        labels = digits[idx] if spec.label_rule == "digit" else digits[idx] % 2
        if few_shot is not None:
            keep = torch.tensor(few_shot_indices(labels.tolist(), few_shot, seed), dtype=torch.int64)
            idx, labels = idx[keep], labels[keep]
        ds = DigitsViewDataset(images[idx], labels, idx, spec.view, image_size, mean, std, seed)
        out.append(TaskDataset(name, ds, list(spec.classnames), list(spec.templates), split, labels.tolist()))
        logger.info("digits %s/%s: %d images, %d classes, %dx%d", name, split, len(ds), len(spec.classnames),
                    image_size, image_size)
    return out
