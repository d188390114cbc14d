"""The data layer: MTIL datasets (torchvision), the offline streams (digits, offline-mtil), a synthetic stream.

Every task split is a `TaskDataset` (name, dataset yielding `(float32 (3, H, W), int label)`, classnames,
templates, split, targets). The trainer calls `build_task_stream(config, transform=...)` and gets one
(train, test) pair per task. Dataset layouts and the digits task design: docs/datasets.md.
"""

from igsp.data.base import CLIP_MEAN, CLIP_STD, DatasetNotFoundError, TaskDataset, few_shot_indices
from igsp.data.digits import DIGITS_TASKS, digits_benchmark
from igsp.data.mtil import MTIL_DATASETS, ORDER_I, ORDER_II, build_dataset, mtil_order
from igsp.data.offline_mtil import OFFLINE_MTIL_TASKS, offline_mtil_benchmark
from igsp.data.stream import TaskStreamConfig, build_task_stream
from igsp.data.synthetic import synthetic_benchmark

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DIGITS_TASKS",
    "MTIL_DATASETS",
    "OFFLINE_MTIL_TASKS",
    "ORDER_I",
    "ORDER_II",
    "DatasetNotFoundError",
    "TaskDataset",
    "TaskStreamConfig",
    "build_dataset",
    "build_task_stream",
    "digits_benchmark",
    "few_shot_indices",
    "mtil_order",
    "offline_mtil_benchmark",
    "synthetic_benchmark",
]
