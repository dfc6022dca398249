"""Atomic file writes: a crash or error mid-write leaves any earlier file at that path intact.

Data goes to a temporary file in the destination's directory, is flushed and fsynced, and is then
moved over the destination with `os.replace` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

__all__ = ["atomic_path", "check_writable_dir"]

PathLike = Union[str, os.PathLike]


def check_writable_dir(directory: PathLike) -> Path:
    """`directory` as a Path, created if missing; a clear error if it cannot be written."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create directory {str(path)!r}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"directory {str(path)!r} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(destination: PathLike, suffix: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path next to `destination`; on normal exit it replaces `destination`,
    on error it is removed and `destination` is untouched."""
    dest = Path(destination)
    check_writable_dir(dest.parent if str(dest.parent) else ".")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
