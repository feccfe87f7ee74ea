"""One training at a time in a run folder (RunLock, a flock the kernel drops when its holder dies), and
never two runs mixed up in one (start_point refuses another run's folder unless `overwrite`)."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

from mobilellm.errors import MobileLLMError
from mobilellm.fileio import reported_writes
from mobilellm.train import state as run_state

LOCK_NAME = ".lock"
LOGS = ("config.yaml", "metrics.jsonl", "tensorboard")  # what a run writes before its first checkpoint


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> list[str]:
        """Take the lock or raise naming its holder; returns notes to print (a stale lock taken over)."""
        with reported_writes(self.path):  # a read-only or full run folder: one line
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise MobileLLMError(f"run folder {self.path.parent} is in use by another training ({holder}); wait "
                                 f"for it to finish, or give this one another run.out_dir") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return [f"warning: cannot lock {self.path.parent} ({os.strerror(err.errno)}): make sure no other "
                    f"training writes to it"]
        previous = _read(fd)
        notes = [f"note: took over the lock of {self.path.parent} left by {_describe(previous)}, which is no "
                 f"longer running"] if previous else []
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return notes

    def release(self) -> None:
        """Empty the file (an empty lock file was released cleanly) and drop the lock."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


def start_point(run_dir: Path, resume: str | None, overwrite: bool) -> tuple[Path | None, list[str]]:
    """(checkpoint to resume from or None, notes to print), after checking the folder holds no other run.

    `resume`: auto (newest checkpoint of the folder), none, or a checkpoint path. `overwrite`: start
    afresh (or from the given checkpoint) and delete what the folder holds of earlier runs.
    """
    if overwrite and resume == "auto":
        resume = "none"
    checkpoint = run_state.resolve_resume(run_dir, resume)
    found = run_state.checkpoints(run_dir)
    notes: list[str] = []
    if checkpoint is not None and _same(checkpoint.parent, run_dir / "checkpoints"):
        # continuing this folder's run from one of its checkpoints: later ones would be mixed with the new ones
        m = run_state.STEP_DIR.match(checkpoint.name)
        step = int(m.group(1)) if m else 0
        later = [p for s, p in found if s > step]
        if later and not overwrite:
            raise MobileLLMError(f"--resume {checkpoint} continues from step {step}, but {run_dir} holds later "
                                 f"checkpoints ({', '.join(p.name for p in later)}); pass --overwrite to delete "
                                 f"them, or continue into another run.out_dir")
        for p in later:
            shutil.rmtree(p)
        if later:
            notes.append(f"note: --overwrite: deleted {len(later)} later checkpoint(s) of {run_dir}")
        return checkpoint, notes
    final = run_dir / "final"
    if found or final.exists():
        what = (f"checkpoints up to step {found[-1][0]}" if found else "") + (
            " and " if found and final.exists() else "") + ("a final model" if final.exists() else "")
        if not overwrite:
            how = ("it has no checkpoint to resume" if not found else
                   "--resume none would start another run beside it" if checkpoint is None else
                   f"--resume {checkpoint} comes from elsewhere")
            raise MobileLLMError(f"run folder {run_dir} holds another run ({what}) and {how}; pass --overwrite "
                                 f"to delete it, or choose another run.out_dir")
        for _, p in found:
            shutil.rmtree(p)
        shutil.rmtree(final, ignore_errors=True)
        for name in LOGS:
            _remove(run_dir / name)
        notes.append(f"note: --overwrite: deleted the previous run in {run_dir} ({what})")
    elif any((run_dir / name).exists() for name in LOGS):
        notes.append(f"note: {run_dir} holds logs of a run that saved no checkpoint; this run replaces them")
        for name in LOGS:
            _remove(run_dir / name)
    return checkpoint, notes


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
