"""Exporting merged weights for the original, unmodified model class (no fxlora needed to load them).

`merged_state_dict` computes the ``state_dict()`` that `LoraModel.merge_and_unload` would leave on
the model, without changing the live model: the adapted layers' merged weights are new tensors, the
other entries are the model's own (as ``state_dict()`` gives them), fxlora's entries are left out,
and each `modules_to_save` module contributes its chosen trained copy under its own name.

`save_merged` writes it:

- as **one safetensors file** (metadata ``{"format": "pt"}``) that
  ``Original().load_state_dict(safetensors.torch.load_file(path))`` accepts, tied tensors written
  once per name; or
- for a transformers ``PreTrainedModel`` and a path not ending in ``.safetensors``, as a
  **directory** written by the model's own ``save_pretrained`` (config, tied weights handled the
  transformers way), which the class's ``from_pretrained`` loads.

Writes are atomic: everything is written to a temporary file or directory next to the destination
and then moved over it file by file with `os.replace`, so an error or crash while writing leaves any
earlier file intact (and other files in an existing directory, such as a tokenizer's, untouched).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from fxlora.io.atomic import atomic_path, check_writable_dir
from fxlora.core.fold import check_fold, check_untied, layer_scales, merged_tensors
from fxlora.kinds.hf_classes import is_pretrained_model
from fxlora.core.layers import fxlora_internal_names, saved_copy_choice

__all__ = ["merged_state_dict", "save_merged", "base_state_dict"]

PathLike = Union[str, os.PathLike]
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def base_state_dict(model: nn.Module) -> dict[str, object]:
    """``model.state_dict()`` without fxlora's entries: the keys of the untransformed model."""
    internal = fxlora_internal_names(model)

    def ours(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in internal for i in range(1, len(parts)))

    return {k: v for k, v in model.state_dict().items() if not ours(k)}


def merged_state_dict(lora_model: nn.Module, adapters: list[str], safe_merge: bool = False) -> dict[str, object]:
    """The state merge_and_unload(adapter_names=`adapters`) would leave; `lora_model` unchanged.

    Raises `fxlora.core.delta.MergeError` where `merge_adapter` would (nothing is computed further)."""
    model = lora_model.model
    scales = {a: lora_model.adapter_state.scale_of(a) for a in adapters if a not in lora_model.merged_adapters}
    layers = {n: m for n, m in model.named_modules() if layer_scales(m, scales)}
    check_untied(model, layers)
    for name, module in layers.items():
        check_fold(name, module, layer_scales(module, scales), finite=safe_merge, merged=layer_scales(module, lora_model.adapter_state.merged_scale))

    state = base_state_dict(model)
    merged = {id(m): merged_tensors(m, layer_scales(m, scales)) for m in layers.values()}
    keep = [*lora_model.merged_adapters, *scales]
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        for which, tensor in merged.get(id(module), {}).items():
            state[prefix + which] = tensor
        chosen = saved_copy_choice(module, keep)
        if chosen is not None:
            for key, value in module.modules_to_save[chosen].state_dict().items():
                state[prefix + key] = value
    return state


def _one_per_name(state: dict[str, object]) -> dict[str, object]:
    """Contiguous tensors, no two sharing memory (safetensors refuses aliases; each name gets its
    own copy so that a plain ``load_state_dict`` finds every key)."""
    seen: set[tuple] = set()
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, which safetensors cannot store")
        tensor = value.detach()
        where = (tensor.device, tensor.untyped_storage().data_ptr())
        if where in seen or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(where)
        out[key] = tensor
    return out


def _check_destination(path: Path, directory: bool) -> None:
    """A clear error, before anything is computed, if `path` cannot receive the export."""
    if directory:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{str(path)!r} exists and is not a directory; a transformers model is exported as a directory (or give a path ending in .safetensors for one file)")
        if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"directory {str(path)!r} is not writable")
    elif path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; give a file path such as {str(path / 'merged.safetensors')!r}")
    check_writable_dir(path.parent if str(path.parent) else ".")


def save_merged(lora_model: nn.Module, path: PathLike, adapters: list[str], safe_merge: bool = False) -> Path:
    """Write the merged weights to `path` (see the module docstring); return `path` as a Path."""
    path = Path(path)
    as_directory = is_pretrained_model(lora_model.model) and path.suffix != ".safetensors"
    _check_destination(path, as_directory)
    state = merged_state_dict(lora_model, adapters, safe_merge)
    if as_directory:
        _write_pretrained(lora_model.model, state, path)
    else:
        _write_file(state, path)
    return path


def _write_file(state: dict[str, object], path: Path) -> None:
    from safetensors import torch as st

    tensors = _one_per_name(state)
    with atomic_path(path, suffix=".tmp") as tmp:
        st.save_file(tensors, str(tmp), metadata={"format": "pt"})


def _write_pretrained(model: nn.Module, state: dict[str, object], directory: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        model.save_pretrained(tmp, state_dict=dict(state), safe_serialization=True)
        _move_into(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_order(name: str) -> tuple[int, str]:
    """Weight files first, then their index, then the config files that point at them."""
    if name.endswith(".index.json"):
        return (1, name)
    return (0 if _WEIGHT_FILE.fullmatch(name) else 2, name)


def _move_into(source: Path, directory: Path) -> None:
    """Move every file of `source` into `directory` (each with one atomic `os.replace`, after an
    fsync), then delete weight files of an earlier export that the new one does not have."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted((p.name for p in source.iterdir() if p.is_file()), key=_move_order)
    for name in names:
        with open(source / name, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(source / name, directory / name)
    for stale in directory.iterdir():
        if stale.is_file() and _WEIGHT_FILE.fullmatch(stale.name) and stale.name not in names:
            stale.unlink()
