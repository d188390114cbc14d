"""A tiny, fully synthetic task stream for fast trainer and selector tests.

Task `t` draws coloured sine gratings: its colour (a fixed palette of 8 well-separated RGB colours) and its
stripe orientation (`pi * t / num_tasks`) are the task's signature, so a prototype selector can tell tasks apart
from the mean colour alone; class `c` is the stripe frequency (`c + 1` cycles across the image), so a classifier
can tell classes apart inside a task. Per-sample variation: a random phase in [-pi/4, pi/4], a brightness factor
in [0.8, 1.0] and Gaussian pixel noise, so samples are not copies yet every class stays separable.

The whole stream is generated at once as float32 tensors (3 tasks x 4 classes x 16 samples at 32x32 is 2.4 MB,
a few milliseconds), from a generator seeded by `(seed, split)`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from igsp.data.base import CLIP_MEAN, CLIP_STD, Split, TaskDataset, TensorTaskDataset, validate_split

logger = logging.getLogger(__name__)

__all__ = ["SYNTHETIC_COLOURS", "SYNTHETIC_TEMPLATES", "synthetic_benchmark"]

SYNTHETIC_TEMPLATES: tuple[str, ...] = ("a photo of {}.", "a picture of {}.")

SYNTHETIC_COLOURS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("red", (0.9, 0.1, 0.1)),
    ("green", (0.1, 0.8, 0.1)),
    ("blue", (0.1, 0.2, 0.9)),
    ("yellow", (0.9, 0.85, 0.1)),
    ("purple", (0.6, 0.1, 0.8)),
    ("cyan", (0.1, 0.8, 0.85)),
    ("orange", (0.95, 0.5, 0.05)),
    ("pink", (0.95, 0.45, 0.7)),
)


def synthetic_benchmark(
    num_tasks: int = 3,
    num_classes: int = 4,
    image_size: int = 32,
    samples_per_class: int = 16,
    seed: int = 0,
    *,
    split: Split = "train",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    noise_std: float = 0.05,
) -> list[TaskDataset]:
    """One split of a stream of `num_tasks` synthetic tasks named `synthetic_0`, `synthetic_1`, ...

    Args:
        num_tasks: 1..8 (one palette colour each).
        num_classes: classes per task, 1..image_size // 4 (a stripe period of at least 4 pixels).
        image_size: output side S.
        samples_per_class: items per class in this split.
        seed: generator seed; train and test draw from different streams of it.
        split: "train" or "test".
        mean, std: per-channel normalisation applied last (default CLIP's).
        noise_std: std of the additive pixel noise in [0, 1] units.
    Returns:
        list of TaskDataset; each `dataset` yields `(float32 (3, S, S), int label)`, items ordered by class.
    """
    split = validate_split(split)
    if not isinstance(num_tasks, int) or not 1 <= num_tasks <= len(SYNTHETIC_COLOURS):
        raise ValueError(f"num_tasks must be an int in [1, {len(SYNTHETIC_COLOURS)}], got {num_tasks!r}")
    if not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size must be an int >= 4, got {image_size!r}")
    if not isinstance(num_classes, int) or not 1 <= num_classes <= image_size // 4:
        raise ValueError(f"num_classes must be an int in [1, {image_size // 4}] for image_size={image_size} "
                         f"(stripe period >= 4 px), got {num_classes!r}")
    if not isinstance(samples_per_class, int) or samples_per_class < 1:
        raise ValueError(f"samples_per_class must be a positive int, got {samples_per_class!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std must have 3 entries (std > 0), got mean={mean!r}, std={std!r}")

    # Distinct streams for (seed, split): 2 * seed + {0, 1} never collide across seeds.
    gen = torch.Generator().manual_seed(2 * seed + (split == "test"))
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    n = num_classes * samples_per_class
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)

    out: list[TaskDataset] = []
    for t in range(num_tasks):
        colour_name, rgb = SYNTHETIC_COLOURS[t]
        theta = math.pi * t / num_tasks
        proj = xx * math.cos(theta) + yy * math.sin(theta)  # (S, S)
        freq = (labels + 1).to(torch.float32).view(n, 1, 1)
        phase = (torch.rand(n, 1, 1, generator=gen) - 0.5) * (math.pi / 2)
        grating = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * proj + phase)  # (n, S, S) in [0, 1]
        brightness = 0.8 + 0.2 * torch.rand(n, 1, 1, 1, generator=gen)
        img = brightness * grating.unsqueeze(1) * torch.tensor(rgb).view(1, 3, 1, 1)
        img = (img + noise_std * torch.randn(n, 3, image_size, image_size, generator=gen)).clamp(0.0, 1.0)
        img = (img - mean_t) / std_t
        classnames = [f"{colour_name} stripes with {c + 1} bands" for c in range(num_classes)]
        out.append(
            TaskDataset(
                name=f"synthetic_{t}",
                dataset=TensorTaskDataset(img, labels.clone()),
                classnames=classnames,
                templates=list(SYNTHETIC_TEMPLATES),
                split=split,
                targets=labels.tolist(),
            )
        )
    logger.info("synthetic/%s: %d tasks x %d classes x %d samples, %dx%d", split, num_tasks, num_classes,
                samples_per_class, image_size, image_size)
    return out
