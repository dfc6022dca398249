"""Adapter checkpoints in PEFT's format: `save_pretrained`, `from_pretrained`, `load_adapter`.

Files (see `fxlora.peft_format` for the names): ``adapter_config.json`` and
``adapter_model.safetensors`` per adapter; the adapter ``default`` goes into the directory itself,
any other adapter into a sub-directory named after it (PEFT's layout). PEFT 0.21.2 reads what
fxlora writes and the other way round.

Safety: only safetensors files are read by default, so nothing in an adapter directory is ever
unpickled; a legacy ``adapter_model.bin`` is read only when asked (``allow_bin=True``), and only
with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects. Writes are atomic
(temporary file, then rename): a failed or interrupted save leaves the previous adapter intact.

Loading is all-or-nothing: the config and every tensor (names, shapes, kinds) are checked
against the model before it is touched, and if anything fails later the model is rolled back, so
a bad adapter never leaves a half-loaded one behind.

Mixin of `fxlora.LoraModel`; relies on its ``model``, ``adapter_state``, ``add_adapter``,
``delete_adapter`` and ``set_trainable_adapter``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._io import atomic_path, check_writable_dir
from .apply import fxlora_present, restore_requires_grad, strip
from .config import LoraConfig
from .layers import check_adapter_name, fxlora_internal_names
from .matching import matches_name_list
from .peft_format import (
    BASE,
    CONFIG_NAME,
    EXTRA_BASE,
    LEGACY_WEIGHTS_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    CheckpointError,
    Layout,
    config_from_json,
    config_to_json,
    layout_of_adapter,
    layout_of_plan,
)
from .planning import TracePolicy, make_plan

if TYPE_CHECKING:  # pragma: no cover
    from .model import LoraModel

__all__ = ["CheckpointMixin", "CheckpointError", "AdapterFiles", "read_adapter_dir"]

PathLike = Union[str, os.PathLike]
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
    """Read ``adapter_config.json`` and the adapter's tensors from `directory`.

    Raises `FileNotFoundError` for a missing directory or file and `CheckpointError` for a file
    that cannot be parsed; each names the file.
    """
    path = Path(directory)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise FileNotFoundError(f"adapter directory {str(path)!r} {what}")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in adapter directory {str(path)!r}")
    config, notes = _read_config(config_path)
    weights_path = _weights_path(path, allow_bin)
    raw = _read_tensors(weights_path)
    return AdapterFiles(path, config_path, weights_path, config, _strip_prefix(raw, weights_path), notes)


def _read_config(path: Path) -> tuple[LoraConfig, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    return config_from_json(data, str(path))


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


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only unpickling raises several types
        raise CheckpointError(
            f"{path} could not be read with torch.load(weights_only=True) (corrupted, or it holds objects "
            f"other than tensors): {exc}"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CheckpointError(f"{path} must hold a dict of name -> tensor, found {type(data).__name__}")
    return data


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


def _plan_layout(model: nn.Module, files: AdapterFiles, adapter_name: str) -> Layout:
    """The layout the config of `files` would give on `model` (nothing changed); may leave out
    `modules_to_save` entries the model does not have (see `_drop_unmatched_saved`)."""
    _drop_unmatched_saved(model, files)
    try:
        plan = make_plan(model, files.config, adapter_name, trace="eager")
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{files.config_path} does not fit this model: {exc}") from exc
    return layout_of_plan(model, plan)


# ====================================================================== loading into a model
def _copy_in(model: nn.Module, fitted: dict[str, tuple[torch.Tensor, str]]) -> None:
    """Copy the fitted tensors into `model` (dtype and device follow the model's tensors)."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, (tensor, _) in fitted.items():
            state[key].copy_(tensor)


def _snapshot_base(model: nn.Module, fitted: dict[str, tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
    """Copies of the base-model tensors loading will overwrite (restored if loading fails)."""
    state = model.state_dict(keep_vars=True)
    return {k: state[k].detach().clone() for k, (_, role) in fitted.items() if role in (BASE, EXTRA_BASE)}


def _restore_base(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in snapshot.items():
            state[key].copy_(value)


def _emit(notes: list[str]) -> None:
    for note in notes:
        warnings.warn(f"fxlora: {note}", stacklevel=3)


# ====================================================================== writing
def _base_model_name(model: nn.Module) -> Optional[str]:
    name = model.__dict__.get("name_or_path") or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _to_file_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no storage (safetensors refuses aliasing)."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def config_text(config_json: dict) -> str:
    return json.dumps(config_json, indent=2, sort_keys=True) + "\n"


def write_adapter_dir(directory: Path, tensors: dict[str, torch.Tensor], text: str) -> None:
    """Write both files of one adapter (`text` is the config JSON), each to a temporary file
    first; both are renamed into place only after both were written completely."""
    check_writable_dir(directory)
    with atomic_path(directory / WEIGHTS_NAME) as weights_tmp, atomic_path(directory / CONFIG_NAME) as config_tmp:
        save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
        config_tmp.write_text(text, encoding="utf-8")


def _adapter_directory(root: Path, adapter: str) -> Path:
    if adapter == DEFAULT_ADAPTER:
        return root
    if any(sep in adapter for sep in ("/", "\\", os.sep)) or adapter in (".", ".."):
        raise ValueError(f"adapter {adapter!r} cannot be saved: its name is used as a directory name and must not contain path separators")
    return root / adapter


# ====================================================================== the mixin
class CheckpointMixin:
    def _adapter_file_tensors(self, adapter: str) -> dict[str, torch.Tensor]:
        """The tensors of `adapter` under their file keys (with PEFT's prefix)."""
        layout = layout_of_adapter(self.model, adapter, self.peft_config[adapter].bias)
        state = self.model.state_dict(keep_vars=True)
        tensors = {}
        for file_key, slot in layout.slots.items():
            if not slot.written:
                continue
            tensor = state[slot.key]
            if tuple(tensor.shape) != slot.shape:  # layout and layers disagree: a bug, not bad input
                raise RuntimeError(f"fxlora internal error: {slot.key} has shape {tuple(tensor.shape)}, layout says {slot.shape}")
            tensors[PEFT_PREFIX + file_key] = tensor
        return _to_file_tensors(tensors)

    def save_pretrained(self, save_directory: PathLike, selected_adapters: Optional[Sequence[str]] = None) -> None:
        """Save adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

        The adapter ``default`` is written into `save_directory`, every other one into
        ``save_directory/<adapter name>/``. Only the adapters' tensors are written (LoRA weights,
        `modules_to_save` copies, and the base biases the adapter trains with ``bias != "none"``).
        Each adapter's pair of files is replaced atomically: if the save fails, the files that
        were there before are left intact.

        Args:
            save_directory: created if missing.
            selected_adapters: names of the adapters to save (default: all).
        """
        names = list(self.peft_config) if selected_adapters is None else self._check_known(selected_adapters)
        root = Path(save_directory)
        base_name = _base_model_name(self.model)
        prepared = []
        for name in names:  # everything is computed before the first byte is written
            directory = _adapter_directory(root, name)
            text = config_text(config_to_json(self.peft_config[name], base_name))
            prepared.append((directory, self._adapter_file_tensors(name), text))
        check_writable_dir(root)
        for directory, tensors, text in prepared:
            write_adapter_dir(directory, tensors, text)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: PathLike,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        *,
        trace: TracePolicy = "auto",
        allow_bin: bool = False,
    ) -> "LoraModel":
        """Adapt `model` (in place, as `fxlora.transform` does) with the adapter saved in
        `directory` by fxlora or PEFT, and return the `LoraModel`.

        Args:
            model: the base model the adapter was trained on (not a LoraModel: use `load_adapter`).
            directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
            adapter_name: the name the adapter gets in the returned model.
            is_trainable: False (default) puts the model in eval mode with nothing requiring
                grad; True leaves the mode alone and lets the adapter's weights train.
            trace: as in `fxlora.transform`.
            allow_bin: also read a legacy ``adapter_model.bin`` when there is no safetensors file
                (with ``torch.load(weights_only=True)``).

        Raises:
            FileNotFoundError: missing directory or file.
            CheckpointError: unreadable file, unsupported config, or tensors that do not fit the
                model (the message names the file, the keys and expected vs found shapes).
            On any error `model` is left exactly as it was.
        """
        from .transform import transform  # transform imports the model class

        if isinstance(model, CheckpointMixin) or (isinstance(model, nn.Module) and fxlora_present(model)):
            raise TypeError("this model already carries fxlora adapters; add another one with lora_model.load_adapter(directory, name)")
        check_adapter_name(adapter_name)
        files = read_adapter_dir(directory, allow_bin)
        fitted = fit_tensors(files, _plan_layout(model, files, adapter_name))
        _emit(files.notes)
        flags = {id(p): p.requires_grad for p in model.parameters()}
        snapshot = _snapshot_base(model, fitted)
        lora_model = transform(model, files.config, adapter_name, trace=trace)
        try:
            _copy_in(model, fitted)
        except BaseException:
            strip(model)
            restore_requires_grad(model, flags)
            _restore_base(model, snapshot)
            raise
        lora_model._finish_load(adapter_name, is_trainable)
        return lora_model

    def load_adapter(
        self,
        directory: PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        *,
        allow_bin: bool = False,
    ) -> None:
        """Add the adapter saved in `directory` (by fxlora or PEFT) as a new, inactive adapter
        `adapter_name` (activate it with `set_adapter`).

        `is_trainable=False` marks the adapter not trainable and puts the model in eval mode
        (as PEFT does); errors are those of `from_pretrained`, and on any error the model is left
        exactly as it was.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {list(self.peft_config)}")
        files = read_adapter_dir(directory, allow_bin)
        fitted = fit_tensors(files, _plan_layout(self.model, files, adapter_name))
        _emit(files.notes)
        snapshot = _snapshot_base(self.model, fitted)
        with self.adapter_state.transaction(self.model) as tx:
            tx.on_undo(lambda: _restore_base(self.model, snapshot))
            self.add_adapter(adapter_name, files.config)
            tx.on_undo(lambda: self.delete_adapter(adapter_name))
            _copy_in(self.model, fitted)
        self._finish_load(adapter_name, is_trainable)

    def _finish_load(self, adapter_name: str, is_trainable: bool) -> None:
        self.set_trainable_adapter(adapter_name, is_trainable)
        self.adapter_state.sync_trainable(self.training, force=True)
        if not is_trainable:
            self.eval()
