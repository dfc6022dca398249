"""Adapter directories in PEFT's format: reading, checking against a model, writing.

Files (see `fxlora.io.peft_format` for the names): ``adapter_config.json`` and
``adapter_model.safetensors`` per adapter; the adapter ``default`` goes into the directory itself,
any other adapter into a sub-directory named after it (PEFT's layout). PEFT 0.21.2 reads what
fxlora writes and the other way round.

Safety: only safetensors files are read by default, so nothing in an adapter directory is ever
unpickled; a legacy ``adapter_model.bin`` is read only when asked (``allow_bin=True``), and only
with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects. A save replaces an
adapter's pair of files as a whole and a read gets one whole pair (`fxlora.io.adapter_dir`).
Every tensor of a file is checked against the model (`fit_tensors`) before anything is copied in.
"""


from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Sequence, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from fxlora.io.distributed import copy_into, full_tensor
from fxlora.io.adapter_dir import current_pair, dir_state, file_identity, replace_pair
from fxlora.io.atomic import check_writable_dir, fs_errors, fsync_file, give_file_mode
from fxlora.io.model_card import CARD_NAME, CardFacts, updated_card
from fxlora.io.moe_files import convert_expert_tensors
from fxlora.config import LoraConfig
from fxlora.core.layers import fxlora_internal_names
from fxlora.planning.names import matches_name_list
from fxlora.io.peft_format import (
    BASE,
    CONFIG_DIGEST_KEY,
    CONFIG_NAME,
    EXTRA_BASE,
    LEGACY_WEIGHTS_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    Layout,
    config_digest,
    config_from_json,
    layout_of_plan,
)
from fxlora.errors import CheckpointError
from fxlora.planning.plan import Plan, make_plan

__all__ = [
    "AdapterFiles",
    "read_adapter_dir",
    "fit_tensors",
    "plan_files",
    "plan_layout",
    "copy_in",
    "snapshot_base",
    "restore_base",
    "emit_notes",
    "base_model_name",
    "file_tensors",
    "config_text",
    "write_adapter_dir",
    "adapter_directory",
    "DEFAULT_ADAPTER",
]

PathLike = Union[str, os.PathLike]
#: the adapter saved into the directory itself (others go into sub-directories named after them)
DEFAULT_ADAPTER = "default"
_MAX_LISTED = 8  # problems listed in one error message


# ====================================================================== reading
@dataclass
class AdapterFiles:
    """An adapter directory, read and parsed (nothing checked against a model yet)."""

    directory: Path
    config_path: Path
    weights_path: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]  # file keys with PEFT_PREFIX removed
    notes: list[str]


def read_adapter_dir(directory: PathLike, allow_bin: bool = False) -> AdapterFiles:
    """Read ``adapter_config.json`` and the adapter's tensors from `directory`: one whole pair.

    The pair read is the one `fxlora.io.adapter_dir.current_pair` names (the directory's own, or,
    while a save is under way or after one was killed, the complete pair beside it). It is taken
    when the weights carry the digest of this very config, or when no save touched the directory
    while it was read; otherwise it is read again, a bounded number of times (a concurrent save).
    A config that was changed after saving (by hand: not the one the weights were saved with) loads
    with a note saying so.

    Raises `FileNotFoundError` for a missing directory or file and `CheckpointError` for a file
    that cannot be parsed, or for files that kept changing while being read; each names the path.
    """
    path = Path(directory)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise FileNotFoundError(f"adapter directory {str(path)!r} {what}")
    for attempt in range(_READ_ATTEMPTS):
        before = dir_state(path)
        with contextlib.ExitStack() as pins:  # open files keep their inodes from being reused
            try:
                files, verdict, read = _read_current_pair(path, allow_bin, pins)
            except (FileNotFoundError, CheckpointError):
                if dir_state(path) == before:
                    raise
            else:
                after = dir_state(path)
                quiet = after == before and all(after.identity(name) == ident for name, ident in read)
                if verdict == _MATCH or (quiet and verdict == _UNSIGNED):
                    return files
                if quiet and not before.in_transaction:
                    files.notes.append(f"{files.config_path} is not the config {files.weights_path.name} was saved with (edited since?); loaded as it is")
                    return files
        time.sleep(min(0.002 * 2**attempt, 0.05))
    raise CheckpointError(
        f"adapter directory {str(path)!r} kept changing while being read ({_READ_ATTEMPTS} attempts): is another process saving to it?"
    )


_READ_ATTEMPTS = 20
_MATCH, _MISMATCH, _UNSIGNED = "match", "mismatch", "unsigned"


def _read_current_pair(path: Path, allow_bin: bool, pins: contextlib.ExitStack) -> tuple[AdapterFiles, str, list]:
    """The current pair of `path`, whether its weights were saved with its config, and the
    identity (`file_identity`) of each file read, by its name in `path` (its files are held open
    in `pins`; none for a pair in a transaction directory)."""
    found = current_pair(path)
    if found is None:
        raise FileNotFoundError(f"no {CONFIG_NAME} in adapter directory {str(path)!r}")
    config_path = found.directory / CONFIG_NAME
    weights_path = _weights_path(found.directory, allow_bin)
    # both files are read through the handles opened here, so the identities name what was read
    config_fh, weights_fh = (pins.enter_context(open(p, "rb")) for p in (config_path, weights_path))
    read = [] if found.staged else [(config_path.name, file_identity(config_fh)), (weights_path.name, file_identity(weights_fh))]
    data = _read_config_json(config_path, config_fh.read())
    config, notes = config_from_json(data, str(config_path))
    raw, metadata = _read_tensors(weights_path, weights_fh)
    files = AdapterFiles(path, config_path, weights_path, config, _strip_prefix(raw, weights_path), notes)
    saved_with = metadata.get(CONFIG_DIGEST_KEY)
    if saved_with is None:
        return files, _UNSIGNED, read
    return files, (_MATCH if saved_with == config_digest(data) else _MISMATCH), read


def _read_config_json(path: Path, content: bytes) -> dict:
    try:
        return json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise CheckpointError(
            f"{path}: its JSON is nested too deeply to read; an adapter config is one object whose "
            "fields are numbers, strings, lists of names or {name: number} objects"
        ) from None


def _weights_path(directory: Path, allow_bin: bool) -> Path:
    safetensors_path = directory / WEIGHTS_NAME
    if safetensors_path.is_file():
        return safetensors_path
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        if allow_bin:
            return legacy
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} in {str(directory)!r}, only a legacy {LEGACY_WEIGHTS_NAME}; pass allow_bin=True to "
            "read it with torch.load(weights_only=True), which refuses pickled objects other than tensors"
        )
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in adapter directory {str(directory)!r}")


def _read_tensors(path: Path, fh: BinaryIO) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of the weights file open as `fh` (named `path` in errors) and its safetensors
    metadata (none for a legacy file). The whole file is read through `fh`: tensors and metadata
    come from that one file even if the path is replaced meanwhile."""
    if path.suffix == ".safetensors":
        try:
            content = fh.read()
            return load_safetensors(content), _safetensors_metadata(content)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from None
    try:
        data = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only unpickling raises several types
        raise CheckpointError(
            f"{path} could not be read with torch.load(weights_only=True) (corrupted, or it holds objects "
            f"other than tensors): {exc}"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CheckpointError(f"{path} must hold a dict of name -> tensor, found {type(data).__name__}")
    return data, {}


def _safetensors_metadata(content: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian length, JSON)."""
    size = int.from_bytes(content[:8], "little")
    header = json.loads(content[8 : 8 + size].decode("utf-8"))
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def _strip_prefix(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Drop PEFT's ``base_model.model.`` prefix (files written without it are accepted too)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        short = key.removeprefix(PEFT_PREFIX)
        if short in out:
            raise CheckpointError(f"{path}: key {key!r} appears both with and without the prefix {PEFT_PREFIX!r}")
        out[short] = value
    return out


# ====================================================================== checking


def _shape(shape: Sequence[int]) -> str:
    return str(tuple(shape))


def fit_tensors(files: AdapterFiles, layout: Layout) -> dict[str, tuple[torch.Tensor, str]]:
    """Match the file's tensors to the model's slots: ``{fxlora key: (tensor, role)}``.

    Raises `CheckpointError` naming the file and listing missing keys, unexpected keys, and keys
    whose shape (expected vs found) or kind (floating point or not) differs.
    """
    problems: list[str] = []
    for file_key, slot in layout.slots.items():
        if slot.required and file_key not in files.tensors:
            problems.append(f"missing key {PEFT_PREFIX + file_key!r} (expected shape {_shape(slot.shape)})")
    fitted: dict[str, tuple[torch.Tensor, str]] = {}
    for file_key, tensor in files.tensors.items():
        full = PEFT_PREFIX + file_key
        slot = layout.slots.get(file_key)
        if slot is None and layout.is_ignored(file_key):
            continue
        if slot is None:
            problems.append(f"unexpected key {full!r} (shape {_shape(tensor.shape)}): this model has no such adapter tensor")
        elif tuple(tensor.shape) != slot.shape:
            problems.append(f"key {full!r}: expected shape {_shape(slot.shape)}, found {_shape(tensor.shape)}")
        elif tensor.is_floating_point() != slot.floating:
            want = "a floating point" if slot.floating else "an integer"
            problems.append(f"key {full!r}: expected {want} tensor, found dtype {tensor.dtype}")
        elif not layout.is_ignored(file_key):
            fitted[slot.key] = (tensor, slot.role)
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError(
            f"{files.weights_path} does not fit this model (was the adapter made for another model or config?):"
            f"\n  {listed}{more}"
        )
    return fitted


def _drop_unmatched_saved(model: nn.Module, files: AdapterFiles) -> None:
    """Leave out `modules_to_save` entries that name no module of `model`, as PEFT does: PEFT's
    task types add e.g. both ``classifier`` and ``score`` and a model has only one of them. (A
    file that holds a copy of a module the model lacks still fails the tensor check.)"""
    entries = files.config.modules_to_save
    if not entries:
        return
    internal = fxlora_internal_names(model)
    names = [n for n, _ in model.named_modules() if n and n not in internal]
    kept = [e for e in entries if any(matches_name_list([e], n) for n in names)]
    if len(kept) < len(entries):
        unused = [e for e in entries if e not in kept]
        files.notes.append(f"{files.config_path}: modules_to_save entries {unused} match no module of this model; ignored")
        files.config = files.config.replace(modules_to_save=kept or None)


def plan_files(model: nn.Module, files: AdapterFiles, adapter_name: str) -> Plan:
    """The plan the config of `files` gives on `model` (nothing changed); may leave out `modules_to_save`
    entries the model lacks (`_drop_unmatched_saved`), converts transformers 4 MoE tensors (`fxlora.io.moe_files`)."""
    _drop_unmatched_saved(model, files)
    try:
        plan = make_plan(model, files.config, adapter_name, trace="eager")
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{files.config_path} does not fit this model: {exc}") from exc
    files.tensors = convert_expert_tensors(model, files.tensors, plan.targets, files.config, str(files.weights_path))
    return plan


def plan_layout(model: nn.Module, files: AdapterFiles, adapter_name: str) -> Layout:
    """The file layout of `plan_files`' plan."""
    return layout_of_plan(model, plan_files(model, files, adapter_name))


# ====================================================================== loading into a model


def copy_in(model: nn.Module, fitted: dict[str, tuple[torch.Tensor, str]]) -> None:
    """Copy the fitted tensors into `model` (dtype and device follow the model's tensors)."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, (tensor, _) in fitted.items():
            copy_into(state[key], tensor)


def snapshot_base(model: nn.Module, fitted: dict[str, tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
    """Copies of the base-model tensors loading will overwrite (restored if loading fails)."""
    state = model.state_dict(keep_vars=True)
    return {k: state[k].detach().clone() for k, (_, role) in fitted.items() if role in (BASE, EXTRA_BASE)}


def restore_base(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in snapshot.items():
            state[key].copy_(value)  # a snapshot is sharded as its tensor is


def emit_notes(notes: list[str]) -> None:
    for note in notes:
        warnings.warn(f"fxlora: {note}", stacklevel=3)


# ====================================================================== writing


def base_model_name(model: nn.Module) -> Optional[str]:
    name = model.__dict__.get("name_or_path") or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def file_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no storage (safetensors refuses aliasing); sharded
    tensors whole (`fxlora.io.distributed.full_tensor`: every process must call)."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        t = full_tensor(tensor.detach()).to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def config_text(config_json: dict) -> str:
    return json.dumps(config_json, indent=2, sort_keys=True) + "\n"


def write_adapter_dir(directory: Path, tensors: dict[str, torch.Tensor], text: str, card: Optional[CardFacts] = None) -> None:
    """Replace the adapter files in `directory` (`text` is the config JSON) as a whole, see
    `fxlora.io.adapter_dir.replace_pair`: afterwards the new pair is there, after a failure the
    previous one, after a kill one of the two. With `card`, the model card (``README.md``,
    `fxlora.io.model_card.updated_card`) is replaced in the same save. The weights carry the
    config's digest (`CONFIG_DIGEST_KEY`). Errors are `OSError`s naming the path (a full disk:
    ``ENOSPC``)."""
    check_writable_dir(directory)
    metadata = {"format": "pt", CONFIG_DIGEST_KEY: config_digest(json.loads(text))}

    def write_pair(into: Path) -> None:
        weights, config = into / WEIGHTS_NAME, into / CONFIG_NAME
        with fs_errors("write", weights):
            try:
                save_file(tensors, str(weights), metadata=metadata)
            except SafetensorError as exc:
                raise _as_os_error(exc) from exc
        with fs_errors("write", config):
            config.write_text(text, encoding="utf-8")
        content = updated_card(directory, card) if card is not None else None
        if content is not None:
            with fs_errors("write", into / CARD_NAME):
                (into / CARD_NAME).write_text(content, encoding="utf-8")
        for path in (weights, config) + ((into / CARD_NAME,) if content is not None else ()):
            give_file_mode(path)  # as PEFT's files, whatever wrote them: 0644 under umask 022
            fsync_file(path)

    replace_pair(directory, write_pair)


def _as_os_error(exc: SafetensorError) -> OSError:
    """safetensors reports I/O failures as SafetensorError("... Os { code: 28, ... }")."""
    found = re.search(r"code: (\d+)", str(exc))
    return OSError(int(found.group(1)) if found else errno.EIO, str(exc))


def adapter_directory(root: Path, adapter: str) -> Path:
    if adapter == DEFAULT_ADAPTER:
        return root
    if any(sep in adapter for sep in ("/", "\\", os.sep)) or adapter in (".", ".."):
        raise ValueError(f"adapter {adapter!r} cannot be saved: its name is used as a directory name and must not contain path separators")
    return root / adapter
