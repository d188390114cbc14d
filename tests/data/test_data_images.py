"""The up-front image check (igsp/data/images.py): which files it flags, and what the stream looks like after."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from igsp.data.base import TaskDataset
from igsp.data.images import BadImageError, check_image_file, verify_stream_images


def _image_bytes(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _files(tmp_path: Path) -> dict[str, Path]:
    jpg, png = _image_bytes("JPEG"), _image_bytes("PNG")
    content = {
        "good.jpg": jpg,
        "good.png": png,
        "good.bmp": _image_bytes("BMP"),
        "padded.jpg": jpg + b"\x00" * 100,  # a few padding bytes after the end marker are common and fine
        "png-named.jpg": png,  # PIL reads the content, not the name (Oxford Pets has such files)
        "empty.jpg": b"",
        "random.jpg": bytes(range(256)) * 20,
        "header-only.jpg": jpg[:200],  # cut inside the header
        "truncated.jpg": jpg[: len(jpg) * 2 // 3],  # header fine, image data cut: no end marker
        "truncated.png": png[: len(png) * 2 // 3],
        "text.png": b"hello, not a picture\n",
    }
    out = {}
    for name, data in content.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    return out


def test_check_image_file_flags_what_cannot_be_decoded(tmp_path):
    files = _files(tmp_path)
    reasons = {name: check_image_file(path) for name, path in files.items()}
    assert {n for n, r in reasons.items() if r is None} == {"good.jpg", "good.png", "good.bmp", "padded.jpg",
                                                            "png-named.jpg"}
    assert reasons["empty.jpg"] == "empty file"
    assert "end marker" in reasons["truncated.jpg"] and "end marker" in reasons["truncated.png"]
    assert reasons["random.jpg"].startswith("UnidentifiedImageError")
    assert check_image_file(tmp_path / "missing.jpg").startswith("FileNotFoundError")
    # What it accepts, PIL decodes; what it flags (bar an empty file), PIL would fail on at the first batch.
    for name, path in files.items():
        if reasons[name] is None:
            Image.open(path).convert("RGB")
        elif name != "empty.jpg":
            with pytest.raises((OSError, SyntaxError)):
                Image.open(path).convert("RGB")


class _Files(Dataset):
    """A dataset over image files that exposes `paths`, like MTILVisionDataset."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3, 2, 2), i % 2


class _InMemory(Dataset):
    """No files (like CIFAR-100 and MNIST): nothing to check."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3, 2, 2), 0


def _task(name: str, split: str, ds: Dataset) -> TaskDataset:
    return TaskDataset(name, ds, ["a", "b"], ["a photo of a {}."], split=split,
                       targets=[i % 2 for i in range(len(ds))])


def _stream(files: dict[str, Path]) -> list[tuple[TaskDataset, TaskDataset]]:
    train = _task("t0", "train", _Files([files["good.jpg"], files["empty.jpg"], files["good.png"],
                                          files["truncated.jpg"]]))
    test = _task("t0", "test", _Files([files["good.bmp"], files["random.jpg"]]))
    return [(train, test), (_task("t1", "train", _InMemory()), _task("t1", "test", _InMemory()))]


def test_bad_files_stop_the_stream_with_the_list(tmp_path):
    files = _files(tmp_path)
    with pytest.raises(BadImageError) as info:
        verify_stream_images(_stream(files))
    msg = str(info.value)
    assert msg.startswith("3 of 6 image files cannot be read")
    for name in ("empty.jpg", "truncated.jpg", "random.jpg"):
        assert str(files[name]) in msg
    assert str(files["good.jpg"]) not in msg and "data.skip_bad_images=true" in msg


def test_skip_bad_leaves_them_out_keeping_labels_aligned(tmp_path, caplog):
    files = _files(tmp_path)
    stream = _stream(files)
    with caplog.at_level("WARNING", logger="igsp.data.images"):
        out = verify_stream_images(stream, skip_bad=True)
    assert "left out 3 unreadable image file(s) of 6" in caplog.text
    train, test = out[0]
    assert len(train) == 2 and train.targets == [0, 0]  # items 0 and 2 of [0, 1, 0, 1]
    assert [train.dataset[i][1] for i in range(2)] == [0, 0]
    assert len(test) == 1 and test.targets == [0]
    assert out[1] == stream[1]  # in-memory task untouched


def test_all_good_returns_the_stream_itself(tmp_path):
    files = _files(tmp_path)
    stream = [(_task("t", "train", _Files([files["good.jpg"]])), _task("t", "test", _Files([files["good.png"]])))]
    assert verify_stream_images(stream) is stream


def test_a_split_with_no_readable_image_is_an_error_even_when_skipping(tmp_path):
    files = _files(tmp_path)
    stream = [(_task("t", "train", _Files([files["empty.jpg"]])), _task("t", "test", _Files([files["good.png"]])))]
    with pytest.raises(BadImageError, match="every image of task 't' \\(train split"):
        verify_stream_images(stream, skip_bad=True)


def test_skip_bad_keeps_seeded_augmentation_keys_working(tmp_path):
    # An augmented MTIL train split is indexed with (index, seed) keys (igsp.data.augment): the filtered view must
    # remap those too, not only plain indices (a torch Subset would fail on the tuple).
    from igsp.data.augment import AugmentedDataset, SeededAugment

    files = _files(tmp_path)
    base = _Files([files["good.jpg"], files["empty.jpg"], files["good.png"], files["truncated.jpg"]])
    aug = AugmentedDataset(base, SeededAugment(lambda x: x + 1.0), raw=lambda i: (torch.full((3, 2, 2), float(i)), i))
    stream = [(_task("t0", "train", aug), _task("t0", "test", _Files([files["good.bmp"]])))]
    train, _ = verify_stream_images(stream, skip_bad=True)[0]
    image, label = train.dataset[(1, 123)]  # the second good item is base item 2
    assert label == 2 and torch.equal(image, torch.full((3, 2, 2), 3.0))
    assert train.dataset[1][1] == 0  # plain keys still map: base[2] has label 2 % 2
