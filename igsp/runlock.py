"""One run per output folder: an exclusive OS file lock held for the run's whole life.

Without it, two `igsp train` processes pointed at the same `--output` (the second started before the first's
first checkpoint) both run to exit 0 while `log.jsonl` interleaves their records and `config.json`,
`results.json` and `latest.pt` come from different runs (issue 14). `claim_run_dir` prevents that:

- it takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `RUN_DIR/run.lock` *before* anything else is written into the
  folder; a second claimant (a new run, or `igsp train --resume` of a run that is still alive) fails at once
  with `RunLockedError` naming the folder and the holder's pid, host and start time (recorded in the lock file);
- the kernel drops a flock when the last descriptor of the holder's open file goes away, so a run that is
  killed (even with SIGKILL or `os._exit`) frees its folder without any cleanup code running. Forked
  DataLoader workers inherit the descriptor and exit a few seconds after their parent dies (torch's watchdog
  polls every 5 s), so a claim whose recorded holder is no longer alive retries for `STALE_GRACE_S` seconds;
- under DDP only rank 0 locks (only rank 0 writes); every rank learns the outcome through one broadcast, so a
  refused claim stops all ranks with the same error instead of leaving them waiting in a collective;
- `probe_run_dir`, called before the slow set-up (model, stream, image check), refuses a busy or finished
  folder at once without writing anything; the claim after the set-up is the check that counts;
- after a successful claim, temporaries that killed atomic writes left behind are removed
  (`remove_stale_temporaries`: only igsp.checkpoint's temporary-name pattern, only inside the run folder).

The lock file is never deleted: unlinking a lock file while another process has it open would let two
processes lock two different inodes of the same name. Read-only users of a run folder (`igsp eval`,
`igsp report`) take no lock: every file a run writes is replaced atomically, so they read consistent files.
Platforms without `fcntl` (Windows) run unlocked, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

try:  # POSIX; on Windows runs go unlocked (logged once per claim)
    import fcntl
except ImportError:  # pragma: no cover - not on the Linux CI
    fcntl = None  # type: ignore[assignment]

from igsp.checkpoint import TEMP_PATTERN, require_run_dir

__all__ = ["LOCK_NAME", "STALE_GRACE_S", "STALE_TEMP_AGE_S", "RunLock", "RunLockedError", "claim_run_dir",
           "pid_alive", "probe_run_dir", "remove_stale_temporaries"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

LOCK_NAME = "run.lock"
# DataLoader workers forked by a killed run keep its lock until torch's worker watchdog notices the dead
# parent: it polls every 5 s (torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL), so 15 s covers two misses.
STALE_GRACE_S = 15.0
_RETRY_S = 0.25
# A temporary whose pid is alive is normally being written right now (a write takes well under a second);
# after an hour it is a killed writer's whose pid was reused, or one from another host sharing the folder.
STALE_TEMP_AGE_S = 3600.0


class RunLockedError(RuntimeError):
    """The run folder is locked by a live run; the message names the folder and the holder (pid, host, start)."""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 probes without signalling)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def remove_stale_temporaries(root: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries that killed atomic writes left anywhere under `root`; returns what was removed.

    Only files named after `TEMP_PATTERN` are touched, and only those whose writer is gone: its pid is not a
    live process on this host, or the file is older than an hour. A temporary of a live writer (e.g. an
    `igsp eval` writing eval.json into the folder right now) is left alone.
    """
    removed: list[Path] = []
    now = time.time()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            m = TEMP_PATTERN.match(name)
            if m is None:
                continue
            path = Path(dirpath) / name
            pid = int(m.group("pid"))
            try:
                old = now - path.stat().st_mtime > STALE_TEMP_AGE_S
                if old or (pid != os.getpid() and not pid_alive(pid)):
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # its writer renamed or removed it meanwhile
                continue
    return removed


def _holder_gone(info: dict[str, Any]) -> bool:
    """The lock file names a process of this host that no longer exists (its forked children may still hold
    the lock for a few seconds)."""
    pid = info.get("pid")
    return info.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


class RunLock:
    """An exclusive, non-blocking `flock` on `RUN_DIR/run.lock`; the file records who holds it.

    Args:
        run_dir: the run folder (created if missing).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._file: BinaryIO | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._file is not None

    def holder(self) -> dict[str, Any]:
        """What the lock file records about its (last) holder: {"pid", "host", "started"}; {} if unreadable."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self, *, purpose: str = "train", grace_s: float = STALE_GRACE_S) -> RunLock:
        """Take the lock or raise `RunLockedError`; returns self.

        Args:
            purpose: what the caller wants to do, for the message ("train" or "resume").
            grace_s: how long to retry while the recorded holder process is gone (its forked children may
                still hold the descriptor for a few seconds). A live holder fails the claim at once.
        """
        if self._file is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+b")  # kept open for the run's life: closing it (release) drops the flock
        if fcntl is None:  # pragma: no cover - not on the Linux CI
            logger.warning("no fcntl on this platform: run folder %s is not locked against a second run",
                           self.run_dir)
        else:
            deadline = time.monotonic() + grace_s
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    info = self.holder()
                    if _holder_gone(info) and time.monotonic() < deadline:
                        time.sleep(_RETRY_S)
                        continue
                    f.close()
                    raise RunLockedError(self._busy_message(info, purpose)) from None
                except BaseException:
                    f.close()
                    raise
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(
            timespec="seconds")}
        f.seek(0)
        f.truncate()
        f.write((json.dumps(record) + "\n").encode("utf-8"))
        f.flush()
        self._file = f
        return self

    def probe(self, *, purpose: str = "train") -> None:
        """Raise `RunLockedError` if a live process holds the lock now; takes nothing and writes nothing.

        A holder whose recorded pid is gone (its forked children may keep the lock a few seconds) is not
        reported: `acquire` waits for those.
        """
        if fcntl is None or not self.path.is_file():  # no lock file: never locked
            return
        with open(self.path, "rb") as f:  # flock does not need write access
            try:  # shared: conflicts with a run's exclusive lock, not with other probes
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self.holder()
                if not _holder_gone(info):
                    raise RunLockedError(self._busy_message(info, purpose)) from None
            # closing the file drops the probe's lock

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock). Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _busy_message(self, info: dict[str, Any], purpose: str) -> str:
        pid, host = info.get("pid"), info.get("host")
        if pid is None:  # the holder has not written its record yet (it writes right after locking)
            who = "another igsp process"
        else:
            who = f"pid {pid}" + (f" on host {host}" if host and host != socket.gethostname() else "")
            who += " (this process)" if pid == os.getpid() and host == socket.gethostname() else ""
            who += f", started {info['started']}" if info.get("started") else ""
        what = "cannot resume" if purpose == "resume" else "cannot start a run in"
        hint = ("wait for that run to end or stop it, then resume" if purpose == "resume" else
                "wait for it to end, stop it, or choose another --output")
        return f"{what} {str(self.run_dir)!r}: the folder is locked by a running igsp run ({who}); {hint}"


def _refuse_existing_run(path: Path) -> None:
    if (path / "checkpoints" / "latest.pt").exists() or (path / "results.json").exists():
        raise FileExistsError(f"output directory {str(path)!r} already holds a run; continue it with "
                              f"`igsp train --resume {path}` or choose another --output")


def _on_rank0(fn: Callable[[], T], rank: int, world: int) -> T | None:
    """fn() on rank 0 only; with world > 1 its failure is broadcast, so every rank raises the same error (the
    other ranks would otherwise wait forever in their next collective for a rank 0 that has gone)."""
    result: T | None = None
    error: BaseException | None = None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # broadcast first, then raise below
            error = exc
    if world > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
        if error is not None:
            # The source's send can complete before a slower rank has even reached the broadcast; if rank 0 then
            # exited at once, torchrun would stop the others before they report the error. Every rank holds the
            # error after this barrier, so each prints its own line.
            dist.barrier()
    if error is not None:
        raise error
    return result


def probe_run_dir(path: str | os.PathLike[str], *, resume: bool, rank: int = 0, world: int = 1) -> None:
    """Refuse early what `claim_run_dir` will refuse, writing nothing: call it before the slow set-up.

    A run builds its model and checks its images before it claims its folder (nothing may be written before
    the configuration has proved sound), which takes from seconds to a minute for ViT-B/16 on MTIL; this probe
    lets a busy or finished folder fail at once. It is advisory (the folder can change hands in between):
    `claim_run_dir` remains the check that counts. Same arguments, errors and DDP rule as `claim_run_dir`.
    """
    path = Path(path)

    def probe() -> None:
        if resume:
            require_run_dir(path)
        if path.is_dir():
            RunLock(path).probe(purpose="resume" if resume else "train")
            if not resume:
                _refuse_existing_run(path)

    _on_rank0(probe, rank, world)


def claim_run_dir(path: str | os.PathLike[str], *, resume: bool, rank: int = 0, world: int = 1) -> RunLock | None:
    """Make `path` this run's folder: lock it (rank 0), refuse what must not happen, clean stale temporaries.

    A new run (`resume=False`) creates the folder and refuses one that already holds a run (a checkpoint or
    results.json); a resumed run needs an existing run folder. Both refuse a folder whose run is alive.
    With `world > 1` every rank must call this: rank 0 claims and broadcasts the outcome, so all ranks raise
    the same error.

    Returns:
        the held `RunLock` on rank 0 (release it when the run ends: `Trainer.close()`), None on other ranks.
    Raises:
        RunLockedError: a live run holds the folder. FileExistsError: a new run into a folder holding a run.
        FileNotFoundError / NotADirectoryError: `resume=True` and `path` is not a run folder.
    """
    path = Path(path)

    def claim() -> RunLock:
        if resume:
            require_run_dir(path)
        lock = RunLock(path).acquire(purpose="resume" if resume else "train")
        try:
            if not resume:
                _refuse_existing_run(path)
            removed = remove_stale_temporaries(path)
        except BaseException:
            lock.release()
            raise
        if removed:
            logger.info("removed %d stale temporary file(s) of killed writes under %s: %s", len(removed), path,
                        [str(p.relative_to(path)) for p in removed[:5]])
        return lock

    return _on_rank0(claim, rank, world)
