"""Atomic file and directory writes (readers never see a half-written file), and the one JSON-object
reader whose errors are one line. A write that fails for a reason outside the program (full disk,
read-only folder, no permission) raises WriteError, one line naming the target."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mobilellm.errors import MobileLLMError

# errno values that mean "this filesystem will not take the write"; others are bugs and keep their traceback
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class WriteError(MobileLLMError):
    """A file or directory could not be written (disk full, read-only, no permission, I/O error)."""

    def __init__(self, path: str | os.PathLike, reason: str, note: str | None = None):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{reason} writing {path}" + (f"; {note}" if note else ""))


def write_failure(err: BaseException) -> str | None:
    """'no space left on device' (etc.) when `err` is an OS-level write failure, else None.

    Python raises OSError; Rust writers (safetensors, tokenizers) only put "(os error 28)" in the message.
    """
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        found = re.search(r"\(os error (\d+)\)", str(err))
        code = int(found.group(1)) if found else None
    if code not in WRITE_ERRNOS:
        return None
    reason = os.strerror(code)
    return reason[:1].lower() + reason[1:]


@contextlib.contextmanager
def reported_writes(path: str | os.PathLike, note: str | None = None) -> Iterator[None]:
    """Turn OS write failures inside the block into one WriteError naming `path` (inner writes too)."""
    path = Path(path)
    existed = path.exists()
    note = note or (f"the previous {path.name} is intact" if existed else None)
    try:
        yield
    except WriteError as err:  # a nested atomic write: report the outer target, which is what the user named
        raise WriteError(path, err.reason, note) from None
    except Exception as err:
        reason = write_failure(err)
        if reason is None or not _concerns(err, path):
            raise
        raise WriteError(path, reason, note) from None


def _concerns(err: BaseException, path: Path) -> bool:
    """False for an OSError about a file elsewhere (an input read inside the block)."""
    name = getattr(err, "filename", None)
    if not name:
        return True
    try:
        failed, folder = Path(name).resolve(), path.parent.resolve()
    except (OSError, RuntimeError):
        return True
    return failed == folder or folder in failed.parents or failed in folder.parents


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    with reported_writes(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 (and some writers replace the file)
            _fsync(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def read_json_object(path: str | os.PathLike, fix: str) -> dict:
    """The JSON object in `path`; a file that is not JSON, or holds another JSON value, is one
    MobileLLMError line ending with `fix` (what the user should do)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MobileLLMError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise MobileLLMError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it into place.

    An existing directory at `path` survives until the new one is complete; on failure the
    temporary directory is removed and `path` is untouched.
    """
    path = Path(path)
    with reported_writes(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
            yield tmp
            mode = 0o666 & ~_umask()
            for f in tmp.rglob("*"):
                if f.is_file():
                    os.chmod(f, mode)  # some writers (safetensors) create files 0600
                    _fsync(f)
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.replace(old, path)  # put the previous version back
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
