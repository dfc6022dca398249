"""Merging adapters into the base weights, unmerging, and unloading fxlora from a model.

The functions behind `fxlora.LoraModel`'s merge methods (``lm`` is the `LoraModel`). Which
adapters are merged is the merge steps of its `fxlora.model.state.AdapterState`
(``adapter_state.merge_steps``), their one representation. Merging and unmerging hold
`fxlora.runtime.calls.CALL_LOCK` exclusively: no call is in flight while weights change.

How a merged model computes: each merged adapter's update is in the base weights (folded on the
graph path by the pass `fxlora.passes.merge`, and with the same code for eager-path layers), and its
branch is multiplied by (wanted scale - merged scale) through the adapter's gate (the published
gate state, `fxlora.model.state.AdapterState.gate_values`). So a merged,
active adapter's branch adds nothing; disabling it (``disable_adapter()``, ``set_adapter`` to another
adapter, a new ``set_adapter_scale``) subtracts exactly what was folded in, with the weights left
merged. None of it changes generated code, so a compiled model does not recompile.

Unmerging is exact: merge + unmerge gives the original weights bit for bit (see `fxlora.core.fold`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Optional, TYPE_CHECKING, Union

import torch
import torch.nn as nn

from fxlora.runtime.install import strip
from fxlora.runtime.calls import exclusive
from fxlora.core.fold import FoldRecord, check_fold, check_untied, fold_layer, layer_scales, unfold_layer
from fxlora.runtime.forwards import GraphForward, installed_forward
from fxlora.core.layers import saved_copy_choice, target_meta
from fxlora.passes.merge import merge_graph, merge_targets
from fxlora.model.state import MergeStep
from fxlora.io import export

if TYPE_CHECKING:  # pragma: no cover
    from fxlora.model.lora_model import LoraModel

__all__ = [
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "unload",
    "merged_state_dict",
    "save_merged",
    "UnloadedLoraModel",
]


def _requested(lm: "LoraModel", adapter_names: Optional[Union[str, Iterable[str]]]) -> list[str]:
    if adapter_names is None:
        return list(lm.adapter_state.active)
    return lm.adapter_state.check_known(adapter_names)


def merge_adapter(lm: "LoraModel", adapter_names: Optional[Union[str, list[str]]] = None, safe_merge: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights.

    Each update ``B @ A * scaling * scale`` (``scale``: the adapter's run-time scale, see
    `set_adapter_scale`) is summed in float32 and rounded once into the weight's dtype. The
    outputs do not change, and a compiled model does not recompile. Already merged adapters are
    skipped with a warning (all of them merged: a no-op).

    Args:
        adapter_names: an adapter name or a list of them; ``None`` merges the active adapters.
        safe_merge: compute every layer's result first and refuse, naming the adapter and the
            layer, if any holds a NaN or an infinity.

    Raises:
        ValueError: an unknown adapter name. `MergeError` (a ValueError): a layer cannot take
            the update (grouped convolution, embedding with max_norm, lora_bias on a layer
            without bias, a weight tied to another module), or non-finite values with
            `safe_merge`. In every case no weight has changed.
    """
    requested = _requested(lm, adapter_names)
    already = [a for a in requested if a in lm.merged_adapters]
    if already:
        warnings.warn(f"adapter(s) {already} are already merged; merging them again is a no-op", UserWarning, stacklevel=3)
    _merge(lm, [a for a in requested if a not in already], safe_merge)


@exclusive
def _merge(lm: "LoraModel", adapters: list[str], safe_merge: bool, exact: bool = True) -> None:
    if not adapters:
        return
    state = lm.adapter_state
    scales = {a: state.scale_of(a) for a in adapters}
    every, direct = _merge_layers(lm, adapters)
    check_untied(lm.model, every)
    for name, module in every.items():
        check_fold(name, module, layer_scales(module, scales), finite=safe_merge, merged=layer_scales(module, state.merged_scale))
    records: dict[str, FoldRecord] = {}
    try:
        done: set[int] = set()
        for prefix, root, graphs in _graph_units(lm):
            for graph in graphs:
                written = merge_graph(graph, root, scales, prefix, skip=done, exact=exact)
                records.update(written)
                done.update(id(every[n]) for n in written)
        for name, module in direct.items():
            if id(module) not in done:
                records[name] = fold_layer(module, layer_scales(module, scales), exact)
    except BaseException:
        for name, record in reversed(records.items()):
            unfold_layer(every[name], record)
        raise
    state.merge_steps.append(MergeStep(scales, records))
    state.publish()


def _graph_units(lm: "LoraModel") -> list[tuple[str, nn.Module, list]]:
    """(name prefix, root, traced base graphs) of every graph root."""
    units = []
    for name, module in lm.model.named_modules():
        fwd = installed_forward(module)
        if isinstance(fwd, GraphForward):
            units.append((f"{name}." if name else "", module, [v.graph for v in fwd.variants.values()]))
    return units


def _merge_layers(lm: "LoraModel", adapters: list[str]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(every layer carrying any of `adapters`, the *direct* ones among them). The graph roots'
    layers are those their traced graphs call (found by the merge pass); the direct ones are
    the rest (eager-path layers, and graph-root layers no traced call pattern has reached yet),
    which are folded with the same code, directly."""
    every: dict[str, nn.Module] = {}
    for prefix, root, graphs in _graph_units(lm):
        for graph in graphs:
            every.update(merge_targets(graph, root, adapters, prefix))
    covered = {id(m) for m in every.values()}
    direct = {}
    for name, module in lm.model.named_modules():
        meta = target_meta(module)
        if meta is not None and id(module) not in covered and any(a in meta.adapters for a in adapters):
            direct[name] = module
    every.update(direct)
    return every, direct


def unmerge_adapter(lm: "LoraModel") -> None:
    """Take every merged adapter out of the base weights again, restoring the exact pre-merge
    weights (bit for bit, where neither the merged weights nor the adapter weights changed
    since the merge; elsewhere the update is subtracted). Unmerging an unmerged model is a
    no-op with a warning."""
    if not lm.adapter_state.merge_steps:
        warnings.warn("no adapter is merged; unmerge_adapter() is a no-op", UserWarning, stacklevel=3)
        return
    _unmerge_all(lm)


@exclusive
def _unmerge_all(lm: "LoraModel") -> None:
    state = lm.adapter_state
    while state.merge_steps:
        step = state.merge_steps[-1]
        for name, record in reversed(step.records.items()):
            unfold_layer(lm.model.get_submodule(name), record)
        state.merge_steps.pop()
    state.publish()


def merge_and_unload(lm: "LoraModel", safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
    """Merge adapters (default: the active ones, plus any merged before) and return the
    user's own model object with nothing of fxlora left: original module classes and
    ``forward`` code, ``state_dict()`` keys of the untransformed model, the user's original
    ``requires_grad`` flags. A `modules_to_save` module takes the weights of the trained copy
    of the last merged adapter that has one. This `LoraModel` cannot be used afterwards.

    Raises as `merge_adapter` does; the model is then unchanged and still usable. (The merge
    keeps no exact-restore data, as it is never undone: should writing a weight fail, e.g.
    out of memory, the layers already written are unmerged by subtraction.)"""
    requested = _requested(lm, adapter_names)
    _merge(lm, [a for a in requested if a not in lm.merged_adapters], safe_merge, exact=False)
    in_weights = lm.merged_adapters
    copies = {}
    for name, module in lm.model.named_modules():
        chosen = saved_copy_choice(module, in_weights)
        if chosen is not None:
            copies[name] = module.modules_to_save[chosen].state_dict()
    return _strip_and_close(lm, copies)


def unload(lm: "LoraModel") -> nn.Module:
    """Return the user's own model object as it was before `fxlora.transform` (merged adapters
    are unmerged first, exactly), with nothing of fxlora left. This `LoraModel` cannot be used
    afterwards."""
    if lm.adapter_state.merge_steps:
        _unmerge_all(lm)
    return _strip_and_close(lm, {})


def _strip_and_close(lm: "LoraModel", copies: dict[str, dict]) -> nn.Module:
    model = lm.model
    strip(model)
    for name, state in copies.items():
        model.get_submodule(name).load_state_dict(state)
    flags = lm.adapter_state.base_requires_grad
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
    UnloadedLoraModel.close(lm)
    return model


def merged_state_dict(lm: "LoraModel", adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> dict[str, torch.Tensor]:
    """The ``state_dict()`` that `merge_and_unload` would leave on the model, computed into new
    tensors for the adapted layers; this model is not changed. See `fxlora.io.export`."""

    return export.merged_state_dict(lm, _requested(lm, adapter_names), safe_merge)


def save_merged(lm: "LoraModel", path: Union[str, Path], adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> Path:
    """Write the merged weights (`merged_state_dict`) for the original model class, atomically;
    this model is not changed. A path ending in ``.safetensors`` (or any path, for a model that
    is not a transformers ``PreTrainedModel``) gets one safetensors file, loadable with
    ``Original().load_state_dict(safetensors.torch.load_file(path))``; otherwise a transformers
    model gets a directory its class's ``from_pretrained`` loads. Returns the path written."""

    return export.save_merged(lm, path, _requested(lm, adapter_names), safe_merge)


class UnloadedLoraModel(nn.Module):
    """What a `LoraModel` becomes after `merge_and_unload()` / `unload()`: it no longer refers to
    the user's model, and every use raises a `RuntimeError` that says what to do instead."""

    _ALLOWED = frozenset({"__class__", "__dict__", "__repr__", "__str__", "_reason", "__eq__", "__hash__", "__ne__"})

    @staticmethod
    def close(model: nn.Module) -> None:
        model.__dict__.clear()
        object.__setattr__(model, "__class__", UnloadedLoraModel)

    def _reason(self) -> str:
        return (
            "this LoraModel was unloaded by merge_and_unload() or unload() and cannot be used any more; "
            "use the model that call returned (to adapt it again, call fxlora.transform on it)"
        )

    def __getattribute__(self, name: str):
        if name in UnloadedLoraModel._ALLOWED:
            return object.__getattribute__(self, name)
        raise RuntimeError(object.__getattribute__(self, "_reason")())

    def __setattr__(self, name: str, value) -> None:
        raise RuntimeError(self._reason())

    def __repr__(self) -> str:
        return "UnloadedLoraModel()"
