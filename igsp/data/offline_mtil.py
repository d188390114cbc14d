"""`offline-mtil`: a continual stream that a CLIP pretrained on the project's synthetic corpus can transfer to.

MTIL measures learning new tasks *and* keeping zero-shot ability on tasks not yet learned (Transfer). That needs a
backbone with zero-shot ability and tasks it can read. Nothing can be downloaded here, so the backbone is the
small CLIP of `igsp pretrain` (tag `igsp-small-synthetic`, trained on igsp.pretrain.corpus) and this stream asks
in the words that corpus taught it, about images it never saw:

| task           | images                                       | labels (classes) | relation                        |
|----------------|----------------------------------------------|------------------|---------------------------------|
| `digits`       | scikit-learn's real handwritten digits       | digit (10)       | handwriting: the corpus has     |
|                |                                              |                  | printed glyphs only             |
| `shapes`       | solid shapes over crops of real photographs  | shape (10)       |                                 |
| `parity`       | the `digits` images                          | even / odd (2)   | same images as `digits`,        |
|                |                                              |                  | another labelling rule          |
| `letters`      | capitals in Pillow's *bitmap* font, blocky   | letter (26)      | a typeface the corpus lacks     |
| `colours`      | the `shapes` images                          | colour (10)      | same images as `shapes`,        |
|                |                                              |                  | another labelling rule          |
| `pixel_digits` | digits in the bitmap font over photographs   | digit (10)       | shares labels and prompts with  |
|                |                                              |                  | `digits`, looks different       |
| `outlines`     | hand-drawn (jittered) shape outlines, photos | shape (10)       | shares labels with `shapes`     |

Disjoint from the corpus by construction: the corpus draws glyphs in Aileron, clean polygons and procedural
backgrounds from `random.Random(seed * 2**48 + index)`; the stream uses real handwriting, the bitmap font,
jittered outlines and photograph crops (scikit-learn's two bundled photos), from string-seeded generators
(`"offline-mtil/<source>/<split>/<seed>/<index>"`). Class names and templates use only corpus words (a test
checks every prompt token against the corpus vocabulary).

Procedural sources are fully crossed: item i of `shapes` has shape `i % 10` and colour `(i // 10) % 10`, so shape
and colour are independent labels over the same images (no shortcut from one to the other). Train and test are
different draws (800 / 400 items; letters 780 / 390, 30 / 15 per letter); scikit-learn's digits use the stratified
70 / 30 split of igsp.data.digits. A procedural source is rendered once per process and size (~1 ms an image,
cached), so building the stream costs ~5 s the first time.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from igsp.data.base import CLIP_MEAN, CLIP_STD, Split, TaskDataset, TensorTaskDataset, few_shot_indices, validate_split
from igsp.data.digits import DigitsViewDataset, digits_split_indices, load_digits_source
from igsp.data.procedural import (
    COLOURS,
    DIGITS,
    LETTERS,
    SHAPES,
    composite,
    glyph_mask,
    jitter_colour,
    normalise,
    photo_background,
    pixel_glyph,
    shape_mask,
)

__all__ = ["OFFLINE_MTIL_TASKS", "OfflineTaskSpec", "offline_mtil_benchmark", "render_source"]

logger = logging.getLogger(__name__)

Source = Literal["handwritten", "shapes", "letters", "pixel_digits", "outlines"]
LabelRule = Literal["digit", "parity", "shape", "colour", "letter"]

_COLOUR_NAMES = tuple(name for name, _ in COLOURS)
# Items per split of a procedural source: 800 train = 8 per (shape, colour) pair, 400 test = 4 per pair; letters
# 30 / 15 per letter. Enough for ~120 steps of batch 32 (~5 epochs) and a test error bar of ~2.5 points.
_SIZES = {"train": 800, "test": 400}
_LETTER_SIZES = {"train": 780, "test": 390}


@dataclass(frozen=True)
class OfflineTaskSpec:
    """One task of the offline-mtil stream: its image source, label rule and text side."""

    name: str
    source: Source
    label_rule: LabelRule
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    purpose: str


OFFLINE_MTIL_TASKS: dict[str, OfflineTaskSpec] = {
    "digits": OfflineTaskSpec(
        "digits", "handwritten", "digit", DIGITS, ("a photo of the digit {}.", "a photo of the number {}."),
        "real handwriting (scikit-learn); the corpus only has printed glyphs"),
    "shapes": OfflineTaskSpec(
        "shapes", "shapes", "shape", SHAPES, ("a photo of a {}.", "a photo of a {} shape."),
        "solid shapes over real photographs (the corpus has procedural backgrounds only)"),
    "parity": OfflineTaskSpec(
        "parity", "handwritten", "parity", ("even", "odd"), ("a photo of an {} number.", "a photo of an {} digit."),
        "the digits images, another labelling rule: a task selector cannot tell them apart"),
    "letters": OfflineTaskSpec(
        "letters", "letters", "letter", LETTERS, ("a photo of the letter {}.", "a photo of a capital {}."),
        "capitals in a typeface the corpus lacks (Pillow's bitmap font), blocky"),
    "colours": OfflineTaskSpec(
        "colours", "shapes", "colour", _COLOUR_NAMES, ("a photo of a {} shape.", "a photo of something {}."),
        "the shapes images, another labelling rule"),
    "pixel_digits": OfflineTaskSpec(
        "pixel_digits", "pixel_digits", "digit", DIGITS, ("a photo of the digit {}.", "a photo of the number {}."),
        "shares labels and prompts with digits, visually different (bitmap font over photographs)"),
    "outlines": OfflineTaskSpec(
        "outlines", "outlines", "shape", SHAPES, ("a photo of the outline of a {}.", "a drawing of a {}."),
        "shares labels with shapes, visually different (hand-drawn outlines)"),
}


def _item_rng(source: str, split: str, seed: int, index: int) -> random.Random:
    # A string seed is hashed (SHA-512) by random.Random: stable across platforms and Python versions, and it
    # never coincides with the corpus generators, which are seeded with integers.
    return random.Random(f"offline-mtil/{source}/{split}/{seed}/{index}")


def _draw(source: Source, label: int, colour_id: int, rng: random.Random, size: int) -> np.ndarray:
    """One procedural stream image, numpy float32 `(3, size, size)` in [0, 1]."""
    colour = jitter_colour(COLOURS[colour_id][1], rng)
    cx, cy = 0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08)
    if source in ("shapes", "outlines"):
        name = SHAPES[label]
        if name in ("square", "diamond"):
            rot = rng.uniform(-12.0, 12.0)
        elif name == "arrow":
            rot = rng.choice((0.0, 90.0, 180.0, 270.0)) + rng.uniform(-15.0, 15.0)
        elif name == "moon":
            rot = rng.uniform(0.0, 360.0)
        else:
            rot = rng.uniform(-25.0, 25.0)
        radius = rng.uniform(0.26, 0.44)
        if source == "shapes":
            mask = shape_mask(name, size, cx=cx, cy=cy, radius=radius, rotation=rot)
        else:
            mask = shape_mask(name, size, cx=cx, cy=cy, radius=radius, rotation=rot, outline=rng.uniform(0.05, 0.09),
                              jitter=0.06, rng=rng)
    else:
        char = (LETTERS if source == "letters" else DIGITS)[label]
        mask = glyph_mask(pixel_glyph(char), size, cx=cx, cy=cy, height=rng.uniform(0.5, 0.8),
                          rotation=rng.uniform(-8.0, 8.0), aspect=rng.uniform(0.9, 1.3), smooth=False)
    return composite(mask, colour, photo_background(size, colour, rng))


@functools.lru_cache(maxsize=16)
def render_source(source: Source, split: Split, seed: int,
                  image_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """All images of one procedural source and split, `(N, 3, S, S)` in [0, 1], and their labels by rule.

    Labels: shapes / outlines -> {"shape", "colour"}; letters -> {"letter", "colour"}; pixel_digits -> {"digit",
    "parity", "colour"}. Item i has class `i % C` and colour `(i // C) % 10` (fully crossed). Cached per process.
    """
    if source == "handwritten":
        raise ValueError("render_source: 'handwritten' is scikit-learn's digits (load_digits_source), not rendered")
    n = (_LETTER_SIZES if source == "letters" else _SIZES)[split]
    classes = len(LETTERS) if source == "letters" else 10
    labels = torch.arange(n) % classes
    colours = (torch.arange(n) // classes) % len(COLOURS)
    images = torch.from_numpy(np.stack([
        _draw(source, int(labels[i]), int(colours[i]), _item_rng(source, split, seed, i), image_size)
        for i in range(n)
    ]))
    key = {"shapes": "shape", "outlines": "shape", "letters": "letter", "pixel_digits": "digit"}[source]
    out = {key: labels, "colour": colours}
    if source == "pixel_digits":
        out["parity"] = labels % 2
    logger.info("offline-mtil %s/%s: rendered %d images at %dx%d", source, split, n, image_size, image_size)
    return images, out


def offline_mtil_benchmark(
    image_size: int = 32,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    *,
    split: Split = "train",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    few_shot: int | None = None,
) -> list[TaskDataset]:
    """One split of every task of the offline-mtil stream, in stream order.

    Args:
        image_size: output side S (32 for the igsp-small model).
        seed: the scikit-learn split and few-shot seed, and the procedural draw (another seed = other images).
        tasks: task names in stream order (default: all of `OFFLINE_MTIL_TASKS`, in its order).
        split: "train" or "test".
        mean, std: per-channel normalisation (default CLIP's, as the pretraining corpus).
        few_shot: shots per class of the train split (None = full; train split only).
    Returns:
        list of TaskDataset; each `dataset` yields `(float32 (3, S, S), int label)`.
    """
    split = validate_split(split)
    names = list(OFFLINE_MTIL_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in OFFLINE_MTIL_TASKS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"tasks must be a non-empty list of distinct names from {list(OFFLINE_MTIL_TASKS)}, "
                         f"got {tasks!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std must have 3 entries (std > 0), got mean={mean!r}, std={std!r}")
    if few_shot is not None and split != "train":
        raise ValueError(f"few_shot applies to the train split only, got few_shot={few_shot} with split={split!r}")

    out: list[TaskDataset] = []
    for name in names:
        spec = OFFLINE_MTIL_TASKS[name]
        if spec.source == "handwritten":
            images, digits = load_digits_source()
            train_idx, test_idx = digits_split_indices(digits, seed)
            idx = torch.tensor(train_idx if split == "train" else test_idx, dtype=torch.int64)
            labels = digits[idx] if spec.label_rule == "digit" else digits[idx] % 2
            if few_shot is not None:
                keep = torch.tensor(few_shot_indices(labels.tolist(), few_shot, seed), dtype=torch.int64)
                idx, labels = idx[keep], labels[keep]
            ds: torch.utils.data.Dataset = DigitsViewDataset(images[idx], labels, idx, "identity", image_size,
                                                             mean, std, seed)
        else:
            images, by_rule = render_source(spec.source, split, seed, image_size)
            labels = by_rule[spec.label_rule]
            keep = torch.arange(labels.numel())
            if few_shot is not None:
                keep = torch.tensor(few_shot_indices(labels.tolist(), few_shot, seed), dtype=torch.int64)
            labels = labels[keep]
            ds = TensorTaskDataset(normalise(images[keep], mean, std), labels.clone())
        out.append(TaskDataset(name, ds, list(spec.classnames), list(spec.templates), split, labels.tolist()))
        logger.info("offline-mtil %s/%s: %d images, %d classes, %dx%d", name, split, len(ds), len(spec.classnames),
                    image_size, image_size)
    return out
