"""One run per output folder (issue 14): the run lock and the clean-up of stale temporaries.

The lock holders here are separate processes (forked from the test: a second `igsp train` is another process,
and that is what the lock must stop) that lock a folder and wait. Two real runs racing for
one folder (the issue's data-loss case) are in `test_two_runs_into_one_folder_*`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from igsp.checkpoint import TEMP_PATTERN, atomic_write_bytes
from igsp.cli import main
from igsp.runlock import (
    LOCK_NAME,
    STALE_TEMP_AGE_S,
    RunLock,
    RunLockedError,
    claim_run_dir,
    probe_run_dir,
    remove_stale_temporaries,
)

REPO = Path(__file__).resolve().parents[2]

def _holder_main(folder: str, linger: bool, conn) -> None:
    lock = RunLock(folder).acquire(grace_s=0)
    if linger:  # a killed run whose forked DataLoader worker keeps the descriptor for 2 s more
        if os.fork() == 0:
            time.sleep(2.0)
            os._exit(0)
        conn.send("locked")
        os._exit(0)
    conn.send("locked")
    conn.recv()  # until the test says "release" (or kills this process)
    lock.release()


def _hold(folder: Path, linger: bool = False) -> mp.Process:
    """A separate process holding the lock of `folder` (forked: no interpreter start-up, torch already loaded)."""
    ours, theirs = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_holder_main, args=(str(folder), linger, theirs), daemon=True)
    proc.start()
    assert ours.poll(60) and ours.recv() == "locked"
    proc.conn = ours  # type: ignore[attr-defined]
    return proc


def _wait_exit(proc: mp.Process) -> None:
    """Until the holder itself has exited (join() would also wait for its lingering child: it inherits the
    sentinel pipe join() watches)."""
    deadline = time.monotonic() + 30
    while proc.is_alive():  # waitpid(WNOHANG) on the holder only
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _release(proc: mp.Process) -> None:
    proc.conn.send("release")  # type: ignore[attr-defined]
    proc.join(timeout=30)


def _error_lines(err: str, command: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"igsp {command}")]


def test_lock_is_exclusive_between_processes_and_names_the_holder(tmp_path):
    holder = _hold(tmp_path / "run")
    try:
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path / "run").acquire(grace_s=0)
        msg = str(info.value)
        assert str(tmp_path / "run") in msg and f"pid {holder.pid}" in msg
    finally:
        _release(holder)
    # Ended: the folder is free again, and the lock file stays (deleting it would race other claimants).
    with RunLock(tmp_path / "run") as lock:
        assert lock.held and json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert (tmp_path / "run" / LOCK_NAME).is_file()


def test_a_killed_holder_frees_the_folder(tmp_path):
    holder = _hold(tmp_path / "run")
    holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the flock with the last descriptor
    holder.join(timeout=30)
    RunLock(tmp_path / "run").acquire(grace_s=0).release()


def test_a_dead_holders_lingering_child_is_waited_for(tmp_path):
    # The holder exits at once but a forked child (as a DataLoader worker would) keeps the descriptor for 2 s:
    # the recorded pid is dead, so the claim retries instead of failing, and gets the lock once the child is gone.
    holder = _hold(tmp_path / "run", linger=True)
    _wait_exit(holder)
    start = time.monotonic()
    lock = RunLock(tmp_path / "run").acquire(grace_s=20)
    waited = time.monotonic() - start
    assert lock.held and 0.5 < waited < 20  # it did wait for the child (2 s after the fork)
    lock.release()
    # Without the grace the same situation is refused: a live holder would be, always.
    holder = _hold(tmp_path / "run2", linger=True)
    _wait_exit(holder)
    with pytest.raises(RunLockedError):
        RunLock(tmp_path / "run2").acquire(grace_s=0)


def _no_model(*args, **kwargs):
    raise AssertionError("the model was built: the refusal should have come first")


def test_second_run_into_a_live_folder_is_refused_and_writes_nothing(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    holder = _hold(run)
    (run / "log.jsonl").write_text('{"event": "step"}\n')  # what the live run has written so far
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK_NAME}
    monkeypatch.setattr("igsp.engine.create_clip", _no_model)  # refused by the probe, before any set-up
    try:
        assert main(["-q", "train", "tiny", "--output", str(run)]) == 2
    finally:
        _release(holder)
    lines = _error_lines(capsys.readouterr().err, "train")
    assert len(lines) == 1 and str(run) in lines[0] and f"pid {holder.pid}" in lines[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK_NAME} == before


def test_resume_of_a_live_run_is_refused(tiny_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    log = (run / "log.jsonl").read_bytes()
    monkeypatch.setattr("igsp.engine.create_clip", _no_model)
    holder = _hold(run)
    try:
        assert main(["-q", "train", "--resume", str(run)]) == 2
    finally:
        _release(holder)
    lines = _error_lines(capsys.readouterr().err, "train")
    assert len(lines) == 1 and "cannot resume" in lines[0] and f"pid {holder.pid}" in lines[0]
    assert (run / "log.jsonl").read_bytes() == log  # not truncated to the checkpoint's offset


def test_the_claim_refuses_a_live_folder_that_the_probe_let_pass(tmp_path):
    # The probe is advisory: a run that takes the folder between a probe and the claim is caught by the claim.
    run = tmp_path / "run"
    probe_run_dir(run, resume=False)  # free (it does not even exist), and the probe created nothing
    assert not run.exists()
    holder = _hold(run)
    try:
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            claim_run_dir(run, resume=False)
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            probe_run_dir(run, resume=False)
    finally:
        _release(holder)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # neither wrote anything else
    probe_run_dir(run, resume=False)
    claim_run_dir(run, resume=False).release()


def test_finished_or_checkpointed_folder_is_refused_for_a_new_run(tmp_path):
    for marker in ("results.json", "checkpoints/latest.pt"):
        folder = tmp_path / marker.replace("/", "_")
        (folder / marker).parent.mkdir(parents=True)
        (folder / marker).write_text("{}")
        with pytest.raises(FileExistsError, match="--resume"):
            probe_run_dir(folder, resume=False)
        with pytest.raises(FileExistsError, match="--resume"):
            claim_run_dir(folder, resume=False)
        RunLock(folder).acquire(grace_s=0).release()  # the refusal released its lock


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        claim_run_dir(tmp_path / "missing", resume=True)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        claim_run_dir(tmp_path, resume=True)
    assert not (tmp_path / "missing").exists()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_claim_removes_only_stale_temporaries_of_our_own_pattern(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "report").mkdir()
    dead, live = _dead_pid(), os.getppid()  # pytest's parent (or the xdist controller) is alive
    stale = [run / "checkpoints" / f".latest.pt.{dead}.0123abcd.tmp",
             run / "report" / f".report.md.{dead}.89ef0123.tmp",
             run / f".results.json.{live}.00000000.tmp"]  # alive, but older than an hour: a reused pid
    keep = [run / "checkpoints" / f".latest.pt.{live}.0123abcd.tmp",  # a live writer's (e.g. igsp eval's)
            run / ".results.json.tmp", run / "notes.tmp", run / f".x.{dead}.0123ABCD.tmp",  # not our pattern
            run / "checkpoints" / "latest.pt"]
    outside = tmp_path / f".latest.pt.{dead}.0123abcd.tmp"  # not in the run folder's tree
    for p in [*stale, *keep, outside]:
        p.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_AGE_S - 60
    os.utime(stale[2], (old, old))
    assert all(TEMP_PATTERN.match(p.name) for p in stale) and not TEMP_PATTERN.match(keep[1].name)
    removed = remove_stale_temporaries(run)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in [*keep, outside]) and not any(p.exists() for p in stale)


def test_claim_cleans_the_folder_after_locking(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    tmp = run / f".log.jsonl.{_dead_pid()}.0123abcd.tmp"
    tmp.write_bytes(b"x")
    lock = claim_run_dir(run, resume=False)
    try:
        assert not tmp.exists()
    finally:
        lock.release()


def test_atomic_writes_name_their_temporaries_after_the_pattern(tmp_path, monkeypatch):
    # The clean-up can only find what atomic_open names this way: pin the pattern to the writer.
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_bytes(tmp_path / "results.json", b"{}")
    assert len(seen) == 1
    m = TEMP_PATTERN.match(seen[0])
    assert m and m.group("target") == "results.json" and int(m.group("pid")) == os.getpid()


@pytest.mark.slow
def test_two_runs_into_one_folder_one_wins_the_other_is_refused(tmp_path):
    # The data-loss case: two `igsp train` into one --output, started together. One must be refused
    # (exit 2, naming the folder) and the other's files must all be its own.
    run = tmp_path / "run"
    sets = ["--set", "data.num_tasks=2", "--set", "train.iterations=8", "--set", "method.min_steps=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmds = [[sys.executable, "-m", "igsp", "-q", "train", "tiny", "--output", str(run), "--set", f"train.seed={s}",
             *sets] for s in (1, 2)]
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)][1]
    lines = _error_lines(loser, "train")
    # Refused by the lock (it started while the winner ran) or, had the winner already finished, as a finished run.
    assert len(lines) == 1 and str(run) in lines[0] and ("locked" in lines[0] or "already holds a run" in lines[0])
    winner_seed = json.loads((run / "config.json").read_text())["train"]["seed"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "step" for r in records) == 2 * 8 // 4  # one run's records only (log_every=4)
    res = json.loads((run / "results.json").read_text())
    assert res["complete"] and winner_seed in (1, 2)
    assert main(["-q", "eval", str(run)]) == 0  # config.json and latest.pt belong together
