"""Several adapters on one model: add, activate, delete, disable, scale.

Switching is O(number of adapters) in Python: it writes the shared gate tensors in place and never
touches the per-layer modules or the graph code, so a compiled model does not recompile. Which
parameters train follows the active adapters (PEFT's rule: only active, trainable adapters' weights
require grad); in eval mode that update is deferred until the model is put back in train mode, so
serving-time switches stay cheap.

Mixin of `fxlora.LoraModel`; relies on its ``model``, ``peft_config``, ``_active``, ``_enabled``,
``_scales``, ``_gates`` and ``_sync_gates``.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Union

from .apply import attach_plan, reinstall_forwards, restore_requires_grad, set_trainable
from .config import LoraConfig
from .explain import report_from_plan
from .layers import check_adapter_name, remove_adapter, saved_meta, target_meta
from .planning import emit_warnings, make_plan

__all__ = ["AdapterMixin"]


class AdapterMixin:
    # ------------------------------------------------------------------ checks
    def _check_known(self, names: Iterable[str]) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError(f"give at least one adapter name; existing adapters: {list(self.peft_config)}")
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; existing adapters: {list(self.peft_config)}")
        return names

    def _check_no_overlap_with_saved(self, plan) -> None:
        saved_by_others = [n for n, m in self.model.named_modules() if saved_meta(m) is not None]
        for t in plan.targets:
            for s in saved_by_others:
                if t.name.startswith(s + "."):
                    raise ValueError(
                        f"adapter {plan.adapter!r} targets {t.name!r}, inside {s!r}, which another adapter "
                        "trains in full (modules_to_save); exclude it or drop that modules_to_save entry"
                    )
        adapted = [n for n, m in self.model.named_modules() if target_meta(m) is not None]
        for s in plan.saved:
            inside = [n for n in adapted if n.startswith(s.name + ".")]
            if inside:
                raise ValueError(
                    f"adapter {plan.adapter!r} saves {s.name!r} in full (modules_to_save), but {inside[0]!r} "
                    "inside it carries another adapter's LoRA; choose a module without adapters inside"
                )

    # ------------------------------------------------------------------ add / delete
    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Add a new, inactive adapter (its own targets, rank and alpha). Activate it with
        `set_adapter`. An existing name is an error; on any error nothing changes."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {list(self.peft_config)}")
        config = copy.deepcopy(config)
        plan = make_plan(self.model, config, adapter_name, trace="eager")  # paths come from re-planning
        self._check_no_overlap_with_saved(plan)
        emit_warnings(plan)
        flags = {id(p): p.requires_grad for p in self.model.parameters()}
        try:
            attach_plan(self.model, plan, self._gates)
            paths = reinstall_forwards(self.model, self._trace_policy)
        except BaseException:
            self._drop_adapter_modules(adapter_name)
            restore_requires_grad(self.model, flags)
            raise
        for p in [*plan.targets, *plan.saved]:
            info = paths[p.name]
            p.path, p.root, p.reason = info.path, info.root, info.reason
        self.peft_config[adapter_name] = config
        self.reports[adapter_name] = report_from_plan(plan)
        self._trainable[adapter_name] = True
        self._sync_gates()
        self._sync_trainable()

    def _drop_adapter_modules(self, adapter_name: str) -> None:
        for module in list(self.model.modules()):
            if target_meta(module) is not None or saved_meta(module) is not None:
                remove_adapter(module, adapter_name)
        self._gates.remove(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its weights. If it was active, the remaining active adapters (or
        the first remaining adapter) become active. The last adapter cannot be deleted (use
        ``unload()``); nor can a merged one (unmerge it first)."""
        self._check_known(adapter_name)
        if len(self.peft_config) == 1:
            raise ValueError(f"{adapter_name!r} is the only adapter; use unload() to remove fxlora from the model")
        if adapter_name in self._merged_adapters():
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; unmerge_adapter() it first")
        self._drop_adapter_modules(adapter_name)
        reinstall_forwards(self.model, self._trace_policy)
        del self.peft_config[adapter_name]
        self.reports.pop(adapter_name, None)
        self._trainable.pop(adapter_name, None)
        self._scales.pop(adapter_name, None)
        self._active = [a for a in self._active if a != adapter_name] or [next(iter(self.peft_config))]
        self._sync_gates()
        self._sync_trainable()

    def _merged_adapters(self) -> set[str]:
        merged: set[str] = set()
        for module in self.model.modules():
            meta = target_meta(module)
            if meta is not None:
                merged.update(meta.merged)
        return merged

    # ------------------------------------------------------------------ activate
    def set_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Make these adapters active (several active adapters sum their updates). O(adapters):
        only the gate tensors change, so a compiled model does not recompile."""
        self._active = self._check_known(adapter_name)
        self._sync_gates()
        self._sync_trainable()

    def enable_adapter_layers(self) -> None:
        """Turn the active adapters back on after `disable_adapter_layers`."""
        self._enabled = True
        self._sync_gates()

    def disable_adapter_layers(self) -> None:
        """Compute as the base model until `enable_adapter_layers` (see also `disable_adapter()`)."""
        self._enabled = False
        self._sync_gates()

    def set_adapter_scale(self, adapter_name: str, scale: float) -> None:
        """Multiply an adapter's update by `scale` (1.0 restores it) — at run time, without
        recompiling."""
        self._check_known(adapter_name)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        self._scales[adapter_name] = float(scale)
        self._sync_gates()

    def get_adapter_scale(self, adapter_name: str) -> float:
        self._check_known(adapter_name)
        return self._scales.get(adapter_name, 1.0)

    # ------------------------------------------------------------------ trainable flags
    def _sync_trainable(self, force: bool = False) -> None:
        """Let exactly the active, trainable adapters train. Deferred while in eval mode (applied
        by ``train()`` and by the parameter reports), so switching adapters to serve stays O(1)."""
        if not (self.training or force):
            self._trainable_stale = True
            return
        wanted = {a: self.peft_config[a].bias for a in self._active if self._trainable.get(a, True)}
        set_trainable(self.model, wanted)
        self._trainable_stale = False

    def set_trainable_adapter(self, adapter_name: str, trainable: bool = True) -> None:
        """Allow (or forbid) an adapter's weights to train when it is active."""
        self._check_known(adapter_name)
        self._trainable[adapter_name] = bool(trainable)
        self._sync_trainable()
