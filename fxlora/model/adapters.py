"""Several adapters on one model: add, activate, delete, disable, scale.

Switching is O(number of adapters) in Python: it publishes a new gate state
(`fxlora.model.state.AdapterState.publish`) and never touches the per-layer modules or the graph
code, so a compiled model does not recompile. Which
parameters train follows the active adapters (PEFT's rule: only active, trainable adapters' weights
require grad); in eval mode that update is deferred until the model is put back in train mode, so
serving-time switches stay cheap.

The functions behind `fxlora.LoraModel`'s adapter methods (``lm`` is the `LoraModel`): they
change adapter state only through its `fxlora.model.state.AdapterState` (``adapter_state``), and
every all-or-nothing step in its ``transaction``.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Iterable, Optional, TYPE_CHECKING, Union

import torch
import torch.nn as nn

from fxlora.runtime.install import attach_plan, install_forwards, installed_forwards, reinstall_forwards, restore_forwards
from fxlora.runtime.calls import CALL_LOCK
from fxlora.tracing.integrations import hooks_fixed
from fxlora.core.combine import COMBINATIONS, DENSITY_COMBINATIONS, EQUAL_RANK_COMBINATIONS, combined_weights, layer_rank
from fxlora.core.task_merge import SIGN_METHODS
from fxlora.kinds.weight_inits import changes_base_weights, init_state_restorer
from fxlora.config import LoraConfig
from fxlora.planning.explain import report_from_plan
from fxlora.core.layers import check_adapter_name, remove_adapter, saved_meta, target_meta

if TYPE_CHECKING:  # pragma: no cover
    from fxlora.model.lora_model import LoraModel

__all__ = [
    "add_adapter",
    "add_planned",
    "delete_adapter",
    "add_weighted_adapter",
    "set_adapter",
    "enable_adapter_layers",
    "disable_adapter_layers",
    "set_adapter_scale",
    "get_adapter_scale",
    "set_trainable_adapter",
    "drop_adapter_modules",
]


def drop_adapter_modules(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter's modules and copies from every layer of `model`."""
    for module in list(model.modules()):
        if target_meta(module) is not None or saved_meta(module) is not None:
            remove_adapter(module, adapter_name)
from fxlora.planning.notes import call_notes
from fxlora.planning.plan import PathInfo, Plan, emit_warnings, make_plan, place


def _check_known(lm: "LoraModel", names: Iterable[str]) -> list[str]:
    return lm.adapter_state.check_known(names)


def _check_no_overlap_with_saved(lm: "LoraModel", plan) -> None:
    """A module cannot both carry LoRA (of any adapter) and be trained in full as a
    `modules_to_save` copy (of any adapter), nor contain one of the two kinds inside the other."""

    def overlap(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    saved_by_others = [n for n, m in lm.model.named_modules() if saved_meta(m) is not None]
    adapted = [n for n, m in lm.model.named_modules() if target_meta(m) is not None]
    for t in plan.targets:
        for s in saved_by_others:
            if overlap(t.name, s):
                raise ValueError(
                    f"adapter {plan.adapter!r} targets {t.name!r}, but another adapter trains {s!r} in full "
                    "(modules_to_save); exclude it or drop that modules_to_save entry"
                )
    for s in plan.saved:
        for n in adapted:
            if overlap(s.name, n):
                raise ValueError(
                    f"adapter {plan.adapter!r} saves {s.name!r} in full (modules_to_save), but {n!r} carries "
                    "another adapter's LoRA; choose a module without adapters"
                )


def add_adapter(lm: "LoraModel", adapter_name: str, config: LoraConfig) -> None:
    """Add a new, inactive adapter (its own targets, rank and alpha). Activate it with
    `set_adapter`. An existing name is an error; on any error nothing changes."""
    check_adapter_name(adapter_name)
    if adapter_name in lm.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {list(lm.peft_config)}")
    config = copy.deepcopy(config)
    with CALL_LOCK.exclusive():
        plan = make_plan(lm.model, config, adapter_name, trace="eager")  # paths come from re-planning
        _check_no_overlap_with_saved(lm, plan)
        add_planned(lm, plan)
        emit_warnings(plan)


def add_planned(lm: "LoraModel", plan: Plan) -> None:
    """The one path by which an adapter joins the model (`fxlora.transform`, `add_adapter`,
    `from_pretrained`, `load_adapter`): attach its modules, install the forwards (for the first
    adapter those the plan traced, `plan.roots`; else re-planned for every adapted module), record
    it in the adapter state, all or nothing. The adapter is active if it is the only one."""
    state = lm.adapter_state
    with CALL_LOCK.exclusive(), state.transaction(lm.model) as tx, hooks_fixed():  # adapter modules are torch's and fxlora's
        forwards = installed_forwards(lm.model)
        tx.on_undo(lambda: drop_adapter_modules(lm.model, plan.adapter))
        tx.on_undo(lambda: restore_forwards(lm.model, forwards))
        if changes_base_weights(plan.config.init_lora_weights):  # PiSSA / OLoRA / LoftQ / CorDA rewrite the targets' weights
            tx.on_undo(init_state_restorer([t.module for t in plan.targets]))
        first = not state.configs
        attach_plan(plan)
        if first:
            install_forwards(lm.model, plan.roots, {p.name: PathInfo(p.path, p.root, p.reason) for p in [*plan.targets, *plan.saved]}, state)
        else:
            place(plan.targets, plan.saved, reinstall_forwards(lm.model, state))
            plan.warnings += call_notes(plan.targets)
        state.configs[plan.adapter] = plan.config
        state.reports[plan.adapter] = report_from_plan(plan)
        state.trainable[plan.adapter] = not plan.config.inference_mode  # PEFT: inference_mode freezes it
        if first:
            state.active = [plan.adapter]
        state.flags.invalidate()
        state.publish()
        state.sync_trainable(lm.training or first)


def delete_adapter(lm: "LoraModel", adapter_name: str) -> None:
    """Remove an adapter and its weights. If it was active, the remaining active adapters (or
    the first remaining adapter) become active. The last adapter cannot be deleted (use
    ``unload()``); nor can a merged one (unmerge it first)."""
    state = lm.adapter_state
    state.check_known(adapter_name)
    if len(state.configs) == 1:
        raise ValueError(f"{adapter_name!r} is the only adapter; use unload() to remove fxlora from the model")
    if adapter_name in state.merged_adapters:
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; unmerge_adapter() it first")
    with CALL_LOCK.exclusive():
        drop_adapter_modules(lm.model, adapter_name)
        reinstall_forwards(lm.model, state)
        state.flags.invalidate()
        del state.configs[adapter_name]
        state.reports.pop(adapter_name, None)
        state.trainable.pop(adapter_name, None)
        state.scales.pop(adapter_name, None)
        state.active = [a for a in state.active if a != adapter_name] or [next(iter(state.configs))]
        state.publish()
        state.sync_trainable(lm.training)


def add_weighted_adapter(
    lm: "LoraModel",
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
) -> None:
    """Add a new (inactive) adapter combining `adapters` with `weights` (`fxlora.core.combine`):
    ``"cat"`` (exact weighted sum of the updates), ``"linear"`` (PEFT's, equal ranks),
    ``"svd"`` (best rank-`svd_rank` approximation; every layer kind), or PEFT's pruning merges
    ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` (equal ranks) and their
    ``"_svd"`` forms, which need `density` (the fraction of entries kept, in [0, 1]; (0, 1] for
    DARE) and take `majority_sign_method` (``"total"`` or ``"frequency"``, for the TIES ones).
    DARE is random: the same torch seed gives PEFT's result bit for bit.
    Unlike PEFT, a single adapter is combined by the method asked for (PEFT silently switches to
    ``"linear"`` and ignores `density`).
    An existing `adapter_name` is an error (PEFT silently does nothing); on any error nothing
    changes."""
    _check_density(combination_type, density, majority_sign_method)
    plan = _plan_combination(lm, adapters, weights, adapter_name, combination_type, svd_rank)
    layers, ranks, saved_from, config = plan
    biases = {name: _combined_bias(module, present, w) for name, (module, present, w) in layers.items()}
    with lm.adapter_state.transaction(lm.model) as tx:
        # PEFT creates the new adapter (drawing its init) before it prunes: same order here, so
        # that DARE's random draws match PEFT's under the same seed
        lm.add_adapter(adapter_name, config.replace(init_lora_weights=_creation_init(lm.peft_config[adapters[0]])))
        tx.on_undo(lambda: lm.delete_adapter(adapter_name))
        lm.adapter_state.configs[adapter_name] = config
        factors = {
            name: combined_weights(
                module, present, layer_weights, combination_type, ranks[name], svd_clamp, svd_full_matrices,
                svd_driver, density, majority_sign_method,
            )
            for name, (module, present, layer_weights) in layers.items()
        }
        with torch.no_grad():
            for name, combined in factors.items():
                module = layers[name][0]
                target_meta(module).kind.write_matrices(module, adapter_name, combined, biases[name])
            for module, owner in saved_from.items():
                module.modules_to_save[adapter_name].load_state_dict(module.modules_to_save[owner].state_dict())


def _creation_init(first: LoraConfig):
    """The init the combined adapter is created with before its weights are written: the first
    adapter's, as PEFT does (so the random draws match), unless that init reads or changes the
    base weights (then PEFT's default, which changes nothing)."""
    return first.init_lora_weights if first.init_lora_weights in (True, False, "gaussian") else True


def _check_density(combination_type: str, density: Optional[float], majority_sign_method: str) -> None:
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}")
    if combination_type not in DENSITY_COMBINATIONS:
        if density is not None:
            raise ValueError(
                f"density applies only to combination_type in {DENSITY_COMBINATIONS}, not {combination_type!r}; "
                "leave it None"
            )
        return
    dare = combination_type.startswith("dare")
    valid = "a float in (0, 1]" if dare else "a float in [0, 1]"
    if density is None or isinstance(density, bool) or not isinstance(density, (int, float)):
        raise ValueError(f"combination_type={combination_type!r} needs density, {valid} (the fraction of entries kept), got {density!r}")
    # DARE divides by the density, in float32: one that rounds to 0 there would give NaN
    if not (torch.finfo(torch.float32).tiny <= density <= 1 if dare else 0 <= density <= 1):
        reason = " (DARE divides by the density, which must be a normal float32)" if dare else ""
        raise ValueError(f"density must be {valid} for combination_type={combination_type!r}{reason}, got {density!r}")


def _plan_combination(lm: "LoraModel", adapters, weights, adapter_name, combination_type, svd_rank):
    check_adapter_name(adapter_name)
    if adapter_name in lm.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; choose a new name (existing: {list(lm.peft_config)})")
    adapters = _check_known(lm, adapters)
    dora = [a for a in adapters if lm.peft_config[a].use_dora]
    if dora:
        raise ValueError(
            f"add_weighted_adapter cannot combine the DoRA adapter(s) {dora}: a DoRA update rescales the weight by "
            "its magnitude over a norm that depends on the whole update, so a combination of the factors is no "
            "combination of the updates; combine plain LoRA adapters only"
        )
    weights = list(weights)
    if len(weights) != len(adapters) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
    ):
        raise ValueError(f"weights must be {len(adapters)} finite numbers, one per adapter, got {weights!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive int or None, got {svd_rank!r}")
    # one adapter: "cat" and "svd" reduce to "linear" (its rank); the pruning merges still prune
    single_is_linear = len(adapters) == 1 and combination_type in ("cat", "linear", "svd")
    combination = "linear" if single_is_linear else combination_type
    layers, ranks = {}, {}
    for name, module in lm.model.named_modules():
        meta = target_meta(module)
        if meta is None:
            continue
        present = [a for a in adapters if a in meta.adapters]
        if not present:
            continue
        if combination in EQUAL_RANK_COMBINATIONS and len({meta.adapters[a].r for a in present}) > 1:
            raise ValueError(
                f"combination_type={combination!r} needs equal ranks, but {name!r} has ranks "
                f"{ {a: meta.adapters[a].r for a in present} }; use 'cat' or 'svd'"
            )
        layers[name] = (module, present, [weights[adapters.index(a)] for a in present])
        ranks[name] = layer_rank(module, present, combination, svd_rank)
    saved_from = {}
    for name, module in lm.model.named_modules():
        meta = saved_meta(module)
        owners = [a for a in adapters if meta is not None and a in meta.adapters]
        if len(owners) > 1:
            raise ValueError(
                f"adapters {owners} each train their own copy of {name!r} (modules_to_save); "
                "combining them is ambiguous: combine adapters that do not save the same module"
            )
        if owners:
            saved_from[module] = owners[0]
    first = lm.peft_config[adapters[0]]
    top = max(ranks.values())
    pattern = {re.escape(n): r for n, r in ranks.items() if r != top}
    config = first.replace(
        r=top,
        lora_alpha=top,
        target_modules=list(layers),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        modules_to_save=[n for n, m in lm.model.named_modules() if m in saved_from] or None,
        lora_bias=any(target_meta(m).adapters[a].lora_bias for m, present, _ in layers.values() for a in present),
        init_lora_weights=False,
    )
    return layers, ranks, saved_from, config


def set_adapter(lm: "LoraModel", adapter_name: Union[str, list[str]]) -> None:
    """Make these adapters active (several active adapters sum their updates). O(adapters):
    a new gate state is published, so a compiled model does not recompile."""
    state = lm.adapter_state
    state.active = state.check_known(adapter_name)
    state.publish()
    state.sync_trainable(lm.training)


def enable_adapter_layers(lm: "LoraModel") -> None:
    """Turn the active adapters back on after `disable_adapter_layers`."""
    lm.adapter_state.enabled = True
    lm.adapter_state.publish()


def disable_adapter_layers(lm: "LoraModel") -> None:
    """Compute as the base model until `enable_adapter_layers` (see also `disable_adapter()`)."""
    lm.adapter_state.enabled = False
    lm.adapter_state.publish()


def set_adapter_scale(lm: "LoraModel", adapter_name: str, scale: float) -> None:
    """Multiply an adapter's update by `scale` (1.0 restores it) — at run time, without
    recompiling."""
    state = lm.adapter_state
    state.check_known(adapter_name)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    state.scales[adapter_name] = float(scale)
    state.publish()


def get_adapter_scale(lm: "LoraModel", adapter_name: str) -> float:
    lm.adapter_state.check_known(adapter_name)
    return lm.adapter_state.scale_of(adapter_name)


def _sync_trainable(lm: "LoraModel", force: bool = False) -> None:
    lm.adapter_state.sync_trainable(lm.training, force)


def set_trainable_adapter(lm: "LoraModel", adapter_name: str, trainable: bool = True) -> None:
    """Allow (or forbid) an adapter's weights to train when it is active."""
    state = lm.adapter_state
    state.check_known(adapter_name)
    state.trainable[adapter_name] = bool(trainable)
    state.sync_trainable(lm.training)


def _combined_bias(module: nn.Module, adapters: list[str], weights: list[float]) -> Optional[torch.Tensor]:
    """Weighted sum of the adapters' B biases (each times its scaling), or None without any."""
    meta = target_meta(module)
    total = None
    for adapter, weight in zip(adapters, weights):
        bias = meta.kind.bias(module, adapter)
        if bias is not None:
            part = bias.float() * (weight * meta.adapters[adapter].scaling)
            total = part if total is None else total + part
    return total
