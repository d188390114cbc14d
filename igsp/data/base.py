"""Shared pieces of the data layer: the `TaskDataset` record, the missing-data error, splits and few-shot sampling.

Every benchmark in `igsp.data` (MTIL, digits, synthetic) hands the trainer the same record per task and split:
a torch `Dataset` yielding `(image, label)` with `image` a float32 tensor `(3, H, W)` (after the transform) and
`label` a Python `int` in `[0, len(classnames))`, plus the class names and prompt templates the CLIP text tower
turns into class embeddings.

Determinism: every random choice here (80/20 splits, few-shot draws) uses a private `torch.Generator` seeded
explicitly, over an index order that does not depend on the file system, so two machines holding the same files
get the same samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DatasetNotFoundError",
    "Split",
    "TaskDataset",
    "TensorTaskDataset",
    "check_stream_arguments",
    "few_shot_indices",
    "random_split_indices",
    "shuffled_pass_order",
    "validate_split",
]

Split = Literal["train", "test"]

# The OpenAI CLIP normalisation (open_clip.constants.OPENAI_DATASET_MEAN/STD); the digits and synthetic
# benchmarks build tensors directly, so they apply it themselves.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder is missing or incomplete; the message names the folder, the layout and how to get it."""


@dataclass
class TaskDataset:
    """One split of one task: the images, their labels and the text side CLIP needs.

    Attributes:
        name: task name (a key of `igsp.data.mtil.MTIL_DATASETS`, of `DIGITS_TASKS`, or `synthetic_<t>`).
        dataset: torch Dataset; item `i` is `(image, label)`, `image` float32 `(3, H, W)` (after the transform for
            MTIL, already normalised for digits/synthetic), `label` an `int` in `[0, num_classes)`.
        classnames: readable class names, index = label.
        templates: prompt templates with one `{}` placeholder, e.g. `"a photo of a {}, a type of aircraft."`.
        split: `"train"` or `"test"`.
        targets: the label of every item, in item order (len == len(dataset)), for class-balanced sampling,
            few-shot draws and statistics without decoding images. If omitted it is taken from the dataset's
            `labels` or `targets` attribute, else by iterating over the dataset once (decodes every item).
    """

    name: str
    dataset: Dataset
    classnames: list[str]
    templates: list[str]
    split: Split = "train"
    targets: list[int] = None  # type: ignore[assignment]  # filled in __post_init__

    def __post_init__(self) -> None:
        if self.targets is None:
            found = getattr(self.dataset, "labels", None)
            if found is None:
                found = getattr(self.dataset, "targets", None)
            if found is None:
                found = [label for _, label in self.dataset]  # type: ignore[attr-defined]
            self.targets = found
        self.targets = [int(t) for t in (self.targets.tolist() if torch.is_tensor(self.targets) else self.targets)]
        if not self.classnames:
            raise ValueError(f"TaskDataset {self.name!r}: classnames must be non-empty, got {self.classnames!r}")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError(
                f"TaskDataset {self.name!r}: templates must be a non-empty list of strings with exactly one '{{}}', "
                f"got {self.templates!r}"
            )
        validate_split(self.split)
        n = len(self.dataset)  # type: ignore[arg-type]
        if len(self.targets) != n:
            raise ValueError(f"TaskDataset {self.name!r}: len(targets)={len(self.targets)} but len(dataset)={n}")
        bad = [t for t in self.targets if not 0 <= t < len(self.classnames)]
        if bad:
            raise ValueError(
                f"TaskDataset {self.name!r}: labels must lie in [0, {len(self.classnames)}), got e.g. {bad[:5]}"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes (= len(classnames))."""
        return len(self.classnames)

    def __len__(self) -> int:
        return len(self.targets)

    def prompts(self, classname: str) -> list[str]:
        """All prompts for one class: `[t.format(classname) for t in templates]`."""
        return [t.format(classname) for t in self.templates]


class TensorTaskDataset(Dataset):
    """A dataset over precomputed tensors: item `i` is `(images[i], int(labels[i]))`.

    Args:
        images: float32 `(N, 3, H, W)`.
        labels: int64 `(N,)`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def validate_split(split: str) -> Split:
    """Return `split` if it is "train" or "test", else raise ValueError naming it."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split  # type: ignore[return-value]


def check_stream_arguments(known: Sequence[str], tasks: Sequence[str] | None, image_size: object,
                           mean: Sequence[float], std: Sequence[float], few_shot: int | None, split: str, *,
                           min_size: int = 1) -> list[str]:
    """Validate the arguments every offline stream builder takes (digits, offline-mtil); return the task names
    in stream order (`known`, in its order, when `tasks` is None). Raises ValueError naming the argument."""
    validate_split(split)
    names = list(known) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in known]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"tasks must be a non-empty list of distinct names from {list(known)}, got {tasks!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < min_size:
        raise ValueError(f"image_size must be an int >= {min_size}, got {image_size!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std must have 3 entries (std > 0), got mean={mean!r}, std={std!r}")
    if few_shot is not None and split != "train":
        raise ValueError(f"few_shot applies to the train split only, got few_shot={few_shot} with split={split!r}")
    return names


def random_split_indices(n: int, train_fraction: float = 0.8, seed: int = 42) -> tuple[list[int], list[int]]:
    """Seeded random train/test split of `range(n)`, identical to `torch.utils.data.random_split`.

    `train = perm[:int(train_fraction * n)]`, `test = perm[int(train_fraction * n):]` with
    `perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))`. This is what
    MoE-Adapters/ZSCL run (`random_split(dataset, [int(0.8 n), n - int(0.8 n)], manual_seed(42))`), so over the
    same item order the split is the same.

    Returns:
        (train_indices, test_indices): Python int lists, disjoint, together a permutation of range(n).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    n_train = int(train_fraction * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[:n_train], perm[n_train:]


def shuffled_pass_order(n: int, seed: int) -> list[int]:
    """The order in which `DataLoader(range(n), shuffle=True)` yields items right after `torch.manual_seed(seed)`.

    A DataLoader iterator first draws its workers' base seed from the global generator, then its RandomSampler
    draws a second int64 and seeds a private generator with it for `randperm(n)`. Replayed here on a private
    generator, so the global RNG is untouched (tests/data/test_data_base.py checks it against a real DataLoader).
    """
    g = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the loader iterator's base seed, drawn first
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=g))
    return torch.randperm(n, generator=torch.Generator().manual_seed(sampler_seed)).tolist()


def few_shot_indices(targets: Sequence[int], shots: int, seed: int = 0) -> list[int]:
    """Seeded k-shot subset, drawn as MoE-Adapters draws it: up to `shots` items per class, in ascending order.

    MoE-Adapters (`mtil/src/models/finetune.py`) seeds everything (`seed_all(42)`), makes one pass over its
    shuffled train loader and keeps the first `shots` images of each class in the order they come. Here the pass
    order is `shuffled_pass_order(len(targets), seed)`: the order a shuffled DataLoader yields right after
    `torch.manual_seed(seed)`. (Their subset also depends on every global RNG draw their process makes between
    seeding and that pass, building a ~150 M-parameter model among them, so no other code base can replay it.)
    The result depends only on (targets, shots, seed). A class with fewer than `shots` items keeps all of them
    (logged as a warning).

    Args:
        targets: the label of every item (ints).
        shots: items per class, >= 1.
        seed: the seed of the pass.
    Returns:
        sorted list of item indices.
    """
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 1:
        raise ValueError(f"few_shot (shots per class) must be a positive int, got {shots!r}")
    taken: dict[int, int] = {}
    chosen: list[int] = []
    for i in shuffled_pass_order(len(targets), seed):
        c = int(targets[i])
        if taken.get(c, 0) < shots:
            taken[c] = taken.get(c, 0) + 1
            chosen.append(i)
    short = sorted(c for c, k in taken.items() if k < shots)
    if short:
        logger.warning("few-shot: %d class(es) have fewer than %d items, kept all of them: %s", len(short), shots,
                       short[:10])
    return sorted(chosen)
