"""Merging adapters into the base weights, unmerging, and unloading fxlora from a model.

Mixin of `fxlora.LoraModel`: which adapters are merged is the merge steps of the model's
`fxlora.state.AdapterState` (``adapter_state.merge_steps``), its one representation. Merging and
unmerging hold `fxlora.calls.CALL_LOCK` exclusively: no call is in flight while weights change.

How a merged model computes: each merged adapter's update is in the base weights (folded on the
graph path by the pass `fxlora.passes.merge`, and with the same code for eager-path layers), and its
branch is multiplied by (wanted scale - merged scale) through the shared gate tensors. So a merged,
active adapter's branch adds nothing; disabling it (``disable_adapter()``, ``set_adapter`` to another
adapter, a new ``set_adapter_scale``) subtracts exactly what was folded in, with the weights left
merged. None of it changes generated code, so a compiled model does not recompile.

Unmerging is exact: merge + unmerge gives the original weights bit for bit (see `fxlora.fold`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from .apply import strip
from .calls import exclusive
from .delta import MergeError
from .fold import FoldRecord, check_fold, fold_layer, unfold_layer
from .forwards import GraphForward, installed_forward
from .layers import saved_meta, target_meta
from .passes.merge import layer_scales, merge_graph, merge_targets
from .state import MergeStep

__all__ = ["MergeMixin", "MergeError", "UnloadedLoraModel", "check_untied", "saved_copy_choice"]


class MergeMixin:
    # ------------------------------------------------------------------ state
    @property
    def merged_adapters(self) -> list[str]:
        """Adapters whose update is folded into the base weights, in merge order."""
        return self.adapter_state.merged_adapters

    @property
    def merged(self) -> bool:
        return bool(self.adapter_state.merge_steps)

    def _requested(self, adapter_names: Optional[Union[str, Iterable[str]]]) -> list[str]:
        if adapter_names is None:
            return list(self.adapter_state.active)
        return self.adapter_state.check_known(adapter_names)

    # ------------------------------------------------------------------ merge / unmerge
    def merge_adapter(self, adapter_names: Optional[Union[str, list[str]]] = None, safe_merge: bool = False) -> None:
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
        requested = self._requested(adapter_names)
        already = [a for a in requested if a in self.merged_adapters]
        if already:
            warnings.warn(f"adapter(s) {already} are already merged; merging them again is a no-op", UserWarning, stacklevel=2)
        self._merge([a for a in requested if a not in already], safe_merge)

    @exclusive
    def _merge(self, adapters: list[str], safe_merge: bool, exact: bool = True) -> None:
        if not adapters:
            return
        state = self.adapter_state
        scales = {a: state.scale_of(a) for a in adapters}
        every, direct = self._merge_layers(adapters)
        check_untied(self.model, every)
        for name, module in every.items():
            check_fold(name, module, layer_scales(module, scales), finite=safe_merge)
        records: dict[str, FoldRecord] = {}
        try:
            done: set[int] = set()
            for prefix, root, graphs in self._graph_units():
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

    def _graph_units(self) -> list[tuple[str, nn.Module, list]]:
        """(name prefix, root, traced base graphs) of every graph root."""
        units = []
        for name, module in self.model.named_modules():
            fwd = installed_forward(module)
            if isinstance(fwd, GraphForward):
                units.append((f"{name}." if name else "", module, [v.graph for v in fwd.variants.values()]))
        return units

    def _merge_layers(self, adapters: list[str]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        """(every layer carrying any of `adapters`, the *direct* ones among them). The graph roots'
        layers are those their traced graphs call (found by the merge pass); the direct ones are
        the rest (eager-path layers, and graph-root layers no traced call pattern has reached yet),
        which are folded with the same code, directly."""
        every: dict[str, nn.Module] = {}
        for prefix, root, graphs in self._graph_units():
            for graph in graphs:
                every.update(merge_targets(graph, root, adapters, prefix))
        covered = {id(m) for m in every.values()}
        direct = {}
        for name, module in self.model.named_modules():
            meta = target_meta(module)
            if meta is not None and id(module) not in covered and any(a in meta.adapters for a in adapters):
                direct[name] = module
        every.update(direct)
        return every, direct

    def unmerge_adapter(self) -> None:
        """Take every merged adapter out of the base weights again, restoring the exact pre-merge
        weights (bit for bit, where neither the merged weights nor the adapter weights changed
        since the merge; elsewhere the update is subtracted). Unmerging an unmerged model is a
        no-op with a warning."""
        if not self.adapter_state.merge_steps:
            warnings.warn("no adapter is merged; unmerge_adapter() is a no-op", UserWarning, stacklevel=2)
            return
        self._unmerge_all()

    @exclusive
    def _unmerge_all(self) -> None:
        state = self.adapter_state
        while state.merge_steps:
            step = state.merge_steps[-1]
            for name, record in reversed(step.records.items()):
                unfold_layer(self.model.get_submodule(name), record)
            state.merge_steps.pop()
        state.publish()

    # ------------------------------------------------------------------ unload
    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge adapters (default: the active ones, plus any merged before) and return the
        user's own model object with nothing of fxlora left: original module classes and
        ``forward`` code, ``state_dict()`` keys of the untransformed model, the user's original
        ``requires_grad`` flags. A `modules_to_save` module takes the weights of the trained copy
        of the last merged adapter that has one. This `LoraModel` cannot be used afterwards.

        Raises as `merge_adapter` does; the model is then unchanged and still usable. (The merge
        keeps no exact-restore data, as it is never undone: should writing a weight fail, e.g.
        out of memory, the layers already written are unmerged by subtraction.)"""
        requested = self._requested(adapter_names)
        self._merge([a for a in requested if a not in self.merged_adapters], safe_merge, exact=False)
        in_weights = self.merged_adapters
        copies = {}
        for name, module in self.model.named_modules():
            chosen = saved_copy_choice(module, in_weights)
            if chosen is not None:
                copies[name] = module.modules_to_save[chosen].state_dict()
        return self._strip_and_close(copies)

    def unload(self) -> nn.Module:
        """Return the user's own model object as it was before `fxlora.transform` (merged adapters
        are unmerged first, exactly), with nothing of fxlora left. This `LoraModel` cannot be used
        afterwards."""
        if self.adapter_state.merge_steps:
            self._unmerge_all()
        return self._strip_and_close({})

    def _strip_and_close(self, copies: dict[str, dict]) -> nn.Module:
        model = self.model
        strip(model)
        for name, state in copies.items():
            model.get_submodule(name).load_state_dict(state)
        flags = self.adapter_state.base_requires_grad
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
        UnloadedLoraModel.close(self)
        return model

    # ------------------------------------------------------------------ export
    def merged_state_dict(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> dict[str, torch.Tensor]:
        """The ``state_dict()`` that `merge_and_unload` would leave on the model, computed into new
        tensors for the adapted layers; this model is not changed. See `fxlora.export`."""
        from .export import merged_state_dict

        return merged_state_dict(self, self._requested(adapter_names), safe_merge)

    def save_merged(self, path: Union[str, Path], adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> Path:
        """Write the merged weights (`merged_state_dict`) for the original model class, atomically;
        this model is not changed. A path ending in ``.safetensors`` (or any path, for a model that
        is not a transformers ``PreTrainedModel``) gets one safetensors file, loadable with
        ``Original().load_state_dict(safetensors.torch.load_file(path))``; otherwise a transformers
        model gets a directory its class's ``from_pretrained`` loads. Returns the path written."""
        from .export import save_merged

        return save_merged(self, path, self._requested(adapter_names), safe_merge)


def saved_copy_choice(module: nn.Module, adapters: list[str]) -> Optional[str]:
    """For a `modules_to_save` module: the adapter among `adapters` whose trained copy the
    merged model keeps (the last one in the module's order, as the forward selects), else None."""
    meta = saved_meta(module)
    if meta is None:
        return None
    owning = [a for a in meta.adapters if a in adapters]
    return owning[-1] if owning else None


def check_untied(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """`MergeError` if a layer's weight or bias is also a parameter of another module (tied
    weights, such as an input embedding shared with the output layer): folding an update into it
    would change that module's computation too."""
    wanted = {id(getattr(m, w)): (name, w) for name, m in layers.items() for w in ("weight", "bias") if getattr(m, w, None) is not None}
    owners: dict[int, set[int]] = {}
    names: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module._parameters.items():
            if p is not None and id(p) in wanted:
                owners.setdefault(id(p), set()).add(id(module))
                names.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    for key, (name, which) in wanted.items():
        if len(owners.get(key, ())) > 1:
            others = [n for n in names[key] if n != f"{name}.{which}"]
            raise MergeError(
                f"cannot merge into {name!r}: its {which} is tied to {others} (the same tensor), so folding "
                "the update in would change those modules as well; keep the adapter unmerged, or adapt a "
                "layer whose weights are not tied"
            )


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
