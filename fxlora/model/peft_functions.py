"""PEFT's module-level functions, for code written against PEFT: `get_peft_model_state_dict`,
`set_peft_model_state_dict`, `inject_adapter_in_model`, and ``peft.utils.hotswap``'s
`prepare_model_for_compiled_hotswap`, `hotswap_adapter` and `hotswap_adapter_from_state_dict`
(`fxlora.model.hotswap`), `get_layer_status` and `get_model_status` (`fxlora.model.status`).

The state-dict functions speak PEFT's key format: on a `LoraModel` the keys PEFT's functions use
on a ``PeftModel`` (``base_model.model.<module>.lora_A.weight``, no adapter name), on a model
adapted in place by `inject_adapter_in_model` the same keys without ``base_model.model.`` (as
PEFT's, on the model its ``inject_adapter_in_model`` returns).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import warnings

import torch
import torch.nn as nn

from fxlora.config import LoraConfig
from fxlora.errors import CheckpointError, MergeError
from fxlora.io.moe_files import adapter_targets, convert_expert_tensors
from fxlora.io.peft_format import BASE, EXTRA_BASE, PEFT_PREFIX, layout_of_adapter
from fxlora.model import status
from fxlora.model.loading import adapter_peft_tensors
from fxlora.model.lora_model import LoraModel
from fxlora.model.state import AdapterState
from fxlora.model.status import LayerStatus, ModelStatus
from fxlora.model.transform import transform
from fxlora.runtime.forwards import installed_forward

__all__ = [
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_compiled_hotswap",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "get_layer_status",
    "get_model_status",
    "LoadResult",
]


class LoadResult(NamedTuple):
    """What `set_peft_model_state_dict` did not use, as ``nn.Module.load_state_dict`` reports it."""

    missing_keys: list[str]  # tensors of the adapter the dict did not hold (left as they were)
    unexpected_keys: list[str]  # keys of the dict that are not the adapter's (ignored)


def _facade(model: nn.Module) -> tuple[LoraModel, str]:
    """(the `LoraModel` of `model`, the key prefix PEFT uses for it)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(model, LoraModel):
        return model, PEFT_PREFIX
    owner = next((f.owner for m in model.modules() if (f := installed_forward(m)) is not None), None)
    if not isinstance(owner, AdapterState):
        raise ValueError(
            f"{type(model).__name__} carries no fxlora adapter; adapt it first with fxlora.transform(model, config) "
            "or fxlora.inject_adapter_in_model(config, model)"
        )
    return LoraModel(model, owner), ""


def get_layer_status(model: nn.Module) -> list[LayerStatus]:
    """PEFT's ``get_layer_status(model)`` (`fxlora.model.status`): `model` is a `LoraModel`, a model
    adapted by `inject_adapter_in_model`, or either compiled."""
    return status.get_layer_status(_facade(model)[0])


def get_model_status(model: nn.Module) -> ModelStatus:
    """PEFT's ``get_model_status(model)`` (`fxlora.model.status`), for the models `get_layer_status` takes."""
    return status.get_model_status(_facade(model)[0])


def get_peft_model_state_dict(
    model: nn.Module, state_dict: Optional[dict] = None, adapter_name: str = "default", unwrap_compiled: bool = False,
    save_embedding_layers: Any = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of adapter `adapter_name` under PEFT's keys (module docstring): what PEFT's
    function returns for the same adapter, and what ``save_pretrained`` writes. Values are the
    model's tensors (detached, not copied), except a base tensor a merged adapter changed
    (``bias="all"``), which is computed back to its unmerged value. `model` is a `LoraModel`, a
    model adapted by `inject_adapter_in_model`, or either compiled.

    PEFT's ``state_dict`` (take the tensors from another dict) and a ``save_embedding_layers``
    other than ``"auto"`` are not supported (`ValueError`).
    """
    if state_dict is not None or save_embedding_layers != "auto":
        raise ValueError(
            "fxlora's get_peft_model_state_dict reads the model's own tensors: pass state_dict=None and "
            f"save_embedding_layers='auto' (got state_dict={'a dict' if state_dict is not None else None}, "
            f"save_embedding_layers={save_embedding_layers!r})"
        )
    del unwrap_compiled  # a compiled model is always unwrapped
    lm, prefix = _facade(model)
    lm.adapter_state.check_known(adapter_name)
    return {key[len(PEFT_PREFIX):] if not prefix else key: t.detach() for key, t in adapter_peft_tensors(lm, adapter_name).items()}


def set_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Copy the tensors of a PEFT-format dict (`get_peft_model_state_dict`'s keys, with or without
    ``base_model.model.``; from fxlora or PEFT) into the existing adapter `adapter_name`.

    All or nothing: every key of the adapter is checked for its shape first, and a mismatch
    raises `CheckpointError` naming the key, both shapes (PEFT's ``ignore_mismatched_sizes=True``
    is not supported) and changes nothing. Keys that are not the adapter's are returned in
    ``unexpected_keys``, the adapter's tensors the dict lacks in ``missing_keys``. A merged
    adapter's weights, or base tensors while an adapter is merged, cannot be set (`MergeError`:
    unmerge first). Tensors of transformers 4's per-expert MoE modules are converted to the
    adapter's fused experts first, as PEFT's function does (`fxlora.io.moe_files`; a dict that
    cannot be converted exactly raises `CheckpointError`).
    """
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True is not supported: fxlora loads only tensors of the adapter's shapes")
    del low_cpu_mem_usage  # tensors are copied into the adapter's existing ones either way
    lm, prefix = _facade(model)
    state = lm.adapter_state
    state.check_known(adapter_name)
    layout = layout_of_adapter(lm.model, adapter_name, lm.peft_config[adapter_name].bias)
    peft_model_state_dict = _with_fused_experts(lm, adapter_name, peft_model_state_dict, prefix)
    own = lm.model.state_dict(keep_vars=True)
    chosen, unexpected = {}, []
    for key, tensor in peft_model_state_dict.items():
        file_key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        slot = layout.slots.get(file_key)
        if slot is None or not slot.written:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(own[slot.key].shape):
            raise CheckpointError(
                f"{key}: shape {tuple(tensor.shape)} does not fit adapter {adapter_name!r}, whose tensor {slot.key!r} "
                f"has shape {tuple(own[slot.key].shape)}; nothing was set"
            )
        chosen[slot.key] = (tensor, slot.role)
    merged = state.merged_adapters
    if merged and (adapter_name in merged or any(role in (BASE, EXTRA_BASE) for _, role in chosen.values())):
        raise MergeError(
            f"cannot set adapter {adapter_name!r}'s tensors while {merged} {'is' if len(merged) == 1 else 'are'} merged "
            "(the merged weights would no longer match); call unmerge_adapter() first; nothing was set"
        )
    with torch.no_grad():
        for key, (tensor, _) in chosen.items():
            own[key].copy_(tensor)
    missing = [prefix + k for k, s in layout.slots.items() if s.written and s.key not in chosen]
    return LoadResult(missing, unexpected)


def _with_fused_experts(lm: LoraModel, adapter: str, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`tensors` with transformers 4 per-expert MoE keys converted for the adapter's fused experts
    (`fxlora.io.moe_files`, as PEFT's function does); new keys get `prefix`, the others stay as given."""
    short = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): k for k in tensors}
    given = {s: tensors[k] for s, k in short.items()}
    targets = adapter_targets(lm.model, adapter)
    converted = convert_expert_tensors(lm.model, given, targets, lm.peft_config[adapter], "the state dict", strict=False)
    if converted is given:
        return tensors
    return {short.get(s, prefix + s): t for s, t in converted.items()}


def inject_adapter_in_model(
    peft_config: Any, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
    state_dict: Optional[dict] = None,
) -> nn.Module:
    """Adapt `model` in place with the adapter `peft_config` describes and return `model` itself
    (as PEFT's function does): the same object, its forward now computing with LoRA. Use
    `get_peft_model_state_dict` / `set_peft_model_state_dict` on it; `fxlora.transform` does the
    same and returns the `LoraModel` with every other operation (merging, saving, several
    adapters). `peft_config` is a `fxlora.LoraConfig` or a ``peft.LoraConfig`` (converted, with the
    same checks). PEFT's ``low_cpu_mem_usage=True`` and ``state_dict`` (targets taken from a
    dict's keys) are not supported (`ValueError`)."""
    if low_cpu_mem_usage or state_dict is not None:
        raise ValueError(
            "inject_adapter_in_model: low_cpu_mem_usage=True and state_dict are not supported by fxlora; name the "
            "targets in the config and load tensors afterwards with set_peft_model_state_dict"
        )
    transform(model, as_fxlora_config(peft_config), adapter_name)
    return model


def as_fxlora_config(config: Any) -> LoraConfig:
    """`config` if it is a `LoraConfig`, else a ``peft.LoraConfig`` converted field by field."""
    if isinstance(config, LoraConfig):
        return config
    if type(config).__name__ == "LoraConfig" and hasattr(config, "to_dict"):
        data = config.to_dict()
        data.pop("runtime_config", None)
        return LoraConfig(**data)
    raise TypeError(f"expected a fxlora.LoraConfig (or a peft.LoraConfig), got {type(config).__name__}")


def prepare_model_for_compiled_hotswap(
    model: nn.Module, *, target_rank: Optional[int] = None, config: Any = None, check_compiled: str = "error"
) -> None:
    """PEFT's name for `LoraModel.prepare_for_compiled_hotswap` (`fxlora.model.hotswap`), on every
    adapter of `model`. As in PEFT, a model already compiled is refused (``check_compiled="error"``),
    warned about (``"warn"``: preparing then rebuilds the code it runs, one recompile) or not
    (``"ignore"``). `config` is accepted and left alone: fxlora records the padded ranks in the
    model's own configs, with alphas that keep each layer's scaling (PEFT sets ``r`` and keeps
    ``lora_alpha``, which changes the scaling of an adapter saved afterwards)."""
    del config
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if hasattr(model, "_orig_mod"):
        if check_compiled == "error":
            raise ValueError("call prepare_model_for_compiled_hotswap before compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap on a compiled model rebuilds its code: it recompiles once")
    lm, _ = _facade(model)
    lm.prepare_for_compiled_hotswap(target_rank=target_rank)


def hotswap_adapter(model: nn.Module, model_name_or_path: Any, adapter_name: str, torch_device: Any = None, **kwargs: Any) -> None:
    """PEFT's ``hotswap_adapter``: `LoraModel.hotswap_adapter` with the adapter saved in
    `model_name_or_path` (a directory or Hub id; ``revision`` and ``subfolder`` as in PEFT).
    `torch_device` is accepted and not needed: tensors are copied onto the adapter's own device."""
    del torch_device
    unknown = set(kwargs) - {"revision", "subfolder"}
    if unknown:
        raise TypeError(f"hotswap_adapter: unsupported keyword(s) {sorted(unknown)}; supported: revision, subfolder")
    lm, _ = _facade(model)
    lm.hotswap_adapter(model_name_or_path, adapter_name, **kwargs)


def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config: Any, parameter_prefix: str = "lora_"
) -> None:
    """PEFT's ``hotswap_adapter_from_state_dict``: `LoraModel.hotswap_adapter` with the tensors of
    `state_dict` (PEFT's keys, with or without the adapter name: `fxlora.io.hotswap_source`) and
    their `config` (a `fxlora.LoraConfig` or a ``peft.LoraConfig``). Unlike PEFT's, it checks the
    adapter fully first (nothing is changed if it does not fit)."""
    if parameter_prefix != "lora_":
        raise ValueError(f"only LoRA adapters hot-swap (parameter_prefix 'lora_'), got {parameter_prefix!r}")
    lm, _ = _facade(model)
    lm.hotswap_adapter(state_dict, adapter_name, config=as_fxlora_config(config))
