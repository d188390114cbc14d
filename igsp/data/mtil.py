"""The 11 MTIL datasets (Aircraft ... SUN397) through torchvision, under one data root.

Every dataset is read by its torchvision class (which knows the on-disk format and, where torchvision has one,
runs its integrity check); this module adds what the MTIL protocol needs on top:

- the split MoE-Adapters/ZSCL train and test on (see `MTILSpec.split_note` and docs/datasets.md): the official
  split where the dataset has one; Caltech101, EuroSAT and SUN397 have none and take a seeded 80/20 split
  (`random_split_indices`, seed 42 as MoE-Adapters) over the items *sorted by path*, so every machine gets the
  same split (torchvision lists SUN397 in `rglob` order, which depends on the file system);
- ZSCL's class names and prompt templates, verbatim (`igsp.data.mtil_prompts`): every template evaluates, the first
  one trains, as in ZSCL and MoE-Adapters;
- seeded few-shot subsets (`few_shot` shots per class of the train split), drawn as MoE-Adapters draws them
  (`igsp.data.base.few_shot_indices`);
- one clear `DatasetNotFoundError` for a missing or incomplete dataset: the folder, the expected layout and how
  to obtain it, with torchvision's own error chained as the cause.

Images are converted to RGB before the transform (MNIST is grayscale, a few Caltech101 images are too), so any
open_clip preprocess works as `transform`.

Orders: Order I is the order of `MTIL_DATASETS`; Order II is Order I permuted by [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2].

The split policy (which torchvision split, which seed) follows MoE-Adapters4CL `mtil/src/datasets/collections.py`
(https://github.com/JiazuoYu/MoE-Adapters4CL); the code is ours.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from igsp.data.base import (
    DatasetNotFoundError,
    Split,
    TaskDataset,
    few_shot_indices,
    random_split_indices,
    validate_split,
)
from igsp.data.images import BadImageError
from igsp.data.mtil_prompts import ZSCL_TEMPLATES, zscl_classnames

logger = logging.getLogger(__name__)

__all__ = [
    "MTIL_DATASETS",
    "ORDER_I",
    "ORDER_II",
    "ORDER_II_PERMUTATION",
    "REFERENCE_ITERATIONS",
    "REFERENCE_LR_FEW_SHOT",
    "REFERENCE_LR_FULL",
    "REFERENCE_SHOTS",
    "REFERENCE_TRAIN",
    "SPLIT_SEED",
    "MTILSpec",
    "MTILVisionDataset",
    "build_dataset",
    "mtil_order",
    "reference_lr",
]

# MoE-Adapters/ZSCL split Caltech101, EuroSAT and SUN397 with torch.Generator().manual_seed(42), 80/20.
SPLIT_SEED = 42
SPLIT_TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class MTILSpec:
    """What one MTIL dataset needs on disk and how it is split.

    Attributes:
        name: registry key (Order-I name).
        display_name: human name used in messages.
        num_classes: the real dataset's class count (a mismatch is logged: a partial copy).
        folder: the folder torchvision reads, relative to the data root.
        required: paths relative to the data root that must exist before torchvision is called.
        layout: the expected tree under the data root (for error messages and docs).
        obtain: how to get the data.
        downloadable: whether torchvision's `download=True` fetches it.
        split_note: which split is used for train/test.
    """

    name: str
    display_name: str
    num_classes: int
    folder: str
    required: tuple[str, ...]
    layout: str
    obtain: str
    downloadable: bool
    split_note: str

    @property
    def templates(self) -> tuple[str, ...]:
        """ZSCL's CLIP prompt templates (one `{}` each): all of them evaluate, the first one trains."""
        return ZSCL_TEMPLATES[self.name]

    @property
    def train_template(self) -> str:
        """The template of the training text features (ZSCL/MoE-Adapters' `dataset.template`: the first)."""
        return self.templates[0]


_DL = "pass download=True (CLI: --download) to let torchvision fetch and extract it, or download it yourself from "

MTIL_DATASETS: dict[str, MTILSpec] = {
    "aircraft": MTILSpec(
        name="aircraft",
        display_name="FGVC-Aircraft",
        num_classes=100,
        folder="fgvc-aircraft-2013b",
        required=(
            "fgvc-aircraft-2013b/data/variants.txt",
            "fgvc-aircraft-2013b/data/images_variant_train.txt",
            "fgvc-aircraft-2013b/data/images_variant_test.txt",
            "fgvc-aircraft-2013b/data/images",
        ),
        layout=(
            "fgvc-aircraft-2013b/data/variants.txt\n"
            "fgvc-aircraft-2013b/data/images_variant_{train,test}.txt   ('<image id> <variant>' per line)\n"
            "fgvc-aircraft-2013b/data/images/<image id>.jpg"
        ),
        obtain=_DL + "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
        downloadable=True,
        split_note="official 'train' (3,334) / 'test' (3,333), variant level; 'val' unused (as MoE-Adapters)",
    ),
    "caltech101": MTILSpec(
        name="caltech101",
        display_name="Caltech101",
        num_classes=101,
        folder="caltech101",
        required=("caltech101/101_ObjectCategories", "caltech101/101_ObjectCategories/BACKGROUND_Google"),
        layout=(
            "caltech101/101_ObjectCategories/<category>/image_0001.jpg ... image_<n>.jpg\n"
            "caltech101/101_ObjectCategories/BACKGROUND_Google/   (present in the archive; dropped as a class)"
        ),
        obtain=_DL + "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
        downloadable=True,
        split_note="no official split: seeded 80/20 (seed 42) over the images sorted by path",
    ),
    "cifar100": MTILSpec(
        name="cifar100",
        display_name="CIFAR-100",
        num_classes=100,
        folder="cifar-100-python",
        required=("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
        layout="cifar-100-python/{train,test,meta}   (the python pickles; torchvision checks their md5)",
        obtain=_DL + "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        downloadable=True,
        split_note="official train (50,000) / test (10,000)",
    ),
    "dtd": MTILSpec(
        name="dtd",
        display_name="DTD",
        num_classes=47,
        folder="dtd/dtd",
        required=("dtd/dtd/labels/train1.txt", "dtd/dtd/labels/test1.txt", "dtd/dtd/images"),
        layout=(
            "dtd/dtd/labels/train1.txt, test1.txt   ('<class>/<file>.jpg' per line)\n"
            "dtd/dtd/images/<class>/<file>.jpg      (the archive's dtd/ folder inside <root>/dtd/)"
        ),
        obtain=_DL + "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz (extract into <root>/dtd)",
        downloadable=True,
        split_note="official partition 1: 'train' (1,880) / 'test' (1,880); 'val' unused (as MoE-Adapters)",
    ),
    "eurosat": MTILSpec(
        name="eurosat",
        display_name="EuroSAT (RGB)",
        num_classes=10,
        folder="eurosat/2750",
        required=("eurosat/2750",),
        layout="eurosat/2750/<Class>/<Class>_<k>.jpg   (classes AnnualCrop ... SeaLake)",
        obtain=_DL + "https://huggingface.co/datasets/torchgeo/eurosat/resolve/main/EuroSAT.zip "
        "(extract into <root>/eurosat)",
        downloadable=True,
        split_note="no official split: seeded 80/20 (seed 42) over the images sorted by path",
    ),
    "flowers": MTILSpec(
        name="flowers",
        display_name="Oxford Flowers-102",
        num_classes=102,
        folder="flowers-102",
        required=("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
        layout=(
            "flowers-102/jpg/image_00001.jpg ...\n"
            "flowers-102/imagelabels.mat, flowers-102/setid.mat   (torchvision checks their md5)"
        ),
        obtain=_DL + "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (102flowers.tgz, imagelabels.mat, setid.mat)",
        downloadable=True,
        split_note="official 'train' (1,020) / 'test' (6,149); 'val' unused (as MoE-Adapters)",
    ),
    "food": MTILSpec(
        name="food",
        display_name="Food-101",
        num_classes=101,
        folder="food-101",
        required=("food-101/meta/train.json", "food-101/meta/test.json", "food-101/images"),
        layout=(
            "food-101/meta/{train,test}.json   ({class: ['<class>/<id>', ...]})\n"
            "food-101/images/<class>/<id>.jpg"
        ),
        obtain=_DL + "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
        downloadable=True,
        split_note="official train (75,750) / test (25,250)",
    ),
    "mnist": MTILSpec(
        name="mnist",
        display_name="MNIST",
        num_classes=10,
        folder="MNIST/raw",
        required=(
            "MNIST/raw/train-images-idx3-ubyte",
            "MNIST/raw/train-labels-idx1-ubyte",
            "MNIST/raw/t10k-images-idx3-ubyte",
            "MNIST/raw/t10k-labels-idx1-ubyte",
        ),
        layout="MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte   (uncompressed idx files)",
        obtain=_DL + "https://ossci-datasets.s3.amazonaws.com/mnist/ (gunzip the four .gz files into MNIST/raw)",
        downloadable=True,
        split_note="official train (60,000) / test (10,000)",
    ),
    "oxford_pet": MTILSpec(
        name="oxford_pet",
        display_name="Oxford-IIIT Pet",
        num_classes=37,
        folder="oxford-iiit-pet",
        required=(
            "oxford-iiit-pet/images",
            "oxford-iiit-pet/annotations/trainval.txt",
            "oxford-iiit-pet/annotations/test.txt",
        ),
        layout=(
            "oxford-iiit-pet/images/<Breed>_<k>.jpg\n"
            "oxford-iiit-pet/annotations/{trainval,test}.txt   ('<image id> <class 1..37> <species> <breed id>')"
        ),
        obtain=_DL + "https://www.robots.ox.ac.uk/~vgg/data/pets/data/{images,annotations}.tar.gz",
        downloadable=True,
        split_note="official 'trainval' (3,680) / 'test' (3,669)",
    ),
    "cars": MTILSpec(
        name="cars",
        display_name="Stanford Cars",
        num_classes=196,
        folder="stanford_cars",
        required=(
            "stanford_cars/devkit/cars_meta.mat",
            "stanford_cars/devkit/cars_train_annos.mat",
            "stanford_cars/cars_test_annos_withlabels.mat",
            "stanford_cars/cars_train",
            "stanford_cars/cars_test",
        ),
        layout=(
            "stanford_cars/devkit/cars_meta.mat, stanford_cars/devkit/cars_train_annos.mat\n"
            "stanford_cars/cars_test_annos_withlabels.mat\n"
            "stanford_cars/cars_train/<fname>.jpg, stanford_cars/cars_test/<fname>.jpg"
        ),
        obtain=(
            "cannot be downloaded by torchvision (the original Stanford URL is gone): get a copy of the original "
            "release (car_devkit.tgz, cars_train.tgz, cars_test.tgz and cars_test_annos_withlabels.mat; mirrored "
            "e.g. on Kaggle as 'stanford-cars-dataset') and arrange it as shown"
        ),
        downloadable=False,
        split_note="official train (8,144) / test (8,041)",
    ),
    "sun397": MTILSpec(
        name="sun397",
        display_name="SUN397",
        num_classes=397,
        folder="SUN397",
        required=("SUN397/ClassName.txt",),
        layout=(
            "SUN397/ClassName.txt   ('/a/abbey' per line)\n"
            "SUN397/<letter>/<class>[/<sub>]/sun_<id>.jpg"
        ),
        obtain=_DL + "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
        downloadable=True,
        split_note="no official split used: seeded 80/20 (seed 42) over the images sorted by path",
    ),
}

ORDER_I: tuple[str, ...] = tuple(MTIL_DATASETS)
ORDER_II_PERMUTATION: tuple[int, ...] = (9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2)
ORDER_II: tuple[str, ...] = tuple(ORDER_I[i] for i in ORDER_II_PERMUTATION)


# ------------------------------------------------------------------------------------- the reference protocol
# MoE-Adapters4CL mtil/scripts/train/train_full_shot_router11_experts22_1000iters.sh, `lr=(...)` in Order-I dataset
# order (the same list as METHOD.md section 5). A dataset keeps its rate in any task order.
REFERENCE_LR_FULL: dict[str, float] = dict(zip(ORDER_I, (5e-3, 1e-3, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3,
                                                         1e-3)))
# ... train_few_shot_router11_experts22_1000iters.sh (5 shots, 500 iterations).
REFERENCE_LR_FEW_SHOT: dict[str, float] = dict(zip(ORDER_I, (8e-3, 5e-4, 2e-4, 5e-3, 1e-3, 1e-3, 1e-2, 1e-4, 1e-2,
                                                             1e-2, 1e-2)))
# What every task of those scripts shares (src/args.py defaults and the scripts' flags): batch 64, AdamW with weight
# decay 0 and betas (0.9, 0.999), 100 warm-up steps then cosine (src/utils.py cosine_lr), label smoothing 0.2 (--ls),
# no gradient clipping, fp32 (clip.py build_model casts every parameter to float; no autocast), the train
# preprocess (RandomResizedCrop, igsp.data.augment), the first template for the training text features, OpenAI CLIP
# ViT-B/16.
REFERENCE_TRAIN: dict[str, Any] = {
    "model": "ViT-B-16", "pretrained": "openai", "batch_size": 64, "warmup": 100, "label_smoothing": 0.2,
    "weight_decay": 0.0, "beta2": 0.999, "grad_clip": None, "precision": "fp32", "augment": True,
    "train_templates": "first",
}
REFERENCE_ITERATIONS = {"full": 1000, "few_shot": 500}
REFERENCE_SHOTS = 5


def reference_lr(name: str, few_shot: bool) -> float:
    """The reference learning rate of MTIL dataset `name` (full-shot or few-shot script)."""
    return (REFERENCE_LR_FEW_SHOT if few_shot else REFERENCE_LR_FULL)[name]


def mtil_order(order: str) -> tuple[str, ...]:
    """The dataset names of MTIL order "I" or "II" (also accepts "1"/"2", "order1"/"order2", any case)."""
    key = str(order).strip().lower().replace("order", "").replace("_", "").strip()
    if key in ("i", "1"):
        return ORDER_I
    if key in ("ii", "2"):
        return ORDER_II
    raise ValueError(f"order must be 'I' or 'II', got {order!r}")


# ----------------------------------------------------------------------------------------------- listing
@dataclass
class _Listing:
    """What a torchvision dataset yields, read without decoding images."""

    base: Dataset  # the torchvision dataset (transform=None)
    labels: list[int]  # per item
    paths: list[str] | None  # per item image file (None for in-memory datasets: CIFAR, MNIST)
    classes: list[str]  # torchvision's class list in label order (folder names for Caltech101 and EuroSAT)


def _private(ds: object, attr: str) -> Any:
    """Read a torchvision-private attribute, failing with the torchvision version if it moved."""
    try:
        return getattr(ds, attr)
    except AttributeError as exc:  # pragma: no cover - only on a torchvision that renamed its internals
        import torchvision

        raise RuntimeError(
            f"{type(ds).__name__} has no attribute {attr!r} in torchvision {torchvision.__version__}; "
            "igsp.data.mtil reads it to list labels and files without decoding images (tested on 0.29)"
        ) from exc


def _list_dataset(name: str, root: str, split: Split, download: bool) -> _Listing:
    """Construct the torchvision dataset of `name` for `split` (full listing for unsplit datasets)."""
    from torchvision import datasets as tvd

    if name == "aircraft":
        ds = tvd.FGVCAircraft(root, split=split, annotation_level="variant", download=download)
        return _Listing(ds, list(_private(ds, "_labels")), [str(p) for p in _private(ds, "_image_files")],
                        list(ds.classes))
    if name == "caltech101":
        ds = tvd.Caltech101(root, target_type="category", download=download)
        paths = [
            os.path.join(ds.root, "101_ObjectCategories", ds.categories[y], f"image_{i:04d}.jpg")
            for y, i in zip(ds.y, ds.index)
        ]
        return _Listing(ds, list(ds.y), paths, list(ds.categories))
    if name == "cifar100":
        ds = tvd.CIFAR100(root, train=split == "train", download=download)
        return _Listing(ds, [int(t) for t in ds.targets], None, list(ds.classes))
    if name == "dtd":
        # torchvision's DTD root is the folder holding dtd/ (it appends 'dtd/dtd' itself).
        ds = tvd.DTD(root, split=split, partition=1, download=download)
        return _Listing(ds, list(_private(ds, "_labels")), [str(p) for p in _private(ds, "_image_files")],
                        list(ds.classes))
    if name == "eurosat":
        ds = tvd.EuroSAT(root, download=download)
        return _Listing(ds, list(ds.targets), [p for p, _ in ds.samples], list(ds.classes))
    if name == "flowers":
        ds = tvd.Flowers102(root, split=split, download=download)
        return _Listing(ds, list(_private(ds, "_labels")), [str(p) for p in _private(ds, "_image_files")],
                        list(tvd.Flowers102.classes))
    if name == "food":
        ds = tvd.Food101(root, split=split, download=download)
        return _Listing(ds, list(_private(ds, "_labels")), [str(p) for p in _private(ds, "_image_files")],
                        list(ds.classes))
    if name == "mnist":
        ds = tvd.MNIST(root, train=split == "train", download=download)
        return _Listing(ds, [int(t) for t in ds.targets.tolist()], None, list(ds.classes))
    if name == "oxford_pet":
        ds = tvd.OxfordIIITPet(root, split="trainval" if split == "train" else "test", target_types="category",
                               download=download)
        return _Listing(ds, list(_private(ds, "_labels")), [str(p) for p in _private(ds, "_images")],
                        list(ds.classes))
    if name == "cars":
        ds = tvd.StanfordCars(root, split=split, download=False)
        samples = _private(ds, "_samples")
        return _Listing(ds, [int(t) for _, t in samples], [str(p) for p, _ in samples], list(ds.classes))
    if name == "sun397":
        ds = tvd.SUN397(root, download=download)
        return _Listing(ds, list(_private(ds, "_labels")), [str(p) for p in _private(ds, "_image_files")],
                        list(ds.classes))
    raise AssertionError(f"unhandled MTIL dataset {name!r}")  # pragma: no cover - guarded by build_dataset


# ----------------------------------------------------------------------------------------------- the dataset
class MTILVisionDataset(Dataset):
    """`(transform(rgb_image), label)` for a subset of a torchvision dataset.

    Item `i` decodes `base[indices[i]]`, converts it to RGB (MNIST and some Caltech101 images are grayscale, CLIP
    wants 3 channels), applies `transform` (e.g. an open_clip preprocess: PIL -> float32 `(3, H, W)`) and returns
    it with `labels[i]` (an int read from the annotations, equal to torchvision's target). `paths[i]` is the item's
    image file (None for the in-memory CIFAR-100 and MNIST).
    """

    def __init__(
        self,
        name: str,
        base: Dataset,
        indices: list[int],
        labels: list[int],
        transform: Callable[[Image.Image], Any] | None,
        paths: list[str] | None = None,
    ) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"indices ({len(indices)}) and labels ({len(labels)}) must have the same length")
        self.name = name
        self.base = base
        self.indices = indices
        self.labels = labels
        self.transform = transform
        self.paths = paths

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.raw_item(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def raw_item(self, i: int) -> tuple[Any, int]:
        """`(decoded RGB image, label)` of item `i` before `transform` (where training augmentation starts)."""
        try:
            image, _ = self.base[self.indices[i]]
        except FileNotFoundError as exc:
            spec = MTIL_DATASETS[self.name]
            raise DatasetNotFoundError(
                f"MTIL dataset {self.name!r} ({spec.display_name}) is incomplete: {exc}. Expected layout under "
                f"the data root:\n{spec.layout}\nHow to obtain it: {spec.obtain}"
            ) from exc
        except (OSError, SyntaxError, ValueError) as exc:  # PIL decoding a corrupt or truncated file
            where = self.paths[i] if self.paths is not None else f"item {self.indices[i]}"
            raise BadImageError(f"MTIL dataset {self.name!r}: cannot read image {where}: {exc}") from exc
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")
        return image, self.labels[i]


def _not_found(spec: MTILSpec, root: Path, problem: str, cause: BaseException | None = None) -> DatasetNotFoundError:
    how = spec.obtain
    if spec.downloadable:
        how += f" (torchvision places it under {root})"
    msg = (
        f"MTIL dataset {spec.name!r} ({spec.display_name}) not usable under data root {root}: {problem}.\n"
        f"Expected folder: {root / spec.folder}\n"
        f"Expected layout under the data root:\n  " + spec.layout.replace("\n", "\n  ") + "\n"
        f"How to obtain it: {how}"
    )
    if cause is not None:
        msg += f"\ntorchvision said: {type(cause).__name__}: {cause}"
    return DatasetNotFoundError(msg)


def build_dataset(
    name: str,
    root: str | os.PathLike[str],
    split: Split,
    transform: Callable[[Image.Image], Any] | None,
    *,
    few_shot: int | None = None,
    seed: int = 0,
    download: bool = False,
    split_seed: int = SPLIT_SEED,
    verify_files: bool = True,
) -> TaskDataset:
    """One split of one MTIL dataset, read by torchvision from `root`.

    Args:
        name: a key of `MTIL_DATASETS` ("aircraft", "caltech101", ..., "sun397").
        root: the data root holding every dataset's folder (layouts: `MTIL_DATASETS[name].layout`,
            docs/datasets.md).
        split: "train" or "test".
        transform: PIL RGB image -> tensor (e.g. open_clip's preprocess), or None to get the PIL image.
        few_shot: shots per class for a seeded k-shot train subset (None = full). Only with split="train"
            (MTIL few-shot trains on k shots and tests on the full test split).
        seed: seed of the few-shot draw.
        download: let torchvision download a missing dataset (Stanford Cars cannot be downloaded).
        split_seed: seed of the 80/20 split of Caltech101/EuroSAT/SUN397 (42 = MoE-Adapters' split). Keep it
            fixed across runs, or test sets differ.
        verify_files: check that every listed image file exists (one stat per file, ~0.1 s per 10^4 files on a
            local disk) so a partially extracted archive fails here, not mid-training.

    Returns:
        TaskDataset whose `dataset` yields `(transform(image), label)`, `label` an int in [0, num_classes).

    Raises:
        KeyError: unknown `name`. ValueError: bad `split`/`few_shot`.
        DatasetNotFoundError: the dataset is missing or incomplete (message: folder, layout, how to obtain).
    """
    if name not in MTIL_DATASETS:
        raise KeyError(f"unknown MTIL dataset {name!r}; expected one of {list(MTIL_DATASETS)}")
    split = validate_split(split)
    if few_shot is not None and split != "train":
        raise ValueError(f"few_shot applies to the train split only (MTIL tests on the full test set), got "
                         f"few_shot={few_shot} with split={split!r}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
    spec = MTIL_DATASETS[name]
    root_path = Path(root).expanduser().resolve()

    if download and not spec.downloadable:
        download = False  # torchvision's StanfordCars raises on download=True even when the data is present
        logger.warning("%s cannot be downloaded by torchvision; looking for a manual copy", spec.display_name)
    if not download:
        missing = [p for p in spec.required if not (root_path / p).exists()]
        if missing:
            raise _not_found(spec, root_path, f"missing {', '.join(str(root_path / p) for p in missing)}")
    elif not root_path.is_dir():
        root_path.mkdir(parents=True, exist_ok=True)

    try:
        listing = _list_dataset(name, str(root_path), split, download)
    except DatasetNotFoundError:
        raise
    except Exception as exc:  # torchvision signals missing/corrupt data with RuntimeError, OSError, KeyError, ...
        raise _not_found(spec, root_path, "torchvision could not read it (missing, incomplete or corrupt)",
                         exc) from exc

    n = len(listing.labels)
    order = list(range(n))
    if name in ("caltech101", "eurosat", "sun397"):
        if listing.paths is None:  # pragma: no cover - these three always list files
            raise AssertionError(name)
        # Sort by path components, not by the path string: '/' sorts before '-', so 'a-b/...' < 'a/...' as
        # strings while torchvision lists class 'a' before 'a-b'. For Caltech101 and EuroSAT this order equals
        # torchvision's, so the split equals MoE-Adapters' random_split(seed 42); SUN397 torchvision lists in
        # rglob (file-system) order, which this sort removes.
        order.sort(key=lambda i: Path(listing.paths[i]).parts)  # type: ignore[index]
        train_pos, test_pos = random_split_indices(n, SPLIT_TRAIN_FRACTION, split_seed)
        order = [order[p] for p in (train_pos if split == "train" else test_pos)]
    labels = [listing.labels[i] for i in order]
    if few_shot is not None:
        keep = few_shot_indices(labels, few_shot, seed)
        order = [order[k] for k in keep]
        labels = [labels[k] for k in keep]
    paths = None if listing.paths is None else [listing.paths[i] for i in order]

    if verify_files and paths is not None:
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise _not_found(
                spec, root_path, f"{len(absent)} of {len(paths)} listed image files are missing, e.g. {absent[:3]}"
            )
    if len(listing.classes) != spec.num_classes:
        logger.warning("%s: found %d classes under %s, the full dataset has %d (partial copy?)", spec.display_name,
                       len(listing.classes), root_path / spec.folder, spec.num_classes)
    if not n:
        raise _not_found(spec, root_path, "the listing holds no images")

    dataset = MTILVisionDataset(name, listing.base, order, labels, transform, paths)
    logger.info("MTIL %s/%s: %d images, %d classes%s", name, split, len(order), len(listing.classes),
                f", {few_shot}-shot (seed {seed})" if few_shot else "")
    return TaskDataset(
        name=name,
        dataset=dataset,
        classnames=zscl_classnames(name, listing.classes),
        templates=list(spec.templates),
        split=split,
        targets=labels,
    )
