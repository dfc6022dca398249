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

__all__ = ["atomic_path", "check_writable_dir", "fs_errors", "fsync_file", "fsync_dir", "file_mode", "give_file_mode"]

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
def fs_errors(action: str, path: PathLike) -> Iterator[None]:
    """Re-raise an `OSError` of the block as one whose message names `path` and the action (same
    errno, so the same subclass: `PermissionError`, ...)."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        message = f"cannot {action} {str(path)!r}: {reason}"
        if exc.errno is None:
            raise OSError(message) from exc
        raise OSError(exc.errno, message) from exc


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the process umask (0644
    under the usual umask 022). Temporary files (``mkstemp``, safetensors) are made 0600."""
    try:
        with open("/proc/self/status") as fh:
            umask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):  # no procfs: read it by setting it (and back)
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def give_file_mode(path: PathLike) -> None:
    """Give the written file `path` the mode of an ordinary new file (`file_mode`)."""
    with fs_errors("chmod", path):
        os.chmod(path, file_mode())


def fsync_file(path: PathLike) -> None:
    """Flush a written file to the disk."""
    with fs_errors("flush", path), open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entries (renames, links) to the disk, where the platform allows it."""
    if os.name != "posix":  # pragma: no cover
        return
    with fs_errors("flush", path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
        give_file_mode(tmp_path)
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
