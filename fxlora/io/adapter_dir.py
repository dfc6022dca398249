"""Replacing an adapter's pair of files as a whole, and finding the pair that is current.

An adapter directory holds ``adapter_config.json`` next to ``adapter_model.safetensors`` (PEFT's
layout, which must hold after every save). Two files cannot be renamed in one step, so a save is a
small transaction through a hidden directory beside them. Every name it uses starts with `PREFIX`
and its id sorts by time (newest last).

A save (`replace_pair`), holding an exclusive lock on the directory (POSIX ``flock``):

0. removes what killed saves left behind (`clear_leftovers`);
1. writes both new files into ``.fxlora-tmp-<id>/`` and renames it to ``.fxlora-save-<id>/``, a
   complete new pair (a rename of a directory is atomic);
2. moves the current config, then the current weights, into ``.fxlora-save-<id>/previous/``;
3. hard-links (or, where links are refused, copies) the new weights, then the new config, into
   the directory;
4. removes every transaction directory.

A save may also write the model card (``README.md``, `fxlora.io.model_card`) into the new pair's
directory: in step 2 it first replaces the directory's card in one atomic rename, a hard link to
the previous card kept in ``previous/``; so the directory always holds a whole card, the old or
the new one, and a failed save puts the old one back.

The config leaves first and comes back last, so the directory itself never holds a config next to
weights of another save: it holds the old pair, no config, or the new pair. While it holds no
config, the current pair is the complete pair in the newest transaction directory (`current_pair`):
the new pair of a ``.fxlora-save-*``, or the previous pair of a ``.fxlora-undo-*``. A save that
fails undoes itself: ``.fxlora-save-<id>`` is renamed ``.fxlora-undo-<id>``, the previous files are
put back, the transaction directory goes. So at every instant, and after a kill at any instant,
some complete pair (the old or the new one) is current, and a failed save leaves the old one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

from fxlora.io.atomic import fs_errors, fsync_dir, fsync_file
from fxlora.io.peft_format import CARD_NAME, CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: saves to one directory are not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "PREFIX", "FoundPair", "DirState", "current_pair", "dir_state", "file_identity", "replace_pair", "replace_file",
    "clear_leftovers",
]

#: every file or directory a save creates beside the adapter's files starts with this
PREFIX = ".fxlora-"
_TMP, _SAVE, _UNDO = PREFIX + "tmp-", PREFIX + "save-", PREFIX + "undo-"
_PREVIOUS = "previous"
_PAIR = (CONFIG_NAME, WEIGHTS_NAME)
_SIDE = (CARD_NAME,)  # replaced in place by a save that writes them (never absent meanwhile)


@dataclass(frozen=True)
class FoundPair:
    """Where the current pair of an adapter directory lies."""

    directory: Path  # holds adapter_config.json and the weights
    staged: bool  # True: inside a transaction directory (a save is under way, or was killed)


@dataclass(frozen=True)
class DirState:
    """What a save would change in an adapter directory: name, inode, size, mtime and ctime of the
    pair's files and of the transaction entries. Equal states before and after a read mean no save
    touched the directory in between (renames and links change ctime; new files are new inodes)."""

    entries: tuple[tuple[str, int, int, int, int], ...]

    def identity(self, name: str) -> Optional[tuple[int, int, int, int]]:
        """(inode, size, mtime, ctime) of the entry `name`, None if absent."""
        return next((tuple(rest) for n, *rest in self.entries if n == name), None)

    @property
    def in_transaction(self) -> bool:
        return any(name.startswith(PREFIX) for name, *_ in self.entries)


# ====================================================================== reading side
def _new_id() -> str:
    return f"{time.time_ns():016x}-{os.getpid()}-{secrets.token_hex(3)}"


def _transactions(directory: Path) -> list[Path]:
    """Transaction directories, newest first."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith((_SAVE, _UNDO))]
    except FileNotFoundError:
        return []
    return [directory / n for n in sorted(names, key=lambda n: n.split("-", 2)[2], reverse=True)]


def _is_pair(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _PAIR)


def current_pair(directory: Path) -> Optional[FoundPair]:
    """The pair that counts now: the directory's own when it holds a config, else the complete pair
    of the newest transaction directory; None when there is neither."""
    if (directory / CONFIG_NAME).is_file():
        return FoundPair(directory, staged=False)
    for txn in _transactions(directory):
        holder = txn if txn.name.startswith(_SAVE) else txn / _PREVIOUS
        if _is_pair(holder):
            return FoundPair(holder, staged=True)
    return None


def file_identity(fh: IO[bytes]) -> tuple[int, int, int, int]:
    """(inode, size, mtime, ctime) of an open file, as `DirState.identity` gives them."""
    st = os.fstat(fh.fileno())
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def dir_state(directory: Path) -> DirState:
    """The `DirState` of `directory` now."""
    watched = (*_PAIR, LEGACY_WEIGHTS_NAME)
    entries = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(directory)):
            if name in watched or name.startswith(PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(directory / name)
                    entries.append((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return DirState(tuple(entries))


# ====================================================================== writing side
@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise saves to `directory` (released by the kernel if the process dies)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with fs_errors("lock", directory):
        fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file or directory tree; a tree is first renamed to a ``.fxlora-tmp-`` name where it
    can be, so a half-removed one is not taken for a pair (a pair is read only when complete)."""
    if path.is_dir() and not path.name.startswith(_TMP):
        trash = path.with_name(f"{_TMP}{_new_id()}-removed")
        with contextlib.suppress(OSError):
            os.rename(path, trash)
            path = trash
    if path.is_dir():
        for _ in range(2):  # a second pass for what a passing failure left
            shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clear_leftovers(directory: Path) -> None:
    """Remove what killed saves left: ``.fxlora-tmp-*`` always, transaction directories once the
    directory holds its own config again (until then one of them holds the current pair)."""
    own_config = (directory / CONFIG_NAME).is_file()
    for name in os.listdir(directory):
        if name.startswith(_TMP) or (own_config and name.startswith((_SAVE, _UNDO))):
            _remove(directory / name)


def _stage(directory: Path, write: Callable[[Path], None]) -> Path:
    """Step 1: a complete new pair in ``.fxlora-save-<id>/`` (nothing left behind on failure)."""
    ident = _new_id()
    tmp, txn = directory / (_TMP + ident), directory / (_SAVE + ident)
    with fs_errors("create", tmp):
        os.mkdir(tmp)
    try:
        write(tmp)
        fsync_dir(tmp)
        with fs_errors("rename", tmp):
            os.rename(tmp, txn)
    except BaseException:
        _remove(tmp)
        raise
    try:
        fsync_dir(directory)
    except BaseException:
        _remove(txn)
        raise
    return txn


def _link(source: Path, destination: Path) -> None:
    """Hard-link (or, where links are refused, copy) `source` to the new name `destination`."""
    try:
        os.link(source, destination)
    except OSError:  # file systems without hard links
        with fs_errors("write", destination):
            shutil.copyfile(source, destination)
            fsync_file(destination)


def _place(source: Path, destination: Path) -> None:
    """Put a copy of `source` at `destination` in one atomic rename; `source` stays."""
    tmp = destination.with_name(f"{_TMP}{_new_id()}-{destination.name}")
    try:
        _link(source, tmp)
        with fs_errors("replace", destination):
            os.replace(tmp, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@dataclass
class _Swap:
    """Progress of steps 2-3, which `_undo` reverses."""

    directory: Path
    txn: Path
    moved_aside: list[str]
    placed: list[str]
    kept: list[str] = dataclasses.field(default_factory=list)  # side files linked into previous/
    replaced: list[str] = dataclasses.field(default_factory=list)  # side files put in place


def _swap_in(swap: _Swap) -> None:
    """Steps 2-3: the side files replaced (the previous ones linked into ``previous/``), the
    previous pair into ``previous/`` (config first), the new one in (config last)."""
    previous = swap.txn / _PREVIOUS
    with fs_errors("create", previous):
        os.mkdir(previous)
    for name in _SIDE:
        if not (swap.txn / name).exists():
            continue
        if (swap.directory / name).exists():
            _link(swap.directory / name, previous / name)
            swap.kept.append(name)
        _place(swap.txn / name, swap.directory / name)
        swap.replaced.append(name)
    for name in _PAIR:
        if (swap.directory / name).exists():
            with fs_errors("move aside", swap.directory / name):
                os.rename(swap.directory / name, previous / name)
            swap.moved_aside.append(name)
    for name in reversed(_PAIR):
        _place(swap.txn / name, swap.directory / name)
        swap.placed.append(name)
    fsync_dir(swap.directory)


def _undo(swap: _Swap) -> None:
    """Put the previous pair back after a failed `_swap_in` (best effort: should a step fail here
    too, the previous or the new pair is still current, see the module docstring)."""
    ident = swap.txn.name[len(_SAVE):]
    undo = swap.directory / (_UNDO + ident)
    try:
        os.rename(swap.txn, undo)
        txn = undo
    except OSError:
        txn = swap.txn
    previous = txn / _PREVIOUS
    if CONFIG_NAME in swap.placed:
        (swap.directory / CONFIG_NAME).unlink()
    if WEIGHTS_NAME in swap.moved_aside:
        _place(previous / WEIGHTS_NAME, swap.directory / WEIGHTS_NAME)
    elif WEIGHTS_NAME in swap.placed:
        (swap.directory / WEIGHTS_NAME).unlink()
    if CONFIG_NAME in swap.moved_aside:
        os.rename(previous / CONFIG_NAME, swap.directory / CONFIG_NAME)
    for name in swap.replaced:
        if name in swap.kept:
            _place(previous / name, swap.directory / name)
        else:
            (swap.directory / name).unlink()
    fsync_dir(swap.directory)
    _remove(txn)


def replace_pair(directory: Path, write: Callable[[Path], None]) -> None:
    """Replace the pair of files in `directory` as a whole with what `write(into)` writes into the
    directory `into` (both files, complete and fsynced, and optionally the card, which `write` may
    read from `directory`: saves are serialised). On return the new pair is in `directory`
    and no ``.fxlora-`` entry is left; on an exception the previous pair is. OSErrors name the path.
    """
    with _locked(directory):
        clear_leftovers(directory)
        swap = _Swap(directory, _stage(directory, write), [], [])
        try:
            _swap_in(swap)
        except BaseException:
            with contextlib.suppress(OSError):
                _undo(swap)
            raise
        for txn in _transactions(directory):
            _remove(txn)


def replace_file(directory: Path, name: str, write: Callable[[Path], bool]) -> None:
    """Replace the file `name` in `directory` (a file outside the pair: the card of a save without
    a pair in `directory`) in one atomic rename with what `write(path)` writes at `path`; when it
    returns False it wrote nothing and the file stays. Serialised with saves, which `write` may
    read from; a killed write leaves a ``.fxlora-tmp-`` file, removed by the next save."""
    with _locked(directory):
        clear_leftovers(directory)
        tmp = directory / f"{_TMP}{_new_id()}-{name}"
        try:
            if write(tmp):
                fsync_file(tmp)
                with fs_errors("replace", directory / name):
                    os.replace(tmp, directory / name)
                fsync_dir(directory)
        finally:
            _remove(tmp)
