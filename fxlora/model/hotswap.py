"""Hot-swapping: put another adapter's tensors into an existing adapter's place, in a model that may
be compiled, without recompiling it.

`prepare_for_compiled_hotswap` (before ``torch.compile``) makes each adapter a *slot*: its LoRA
weights are padded with zeros to `target_rank` (zero rows of A and zero columns of B add exactly
zero), and each layer's scaling gets a 0-d tensor (`fxlora.core.layers.AdapterSpec.scaling_cell`)
that the gated code torch.compile sees reads at run time.

`hotswap_adapter` then checks the incoming adapter (a directory, a Hub id or a state dict with its
config) against the slot completely before touching anything: the same tensors (so the same target
layers, the same ``lora_bias``, DoRA magnitudes, `modules_to_save` copies and ``bias`` mode), the
same variant, no rank above the slot's, tensors of the shapes the incoming config gives and of a
dtype the slot holds exactly (upcasts only), no base-weight init (PiSSA/OLoRA), the slot not
merged. Any problem raises `fxlora.errors.CheckpointError` (or `MergeError`) listing what differs,
and the model is left exactly as it was. Then, holding the model's call lock (no call sees a
half-swapped adapter), it copies the tensors in place into the slot's parameters (zeros beyond the
incoming rank), fills the scaling tensors, and records the incoming config (each layer's rank is
the slot's, its alpha the one giving the incoming scaling, so that ``save_pretrained`` writes an
adapter that reloads to the same model). Compiled code keeps running: tensors changed in place are
no new guards. A slot that was not prepared still swaps (ranks up to its own); its first swap that
changes a scaling gives it scaling tensors, which rebuilds its graph code (one recompile when
compiled).

Deliberately unlike PEFT 0.21.2's ``peft.utils.hotswap``: PEFT checks keys but not shapes before
copying (a wrong shape fails half-way, leaving a mix of two adapters), zeroes a target the incoming
adapter lacks instead of refusing, matches ``rank_pattern``/``alpha_pattern`` against parameter
names (so a per-layer rank or alpha is ignored and the scaling is wrong), grows a slot's tensors
when the incoming rank is larger (breaking a compiled model), and, given ``config=``, sets ``r`` to
the target rank but leaves ``lora_alpha``, so a padded adapter it saves reloads with another scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn as nn

from fxlora.config import LoraConfig
from fxlora.core.layers import target_meta
from fxlora.errors import CheckpointError, MergeError
from fxlora.io.adapter_files import AdapterFiles, fit_tensors, plan_files
from fxlora.io.hotswap_source import read_source
from fxlora.io.peft_format import ADAPTER, layout_of_adapter, layout_of_plan
from fxlora.kinds.weight_inits import changes_base_weights
from fxlora.model.hotswap_slots import SlotLayer, alpha_for, make_slot, pinned_config, rebuild_code, slot_layers
from fxlora.runtime.calls import CALL_LOCK
from fxlora.runtime.forwards import graph_forwards

if TYPE_CHECKING:  # pragma: no cover
    from fxlora.model.lora_model import LoraModel

__all__ = ["hotswap_adapter", "prepare_for_compiled_hotswap"]

_MAX_LISTED = 8


def _refuse(problems: list[str], what: str) -> None:
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError(f"{what}; nothing was changed:\n  {listed}{more}")


def _normal_tensors() -> torch.inference_mode:
    """Called under ``torch.inference_mode()``, the slot's new tensors (padded parameters, scaling
    tensors) must still be normal ones, which later calls outside it may update."""
    return torch.inference_mode(False)


def _check_not_merged(lm: "LoraModel", adapter: str, doing: str) -> None:
    if adapter in lm.adapter_state.merged_adapters:
        raise MergeError(f"cannot {doing} adapter {adapter!r}: it is merged into the base weights; call unmerge_adapter() first")


# ---------------------------------------------------------------------- preparing
def prepare_for_compiled_hotswap(lm: "LoraModel", target_rank: Optional[int] = None, adapter_names: Optional[Sequence[str]] = None) -> None:
    """Make adapters (default: all) hot-swap slots, before ``torch.compile``: pad every layer's
    LoRA weights with zeros to `target_rank` (None: keep each layer's rank; the largest rank of
    the adapters to be swapped in) and give each layer's scaling a tensor, so that swapping in
    adapters of other ranks and alphas (`hotswap_adapter`) never recompiles. The model computes
    as before (the padding adds exact zeros; a matmul kernel may sum over the longer rank in
    another order, so up to float rounding). All or nothing: a rank above `target_rank`, a grouped convolution whose rank
    would change, or a merged adapter is refused (`ValueError` / `MergeError`) before anything
    changes. Parameters are replaced by padded ones: build optimizers afterwards."""
    if target_rank is not None and (isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank <= 0):
        raise ValueError(f"target_rank must be a positive int (the largest rank to be swapped in) or None, got {target_rank!r}")
    state = lm.adapter_state
    names = list(state.configs) if adapter_names is None else state.check_known(adapter_names)
    with _normal_tensors(), CALL_LOCK.exclusive(), state.transaction(lm.model) as tx:
        slots = _checked_slots(lm, names, target_rank)
        tx.on_undo(lambda: rebuild_code(lm))  # runs last: after the specs are back
        for adapter, layers in slots.items():
            ranks = {layer.name: layer.spec.r if target_rank is None else target_rank for layer in layers}
            make_slot(lm, adapter, layers, ranks, tx)
        rebuild_code(lm)


def _checked_slots(lm: "LoraModel", names: list[str], target_rank: Optional[int]) -> dict[str, list[SlotLayer]]:
    """The layers of the adapters `names`, once every one of them can be padded to `target_rank`."""
    slots = {}
    problems = []
    for adapter in names:
        _check_not_merged(lm, adapter, "prepare")
        slots[adapter] = slot_layers(lm, adapter)
        for layer in slots[adapter]:
            rank = layer.spec.r if target_rank is None else target_rank
            if layer.spec.r > rank:
                problems.append(f"{layer.name}: adapter {adapter!r} has rank {layer.spec.r} > target_rank {rank}")
            elif rank != layer.spec.r and getattr(layer.module, "groups", 1) != 1:
                problems.append(f"{layer.name}: a grouped convolution's rank cannot be padded (its A rows are split by group)")
    if problems:
        raise ValueError("cannot prepare for hot-swapping; nothing was changed:\n  " + "\n  ".join(problems[:_MAX_LISTED]))
    if not any(slots.values()):
        raise ValueError(f"adapters {names} have no adapted layer to prepare")
    return slots


# ---------------------------------------------------------------------- swapping
@dataclass
class _Swap:
    """A checked swap: the slot's layers (with the incoming specs), the tensors to copy
    (``{state-dict key: incoming tensor}``) and the config to record."""

    layers: list[SlotLayer]
    tensors: dict[str, torch.Tensor]
    config: LoraConfig


def hotswap_adapter(
    lm: "LoraModel",
    source: Any,
    adapter_name: str = "default",
    *,
    config: Optional[LoraConfig] = None,
    allow_bin: bool = False,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
) -> None:
    """Replace adapter `adapter_name`'s tensors and scalings by those of the adapter `source`
    names, in place: a directory saved by fxlora or PEFT, a Hub repository id (`revision`,
    `subfolder` and `allow_bin` as in `LoraModel.load_adapter`), or a state dict of PEFT's keys
    with its `config` (`fxlora.io.hotswap_source.read_source`). The adapter keeps its name, its
    active/trainable state and its run-time scale. Checks and guarantees: see the module
    docstring (refused: `CheckpointError`, `MergeError`; the model unchanged)."""
    state = lm.adapter_state
    state.check_known(adapter_name)
    files = read_source(source, adapter_name, config, allow_bin=allow_bin, revision=revision, subfolder=subfolder)
    with _normal_tensors(), CALL_LOCK.exclusive(), state.transaction(lm.model) as tx:  # no call sees a half-swapped adapter
        swap = _check_swap(lm, adapter_name, files)
        needs_cells = any(layer.spec.scaling_cell is None and layer.incoming.scaling != layer.spec.scaling for layer in swap.layers)
        if needs_cells:  # a slot not prepared: its scalings become tensors (new graph code)
            tx.on_undo(lambda: rebuild_code(lm))
            make_slot(lm, adapter_name, swap.layers, {layer.name: layer.spec.r for layer in swap.layers}, tx)
        _copy_tensors(lm, swap.tensors, tx)
        for layer in swap.layers:
            _take_scaling(layer, adapter_name, tx)
        state.configs[adapter_name] = pinned_config(swap.config.replace(inference_mode=state.configs[adapter_name].inference_mode), swap.layers)
        if needs_cells:
            rebuild_code(lm)  # drops the eager code too
        else:
            for fwd in graph_forwards(lm.model):
                fwd.forget_eager_code()  # eager code bakes scalings in as numbers


def _check_swap(lm: "LoraModel", adapter: str, files: AdapterFiles) -> _Swap:
    """Everything `hotswap_adapter` checks, before anything changes (module docstring)."""
    _check_not_merged(lm, adapter, "hot-swap")
    slot_config = lm.adapter_state.configs[adapter]
    source = files.weights_path
    incoming = files.config
    problems = []
    if changes_base_weights(incoming.init_lora_weights):
        problems.append(f"init_lora_weights={incoming.init_lora_weights!r} changes the base weights when loaded")
    if incoming.bias != slot_config.bias:
        problems.append(f"bias={incoming.bias!r}, the slot's is {slot_config.bias!r}")
    _refuse(problems, f"{source} cannot be hot-swapped into adapter {adapter!r}")
    plan = plan_files(lm.model, files, adapter)
    fitted = fit_tensors(files, layout_of_plan(lm.model, plan))
    merged = lm.adapter_state.merged_adapters
    if merged and any(role != ADAPTER for _, role in fitted.values()):
        raise MergeError(f"cannot hot-swap base-model tensors (bias={incoming.bias!r}) while {merged} are merged; call unmerge_adapter() first")
    own = lm.model.state_dict(keep_vars=True)
    slot_keys = {s.key for s in layout_of_adapter(lm.model, adapter, slot_config.bias).slots.values() if s.required}
    problems += [f"the slot has {k!r}, the incoming adapter does not" for k in sorted(slot_keys - set(fitted))]
    problems += [f"the incoming adapter has {k!r}, the slot does not" for k in sorted(set(fitted) - slot_keys)]
    _refuse(problems, f"{source} does not have the tensors of adapter {adapter!r} (other targets or features)")
    layers = slot_layers(lm, adapter)
    by_name = {t.name: t.spec for t in plan.targets}
    for layer in layers:
        layer.incoming = by_name[layer.name]
        problems += _layer_problems(layer)
    tensors = {}
    for key, (tensor, _) in fitted.items():
        problem = _tensor_problem(key, tensor, own[key])
        if problem:
            problems.append(problem)
        tensors[key] = tensor
    _refuse(problems, f"{source} cannot be hot-swapped into adapter {adapter!r}")
    return _Swap(layers, tensors, incoming)


def _layer_problems(layer: SlotLayer) -> list[str]:
    slot, new = layer.spec, layer.incoming
    problems = []
    if new.variant != slot.variant:
        problems.append(f"{layer.name}: the incoming adapter is {new.variant.name}, the slot {slot.variant.name}")
    if new.r > slot.r:
        problems.append(
            f"{layer.name}: incoming rank {new.r} exceeds the slot's {slot.r}; call "
            f"prepare_for_compiled_hotswap(target_rank={new.r} or more) before compiling"
        )
    elif new.r != slot.r and getattr(layer.module, "groups", 1) != 1:
        problems.append(f"{layer.name}: a grouped convolution's rank {slot.r} cannot hold rank {new.r}")
    if (new.dropout > 0) != (slot.dropout > 0):
        problems.append(f"{layer.name}: lora_dropout {new.dropout} where the slot has {slot.dropout} (one of them 0)")
    return problems


def _tensor_problem(key: str, tensor: torch.Tensor, slot: torch.Tensor) -> Optional[str]:
    """Why `tensor` cannot go into the slot's `slot` tensor, or None (same shape, or smaller only
    along the rank dimensions, which fit_tensors checked against the incoming config)."""
    if tensor.dim() != slot.dim() or any(n > m for n, m in zip(tensor.shape, slot.shape)):
        return f"{key}: shape {tuple(tensor.shape)} does not fit the slot's {tuple(slot.shape)}"
    if torch.promote_types(tensor.dtype, slot.dtype) != slot.dtype:
        return f"{key}: dtype {tensor.dtype} does not fit the slot's {slot.dtype} exactly (convert the adapter first)"
    return None


def _copy_tensors(lm: "LoraModel", tensors: dict[str, torch.Tensor], tx: Any) -> None:
    """Copy each tensor into the slot's at its key, zeros beyond its extent (undo: the old values)."""
    own = lm.model.state_dict(keep_vars=True)
    saved = {key: own[key].detach().clone() for key in tensors}

    def undo() -> None:
        with torch.no_grad():
            for key, value in saved.items():
                own[key].copy_(value)

    tx.on_undo(undo)
    with torch.no_grad():
        for key, tensor in tensors.items():
            target = own[key]
            if tuple(target.shape) == tuple(tensor.shape):
                target.copy_(tensor)
            else:
                target.zero_()
                target[tuple(slice(0, n) for n in tensor.shape)].copy_(tensor)


def _take_scaling(layer: SlotLayer, adapter: str, tx: Any) -> None:
    """The slot's spec takes the incoming scaling (its rank stays the slot's) and dropout: a
    slot's own spec changes in place (its scaling tensor filled), a spec without one (its scaling
    unchanged, `hotswap_adapter`) is replaced by a changed copy."""
    spec, new = layer.spec, layer.incoming
    values = (alpha_for(new.scaling, spec.r, new.use_rslora, spec.alpha), new.use_rslora, new.dropout)
    if values == (spec.alpha, spec.use_rslora, spec.dropout):
        return
    meta = target_meta(layer.module)
    if spec.scaling_cell is None:
        meta.adapters[adapter] = replace(spec, alpha=values[0], use_rslora=values[1], dropout=values[2])
        tx.on_undo(lambda: meta.adapters.__setitem__(adapter, spec))
        layer.spec = meta.adapters[adapter]
    else:
        before = (spec.alpha, spec.use_rslora, spec.dropout)

        def undo() -> None:
            spec.alpha, spec.use_rslora, spec.dropout = before
            spec.scaling_cell.fill_(spec.scaling)

        tx.on_undo(undo)
        spec.alpha, spec.use_rslora, spec.dropout = values
        spec.scaling_cell.fill_(new.scaling)
    dropout = layer.module._modules.get("lora_dropout")
    if dropout is not None and isinstance(dropout[adapter], nn.Dropout):
        previous = dropout[adapter].p
        tx.on_undo(lambda: setattr(dropout[adapter], "p", previous))
        dropout[adapter].p = new.dropout
