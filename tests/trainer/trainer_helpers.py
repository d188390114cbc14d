"""Helpers shared by the trainer tests (a uniquely named module: pytest's default import mode puts this
directory on sys.path, so tests import it as `trainer_helpers`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

# Every test that trains uses these overrides on top of the preset: checkpoints every 6 steps (so mid-phase
# checkpoints exist) and the default phase files.
TINY_OVERRIDES = ["train.checkpoint_every=6"]
REPO = Path(__file__).resolve().parents[2]


def run_tiny(output: Path, overrides: list[str] | None = None) -> dict:
    """Train the tiny preset into `output` in this process and return results.json's content."""
    from igsp.config import load_config
    from igsp.engine import Trainer

    config = load_config("tiny", [*TINY_OVERRIDES, *(overrides or [])])
    config.output_dir = str(output)
    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def run_igsp(*args: str, hooks: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m igsp -q ARGS` in a subprocess (offline), with exactly the test hooks in `hooks` set
    (e.g. {KILL_ENV: "9"}): hooks inherited from the test's own environment are cleared."""
    from igsp.checkpoint import KILL_IN_WRITE_ENV
    from igsp.engine import KILL_ENV

    env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, KILL_IN_WRITE_ENV)}
    env.update({"HF_HUB_OFFLINE": "1", **(hooks or {})})
    return subprocess.run([sys.executable, "-m", "igsp", "-q", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def step_records(run_dir: Path) -> list[tuple]:
    """The run's step log records (the fields a bit-identical resume must reproduce), as comparable tuples."""
    keep = ("task", "step", "phase", "loss", "ce", "reg", "lr", "grad_norm", "usage", "grad_norms")
    return [tuple(repr(r.get(k)) for k in keep) for r in read_log(run_dir) if r["event"] == "step"]


def resume_in_process(run_dir: Path) -> dict:
    """Continue the run in `run_dir` from its checkpoints/latest.pt in this process; results.json's content."""
    from igsp.config import load_config
    from igsp.engine import Trainer

    trainer = Trainer(load_config(run_dir, TINY_OVERRIDES), resume=run_dir)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def same_adapters(run_a: Path, run_b: Path) -> bool:
    """Whether two runs' latest checkpoints hold bitwise identical adapter tensors (the same keys)."""
    import torch

    a = torch.load(run_a / "checkpoints" / "latest.pt", weights_only=True)["adapters"]
    b = torch.load(run_b / "checkpoints" / "latest.pt", weights_only=True)["adapters"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_log(run_dir: Path) -> list[dict]:
    """The run's log.jsonl records, in order."""
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def mtil_fakes() -> ModuleType:
    """tests/data/mtil_fakes.py (fake MTIL datasets on disk), loaded by path: it is not a package module."""
    path = REPO / "tests" / "data" / "mtil_fakes.py"
    spec = importlib.util.spec_from_file_location("igsp_test_mtil_fakes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module
