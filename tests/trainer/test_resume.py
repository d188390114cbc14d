"""Resume after a hard kill ends with exactly the uninterrupted run's accuracy matrix, adapters and step log.

The run is killed three times through the engine's test hook (IGSP_TEST_KILL_AT_STEP, `os._exit`, no cleanup),
at three kinds of resume point, and continued each time with `igsp train --resume`:
- step 9 (task 0, phase 1): the last checkpoint is the periodic one of step 6, in the middle of a router-
  convergence window (check_every = 4), so the detector state and the usage buffers must be restored;
- step 24 + 17 (task 1, phase 2): the last checkpoint is the phase-1 one (step 12, after pruning), so the
  pruned pool, the fresh phase-2 optimizer and the anchor must be restored;
- step 48 + 2 (task 2): the last checkpoint is the end of task 1 (after its evaluation).
On CPU with fixed seeds and a step-indexed data order the result must match bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import TINY_OVERRIDES, read_log, run_igsp, step_records

from igsp.engine import KILL_ENV, KILL_EXIT_CODE

ITERS = 24  # the tiny preset's steps per task


def _igsp(*args: str, kill_at: int | None = None):
    return run_igsp(*args, hooks={KILL_ENV: str(kill_at)} if kill_at is not None else None)


@pytest.mark.slow
def test_resume_after_kills_matches_the_uninterrupted_run(tiny_run, tmp_path):
    ref_dir, ref = tiny_run
    run = tmp_path / "killed"
    sets = [a for o in TINY_OVERRIDES for a in ("--set", o)]
    first = _igsp("train", "tiny", "--output", str(run), *sets, kill_at=9)
    assert first.returncode == KILL_EXIT_CODE, first.stderr[-2000:]
    assert not (run / "results.json").exists()
    for kill_at in (ITERS + 17, 2 * ITERS + 2):
        again = _igsp("train", "--resume", str(run), kill_at=kill_at)
        assert again.returncode == KILL_EXIT_CODE, again.stderr[-2000:]
    last = _igsp("train", "--resume", str(run))
    assert last.returncode == 0, last.stderr[-2000:]
    assert "Transfer" in last.stdout

    import json

    res = json.loads((run / "results.json").read_text())
    assert res["acc"] == ref["acc"]  # exact: same batches, same RNG, same optimizer states
    assert res["params"]["trainable_per_task"] == ref["params"]["trainable_per_task"]
    assert res["params"]["total_added"] == ref["params"]["total_added"]
    assert [c["converged_at"] for c in res["convergence"]] == [c["converged_at"] for c in ref["convergence"]]
    assert res["train_images"] == ref["train_images"]
    a = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["adapters"]
    b = torch.load(ref_dir / "checkpoints" / "latest.pt", weights_only=True)["adapters"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The log was truncated at each checkpoint: one record per logged step, identical to the reference.
    assert step_records(run) == step_records(ref_dir)
    assert sum(r["event"] == "resume" for r in read_log(run)) == 3
