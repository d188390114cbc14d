"""Fault injection: kills *inside* atomic writes (checkpoints, results) resume to the uninterrupted run, no litter.

`IGSP_TEST_KILL_IN_WRITE=NAME:N` (igsp.checkpoint) exits the process hard during its N-th atomic write of NAME,
after the temporary is complete and before the rename: the worst moment, a finished temporary and an old target.
The tiny preset (checkpoint_every=6: latest.pt at steps 6, 12 (phase 1 ends), 18, 24 of each task) is killed
three times, each time in another kind of write, and resumed with `igsp train --resume`:
1. the 3rd latest.pt write (task 0, step 18): the run resumes from step 12, the end of phase 1;
2. the first task1_phase1.pt write of the resumed process (written before latest.pt at a phase end): latest.pt
   is still task 1, step 6, so the resumed run redoes the convergence window and the pruning;
3. the first results.json write (after task 1's evaluation, after its checkpoint): resumes at task 2's start.
Every kill must leave its temporary behind (else it did not land inside the write), the next start must remove
it, and the end result must equal the uninterrupted run bit for bit (CPU, fixed seeds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_helpers import TINY_OVERRIDES, read_log, run_igsp, step_records

from igsp.checkpoint import KILL_EXIT_CODE, KILL_IN_WRITE_ENV, TEMP_PATTERN, load_checkpoint


def _igsp(*args: str, kill_in: str | None = None):
    return run_igsp(*args, hooks={KILL_IN_WRITE_ENV: kill_in} if kill_in is not None else None)


def _temporaries(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("*") if TEMP_PATTERN.match(p.name) or p.name.endswith(".tmp"))


def _same(a: object, b: object) -> bool:
    """Exact equality of nested checkpoint content (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_kills_inside_atomic_writes_resume_identically_and_leave_no_temporary(tiny_run, tmp_path):
    ref_dir, ref = tiny_run
    run = tmp_path / "run"
    sets = [a for o in TINY_OVERRIDES for a in ("--set", o)]
    steps = [("train", "tiny", "--output", str(run), *sets), ("train", "--resume", str(run)),
             ("train", "--resume", str(run))]
    kills = ["latest.pt:3", "task1_phase1.pt:1", "results.json:1"]
    expected = [(0, 2, 12), (1, 1, 6), (2, 1, 0)]  # (task, phase, step) of latest.pt after each kill
    left: list[Path] = []
    for args, kill, (task, phase, step) in zip(steps, kills, expected):
        proc = _igsp(*args, kill_in=kill)
        assert proc.returncode == KILL_EXIT_CODE, proc.stderr[-3000:]
        temps = _temporaries(run)
        # This kill's temporary is there (named after the file being written); the previous one was removed
        # when this process claimed the folder.
        assert len(temps) == 1 and TEMP_PATTERN.match(temps[0].name).group("target") == kill.split(":")[0], temps
        assert temps[0] not in left
        left = temps
        latest = load_checkpoint(run / "checkpoints" / "latest.pt")  # the previous complete file
        p = latest["progress"]
        assert (p["task"], p["phase"], p["step"]) == (task, phase, step)
    last = _igsp("train", "--resume", str(run))
    assert last.returncode == 0, last.stderr[-3000:]
    assert _temporaries(run) == []

    res = json.loads((run / "results.json").read_text())
    assert res["acc"] == ref["acc"]  # exact: same batches, RNG, optimizer states and usage windows
    assert res["params"] == ref["params"]
    assert [c["converged_at"] for c in res["convergence"]] == [c["converged_at"] for c in ref["convergence"]]
    for name in ["latest.pt"] + [f"task{t}_phase{q}.pt" for t in range(3) for q in (1, 2)]:
        a = torch.load(run / "checkpoints" / name, weights_only=True)
        b = torch.load(ref_dir / "checkpoints" / name, weights_only=True)
        assert a.keys() == b.keys(), name
        # Everything but the clocks and the log size (the resumed log also holds its "resume" records).
        for key in a.keys() - {"wall_time_s", "train_time_s", "log_offset"}:
            assert _same(a[key], b[key]), (name, key)
    # The log was truncated at each restored checkpoint: exactly the uninterrupted run's step records.
    assert step_records(run) == step_records(ref_dir)
    assert sum(r["event"] == "resume" for r in read_log(run)) == 3
