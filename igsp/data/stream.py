"""One entry point for the trainer: a validated config in, the list of (train, test) tasks out."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from igsp.data.base import CLIP_MEAN, CLIP_STD, TaskDataset
from igsp.data.digits import DIGITS_TASKS, digits_benchmark
from igsp.data.mtil import MTIL_DATASETS, build_dataset, mtil_order
from igsp.data.offline_mtil import OFFLINE_MTIL_TASKS, offline_mtil_benchmark
from igsp.data.synthetic import synthetic_benchmark

logger = logging.getLogger(__name__)

__all__ = ["TaskStreamConfig", "build_task_stream", "stream_task_names"]

StreamKind = Literal["mtil", "digits", "offline-mtil", "synthetic"]
# Offline streams built from tensors: kind -> (its tasks, the benchmark function).
_OFFLINE_STREAMS = {"digits": (DIGITS_TASKS, digits_benchmark),
                    "offline-mtil": (OFFLINE_MTIL_TASKS, offline_mtil_benchmark)}


@dataclass
class TaskStreamConfig:
    """Which task stream to build. Validated on construction; JSON-serialisable via `dataclasses.asdict`."""

    kind: StreamKind = field(default="digits", metadata={"help": "mtil | digits | offline-mtil | synthetic"})
    root: str | None = field(default=None, metadata={"help": "MTIL data root (kind=mtil only)"})
    order: str = field(default="I", metadata={"help": "MTIL order: I or II (ignored when tasks is given)"})
    tasks: list[str] | None = field(
        default=None, metadata={"help": "explicit task names in stream order (not synthetic); None = the default"}
    )
    few_shot: int | None = field(default=None, metadata={"help": "shots per class of each train split; None = full"})
    image_size: int = field(default=32, metadata={"help": "offline streams' image side (mtil: the transform's)"})
    seed: int = field(default=0, metadata={"help": "few-shot draw; digits split and noise; procedural draws"})
    mean: tuple[float, float, float] = field(default=CLIP_MEAN, metadata={"help": "offline streams' normalisation"})
    std: tuple[float, float, float] = field(default=CLIP_STD, metadata={"help": "offline streams' normalisation"})
    download: bool = field(default=False, metadata={"help": "MTIL: let torchvision download missing datasets"})
    num_tasks: int = field(default=3, metadata={"help": "synthetic only"})
    num_classes: int = field(default=4, metadata={"help": "synthetic only"})
    samples_per_class: int = field(default=16, metadata={"help": "synthetic only (per split)"})

    def __post_init__(self) -> None:
        if self.kind not in ("mtil", "digits", "offline-mtil", "synthetic"):
            raise ValueError(f"kind must be 'mtil', 'digits', 'offline-mtil' or 'synthetic', got {self.kind!r}")
        if self.kind == "mtil" and not self.root:
            raise ValueError("root (the MTIL data root, --data-root) is required for kind='mtil', got None")
        if self.tasks is not None:
            self.tasks = list(self.tasks)
            known = MTIL_DATASETS if self.kind == "mtil" else _OFFLINE_STREAMS.get(self.kind, (None,))[0]
            if known is None:
                raise ValueError("tasks cannot be set for kind='synthetic' (use num_tasks), got "
                                 f"{self.tasks!r}")
            bad = [t for t in self.tasks if t not in known]
            if bad or not self.tasks or len(set(self.tasks)) != len(self.tasks):
                raise ValueError(f"tasks must be distinct names from {list(known)}, got {self.tasks!r}")
        if self.kind == "mtil":
            mtil_order(self.order)  # raises on a bad order
        if self.few_shot is not None and (not isinstance(self.few_shot, int) or self.few_shot < 1):
            raise ValueError(f"few_shot must be a positive int or None, got {self.few_shot!r}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 entries, std > 0; got mean={self.mean}, std={self.std}")

    def task_names(self) -> list[str]:
        """The task names of the stream, in order."""
        return stream_task_names(self.kind, order=self.order, tasks=self.tasks, num_tasks=self.num_tasks)


def stream_task_names(kind: str, *, order: str = "I", tasks: list[str] | None = None, num_tasks: int = 3) -> list[str]:
    """The task names of a stream of `kind` without loading any data: `tasks` if given, else the default stream."""
    if tasks is not None:
        return list(tasks)
    if kind == "mtil":
        return list(mtil_order(order))
    if kind in _OFFLINE_STREAMS:
        return list(_OFFLINE_STREAMS[kind][0])
    return [f"synthetic_{t}" for t in range(num_tasks)]


def build_task_stream(
    config: TaskStreamConfig | None = None,
    *,
    transform: Callable[[Any], Any] | None = None,
    train_transform: Callable[[Any], Any] | None = None,
    **overrides: Any,
) -> list[tuple[TaskDataset, TaskDataset]]:
    """Build the continual task stream: `[(train_task_0, test_task_0), (train_task_1, test_task_1), ...]`.

    Signature in words: `build_task_stream(config=None, *, transform=None, train_transform=None, **overrides)`;
    `overrides` are `TaskStreamConfig` fields (`kind`, `root`, `order`, `tasks`, `few_shot`, `image_size`,
    `seed`, `mean`, `std`, `download`, `num_tasks`, `num_classes`, `samples_per_class`) applied on top of
    `config` (or of the defaults), e.g. `build_task_stream(kind="mtil", root="/data", order="II",
    transform=preprocess)`.

    Args:
        config: the stream config (default `TaskStreamConfig()`: the digits stream at 32x32).
        transform: kind="mtil" only, and required there: the open_clip preprocess (PIL -> float32 (3, H, W))
            for the test splits, and for the train splits unless `train_transform` is given. Offline
            tasks are tensors already (resized to `image_size`, normalised with `mean`/`std`); a transform given
            for them is not used (logged).
        train_transform: kind="mtil" only: the transform of the train splits (e.g. open_clip's train preprocess).
    Returns:
        one (train, test) pair of TaskDataset per task, in stream order; items are
        `(float32 (3, H, W), int label)`. The few-shot subset (if any) applies to train splits only.
    Raises:
        ValueError: a bad config. DatasetNotFoundError: an MTIL dataset is missing or incomplete.
    """
    if config is None:
        cfg = TaskStreamConfig(**overrides)
    elif overrides:
        cfg = dataclasses.replace(config, **overrides)  # re-runs __post_init__ validation
    else:
        cfg = config
    names = cfg.task_names()

    if cfg.kind == "mtil":
        if transform is None:
            raise ValueError("kind='mtil' needs transform= (the open_clip preprocess that turns PIL images into "
                             "tensors), got None")
        assert cfg.root is not None  # checked by TaskStreamConfig
        stream = []
        for name in names:
            train = build_dataset(name, cfg.root, "train", train_transform or transform, few_shot=cfg.few_shot,
                                  seed=cfg.seed, download=cfg.download)
            test = build_dataset(name, cfg.root, "test", transform, download=cfg.download)
            stream.append((train, test))
        return stream

    if transform is not None or train_transform is not None:
        logger.info("kind=%r builds normalised tensors itself; the given transform is not used", cfg.kind)
    if cfg.kind in _OFFLINE_STREAMS:
        benchmark = _OFFLINE_STREAMS[cfg.kind][1]
        common = dict(image_size=cfg.image_size, seed=cfg.seed, tasks=names, mean=cfg.mean, std=cfg.std)
        trains = benchmark(split="train", few_shot=cfg.few_shot, **common)  # type: ignore[operator]
        tests = benchmark(split="test", **common)  # type: ignore[operator]
        return list(zip(trains, tests))

    common = dict(num_tasks=cfg.num_tasks, num_classes=cfg.num_classes, image_size=cfg.image_size,
                  samples_per_class=cfg.samples_per_class, seed=cfg.seed, mean=cfg.mean, std=cfg.std)
    if cfg.few_shot is not None:
        common["samples_per_class"] = min(cfg.few_shot, cfg.samples_per_class)
    trains = synthetic_benchmark(split="train", **common)  # type: ignore[arg-type]
    common["samples_per_class"] = cfg.samples_per_class
    tests = synthetic_benchmark(split="test", **common)  # type: ignore[arg-type]
    return list(zip(trains, tests))
