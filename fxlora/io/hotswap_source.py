"""Where a hot-swapped adapter comes from (`fxlora.model.hotswap`): a saved adapter directory (or
Hub repository id), read as `fxlora.model.loading` reads one, or a state dict with its config.

Both give an `fxlora.io.adapter_files.AdapterFiles`: the config and the tensors under their file
keys (PEFT's, without ``base_model.model.`` and without the adapter name).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from fxlora.config import LoraConfig
from fxlora.io.adapter_files import AdapterFiles, PathLike, read_adapter_dir
from fxlora.io.hub import resolve_adapter_dir
from fxlora.io.peft_format import PEFT_PREFIX, peft_strip_adapter_name

__all__ = ["read_source", "STATE_DICT_SOURCE"]

#: what errors call an adapter given as a state dict
STATE_DICT_SOURCE = Path("<state dict>")


def read_source(
    source: Any,
    adapter_name: str,
    config: Optional[LoraConfig] = None,
    *,
    allow_bin: bool = False,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
) -> AdapterFiles:
    """The adapter `source` names: a directory or Hub id (its own config; `config` must be None),
    or a mapping of tensors with its `config` (required: a state dict says nothing of alpha).

    A mapping's keys are PEFT's: those of an adapter file or of `get_peft_model_state_dict`
    (``[base_model.model.]<module>.lora_A.weight``), or those of a PEFT model's own state dict
    naming the adapter (``...lora_A.<adapter_name>.weight``), as PEFT's
    ``hotswap_adapter_from_state_dict`` takes them.
    """
    if isinstance(source, Mapping):
        if not isinstance(config, LoraConfig):
            raise ValueError(
                "an adapter given as a state dict needs its config (r, lora_alpha, ...): pass config=LoraConfig(...), "
                f"the config it was trained with (got {type(config).__name__})"
            )
        tensors = {_file_key(str(k), adapter_name): _tensor(k, v) for k, v in source.items()}
        return AdapterFiles(STATE_DICT_SOURCE, STATE_DICT_SOURCE, STATE_DICT_SOURCE, config, tensors, [])
    if config is not None:
        raise ValueError(f"{source!r} is read with its own adapter_config.json: pass config only with a state dict")
    if not isinstance(source, (str, Path)):
        raise TypeError(f"expected an adapter directory, a Hub repository id or a state dict, got {type(source).__name__}")
    directory: PathLike = resolve_adapter_dir(source, allow_bin, revision=revision, subfolder=subfolder)
    return read_adapter_dir(directory, allow_bin)


def _file_key(key: str, adapter_name: str) -> str:
    """A state-dict key as a file key: no prefix; a LoRA tensor's adapter name dropped by PEFT's
    rule (a DoRA magnitude's ``.weight`` too, as PEFT's files name it); a PEFT model's
    `modules_to_save` copy under its module's own name."""
    key = key.removeprefix(PEFT_PREFIX)
    if f".{adapter_name}" in key and ".lora_" in key:
        key = peft_strip_adapter_name(key, adapter_name)
        if key.endswith(".lora_magnitude_vector.weight"):
            key = key.removesuffix(".weight")
    return key.replace(f".modules_to_save.{adapter_name}.", ".")


def _tensor(key: Any, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    return value.detach()
