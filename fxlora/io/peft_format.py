"""PEFT's adapter file format, mapped to fxlora: the config JSON and the tensor names.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` (PEFT's ``LoraConfig`` fields plus
``"peft_type": "LORA"`` and some metadata) and ``adapter_model.safetensors``. A tensor's name in
the file is its name in a PEFT model, prefixed with ``base_model.model.`` and without the adapter
name; fxlora's names differ from PEFT's model names only where PEFT moves the user's module
(``base_layer``, ``original_module``)::

    fxlora state_dict key                      file key (after "base_model.model.")
    seq.0.lora_A.<adapter>.weight              seq.0.lora_A.weight
    seq.0.lora_B.<adapter>.bias                seq.0.lora_B.bias            (lora_bias=True)
    emb.lora_embedding_A.<adapter>             emb.lora_embedding_A
    seq.4.modules_to_save.<adapter>.weight     seq.4.weight                 (modules_to_save copy)
    seq.0.bias  (a target's own bias)          seq.0.base_layer.bias        (bias="lora_only"/"all")
    norm.bias   (any other bias)               norm.bias                    (bias="all")

With ``bias="all"`` PEFT saves every state_dict entry whose name ends in ``bias``, which includes
two duplicates per `modules_to_save` module (``seq.4.original_module.bias``, the untouched
original, and ``seq.4.modules_to_save.bias``, the copy again); fxlora writes them too, so its
files hold exactly PEFT's keys, and ignores them when reading. When an embedding is a target,
PEFT may also save the full input/output embedding weights (``save_embedding_layers``); fxlora
does not write them but reads them (into the base model) when present.

This module only maps names and shapes (the config JSON: `fxlora.io.peft_config`, whose functions
it re-exports): it reads no file and changes no model (`fxlora.model.loading` does both).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn

from fxlora.io.peft_config import config_from_json, config_to_json, file_config
from fxlora.planning.names import is_under
from fxlora.kinds import LayerKind
from fxlora.core.layers import LORA_CHILDREN, AdapterSpec, fxlora_internal_names, saved_meta, target_meta

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "LEGACY_WEIGHTS_NAME",
    "CARD_NAME",
    "PEFT_PREFIX",
    "CONFIG_DIGEST_KEY",
    "config_digest",
    "Slot",
    "Layout",
    "config_to_json",
    "config_from_json",
    "file_config",
    "layout_of_adapter",
    "layout_of_plan",
    "peft_strip_adapter_name",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CARD_NAME = "README.md"  # the model card, in the save directory only (`fxlora.io.model_card`)
PEFT_PREFIX = "base_model.model."
#: fxlora's one addition to the format: a key of the weights file's safetensors metadata (PEFT
#: ignores it) holding `config_digest` of the config saved with them, so that a reader can tell
#: whether a config and a weights file belong together.
CONFIG_DIGEST_KEY = "fxlora_config_sha256"


def config_digest(config_json: dict) -> str:
    """SHA-256 of a config's JSON in one canonical form (key order and spacing do not count)."""
    canonical = json.dumps(config_json, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ====================================================================== tensor layout
ADAPTER, BASE, DUPLICATE, EXTRA_BASE = "adapter", "base", "duplicate", "extra_base"


@dataclass(frozen=True)
class Slot:
    """Where a file tensor lives in the fxlora model.

    role:
      - ``"adapter"``: the adapter's own tensor (LoRA weight, `modules_to_save` copy); written, required.
      - ``"base"``: a base-model tensor the adapter trains (biases with ``bias != "none"``);
        written, required, loaded into the base model.
      - ``"duplicate"``: a copy PEFT writes besides the real entry; written, ignored when read.
      - ``"extra_base"``: a base tensor PEFT sometimes writes (embedding weights); not written,
        optional when read, loaded into the base model.
    """

    key: str  # fxlora state_dict key
    shape: tuple[int, ...]
    role: str
    floating: bool = True

    @property
    def written(self) -> bool:
        return self.role in (ADAPTER, BASE, DUPLICATE)

    @property
    def required(self) -> bool:
        return self.role in (ADAPTER, BASE)


@dataclass
class Layout:
    """The file of one adapter: ``slots`` maps file keys (without `PEFT_PREFIX`) to `Slot`s;
    file keys starting with one of ``ignored_prefixes`` are PEFT duplicates, accepted and ignored."""

    slots: dict[str, Slot] = field(default_factory=dict)
    ignored_prefixes: tuple[str, ...] = ()

    def add(self, file_key: str, slot: Slot) -> None:
        current = self.slots.get(file_key)
        if current is None or (not current.required and slot.required):
            self.slots[file_key] = slot

    def is_ignored(self, file_key: str) -> bool:
        slot = self.slots.get(file_key)
        if slot is not None:
            return slot.role == DUPLICATE
        return file_key.startswith(self.ignored_prefixes)


def peft_strip_adapter_name(key: str, adapter: str) -> str:
    """PEFT's rule for dropping the adapter name from a model key: at the end
    (``emb.lora_embedding_A.default``) or second to last (``q.lora_A.default.weight``), else kept."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter}"):
        return key[: -len(adapter) - 1]
    head, _, suffix = key.rpartition(".")
    head = re.sub(re.escape(f".{adapter}") + r"$", "", head)
    return f"{head}.{suffix}"


#: holders whose tensor PEFT's file names without the leaf its module gives it
_FILE_DROPS_LEAF = {"lora_magnitude_vector": "weight"}  # DoRA: ``lin.lora_magnitude_vector``


def _fxlora_lora_key(name: str, suffix: str, adapter: str) -> str:
    """The fxlora key of an adapter tensor of layer `name` whose file key is ``name.suffix``: the
    adapter name after the holder (`LORA_CHILDREN`), PEFT's ``base_layer`` step left out
    (``base_layer.out_proj.lora_A.weight`` -> ``out_proj.lora_A.<adapter>.weight``), and the leaf
    PEFT's file drops put back (`_FILE_DROPS_LEAF`)."""
    parts = [p for p in suffix.split(".") if p != "base_layer"]
    at = next(i for i, p in enumerate(parts) if p in LORA_CHILDREN) + 1
    leaf = parts[at:] or [_FILE_DROPS_LEAF[parts[at - 1]]] if parts[at - 1] in _FILE_DROPS_LEAF else parts[at:]
    return ".".join([name, *parts[:at], adapter, *leaf])


def _own_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state_dict as the user built it (fxlora's children left out)."""
    return {
        k: v
        for k, v in module.state_dict(keep_vars=True).items()
        if k.split(".", 1)[0] not in LORA_CHILDREN
    }


def _is_bias_key(key: str) -> bool:
    return key == "bias" or key.endswith(".bias")


def _slot(key: str, tensor: torch.Tensor, role: str) -> Slot:
    return Slot(key, tuple(tensor.shape), role, tensor.is_floating_point())


class LayoutTarget(NamedTuple):
    """One adapted layer, as the file layout sees it."""

    name: str
    module: nn.Module
    kind: LayerKind
    spec: AdapterSpec


class LayoutSaved(NamedTuple):
    """One `modules_to_save` module, as the file layout sees it."""

    name: str
    module: nn.Module


def _build_layout(
    model: nn.Module,
    adapter: str,
    bias: str,
    targets: Sequence[LayoutTarget],
    saved: Sequence[LayoutSaved],
) -> Layout:
    layout = Layout(ignored_prefixes=tuple(p for name, _ in saved for p in (f"{name}.original_module.", f"{name}.modules_to_save.")))
    target_names = {name for name, *_ in targets}
    for name, module, kind, spec in targets:
        for suffix, shape in kind.factor_shapes(module, spec).items():
            key = kind.lora_key(module, spec, name, suffix, adapter) or _fxlora_lora_key(name, suffix, adapter)
            layout.add(f"{name}.{suffix}", Slot(key, shape, ADAPTER))
        own_bias = getattr(module, "bias", None)
        if bias == "lora_only" and isinstance(own_bias, torch.Tensor):
            layout.add(f"{name}.base_layer.bias", _slot(f"{name}.bias", own_bias, BASE))
    for name, module in saved:
        for rest, tensor in _own_state(module).items():
            copy_key = f"{name}.modules_to_save.{adapter}.{rest}"
            layout.add(f"{name}.{rest}", _slot(copy_key, tensor, ADAPTER))
            if bias == "all" and _is_bias_key(rest):
                layout.add(f"{name}.original_module.{rest}", _slot(f"{name}.{rest}", tensor, DUPLICATE))
                layout.add(peft_strip_adapter_name(copy_key, adapter), _slot(copy_key, tensor, DUPLICATE))
    if bias == "all":
        _add_all_biases(layout, model, target_names, [name for name, _ in saved])
    _add_embedding_weights(layout, model, target_names, [name for name, _ in saved])
    return layout


def _add_all_biases(layout: Layout, model: nn.Module, target_names: set[str], saved_names: list[str]) -> None:
    """bias="all": every state_dict entry named ``bias`` outside fxlora's own modules and the
    `modules_to_save` originals (those were handled with their copies)."""
    internal = fxlora_internal_names(model)
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if not _is_bias_key(key) or owner in internal:
            continue
        if is_under(owner, saved_names):
            continue
        file_key = f"{owner}.base_layer.bias" if owner in target_names else key
        layout.add(file_key, _slot(key, tensor, BASE))


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(type(model), getter, None)
        if not callable(fn):
            continue
        try:
            module = fn(model)
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(module, nn.Module):
            found.append(module)
    return found


def _add_embedding_weights(layout: Layout, model: nn.Module, target_names: set[str], saved_names: list[str]) -> None:
    """Input/output embedding weights PEFT may save (``save_embedding_layers``): optional base tensors."""
    embeddings = _embedding_modules(model)
    if not embeddings:
        return
    for name, module in model.named_modules():
        if not name or not any(module is e for e in embeddings):
            continue
        if is_under(name, saved_names):
            continue  # its file keys are the modules_to_save copy's
        middle = "base_layer." if name in target_names else ""
        for rest, tensor in _own_state(module).items():
            layout.add(f"{name}.{middle}{rest}", _slot(f"{name}.{rest}", tensor, EXTRA_BASE))


def layout_of_plan(model: nn.Module, plan: Any) -> Layout:
    """The file layout of the adapter a `fxlora.planning.plan.Plan` would create (model unchanged)."""
    targets = [LayoutTarget(t.name, t.module, t.kind, t.spec) for t in plan.targets]
    saved = [LayoutSaved(s.name, s.module) for s in plan.saved]
    return _build_layout(model, plan.adapter, plan.config.bias, targets, saved)


def layout_of_adapter(model: nn.Module, adapter: str, bias: str) -> Layout:
    """The file layout of the adapter `adapter` attached to `model` (the user's model object)."""
    targets, saved = [], []
    for name, module in model.named_modules():
        meta = target_meta(module)
        if meta is not None and adapter in meta.adapters:
            targets.append(LayoutTarget(name, module, meta.kind, meta.adapters[adapter]))
        smeta = saved_meta(module)
        if smeta is not None and adapter in smeta.adapters:
            saved.append(LayoutSaved(name, module))
    return _build_layout(model, adapter, bias, targets, saved)
