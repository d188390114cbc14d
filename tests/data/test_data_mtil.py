"""MTIL datasets: each of the 11 is read from a fake copy in its real layout by the real torchvision class."""

from __future__ import annotations

import pathlib
import shutil

import open_clip
import pytest
import torch
import torchvision.transforms as T
from mtil_fakes import GRAYS, PALETTE

from igsp.data import DatasetNotFoundError, build_dataset
from igsp.data.base import random_split_indices
from igsp.data.mtil import MTIL_DATASETS, ORDER_I, ORDER_II, ORDER_II_PERMUTATION, mtil_order

ALL = list(MTIL_DATASETS)
# open_clip's own eval preprocess, without normalisation so pixel colours stay readable (values in [0, 1]).
CLIP_PREPROCESS = open_clip.image_transform(16, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _decoded_class(img: torch.Tensor, gray: bool) -> int:
    """Which fake class colour an image (float (3, H, W) in [0, 1]) shows: nearest palette entry."""
    rgb = img.float().mean(dim=(1, 2)) * 255
    if gray:
        return int(torch.argmin((torch.tensor(GRAYS, dtype=torch.float32) - rgb.mean()).abs()))
    return int(torch.argmin(((torch.tensor(PALETTE, dtype=torch.float32) - rgb) ** 2).sum(1)))


def test_orders_and_registry():
    # The spec's Order I, and Order II = Order I permuted by [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2] (ZSCL's Order II).
    assert ORDER_I == ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist",
                       "oxford_pet", "cars", "sun397")
    assert ORDER_II == ("cars", "food", "mnist", "oxford_pet", "flowers", "sun397", "aircraft", "caltech101",
                        "dtd", "eurosat", "cifar100")
    assert ORDER_II == tuple(ORDER_I[i] for i in ORDER_II_PERMUTATION)
    assert mtil_order("II") == mtil_order("order2") == ORDER_II and mtil_order("i") == ORDER_I
    with pytest.raises(ValueError, match="order"):
        mtil_order("III")
    for spec in MTIL_DATASETS.values():
        assert spec.templates and all(t.count("{}") == 1 for t in spec.templates), spec.name


@pytest.mark.parametrize("name", ALL)
def test_loads_through_torchvision_with_correct_labels(name, fake_mtil, bypass_md5):
    # Every dataset, both splits, through the real torchvision reader and open_clip's preprocess: sizes, class
    # names, and each image's colour must decode to its own label (catches any image/label misalignment).
    root, metas = fake_mtil
    meta = metas[name]
    train = build_dataset(name, root, "train", CLIP_PREPROCESS)
    test = build_dataset(name, root, "test", CLIP_PREPROCESS)
    if meta.n_total is None:
        assert (len(train), len(test)) == (meta.n_train, meta.n_test)
    else:  # split by igsp: 80/20 of the whole listing
        assert len(train) == int(0.8 * meta.n_total) and len(train) + len(test) == meta.n_total
    for task, split in ((train, "train"), (test, "test")):
        assert task.name == name and task.split == split
        assert task.classnames == meta.classnames
        assert task.templates == list(MTIL_DATASETS[name].templates)
        for i in range(len(task)):
            img, label = task.dataset[i]
            assert isinstance(label, int) and label == task.targets[i]
            assert img.shape == (3, 16, 16) and img.dtype == torch.float32
            if not meta.gray and torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]):
                continue  # the one grayscale Caltech101 file (converted to RGB): no colour code to read
            assert _decoded_class(img, meta.gray) == label, (name, split, i)


@pytest.mark.parametrize("name", ["mnist", "caltech101"])
def test_grayscale_becomes_rgb_before_transform(name, fake_mtil, bypass_md5):
    # MNIST and some Caltech101 files are grayscale; a transform without its own RGB conversion must still get
    # 3 channels (open_clip's preprocess converts, a plain PILToTensor does not).
    root, _ = fake_mtil
    for split in ("train", "test"):
        task = build_dataset(name, root, split, T.PILToTensor())
        assert all(task.dataset[i][0].shape[0] == 3 for i in range(len(task)))


@pytest.mark.parametrize("name", ["caltech101", "eurosat", "sun397"])
def test_own_split_is_disjoint_complete_and_deterministic(name, fake_mtil):
    # The three datasets without an official split: train and test partition the listing, 80/20, and a rebuild
    # gives the same items.
    root, _ = fake_mtil
    tr, te = (build_dataset(name, root, s, None) for s in ("train", "test"))
    tr_paths, te_paths = set(tr.dataset.paths), set(te.dataset.paths)
    assert not tr_paths & te_paths
    assert len(tr_paths) + len(te_paths) == len(tr) + len(te)
    assert build_dataset(name, root, "train", None).dataset.paths == tr.dataset.paths


def test_sun397_split_ignores_file_system_order(fake_mtil, monkeypatch):
    # torchvision lists SUN397 with Path.rglob, whose order depends on the file system; igsp sorts first, so a
    # reversed rglob must give the same split.
    root, _ = fake_mtil
    ref = build_dataset("sun397", root, "train", None).dataset.paths
    orig = pathlib.Path.rglob
    monkeypatch.setattr(pathlib.Path, "rglob", lambda self, pattern, **kw: reversed(list(orig(self, pattern, **kw))))
    got = build_dataset("sun397", root, "train", None).dataset.paths
    assert sorted(got) == sorted(ref) and got == ref


def test_caltech_split_equals_moe_adapters_random_split(fake_mtil):
    # MoE-Adapters split Caltech101 with random_split(dataset, [int(0.8n), n - int(0.8n)], manual_seed(42)) over
    # torchvision's order; ours must select the same images.
    from torchvision.datasets import Caltech101

    root, _ = fake_mtil
    tv = Caltech101(str(root))
    n = len(tv)
    sub_train, _ = torch.utils.data.random_split(range(n), [int(0.8 * n), n - int(0.8 * n)],
                                                 generator=torch.Generator().manual_seed(42))
    expected = {(tv.categories[tv.y[i]], tv.index[i]) for i in sub_train.indices}
    ours = build_dataset("caltech101", root, "train", None).dataset.paths
    got = {(pathlib.Path(p).parent.name, int(pathlib.Path(p).stem.split("_")[1])) for p in ours}
    assert got == expected
    assert random_split_indices(n, 0.8, 42)[0] == sub_train.indices


def test_few_shot_is_per_class_and_seeded(fake_mtil):
    # EuroSAT fake: 18 images, 3 classes; its train split has 3-6 per class, so 2 shots are always available.
    root, _ = fake_mtil
    full = build_dataset("eurosat", root, "train", None)
    a = build_dataset("eurosat", root, "train", None, few_shot=2, seed=3)
    counts = torch.bincount(torch.tensor(a.targets), minlength=3)
    assert counts.tolist() == [2, 2, 2]
    assert set(a.dataset.paths) <= set(full.dataset.paths)
    assert build_dataset("eurosat", root, "train", None, few_shot=2, seed=3).dataset.paths == a.dataset.paths
    others = {tuple(build_dataset("eurosat", root, "train", None, few_shot=2, seed=s).dataset.paths)
              for s in range(6)}
    assert len(others) > 1  # the seed matters
    with pytest.raises(ValueError, match="few_shot"):
        build_dataset("eurosat", root, "test", None, few_shot=2)


@pytest.mark.parametrize("name", ALL)
def test_missing_dataset_names_folder_layout_and_source(name, tmp_path):
    # An empty data root: one DatasetNotFoundError (a FileNotFoundError) naming the folder, layout and source.
    with pytest.raises(FileNotFoundError) as info:
        build_dataset(name, tmp_path, "train", None)
    err = info.value
    assert isinstance(err, DatasetNotFoundError)
    msg = str(err)
    spec = MTIL_DATASETS[name]
    assert str(tmp_path / spec.folder) in msg
    assert spec.layout.splitlines()[0] in msg and "How to obtain" in msg
    assert ("download=True" in msg) == spec.downloadable
    assert not list(tmp_path.iterdir())  # nothing created (torchvision's Caltech101 would mkdir)


def test_incomplete_image_folder_fails_at_build(fake_mtil, fresh_copy):
    # Annotations present but an image gone (a partly extracted archive): caught at build time, not mid-training.
    root = fresh_copy("aircraft", fake_mtil[0])
    data = root / "fgvc-aircraft-2013b" / "data"
    first_train_id = (data / "images_variant_train.txt").read_text().split()[0]
    (data / "images" / f"{first_train_id}.jpg").unlink()
    assert len(build_dataset("aircraft", root, "test", None)) == 3  # the test split is still whole
    with pytest.raises(DatasetNotFoundError, match=r"1 of 6 listed image files are missing"):
        build_dataset("aircraft", root, "train", None)


def test_missing_annotation_file(fake_mtil, fresh_copy):
    # A required annotation file absent: the message names it.
    root = fresh_copy("food", fake_mtil[0])
    (root / "food-101" / "meta" / "test.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="test.json"):
        build_dataset("food", root, "train", None)


def test_caltech_without_background_folder(fake_mtil, fresh_copy):
    # torchvision's Caltech101 crashes with a bare ValueError without BACKGROUND_Google; we say what is missing.
    root = fresh_copy("caltech101", fake_mtil[0])
    shutil.rmtree(root / "caltech101" / "101_ObjectCategories" / "BACKGROUND_Google")
    with pytest.raises(DatasetNotFoundError, match="BACKGROUND_Google"):
        build_dataset("caltech101", root, "train", None)


def test_corrupt_files_wrap_torchvision_error(fake_mtil):
    # Without the md5 bypass the fake CIFAR-100 pickles fail torchvision's integrity check: that RuntimeError
    # must come back as our error, chained, with torchvision's words in the message.
    root, _ = fake_mtil
    with pytest.raises(DatasetNotFoundError, match="torchvision said: RuntimeError") as info:
        build_dataset("cifar100", root, "train", None)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_cars_download_flag_does_not_break_a_manual_copy(fake_mtil, caplog):
    # torchvision's StanfordCars raises on download=True even when the files are there; igsp ignores the flag.
    root, metas = fake_mtil
    with caplog.at_level("WARNING", logger="igsp.data.mtil"):
        task = build_dataset("cars", root, "test", None, download=True)
    assert len(task) == metas["cars"].n_test and "cannot be downloaded" in caplog.text


def test_partial_class_count_is_logged(fake_mtil, caplog):
    # 3 of 100 Aircraft variants: allowed (tests, subsets) but logged, so a truncated copy is noticed.
    root, _ = fake_mtil
    with caplog.at_level("WARNING", logger="igsp.data.mtil"):
        build_dataset("aircraft", root, "test", None)
    assert "found 3 classes" in caplog.text and "100" in caplog.text


def test_bad_arguments(fake_mtil):
    # unknown name, split, non-callable transform, zero shots: each refused naming the argument
    root, _ = fake_mtil
    with pytest.raises(KeyError, match="unknown MTIL dataset"):
        build_dataset("imagenet", root, "train", None)
    with pytest.raises(ValueError, match="split"):
        build_dataset("mnist", root, "val", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="transform"):
        build_dataset("mnist", root, "train", "resize")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="few_shot"):
        build_dataset("mnist", root, "train", None, few_shot=0)


# ZSCL mtil/src/datasets/collections.py (and cifar10.py for CIFAR-100): per dataset the number of templates and the
# first one, which is also the training template (`dataset.template`), in the reference's order.
ZSCL_TEMPLATE_PINS = {
    "aircraft": (2, "a photo of a {}, a type of aircraft."),
    "caltech101": (34, "a photo of a {}."),
    "cifar100": (18, "a photo of a {}."),
    "dtd": (8, "a photo of a {} texture."),
    "eurosat": (3, "a centered satellite photo of {}."),
    "flowers": (1, "a photo of a {}, a type of flower."),
    "food": (1, "a photo of a {}, a type of food."),  # with the "a" our earlier copy dropped
    "mnist": (1, 'a photo of the number: "{}".'),
    "oxford_pet": (1, "a photo of a {}, a type of pet."),
    "cars": (9, "a photo of a {}, a type of car."),
    "sun397": (2, "a photo of a {}."),
}


@pytest.mark.parametrize("name", ALL)
def test_templates_are_zscls_in_order(name):
    count, first = ZSCL_TEMPLATE_PINS[name]
    spec = MTIL_DATASETS[name]
    assert len(spec.templates) == count and spec.templates[0] == first == spec.train_template
    assert len(set(spec.templates)) == count  # no duplicates: every template is its own prompt


def test_template_quirks_and_last_entries_are_verbatim():
    # Copied verbatim, ungrammatical ones included: changing them changes the zero-shot numbers.
    t = {name: MTIL_DATASETS[name].templates for name in ALL}
    assert "a embroidered {}." in t["caltech101"] and "a origami {}." in t["caltech101"]
    assert t["caltech101"][-1] == "a doodle of the {}." and t["cifar100"][-1] == "a photo of the big {}."
    assert t["dtd"][-1] == "a photo of the {} object." and t["cars"][-1] == "a photo of my old {}."
    assert t["cars"][4] == "i love my {}!"


def test_class_name_rules(fake_mtil, bypass_md5):
    # ZSCL's only generic rule is "_" -> " " (slashes and case kept); Caltech101, EuroSAT and Flowers102 use its
    # hand-written lists, looked up by folder / label.
    from torchvision.datasets import Flowers102

    from igsp.data.mtil_prompts import CALTECH101_CLASSNAMES, FLOWERS102_CLASSNAMES, zscl_classnames

    root, _ = fake_mtil
    names = {n: build_dataset(n, root, "test", None).classnames for n in ("sun397", "mnist", "cifar100", "food")}
    assert names["sun397"][1] == "apartment building/outdoor"
    assert names["mnist"][:2] == ["0 - zero", "1 - one"]
    assert names["cifar100"][1] == "aquarium fish" and names["food"][0] == "apple pie"
    assert len(CALTECH101_CLASSNAMES) == 101 and CALTECH101_CLASSNAMES["crocodile_head"] == "head of a  crocodile"
    assert list(CALTECH101_CLASSNAMES) == sorted(CALTECH101_CLASSNAMES)  # torchvision's (sorted) folder order
    # torchvision's Flowers102 list differs from ZSCL's in one entry only.
    diff = [(a, b) for a, b in zip(Flowers102.classes, FLOWERS102_CLASSNAMES) if a != b]
    assert diff == [("pink-yellow dahlia?", "pink-yellow dahlia")]
    assert zscl_classnames("aircraft", ["F/A-18", "Cessna_172"]) == ["F/A-18", "Cessna 172"]


def test_unknown_caltech_folder_is_named_and_logged(caplog):
    # A folder outside Caltech101's 101 keeps the generic rule (ZSCL would shift every later name by one).
    from igsp.data.mtil_prompts import zscl_classnames

    with caplog.at_level("WARNING", logger="igsp.data.mtil_prompts"):
        got = zscl_classnames("caltech101", ["Faces", "my_extra", "yin_yang"])
    assert got == ["off-center face", "my extra", "yin and yang symbol"] and "my_extra" in caplog.text
