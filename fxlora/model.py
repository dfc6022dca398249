"""`LoraModel`: the object `fxlora.transform` returns.

It wraps the user's model *without* adding a level to its names: the wrapper shares the model's
parameter, buffer and submodule tables, so ``lora_model.state_dict()``, ``named_modules()`` and
``named_parameters()`` use exactly the model's own names (plus the LoRA entries under each target,
see `fxlora.layers`). The user's model object itself is ``lora_model.model``; attributes and
methods the wrapper does not define (``config``, ``generate``, ...) are looked up there.

Adapter state (which adapters are active, disabled, their scale) lives in Python on the wrapper and
is mirrored into the shared gate tensors (`fxlora.layers.AdapterGates`), which the rewritten code
reads; changing it never touches the graph code.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from .adapters import AdapterMixin
from .checkpoint import CheckpointMixin
from .config import LoraConfig
from .explain import Report
from .forwards import GraphForward, installed_forward
from .apply import TrainableFlags, lora_parameters
from .layers import LORA_CHILDREN, AdapterGates, saved_meta, target_meta
from .merge import MergeMixin
from .mixed_batch import batch_size_of, check_adapter_names, mixed_batch, prepare_mixed_batch
from .variants import branch_gate, variant_for

__all__ = ["LoraModel"]

_SHARED_TABLES = (
    "_parameters",
    "_buffers",
    "_modules",
    "_non_persistent_buffers_set",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class LoraModel(AdapterMixin, MergeMixin, CheckpointMixin, nn.Module):
    """A model with LoRA adapters. Create it with `fxlora.transform`, not directly."""

    def __init__(self, model: nn.Module, gates: AdapterGates, trace_policy: str = "auto") -> None:
        super().__init__()
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "_gates", gates)
        for table in _SHARED_TABLES:
            object.__setattr__(self, table, getattr(model, table))
        self.training = model.training
        self.peft_config: dict[str, LoraConfig] = {}
        self.reports: dict[str, Report] = {}
        self._active: list[str] = []
        self._enabled = True
        self._scales: dict[str, float] = {}  # run-time scale per adapter (default 1.0)
        self._merged_scale: dict[str, float] = {}  # scale each merged adapter was folded in with
        self._trainable: dict[str, bool] = {}
        self._trainable_flags = TrainableFlags(model)
        self._trainable_stale = False
        self._trace_policy = trace_policy
        self._base_requires_grad: dict[str, bool] = {}  # the user's flags, restored by unload()

    # ------------------------------------------------------------------ calling
    @torch.compiler.disable(recursive=False)
    def forward(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any) -> Any:
        """Call the model. With ``adapter_names`` (one adapter name per batch row, ``"__base__"``
        for the base model) every row computes with its own adapter.

        This frame is kept out of ``torch.compile`` (the model call inside is compiled), so the
        names never become guards: a new assignment of adapters to rows does not recompile.
        """
        if adapter_names is None:
            return self.model(*args, **kwargs)
        restore = prepare_mixed_batch(self, adapter_names, args, kwargs)
        try:
            return self.model(*args, **kwargs)
        finally:
            restore()

    def generate(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any) -> Any:
        """The model's own ``generate``; ``adapter_names`` (one per input row) gives each row its
        adapter for the whole generation (rows expanded for beams / returned sequences follow
        their input row)."""
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise AttributeError(f"{type(self.model).__name__} has no generate() method")
        if adapter_names is None:
            return generate(*args, **kwargs)
        rows = batch_size_of(args, kwargs)
        names = check_adapter_names(adapter_names, list(self.peft_config), rows)
        expand = _generation_expansion(self.model, kwargs)
        with mixed_batch(self, [n for n in names for _ in range(expand)]):
            return generate(*args, **kwargs)

    def adapter_tensors(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """``{parameter name: tensor}`` of one adapter (default: the active one): its LoRA weights
        and `modules_to_save` copies, named as in ``named_parameters()``. Pass such a dict (or a
        stack of them under ``torch.func.vmap``) to ``torch.func.functional_call(model, tensors,
        args)`` to evaluate with adapter weights that are not stored in the model."""
        adapter = adapter_name or self._active[0]
        self._check_known(adapter)
        wanted = {id(p) for p in lora_parameters(self.model, adapter)}
        return {n: p for n, p in self.named_parameters() if id(p) in wanted}

    def get_submodule(self, target: str) -> nn.Module:
        """The sub-module named `target` in ``named_modules()`` (the user's model's names), also
        where that model has a child called ``model`` (transformers' ``*ForCausalLM``), which the
        attribute ``self.model`` would otherwise shadow."""
        return self if target == "" else self.model.get_submodule(target)

    def get_base_model(self) -> nn.Module:
        """The user's model object (adapted in place)."""
        return self.model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("model")
            if model is None or name == "model":
                raise
            return getattr(model, name)

    def train(self, mode: bool = True) -> "LoraModel":
        """Set train/eval mode; also traces the graph roots for that mode if not done yet, and
        applies trainable flags deferred by adapter switches made in eval mode."""
        super().train(mode)
        self.model.training = mode
        if mode and self.__dict__.get("_trainable_stale"):
            self._sync_trainable()
        for module in self.model.modules():
            fwd = installed_forward(module)
            if isinstance(fwd, GraphForward):
                fwd.prepare(module.training)
        return self

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def _gate_values(self, adapter: str) -> tuple[float, float]:
        """(scale gate, select gate) of an adapter. The scale gate is what the branch adds on top of
        the weights: the wanted scale (0 when inactive or disabled) minus the scale the adapter was
        merged with, so a merged adapter that is switched off is subtracted again (`branch_gate`:
        the adapter's variant must be additive)."""
        on = self._enabled and adapter in self._active
        wanted = self._scales.get(adapter, 1.0) if on else 0.0
        variant = variant_for(self.peft_config[adapter])
        return branch_gate(variant, wanted, self._merged_scale.get(adapter, 0.0)), 1.0 if on else 0.0

    def _sync_gates(self) -> None:
        """Write the adapter state into the gate tensors the rewritten code reads (O(adapters))."""
        live, chosen = [], []
        with torch.no_grad():
            for adapter in self.peft_config:
                scale, select = self._gate_values(adapter)
                getattr(self._gates.scale, adapter).fill_(scale)
                getattr(self._gates.select, adapter).fill_(select)
                if scale != 0:
                    live.append((adapter, scale))
                if select != 0:
                    chosen.append(adapter)
        self._gates.eager_state = (tuple(live), tuple(chosen))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes as the base model (original `modules_to_save`
        modules included); the adapter state is restored afterwards, even on error."""
        previous = self._enabled
        self._enabled = False
        self._sync_gates()
        try:
            yield
        finally:
            self._enabled = previous
            self._sync_gates()

    # ------------------------------------------------------------------ reporting
    def _adapted(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.model.named_modules():
            if target_meta(module) is not None:
                yield name, module

    @property
    def targeted_module_names(self) -> list[str]:
        """Full names of the modules carrying LoRA, in ``named_modules()`` order."""
        return [name for name, _ in self._adapted()]

    @property
    def modules_to_save_names(self) -> list[str]:
        return [n for n, m in self.model.named_modules() if saved_meta(m) is not None]

    @property
    def target_paths(self) -> dict[str, str]:
        """``{target name: "graph" | "eager"}``: how each adapted module computes its branch."""
        covered: dict[str, str] = {}
        for name, module in self.model.named_modules():
            fwd = installed_forward(module)
            if isinstance(fwd, GraphForward):
                prefix = f"{name}." if name else ""
                for sub, m in module.named_modules():
                    if target_meta(m) is not None:
                        covered[prefix + sub] = "graph"
        return {name: covered.get(name, "eager") for name, _ in self._adapted()}

    @property
    def graph_roots(self) -> list[str]:
        """Names of the modules whose forward runs rewritten graph code ('' is the model)."""
        return [n for n, m in self.model.named_modules() if isinstance(installed_forward(m), GraphForward)]

    def set_optimizations(self, **switches: bool) -> None:
        """Turn the graph optimisation passes on or off (see `fxlora.passes.PassOptions`), e.g.
        ``model.set_optimizations(fold_scaling=False)``; the graph code is rebuilt."""
        from .passes import PassOptions

        known = set(PassOptions.__dataclass_fields__)
        unknown = set(switches) - known
        if unknown:
            raise ValueError(f"unknown optimisation(s) {sorted(unknown)}; known: {sorted(known)}")
        for module in self.model.modules():
            fwd = installed_forward(module)
            if isinstance(fwd, GraphForward):
                fwd.options = dataclasses.replace(fwd.options, **switches)
                fwd.refresh()

    def graph_code(self, root: str = "", training: Optional[bool] = None) -> str:
        """The generated code of a graph root (for inspection)."""
        fwd = installed_forward(self.model.get_submodule(root))
        if not isinstance(fwd, GraphForward):
            raise ValueError(f"{root or '<model>'!r} is not a graph root; graph roots: {self.graph_roots}")
        return fwd.graph_code(training)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts (both the original and the copy of each
        `modules_to_save` module count in ``all``, as in PEFT)."""
        if self.__dict__.get("_trainable_stale"):
            self._sync_trainable(force=True)
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: ``trainable params: T || all params: A || trainable%: P``."""
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    def __repr__(self) -> str:
        paths = self.target_paths
        n_graph = sum(1 for p in paths.values() if p == "graph")
        head = (
            f"LoraModel(adapters={list(self.peft_config)}, active={self._active}, "
            f"targets={len(paths)} ({n_graph} graph, {len(paths) - n_graph} eager))"
        )
        return head + "\n" + _annotated_repr(self.model, paths)

    # ------------------------------------------------------------------ copying
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for module in self.model.modules():
            fwd = installed_forward(module)
            if isinstance(fwd, GraphForward):
                fwd.refresh()


def _generation_expansion(model: nn.Module, kwargs: dict) -> int:
    """How many rows `generate` makes of each input row (beams, or returned sequences)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
    sequences = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1) or 1)
    return beams if beams > 1 else sequences


def _lora_note(module: nn.Module, path: str) -> str:
    meta = target_meta(module)
    if meta is not None:
        parts = [f"{a}: r={s.r} alpha={s.alpha:g}" for a, s in meta.adapters.items()]
        return f"  [LoRA {', '.join(parts)}; {path}]"
    saved = saved_meta(module)
    if saved is not None:
        return f"  [modules_to_save: trainable copy for {', '.join(saved.adapters)}]"
    return ""


def _annotated_repr(module: nn.Module, paths: dict[str, str], name: str = "") -> str:
    """`nn.Module.__repr__` with fxlora's children folded into a note on their module's line."""
    hide = _is_fxlora_child(module)
    children = [(k, m) for k, m in module._modules.items() if m is not None and not (hide and k in LORA_CHILDREN)]
    note = _lora_note(module, paths.get(name, "eager"))
    extra_lines = module.extra_repr().split("\n") if module.extra_repr() else []
    child_lines = [
        f"({key}): " + _annotated_repr(child, paths, f"{name}.{key}" if name else key).replace("\n", "\n  ")
        for key, child in children
    ]
    if not child_lines and len(extra_lines) <= 1:
        return f"{module._get_name()}({''.join(extra_lines)}){note}"
    body = "\n  ".join(extra_lines + child_lines)
    return f"{module._get_name()}({note}\n  {body}\n)"


def _is_fxlora_child(module: nn.Module) -> bool:
    return target_meta(module) is not None or saved_meta(module) is not None
