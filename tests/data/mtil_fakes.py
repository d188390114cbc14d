"""Tiny fake copies of the 11 MTIL datasets in the exact on-disk layout torchvision 0.29 reads.

Each builder writes a handful of 8x8 images whose solid colour encodes the class (`PALETTE`), so a test can
check, through the real torchvision loaders, that every image comes with its own label. The layouts follow
torchvision/datasets/{fgvc_aircraft,caltech,cifar,dtd,eurosat,flowers102,food101,mnist,oxford_iiit_pet,
stanford_cars,sun397}.py. The returned `FakeMeta` says what the loader must find.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image

# Colours far apart in RGB so JPEG and resizing error (a few levels) cannot move an image to another class.
PALETTE = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (230, 20, 230), (20, 230, 230)]
GRAYS = [30, 80, 130, 180, 230]  # MNIST is grayscale: the class is the gray level


@dataclass
class FakeMeta:
    classnames: list[str]  # what igsp must report (ZSCL's class names)
    n_train: int | None  # None for datasets igsp splits itself (then n_total)
    n_test: int | None
    n_total: int | None = None
    gray: bool = False  # colour code is a gray level (MNIST)


def _jpg(path: Path, c: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":  # a grayscale file (Caltech101 has some): igsp must convert it to RGB
        Image.new("L", (8, 8), sum(PALETTE[c]) // 3).save(path, "JPEG", quality=95)
    else:
        Image.new("RGB", (8, 8), PALETTE[c]).save(path, "JPEG", quality=95)


def make_aircraft(root: Path) -> FakeMeta:
    d = root / "fgvc-aircraft-2013b" / "data"
    classes = ["707-320", "A300B4", "Cessna 172"]  # a space inside a name: torchvision splits on the first space
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("".join(c + "\n" for c in classes))
    counts = {"train": 2, "test": 1}
    k = 1000000
    for split, per in counts.items():
        lines = []
        for ci, c in enumerate(classes):
            for _ in range(per):
                k += 1
                _jpg(d / "images" / f"{k:07d}.jpg", ci)
                lines.append(f"{k:07d} {c}\n")
        (d / f"images_variant_{split}.txt").write_text("".join(lines))
    return FakeMeta(classes, 6, 3)


def make_caltech101(root: Path) -> FakeMeta:
    d = root / "caltech101" / "101_ObjectCategories"
    cats = ["Faces", "Faces_easy", "accordion", "car_side", "crocodile_head", "water_lilly"]
    for ci, c in enumerate(cats):
        for i in range(1, 6):
            _jpg(d / c / f"image_{i:04d}.jpg", ci, mode="L" if (ci, i) == (2, 3) else "RGB")
    _jpg(d / "BACKGROUND_Google" / "image_0001.jpg", 0)
    # ZSCL's hand-written names, quirks included (the double space, CLIP's "lilly").
    names = ["off-center face", "centered face", "accordion", "side of a car", "head of a  crocodile", "water lilly"]
    return FakeMeta(names, None, None, n_total=30)


def make_cifar100(root: Path) -> FakeMeta:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    classes = ["apple", "aquarium_fish", "bear"]
    for split, per in (("train", 3), ("test", 2)):
        labels = [c for c in range(3) for _ in range(per)]
        data = np.stack([np.array(PALETTE[c], np.uint8).repeat(32 * 32) for c in labels])  # (N, 3072) CHW rows
        with open(d / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": classes, "coarse_label_names": ["fruit"]}, f)
    return FakeMeta(["apple", "aquarium fish", "bear"], 9, 6)


def make_dtd(root: Path) -> FakeMeta:
    d = root / "dtd" / "dtd"
    classes = ["banded", "bubbly", "zigzagged"]
    (d / "labels").mkdir(parents=True)
    for split, per in (("train", 2), ("val", 1), ("test", 2)):
        lines = []
        for ci, c in enumerate(classes):
            for i in range(per):
                name = f"{c}_{split}_{i:04d}.jpg"
                _jpg(d / "images" / c / name, ci)
                lines.append(f"{c}/{name}\n")
        (d / "labels" / f"{split}1.txt").write_text("".join(lines))
    return FakeMeta(classes, 6, 6)


def make_eurosat(root: Path) -> FakeMeta:
    d = root / "eurosat" / "2750"
    classes = ["AnnualCrop", "Forest", "SeaLake"]
    for ci, c in enumerate(classes):
        for i in range(1, 7):
            _jpg(d / c / f"{c}_{i}.jpg", ci)
    return FakeMeta(["annual crop land", "forest", "lake or sea"], None, None, n_total=18)


def make_flowers(root: Path) -> FakeMeta:
    d = root / "flowers-102"
    labels = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]  # 1-based, image k has labels[k-1]
    for k, lab in enumerate(labels, 1):
        _jpg(d / "jpg" / f"image_{k:05d}.jpg", lab - 1)
    sio.savemat(d / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    # >= 2 ids per set: with squeeze_me a single id becomes a scalar and torchvision's `.tolist()` breaks.
    sio.savemat(d / "setid.mat", {"trnid": np.array([[1, 2, 3, 4]]), "valid": np.array([[5, 6]]),
                                  "tstid": np.array([[7, 8, 9, 10, 11]])})
    from igsp.data.mtil_prompts import FLOWERS102_CLASSNAMES

    return FakeMeta(list(FLOWERS102_CLASSNAMES), 4, 5)  # torchvision always lists all 102 classes


def make_food(root: Path) -> FakeMeta:
    d = root / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "ramen"]
    (d / "meta").mkdir(parents=True)
    k = 100
    for split, per in (("train", 2), ("test", 1)):
        meta = {}
        for ci, c in enumerate(classes):
            meta[c] = []
            for _ in range(per):
                k += 1
                _jpg(d / "images" / c / f"{k}.jpg", ci)
                meta[c].append(f"{c}/{k}")
        (d / "meta" / f"{split}.json").write_text(json.dumps(meta))
    return FakeMeta(["apple pie", "baby back ribs", "ramen"], 6, 3)


def _idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload)


def make_mnist(root: Path) -> FakeMeta:
    raw = root / "MNIST" / "raw"
    for prefix, labels in (("train", [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]), ("t10k", [4, 3, 2, 1, 0])):
        imgs = np.stack([np.full((28, 28), GRAYS[c], np.uint8) for c in labels])
        # idx magic: 0x08 = uint8, low byte = number of dims (torchvision mnist.read_sn3_pascalvincent_tensor)
        _idx(raw / f"{prefix}-images-idx3-ubyte", 0x0803, (len(labels), 28, 28), imgs.tobytes())
        _idx(raw / f"{prefix}-labels-idx1-ubyte", 0x0801, (len(labels),), bytes(labels))
    names = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
             "8 - eight", "9 - nine"]  # torchvision's MNIST.classes, as ZSCL prompts them
    return FakeMeta(names, 10, 5, gray=True)


def make_oxford_pet(root: Path) -> FakeMeta:
    d = root / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1), ("american_bulldog", 2), ("yorkshire_terrier", 2)]
    (d / "annotations").mkdir(parents=True)
    for split, ks in (("trainval", (1, 2)), ("test", (3,))):
        lines = []
        for ci, (b, species) in enumerate(breeds):
            for k in ks:
                _jpg(d / "images" / f"{b}_{k}.jpg", ci)
                lines.append(f"{b}_{k} {ci + 1} {species} {ci + 1}\n")
        (d / "annotations" / f"{split}.txt").write_text("".join(lines))
    return FakeMeta(["Abyssinian", "American Bulldog", "Yorkshire Terrier"], 6, 3)


def _cars_annos(path: Path, labels: list[int]) -> None:
    ann = np.zeros(len(labels), dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
                                       ("class", "O"), ("fname", "O")])
    for i, lab in enumerate(labels):
        ann[i] = (0, 0, 7, 7, lab, f"{i + 1:05d}.jpg")
    sio.savemat(path, {"annotations": ann.reshape(1, -1)})


def make_cars(root: Path) -> FakeMeta:
    d = root / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Volvo XC90 SUV 2007"]
    (d / "devkit").mkdir(parents=True)
    sio.savemat(d / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object).reshape(1, -1)})
    for split, labels in (("train", [1, 2, 3, 3, 2, 1]), ("test", [2, 3, 1])):
        for i, lab in enumerate(labels):
            _jpg(d / f"cars_{split}" / f"{i + 1:05d}.jpg", lab - 1)
    _cars_annos(d / "devkit" / "cars_train_annos.mat", [1, 2, 3, 3, 2, 1])
    _cars_annos(d / "cars_test_annos_withlabels.mat", [2, 3, 1])
    return FakeMeta(names, 6, 3)


def make_sun397(root: Path) -> FakeMeta:
    d = root / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]
    d.mkdir(parents=True)
    (d / "ClassName.txt").write_text("".join(c + "\n" for c in classes))
    for ci, c in enumerate(classes):
        for i in range(5):
            _jpg(d / c.lstrip("/") / f"sun_{ci}{i:03d}abc.jpg", ci)
    # ZSCL only turns "_" into " ": the sub-category separator "/" stays.
    return FakeMeta(["abbey", "apartment building/outdoor", "bakery/shop"], None, None, n_total=15)


BUILDERS = {
    "aircraft": make_aircraft,
    "caltech101": make_caltech101,
    "cifar100": make_cifar100,
    "dtd": make_dtd,
    "eurosat": make_eurosat,
    "flowers": make_flowers,
    "food": make_food,
    "mnist": make_mnist,
    "oxford_pet": make_oxford_pet,
    "cars": make_cars,
    "sun397": make_sun397,
}
