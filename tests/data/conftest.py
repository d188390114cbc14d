"""Fixtures of the data tests: one fake MTIL data root (builders in mtil_fakes.py) and the md5 bypass."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from mtil_fakes import BUILDERS, FakeMeta


@pytest.fixture(scope="session")
def fake_mtil(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, FakeMeta]]:
    """One data root holding fake copies of all 11 datasets (read-only for tests: copy before mutating)."""
    root = tmp_path_factory.mktemp("mtil_root")
    metas = {name: build(root) for name, build in BUILDERS.items()}
    return root, metas


@pytest.fixture
def bypass_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake CIFAR-100 pickles and Flowers .mat files cannot match torchvision's md5 sums of the real files, so
    their `check_integrity` keeps only its existence check. Nothing else of torchvision is patched."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.flowers102 as tv_flowers

    def exists_only(fpath: str, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    monkeypatch.setattr(tv_cifar, "check_integrity", exists_only)
    monkeypatch.setattr(tv_flowers, "check_integrity", exists_only)


@pytest.fixture
def fresh_copy(tmp_path: Path):
    """copy(name, fake_root) -> a private data root holding only that dataset, safe to mutate."""

    def copy(name: str, src_root: Path) -> Path:
        from igsp.data.mtil import MTIL_DATASETS

        top = MTIL_DATASETS[name].folder.split("/")[0]
        shutil.copytree(src_root / top, tmp_path / top)
        return tmp_path

    return copy
