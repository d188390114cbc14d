"""Install (issue 13 item 1): a kernels-only install, extras for the rest, and a build that says why it skipped the
C++ extension, once, at run time. Verified by hand with pip in a throwaway venv (see the report of issue 13); these
tests pin the pieces: the declared requirements, the build record and its messages, the console script's guard."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import igsp_kernels._build_info as build_info
import igsp_kernels._cpp as cpp

ROOT = Path(__file__).resolve().parents[2]


def test_requirements_are_torch_and_numpy_with_extras(tmp_path):
    env = {**os.environ, "IGSP_KERNELS_BUILD_CPU": "0"}  # metadata only: no compiler probe
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    requires = (tmp_path / "igsp.egg-info" / "requires.txt").read_text().split("\n\n")
    assert requires[0].split() == ["torch>=2.4", "numpy>=1.24"]  # what a kernels-only install pulls in
    extras = {block.splitlines()[0] for block in requires[1:] if block.strip()}
    assert {"[train]", "[bench]", "[dev]"} <= extras and any(e.startswith("[gpu") for e in extras)
    train = next(b for b in requires[1:] if b.startswith("[train]"))
    assert "open_clip_torch" in train and "scikit-learn" in train
    entry = (tmp_path / "igsp.egg-info" / "entry_points.txt").read_text()
    assert "igsp = igsp._entry:main" in entry


@pytest.mark.parametrize("record,level,says", [
    ({"cpp_extension": "opted_out", "reason": "IGSP_KERNELS_BUILD_CPU=0 was set at build time"}, logging.INFO,
     "was not built (IGSP_KERNELS_BUILD_CPU=0 was set at build time)"),
    ({"cpp_extension": "skipped", "reason": "torch was not importable at build time"}, logging.WARNING,
     "the install skipped it: torch was not importable at build time"),
    (None, logging.WARNING, "Build it with torch installed: `pip install --no-build-isolation .`"),
])
def test_a_missing_extension_is_explained_by_the_build_record(monkeypatch, caplog, record, level, says):
    monkeypatch.setattr(build_info, "cpp_build_info", lambda: record)
    with caplog.at_level(logging.INFO, logger="igsp_kernels._cpp"):
        cpp._explain_missing("ModuleNotFoundError: No module named 'igsp_kernels._C'")
    (rec,) = [r for r in caplog.records if r.name == "igsp_kernels._cpp"]
    assert rec.levelno == level and says in rec.getMessage()


@pytest.mark.parametrize("content,expected", [
    (None, None),  # a source checkout or an editable install: no record
    ('{"cpp_extension": "skipped", "reason": "no compiler"}', {"cpp_extension": "skipped", "reason": "no compiler"}),
    ("{not json", None),  # a damaged record is ignored, never an error
])
def test_build_record_reader(tmp_path, monkeypatch, content, expected):
    if content is not None:
        (tmp_path / build_info.BUILD_INFO_NAME).write_text(content)
    monkeypatch.setattr(build_info, "__file__", str(tmp_path / "_build_info.py"))
    build_info.cpp_build_info.cache_clear()
    try:
        assert build_info.cpp_build_info() == expected
    finally:
        build_info.cpp_build_info.cache_clear()


def test_igsp_command_names_the_missing_train_extra(monkeypatch, capsys):
    import importlib.util

    import igsp._entry as entry

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    assert entry.main(["train", "digits-igsp"]) == 2
    err = capsys.readouterr().err
    assert "igsp: error: the trainer needs the [train] extra (missing: open_clip_torch)" in err
    assert "pip install 'igsp[train]'" in err
