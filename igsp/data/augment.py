"""Training augmentation as the MTIL reference applies it, made a pure function of a per-sample seed.

ZSCL and MoE-Adapters train with CLIP's train preprocess: `RandomResizedCrop(224, scale=(0.9, 1.0),
interpolation=bicubic)`, RGB conversion, `ToTensor`, `Normalize` (MoE-Adapters `mtil/clip/clip.py` `_transform`;
open_clip's `preprocess_train` for the OpenAI ViT-B/16 is the same transform, tests/data/test_augment.py checks
it). Evaluation, and the few-shot images' *selection*, use the evaluation preprocess (resize + centre crop).

A random transform that draws from the global RNG would (a) make a resumed run see other crops than the
uninterrupted run, and (b) couple the crops to every other consumer of that RNG (router noise, candidate
initialisation). Here each crop draws from its own seed instead:

- `SeededAugment(transform)(image, seed)` runs any torchvision transform with the CPU default generator forked
  and seeded with `seed` (the caller's RNG state is restored afterwards; CUDA generators are not touched);
- an `AugmentedDataset` answers `dataset[i]` with the base item (the evaluation view: task-selector prototypes,
  statistics) and `dataset[(i, seed)]` with the augmented one;
- `seeded_batches(dataset, batch_sampler)` turns the engine's step-indexed batches of indices into batches of
  `(index, seed)` with `seed = mix_seed(sampler.seed, step, position in the global batch)`, so a crop depends only
  on (train seed, task, step, position): identical after a resume, and identical for any number of DDP ranks.

Few-shot: MoE-Adapters builds its few-shot set once, by iterating the train loader (train transform applied) and
keeping the first k images per class as tensors; each kept image therefore trains with *one* crop, drawn in that
pass, for all iterations. `per_item=True` reproduces that: the seed is `mix_seed(sampler.seed, index)`, fixed per
image for the whole task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from igsp.data.base import TaskDataset

logger = logging.getLogger(__name__)

__all__ = [
    "AUG_INTERPOLATION",
    "AUG_SCALE",
    "AugmentedDataset",
    "SeededAugment",
    "SeededBatches",
    "augment_task",
    "describe_augmentation",
    "mix_seed",
    "seeded_batches",
    "tensor_train_augment",
]

# The reference's RandomResizedCrop: area fraction in [0.9, 1.0] (aspect ratio torchvision's default [3/4, 4/3]),
# bicubic resampling (MoE-Adapters mtil/clip/clip.py; ZSCL mtil/clip/clip.py).
AUG_SCALE: tuple[float, float] = (0.9, 1.0)
AUG_INTERPOLATION = "bicubic"

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 chain): stable across Python versions and processes.

    Neighbouring inputs (step 7 vs 8, position 0 vs 1) give unrelated seeds; the result is a valid
    `torch.Generator.manual_seed` argument.
    """
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


class SeededAugment:
    """`augment(image, seed)`: the random `transform` applied with the CPU RNG seeded by `seed`.

    Works for any transform that draws from torch's default CPU generator (torchvision's v1 and v2 transforms do).
    The caller's RNG state is restored afterwards, so augmenting does not move the training RNG stream.
    """

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.transform = transform

    def __call__(self, image: Any, seed: int) -> Any:
        # fork_rng(devices=[]) saves and restores only the CPU generator; seeding through default_generator
        # (not torch.manual_seed) leaves the CUDA generators alone when this runs in the main process.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            return self.transform(image)

    def __repr__(self) -> str:
        return f"SeededAugment({self.transform!r})"


def tensor_train_augment(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference crop for streams that are tensors already (digits, synthetic): (3, S, S) -> (3, S, S)."""
    from torchvision import transforms as T

    return T.RandomResizedCrop(image_size, scale=AUG_SCALE, interpolation=T.InterpolationMode.BICUBIC,
                               antialias=True)


class AugmentedDataset(Dataset):
    """A train split with seeded augmentation: `ds[i]` is `base[i]`, `ds[(i, seed)]` is the augmented item.

    Args:
        base: the split as built (its items are the evaluation view).
        augment: the seeded train transform.
        raw: `raw(i) -> (image, label)`, the item the augmentation starts from (MTIL: the decoded RGB PIL image,
            before any resizing); default `base[i]` (tensor streams).
        per_item: one crop per image for the whole task (few-shot, as MoE-Adapters) instead of one per draw.
    Attribute reads not found here go to `base` (`labels`, `paths`, ...).
    """

    def __init__(self, base: Dataset, augment: SeededAugment, *, raw: Callable[[int], tuple[Any, int]] | None = None,
                 per_item: bool = False) -> None:
        if not isinstance(augment, SeededAugment):
            raise TypeError(f"augment must be a SeededAugment, got {type(augment).__name__}")
        self.base = base
        self.augment = augment
        self.raw = raw if raw is not None else base.__getitem__
        self.per_item = bool(per_item)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        if isinstance(key, tuple):
            index, seed = key
            image, label = self.raw(index)
            return self.augment(image, seed), label
        return self.base[key]

    def __getattr__(self, name: str) -> Any:
        if name == "base":  # not set yet (unpickling in a DataLoader worker): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """The batches of a step-indexed batch sampler with a seed attached to every index.

    `sampler` must be the engine's `StepBatchSampler` (or expose the same `start`, `seed`, `rank`, `world` and
    yield this rank's share `global_batch(step)[rank::world]` of each step in order). Element j of a rank's share
    sits at position `rank + j * world` of the global batch; its seed is `mix_seed(seed, step, position)`, or
    `mix_seed(seed, index)` with `per_item`.
    """

    def __init__(self, sampler: Any, *, per_item: bool = False) -> None:
        for attr in ("start", "seed", "rank", "world"):
            if not hasattr(sampler, attr):
                raise TypeError(f"sampler must be a step-indexed batch sampler with .{attr} (StepBatchSampler), "
                                f"got {type(sampler).__name__}")
        self.sampler = sampler
        self.per_item = per_item

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.sampler
        for k, batch in enumerate(s):
            step = s.start + k
            if self.per_item:
                yield [(i, mix_seed(s.seed, i)) for i in batch]
            else:
                yield [(i, mix_seed(s.seed, step, s.rank + j * s.world)) for j, i in enumerate(batch)]

    def __len__(self) -> int:
        return len(self.sampler)


def seeded_batches(dataset: Dataset, sampler: Any) -> Sampler:
    """`SeededBatches(sampler)` for an `AugmentedDataset`, else `sampler` unchanged (the engine's one call)."""
    if isinstance(dataset, AugmentedDataset):
        return SeededBatches(sampler, per_item=dataset.per_item)
    return sampler


def augment_task(task: TaskDataset, augment: SeededAugment, *, raw: Callable[[int], tuple[Any, int]] | None = None,
                 per_item: bool = False) -> TaskDataset:
    """`task` with its dataset wrapped in an `AugmentedDataset` (names, templates and targets unchanged)."""
    wrapped = AugmentedDataset(task.dataset, augment, raw=raw, per_item=per_item)
    return TaskDataset(name=task.name, dataset=wrapped, classnames=task.classnames, templates=task.templates,
                       split=task.split, targets=task.targets)


def describe_augmentation(enabled: bool, image_size: int | None, *, few_shot: bool = False) -> str:
    """One line for `igsp plan`: what the train splits go through."""
    if not enabled:
        return "none (evaluation preprocess)"
    size = "?" if image_size is None else str(image_size)
    where = "one crop per image for the task (few-shot, as MoE-Adapters)" if few_shot else "a new crop per draw"
    return (f"RandomResizedCrop({size}, scale=({AUG_SCALE[0]}, {AUG_SCALE[1]}), {AUG_INTERPOLATION}), seeded; "
            f"{where}")
