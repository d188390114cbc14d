"""Shared fixtures of the trainer tests: one tiny igsp run per test session, shared by the xdist workers.

The run (the `tiny` preset: igsp-tiny model with random weights, 3 synthetic tasks x 24 steps, ~4 s of training
on one core) is written once under the session's shared temporary root, guarded by a file lock, so the
several test modules that inspect it (phases, pruning, orthogonality, frozen experts, selector, checkpoints,
`igsp eval`, resume, DDP) do not each pay for it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock
from trainer_helpers import run_tiny


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(run directory, results) of the shared tiny igsp run."""
    base = tmp_path_factory.getbasetemp()
    # Under xdist every worker has its own basetemp inside the session's directory: share that parent.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    run_dir = root / "igsp-tiny-run"
    with FileLock(str(root / "igsp-tiny-run.lock")):
        results_path = run_dir / "results.json"
        if not results_path.exists() or not json.loads(results_path.read_text())["complete"]:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_tiny(run_dir)
    return run_dir, json.loads((run_dir / "results.json").read_text())
