"""PEFT's ``adapter_config.json``, mapped to `LoraConfig` both ways.

fxlora writes what PEFT 0.21.2 writes for the same adapter (`config_to_json` of `file_config`):
every key, the resolved ``target_modules`` and ``fan_in_fan_out``, PEFT's bookkeeping fields; and
reads what any PEFT version writes (`config_from_json`), refusing what would change the
computation and what it cannot tell.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from fxlora.io.distributed import user_class
from fxlora.config import UNIMPLEMENTED_FIELDS, LoraConfig
from fxlora.core.layers import target_meta
from fxlora.errors import CheckpointError
from fxlora.planning.defaults import default_target_modules
from fxlora.planning.parameters import parameter_fields

__all__ = ["PEFT_FORMAT_VERSION", "config_to_json", "config_from_json", "file_config"]

#: the PEFT version whose adapter_config.json fxlora writes (its ``peft_version`` field)
PEFT_FORMAT_VERSION = "0.21.2"

#: keys that describe a file, not the adapter: runtime options (PEFT drops them on read too), the
#: writer's version, ``inference_mode`` (PEFT writes true; loading sets it from ``is_trainable``) and
#: ``auto_mapping`` (the class of the model it was saved from; written again from the model)
_FILE_ONLY = frozenset({"runtime_config", "peft_version", "inference_mode", "auto_mapping"})


def _is_off(value: Any) -> bool:
    """The value PEFT writes for a feature that is not used."""
    return value is None or value is False or (isinstance(value, (dict, list, str)) and len(value) == 0)


def config_to_json(
    config: LoraConfig, base_model_name_or_path: Optional[str] = None, base_model_class: Optional[type] = None
) -> dict[str, Any]:
    """The JSON object PEFT 0.21.2 writes for `config` (keys sorted, as PEFT writes them): every
    LoraConfig field but ``runtime_config`` (``target_modules`` as a list, or the regex string it
    is; pass the config `file_config` resolves), with PEFT's bookkeeping as PEFT's
    ``save_pretrained`` sets it: ``peft_type`` "LORA", ``peft_version`` (the PEFT version whose
    format this is), ``inference_mode`` true, ``base_model_name_or_path`` the config's own or else
    `base_model_name_or_path`, and ``auto_mapping`` from `base_model_class` when there is no
    ``task_type`` (with one, the config's own, as PEFT)."""
    data = config.to_dict()
    del data["runtime_config"]  # PEFT never writes it (runtime options)
    auto_mapping = config.auto_mapping
    if config.task_type is None:
        auto_mapping = None if base_model_class is None else _auto_mapping(base_model_class)
    data.update(
        peft_type="LORA",
        peft_version=PEFT_FORMAT_VERSION,
        base_model_name_or_path=config.base_model_name_or_path or base_model_name_or_path or None,
        inference_mode=True,
        auto_mapping=auto_mapping,
    )
    return dict(sorted(data.items()))


def _auto_mapping(cls: type) -> dict[str, str]:
    """The user's class (`fxlora.io.distributed.user_class`: not FSDP2's ``FSDP<Name>``)."""
    user = user_class(cls)
    return {"base_model_class": user.__name__, "parent_library": user.__module__}


def file_config(model: nn.Module, adapter: str, config: LoraConfig) -> LoraConfig:
    """`config` of `adapter` on `model` as PEFT leaves it after adapting a model, which is what
    it saves: ``target_modules=None`` resolved to the model type's default list and
    ``"all-linear"`` to the adapted modules' names; ``fan_in_fan_out`` set from the layers
    (PEFT sets it for each linear target it adapts, in ``named_modules()`` order: True for a
    transformers ``Conv1D``, False for an ``nn.Linear``; the last one stays); the task type's
    modules (`LoraConfig.task_modules_to_save`) added to ``modules_to_save``. `config` is not
    changed."""
    adapted = [(m, meta) for _, m in model.named_modules() if (meta := target_meta(m)) is not None and adapter in meta.adapters]
    changes: dict[str, Any] = parameter_fields(model, adapter, config)  # with target_parameters: all by name
    if not changes and config.target_modules is None:
        changes["target_modules"] = default_target_modules(model)
    elif not changes and config.is_all_linear:
        names = {id(m): n for n, m in model.named_modules()}
        changes["target_modules"] = [names[id(m)] for m, _ in adapted]
    layouts = [layout for m, meta in adapted if (layout := meta.kind.fan_in_fan_out(m)) is not None]
    if layouts and layouts[-1] != config.fan_in_fan_out:
        changes["fan_in_fan_out"] = layouts[-1]
    task_saved = [n for n in config.task_modules_to_save if n not in (config.modules_to_save or [])]
    if task_saved:  # PEFT's task model adds them to the config it saves
        changes["modules_to_save"] = [*(config.modules_to_save or []), *task_saved]
    return config.replace(**changes) if changes else config


#: deepest nesting of lists/objects in one field PEFT writes (``{"eva_config": {"rho": 2.0}}``: 1),
#: with room to spare
_MAX_FIELD_DEPTH = 4


def _depth(value: Any) -> int:
    """How many levels of lists/objects `value` nests (0 for a number or a string), without recursion."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]


def _check_nesting(data: dict, source: str) -> None:
    """A `CheckpointError` for a field nested deeper than any config field (a config pasted into one)."""
    for key, value in data.items():
        depth = _depth(value)
        if depth > _MAX_FIELD_DEPTH:
            raise CheckpointError(
                f"{source}: field {key!r} holds lists/objects nested {depth} levels deep (a config pasted "
                "inside the config?); a field of an adapter config is a number, a string, a list of names or "
                f"a {{name: number}} object (at most {_MAX_FIELD_DEPTH} levels)"
            )


def config_from_json(data: Any, source: str) -> tuple[LoraConfig, list[str]]:
    """Read PEFT's config JSON into a `LoraConfig`; returns ``(config, warnings)``.

    Raises `CheckpointError` naming `source` for: not a JSON object, a ``peft_type`` other than
    ``"LORA"``, a PEFT feature fxlora does not support switched on (DoRA, other init methods, ...),
    an unknown field with a value that is not "off" (it could change the computation), or an
    invalid LoraConfig value. Unknown fields that are off (``null``, ``false``, empty), as newer
    PEFT versions write for their new features, are ignored with a warning.
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: expected a JSON object with the adapter's config, found {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        found = "no peft_type" if "peft_type" not in data else f"peft_type={peft_type!r}"
        raise CheckpointError(f"{source}: fxlora reads LoRA adapters only (peft_type 'LORA'), this config has {found}")
    _check_nesting(data, source)
    known = set(LoraConfig.field_names())
    kwargs: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in data.items():
        if key in _FILE_ONLY:
            continue
        if key in UNIMPLEMENTED_FIELDS and not _is_off(value):
            raise CheckpointError(
                f"{source}: {key}={value!r} asks for {UNIMPLEMENTED_FIELDS[key]}, which fxlora does not support (not implemented yet); "
                f"only adapters with {key} unset (null/false/empty) can be loaded"
            )
        if key in known:
            kwargs[key] = value
        elif _is_off(value):
            ignored.append(key)
        else:
            raise CheckpointError(
                f"{source}: unknown config field {key}={value!r}; fxlora cannot tell whether it changes the adapter's "
                "computation (unknown fields are accepted only when null, false or empty)"
            )
    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: invalid LoRA config: {exc}") from None
    notes = []
    if ignored:
        notes.append(f"{source}: ignoring config field(s) unknown to fxlora, all unset: {', '.join(sorted(ignored))}")
    return config, notes
