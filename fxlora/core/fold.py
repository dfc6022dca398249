"""Folding adapters into one layer's weights, and taking them out again exactly.

`fold_layer` writes ``round(weight + sum of deltas)`` into the layer's weight (and bias, for
``lora_bias``) *in place*: the parameter objects stay the same, so optimizers, tied references and
compiled code keep pointing at them. The sum is formed in float32 (`fxlora.core.delta`) and rounded once
into the weight's dtype.

Unfolding by subtraction alone is not exact: ``round(round(w + d) - d)`` differs from ``w`` in a
share of the elements that grows with the size of the update (PEFT's unmerge, which does this,
leaves 5.5% of the elements of a float32 weight and 13.9% of a bfloat16 one changed). `fold_layer` therefore also returns a `FoldRecord` that keeps the
pre-merge values of exactly the elements where that subtraction would miss, with their positions
(or, when that would take more memory than the tensor itself, a copy of the whole tensor).
`unfold_layer` subtracts, then puts those values back, so merge + unmerge gives the original
weights bit for bit. A kept value is put back only where the weight still holds ``round(kept +
update)``, the value the merge wrote, with the update recomputed from the adapter as it is now
(compared bit for bit): where the merged weights or the adapter changed after the merge, the
element is unmerged by subtraction, as PEFT does, instead of being overwritten with a stale value.

A quantized weight (`fxlora.kinds.quantized`) cannot be added to in place: its fold dequantizes,
adds, requantizes and assigns the new weight (the one change that replaces a parameter object: it
is frozen, so no optimizer holds it), which rounds again, so the merge is not exact. Its record
(`Requantized`) keeps the original weight object, and the unfold puts it back, bit for bit, while
the layer still holds the weight the fold wrote. `merged_tensors` gives the dequantized merged
weights (what an export writes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Optional

import torch
import torch.nn as nn

from fxlora.dtypes import compute_dtype
from fxlora.errors import MergeError
from fxlora.core.delta import check_mergeable, delta_bias, delta_weight, folded_tensors, layer_tensor
from fxlora.core.dora import dora_fold, dora_unfold
from fxlora.core.layers import target_meta
from fxlora.kinds.quantized import Quantization, QuantizedWeight, quantization_of

__all__ = ["add_rounded", "summed_update", "Restore", "Requantized", "FoldRecord", "merged_tensors", "fold_layer", "unfold_layer", "unfolded_tensor", "check_fold", "check_untied", "layer_scales"]

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """`t`'s elements as same-sized integers (bitwise comparison: -0.0 != 0.0, NaN == same NaN)."""
    return t.contiguous().view(_BITS[t.element_size()])


@dataclass
class Restore:
    """What `unfold_layer` needs to give one tensor back its exact pre-merge values: the flat
    positions where subtracting the update misses (None: every position) and the values there."""

    dtype: torch.dtype
    before: torch.Tensor
    index: Optional[torch.Tensor] = None

    @property
    def nbytes(self) -> int:
        kept = [self.before] if self.index is None else [self.before, self.index]
        return sum(t.numel() * t.element_size() for t in kept)


@dataclass
class Requantized:
    """A fold into a quantized weight (`fxlora.kinds.quantized`): the weight as the merge found it
    (None for a fold that keeps nothing, ``exact=False``) and the requantized weight it wrote."""

    quantization: Quantization
    before: Optional[QuantizedWeight]
    written: QuantizedWeight


@dataclass
class FoldRecord:
    """One fold of some adapters into one layer: their run-time scales, and the exact-restore
    data of each tensor it changed, by path from the layer (the kind's `merged_weights`, and the
    bias where a ``lora_bias`` was folded into it)."""

    scales: dict[str, float]
    restores: dict[str, Restore]
    ratio: Optional[torch.Tensor] = None  # a DoRA fold's ``m / ||W + delta||`` (`fxlora.core.dora`)
    requantized: Optional[Requantized] = None  # the fold into a quantized weight (kept out of `restores`)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.restores.values())


def _delta(module: nn.Module, adapter: str, scale: float, which: str) -> Optional[torch.Tensor]:
    """The adapter's update of the layer's tensor at path `which` (a weight, or ``"bias"``)."""
    return delta_bias(module, adapter, scale) if which == "bias" else delta_weight(module, adapter, scale, which=which)


def summed_update(module: nn.Module, scales: dict[str, float], which: str) -> Optional[torch.Tensor]:
    """Sum of the adapters' updates of the tensor at path `which` (a weight, or ``"bias"``) in the
    compute dtype; None if none has one."""
    total = None
    for adapter, scale in scales.items():
        part = _delta(module, adapter, scale, which)
        if part is None:
            continue
        total = part if total is None else total + part.to(total.dtype)
    return total


def add_rounded(original: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``round(original + update)``: the sum in the compute dtype, rounded once into original's."""
    dtype = compute_dtype(original, update)
    return (original.to(dtype) + update.to(dtype)).to(original.dtype)


def _subtract(merged: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(merged, update)
    return (merged.to(dtype) - update.to(dtype)).to(merged.dtype)


def merged_tensors(module: nn.Module, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """New tensors ``{path: ...}`` (``"weight"``, or the kind's `merged_weights`, and ``"bias"``
    for a ``lora_bias``) holding `module`'s weights with the adapters in `scales` (name -> run-time
    scale) folded in; `module` itself is not changed."""
    out = {}
    dora = _dora_adapter(module, scales)
    if dora is not None:
        return {"weight": dora_fold(module, dora, scales[dora], module.weight.detach())[0]}
    for which in folded_tensors(module):
        update = summed_update(module, scales, which)
        if update is None:
            continue
        out[which] = add_rounded(_dense(module, which), update)
    return out


def _dense(module: nn.Module, which: str) -> torch.Tensor:
    """The layer's tensor at path `which`, dequantized where it is a quantized weight."""
    quantization = quantization_of(module) if which == "weight" else None
    return layer_tensor(module, which).detach() if quantization is None else quantization.dense(module)


def _check_requantizable(module: nn.Module, scales: dict[str, float]) -> Optional[Quantization]:
    """The layer's `Quantization` (None for a plain weight); `MergeError` where its merged weight
    cannot be requantized (nothing is written)."""
    quantization = quantization_of(module)
    obstacle = None if quantization is None else quantization.requantize_obstacle(module)
    if obstacle is not None:
        raise MergeError(f"cannot merge adapter(s) {list(scales)} into {type(module).__name__}: {obstacle}")
    return quantization


def _fold_quantized(module: nn.Module, quantization: Quantization, update: torch.Tensor, exact: bool) -> Requantized:
    """``quantize(round(dequantize(W) + update))`` written as the layer's weight (PEFT's merge;
    the rounding makes it inexact), the weight before kept with `exact` for a bit-exact unfold."""
    written = quantization.quantized(module, add_rounded(quantization.dense(module), update))
    before = quantization.keep(module) if exact else None
    quantization.put(module, written)
    return Requantized(quantization, before, written)


def _unfold_quantized(module: nn.Module, record: FoldRecord) -> None:
    """Undo `_fold_quantized`: the kept weight if the layer still holds the one the fold wrote,
    else (the weight was replaced since, or nothing was kept) ``quantize(dequantize(W) - update)``."""
    done = record.requantized
    if done.before is not None and done.quantization.holds(module, done.written):
        done.quantization.put(module, done.before)
        return
    back = _subtract(done.quantization.dense(module), summed_update(module, record.scales, "weight"))
    done.quantization.put(module, done.quantization.quantized(module, back))


def _dora_adapter(module: nn.Module, scales: dict[str, float]) -> Optional[str]:
    """The DoRA adapter among `scales` (`check_fold` lets one fold only alone), or None."""
    meta = target_meta(module)
    return next((a for a in scales if meta.adapters[a].variant.magnitude), None)


def _check_additive(name: str, module: nn.Module, adapter: str, scales: dict[str, float], merged: Collection[str]) -> None:
    """Folding here is ``weight + delta`` and unfolding ``weight - delta`` plus the restored
    elements: right only for variants whose delta is additive (`fxlora.variants`), and for DoRA
    (`fxlora.core.dora`) folded alone into a layer holding no other merged adapter (its norm is
    that of the base weight plus its own update, as its unmerged output computes it)."""
    variant = target_meta(module).adapters[adapter].variant
    others = [a for a in [*scales, *merged] if a != adapter]
    if variant.magnitude and others:
        raise MergeError(
            f"cannot merge the DoRA adapter {adapter!r} into {name!r} ({type(module).__name__}) together with "
            f"{others} (being merged or merged already into it): a DoRA merge rescales the whole weight by its "
            "magnitude over the norm of the base weight plus its own update, so it merges alone; merge it on its "
            "own, into an unmerged layer"
        )
    if variant.magnitude:
        return
    if any(target_meta(module).adapters[a].variant.magnitude for a in merged):
        raise MergeError(
            f"cannot merge adapter {adapter!r} into {name!r} ({type(module).__name__}): a DoRA adapter is merged into "
            "it, and a DoRA merge takes no other adapter on the same layer; unmerge first"
        )
    if not variant.additive_delta:
        raise MergeError(
            f"cannot merge adapter {adapter!r} into {name!r} ({type(module).__name__}): its LoRA variant "
            f"{variant.name!r} does not merge as weight + delta, which is how fxlora folds and exactly unfolds "
            "adapters; keep this adapter unmerged"
        )


def check_fold(name: str, module: nn.Module, scales: dict[str, float], finite: bool, merged: Collection[str] = ()) -> None:
    """Raise `MergeError` (naming the adapter and the layer) if the adapters cannot be folded into
    `module`, which holds the adapters `merged` folded in already; with `finite`, also if the
    result would hold a NaN or an infinity. Writes nothing."""
    for adapter in scales:
        _check_additive(name, module, adapter, scales, merged)
        check_mergeable(name, module, adapter)
    if not finite:
        return
    for adapter, scale in scales.items():
        for which in folded_tensors(module):
            part = _delta(module, adapter, scale, which)
            if part is not None and not bool(torch.isfinite(part).all()):
                raise MergeError(
                    f"adapter {adapter!r} has non-finite values in its update of {name!r} "
                    f"({type(module).__name__}.{which}); nothing was merged"
                )
    for which, tensor in merged_tensors(module, scales).items():
        if not bool(torch.isfinite(tensor).all()):
            raise MergeError(
                f"merging adapter(s) {list(scales)} into {name!r} ({type(module).__name__}.{which}) gives "
                f"non-finite values (the sum overflows {tensor.dtype}, or the base weight already holds "
                "NaN/inf); nothing was merged"
            )


def _restore_data(original: torch.Tensor, merged: torch.Tensor, update: torch.Tensor) -> Restore:
    """The values `unfold_layer` must put back: those where ``round(merged - update)`` misses
    `original`, by position, or all of `original` when positions would cost more."""
    flat = original.reshape(-1)
    missed = (_bits(_subtract(merged, update)).reshape(-1) != _bits(flat)).nonzero().squeeze(1)
    index = missed.to(torch.int32) if flat.numel() < 2**31 else missed
    if missed.numel() * (index.element_size() + flat.element_size()) >= flat.numel() * flat.element_size():
        return Restore(original.dtype, flat.clone())
    return Restore(original.dtype, flat[missed].clone(), index)


def fold_layer(module: nn.Module, scales: dict[str, float], exact: bool = True) -> FoldRecord:
    """Fold the adapters in `scales` into `module`'s weight (and bias) in place and return the
    record that undoes it (exactly, with `exact`; without it the record keeps nothing, and
    `unfold_layer` subtracts like PEFT does). Requires: `check_fold` passed (so every adapter's
    variant has an additive delta, which the exact restore relies on)."""
    dora = _dora_adapter(module, scales)
    if dora is not None:
        return _fold_dora(module, dora, scales[dora], exact)
    quantization = _check_requantizable(module, scales)
    restores: dict[str, Restore] = {}
    requantized = None
    with torch.no_grad():
        for which in folded_tensors(module):
            update = summed_update(module, scales, which)
            if update is None:
                continue
            if which == "weight" and quantization is not None:
                requantized = _fold_quantized(module, quantization, update, exact)
                continue
            param = layer_tensor(module, which)
            merged = add_rounded(param.detach(), update)
            if exact:
                restores[which] = _restore_data(param.detach(), merged, update)
            else:
                restores[which] = Restore(param.dtype, param.new_empty(0), param.new_empty(0, dtype=torch.int32))
            param.copy_(merged)
    return FoldRecord(dict(scales), restores, requantized=requantized)


def _fold_dora(module: nn.Module, adapter: str, scale: float, exact: bool) -> FoldRecord:
    """`fold_layer` for one DoRA adapter: its merge is no sum, so an exact record keeps the whole
    pre-merge weight (and every record the fold's ratio, which the merged weight does not tell)."""
    with torch.no_grad():
        weight = module.weight
        merged, ratio = dora_fold(module, adapter, scale, weight.detach())
        kept = weight.detach().reshape(-1).clone() if exact else weight.new_empty(0)
        restore = Restore(weight.dtype, kept, None if exact else weight.new_empty(0, dtype=torch.int32))
        weight.copy_(merged)
    return FoldRecord({adapter: scale}, {"weight": restore}, ratio)


def _unfold_dora(module: nn.Module, tensor: torch.Tensor, record: FoldRecord) -> None:
    """Undo `_fold_dora` in `tensor` (the layer's weight, or a copy of it): the kept weight
    wherever the weight still holds what merging it with the adapter as it is now gives, bit for
    bit, else the weight recomputed (`fxlora.core.dora.dora_unfold`)."""
    (adapter, scale), = record.scales.items()
    back = dora_unfold(module, adapter, scale, tensor.detach(), record.ratio)
    kept = record.restores["weight"]
    if kept.index is None and kept.dtype == tensor.dtype:
        before = kept.before.to(tensor.device).view(tensor.shape)
        untouched = _bits(tensor.detach()) == _bits(dora_fold(module, adapter, scale, before)[0])
        back = torch.where(untouched, before, back)
    tensor.copy_(back)


def _unfold_tensor(param: torch.Tensor, update: torch.Tensor, restore: Restore) -> None:
    back = _subtract(param.detach(), update)
    if restore.dtype == param.dtype:
        flat_back, flat_now, flat_update = back.view(-1), param.detach().reshape(-1), update.reshape(-1)
        before = restore.before.to(param.device)
        if restore.index is None:
            untouched = _bits(flat_now) == _bits(add_rounded(before, flat_update))
            flat_back.copy_(torch.where(untouched, before, flat_back))
        else:
            index = restore.index.to(device=param.device, dtype=torch.int64)
            untouched = _bits(flat_now[index]) == _bits(add_rounded(before, flat_update[index]))
            flat_back[index[untouched]] = before[untouched]
    param.copy_(back)


def unfold_layer(module: nn.Module, record: FoldRecord) -> None:
    """Take the adapters of `record` out of `module`'s weights again (in place): the exact
    pre-merge values wherever the merged values were left alone."""
    with torch.no_grad():
        if record.ratio is not None:
            _unfold_dora(module, module.weight, record)
            return
        if record.requantized is not None:
            _unfold_quantized(module, record)
        for which, restore in record.restores.items():
            _unfold_tensor(layer_tensor(module, which), summed_update(module, record.scales, which), restore)


def unfolded_tensor(module: nn.Module, which: str, records: list[FoldRecord]) -> torch.Tensor:
    """A new tensor holding `module`'s tensor at path `which` ("weight", "bias", ...) as it would be after unfolding
    `records` (the layer's fold records, in merge order): what `unfold_layer` would leave, bit for
    bit; `module` itself is not changed."""
    tensor = layer_tensor(module, which).detach().clone()
    with torch.no_grad():
        for record in reversed(records):
            if record.ratio is not None:
                if which == "weight":
                    _unfold_dora(module, tensor, record)
                continue
            restore = record.restores.get(which)
            if restore is not None:
                _unfold_tensor(tensor, summed_update(module, record.scales, which), restore)
    return tensor


def layer_scales(module: nn.Module, scales: dict[str, float]) -> dict[str, float]:
    """The entries of `scales` (adapter -> run-time scale) for the adapters `module` carries."""
    meta = target_meta(module)
    return {a: s for a, s in scales.items() if meta is not None and a in meta.adapters}


def check_untied(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """`MergeError` if a layer's weight or bias is also a parameter of another module (tied
    weights, such as an input embedding shared with the output layer): folding an update into it
    would change that module's computation too."""
    wanted = {
        id(layer_tensor(m, w)): (name, w)
        for name, m in layers.items()
        for w in folded_tensors(m)
        if w != "bias" or getattr(m, "bias", None) is not None
    }
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
