"""`LoraModel`: the object `fxlora.transform` returns.

It wraps the user's model *without* adding a level to its names: the wrapper shares the model's
parameter, buffer and submodule tables, so ``lora_model.state_dict()``, ``named_modules()`` and
``named_parameters()`` use exactly the model's own names (plus the LoRA entries under each target,
see `fxlora.core.layers`). The user's model object itself is ``lora_model.model``; attributes and
methods the wrapper does not define (``config``, ``generate``, ...) are looked up there.

Adapter state (which adapters are active, disabled, their scale, merged, trainable, the pass
options) has one owner, `fxlora.model.state.AdapterState` (``lora_model.adapter_state``); every change
publishes a new immutable gate state that calls read (`fxlora.core.gates`), so changing it never touches
the graph code, and a call in flight in another thread keeps the state it started with.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from fxlora.config import LoraConfig
from fxlora.core.layers import saved_meta, target_meta
from fxlora.kinds.quantized import counted_elements
from fxlora.model import adapters, hotswap, loading, merging, status
from fxlora.model.mixed_batch import check_batch_layout, servable_names
from fxlora.model.model_repr import annotated_repr
from fxlora.model.signature import forward_signature, signed_forward
from fxlora.model.state import AdapterState, CallScope
from fxlora.passes import PassOptions
from fxlora.planning.explain import Report
from fxlora.planning.plan import TracePolicy, emit_warnings, make_plan
from fxlora.runtime.calls import CALL_LOCK, outside_compile
from fxlora.runtime.compile_builds import build_if_compiling
from fxlora.runtime.cond_support import COND_DROPS_STATE, cond_keeps_state
from fxlora.runtime.forwards import GraphForward, graph_forwards, installed_forward
from fxlora.runtime.install import fxlora_present, prepare_all, refresh_all, strip
from fxlora.core.trainable import lora_parameters

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


def _delegate(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A `LoraModel` method that is `fn(self, ...)`, with `fn`'s name, signature and docstring."""

    @functools.wraps(fn)
    def method(self: "LoraModel", *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)

    return method


class LoraModel(nn.Module):
    """A model with LoRA adapters. Create it with `fxlora.transform`, not directly.

    A façade: its adapter state is one `AdapterState` (``adapter_state``), and its operations are
    the functions of `fxlora.model.adapters`, `merging`, `loading` and `hotswap` (mixed in),
    which change that state through its methods only.
    """

    def __init__(self, model: nn.Module, adapter_state: AdapterState, *peft_style: Any) -> None:
        if peft_style or not isinstance(adapter_state, AdapterState):  # PEFT's LoraModel(model, config, name)
            raise TypeError("fxlora.LoraModel is not built directly: use fxlora.transform(model, config, adapter_name), which adapts the model in place and returns its LoraModel")
        super().__init__()
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "adapter_state", adapter_state)
        for table in _SHARED_TABLES:
            object.__setattr__(self, table, getattr(model, table))
        self.training = model.training
        signature = forward_signature(model)  # read before fxlora installs forwards on `model`
        if signature is not None:
            object.__setattr__(self, "forward", signed_forward(type(self).forward, self, signature))

    @classmethod
    def adapt(cls, model: nn.Module, config: LoraConfig, adapter_name: str = "default", trace: TracePolicy = "auto") -> "LoraModel":
        """Adapt `model` in place with its first adapter and wrap it (what `fxlora.transform` does;
        see there). All or nothing: on any error the model is left as it was."""
        if isinstance(model, LoraModel):
            raise TypeError("this model is already a fxlora.LoraModel; add more adapters with model.add_adapter(name, config)")
        if isinstance(model, nn.Module) and fxlora_present(model):
            raise ValueError("this model already carries fxlora adapters; use the LoraModel it came from")
        config = copy.deepcopy(config)
        with CALL_LOCK.exclusive():  # tracing patches torch.nn.Module.__call__ process-wide
            plan = make_plan(model, config, adapter_name, trace)
            emit_warnings(plan)
            state = AdapterState(model, trace)
            state.base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
            wrapped = cls(model, state)
            try:
                adapters.add_planned(wrapped, plan)
            except BaseException:
                strip(model)  # a first adapter's forwards replace none of fxlora's
                raise
        return wrapped

    # ------------------------------------------------------------------ operations
    add_adapter = _delegate(adapters.add_adapter)
    delete_adapter = _delegate(adapters.delete_adapter)
    add_weighted_adapter = _delegate(adapters.add_weighted_adapter)
    set_adapter = _delegate(adapters.set_adapter)
    enable_adapter_layers = _delegate(adapters.enable_adapter_layers)
    disable_adapter_layers = _delegate(adapters.disable_adapter_layers)
    set_adapter_scale = _delegate(adapters.set_adapter_scale)
    get_adapter_scale = _delegate(adapters.get_adapter_scale)
    set_trainable_adapter = _delegate(adapters.set_trainable_adapter)
    merge_adapter = _delegate(merging.merge_adapter)
    unmerge_adapter = _delegate(merging.unmerge_adapter)
    merge_and_unload = _delegate(merging.merge_and_unload)
    unload = _delegate(merging.unload)
    merged_state_dict = _delegate(merging.merged_state_dict)
    save_merged = _delegate(merging.save_merged)
    save_pretrained = _delegate(loading.save_pretrained)
    load_adapter = _delegate(loading.load_adapter)
    from_pretrained = classmethod(_delegate(loading.from_pretrained))
    hotswap_adapter, prepare_for_compiled_hotswap = _delegate(hotswap.hotswap_adapter), _delegate(hotswap.prepare_for_compiled_hotswap)
    get_layer_status, get_model_status = _delegate(status.get_layer_status), _delegate(status.get_model_status)

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters whose update is folded into the base weights, in merge order."""
        return self.adapter_state.merged_adapters

    @property
    def merged(self) -> bool:
        return bool(self.adapter_state.merge_steps)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """``{adapter name: LoraConfig}`` (the owner's; change adapters through the methods)."""
        return self.adapter_state.configs

    @property
    def reports(self) -> dict[str, Report]:
        """``{adapter name: fxlora.planning.explain.Report}``: how each adapter was placed."""
        return self.adapter_state.reports

    # ------------------------------------------------------------------ calling
    @outside_compile
    def forward(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any) -> Any:
        """Call the model. With ``adapter_names`` (one adapter name per batch row, ``"__base__"``
        for the base model) every row computes with its own adapter.

        Rows are taken along dim 0 of the inputs (``len(adapter_names)`` is the size of dim 0 of
        the first tensor argument) and of every adapted layer's input, as in PEFT; checked once
        per input layout (`fxlora.model.mixed_batch`): a sequence-first (time, batch, ...) layout
        is refused with a ValueError, never computed along the wrong dimension.

        This frame is kept out of ``torch.compile`` (the model call inside is compiled), so the
        names never become guards: a new assignment of adapters to rows does not recompile.
        ``torch.export`` captures the model call with the adapter state as it is (no names).
        """
        if torch.compiler.is_exporting():  # the program computes with the adapter state exported in
            if adapter_names is not None:
                raise ValueError(
                    "adapter_names cannot be exported: an exported program computes with the adapter state it was "
                    "exported in (export once per adapter after set_adapter(...), or call the model itself)"
                )
            return self.model(*args, **kwargs)
        if adapter_names is not None:
            check_batch_layout(self, adapter_names, args, kwargs)
        build_if_compiling()
        with self._scope(adapter_names, args, kwargs):
            return self.model(*args, **kwargs)

    @torch.compiler.disable
    def _scope(self, adapter_names: Optional[list[str]], args: tuple, kwargs: dict, expand: int = 1) -> CallScope:
        """The scope of one call: the published gates, or a mixed batch's own (one adapter name
        per row, each row repeated `expand` times). Python over names, kept out of torch.compile."""
        state = self.adapter_state
        if adapter_names is None:
            return state.scope()
        names = servable_names(self, adapter_names, args, kwargs)
        return state.scope(state.row_state([n for n in names for _ in range(expand)]))

    def generate(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any) -> Any:
        """The model's own ``generate``; ``adapter_names`` (one per input row) gives each row its
        adapter for the whole generation (rows expanded for beams / returned sequences follow
        their input row)."""
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise AttributeError(f"{type(self.model).__name__} has no generate() method")
        with self._scope(adapter_names, args, kwargs, _generation_expansion(self.model, kwargs)):
            return generate(*args, **kwargs)

    def adapter_tensors(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """``{parameter name: tensor}`` of one adapter (default: the active one): its LoRA weights
        and `modules_to_save` copies, named as in ``named_parameters()``. Pass such a dict (or a
        stack of them under ``torch.func.vmap``) to ``torch.func.functional_call(model, tensors,
        args)`` to evaluate with adapter weights that are not stored in the model (for a model
        with a child called ``model``, which the attribute ``self.model`` shadows, pass
        ``self.model``: the same names)."""
        adapter = adapter_name or self.adapter_state.active[0]
        self.adapter_state.check_known(adapter)
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
        state = self.__dict__.get("adapter_state")
        if state is None:
            return self
        if mode and state.flags_stale:
            state.sync_trainable(True)
        prepare_all(self.model)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> "LoraModel":
        """``.to()``, ``.cuda()``, ``to_empty()`` ...: the gates follow the model's tensors."""
        super()._apply(fn, recurse)
        state = self.__dict__.get("adapter_state")
        if state is not None:
            state.moved_to(next((p.device for p in self.model.parameters()), None))
        return self

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self.adapter_state.active)

    @property
    def active_adapter(self) -> str:
        active = self.adapter_state.active
        return active[0] if len(active) == 1 else list(active)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes as the base model (original `modules_to_save`
        modules included); the adapter state is restored afterwards, even on error."""
        state = self.adapter_state
        previous = state.enabled
        state.enabled = False
        state.publish()
        try:
            yield
        finally:
            state.enabled = previous
            state.publish()

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
        """``{target name: "graph" | "eager"}``: how each adapted module computes its branch: in
        the graph code of a root whose graphs call it or read its weights, or eagerly (a child its
        root's graph calls whole, having failed to trace, runs its own forward)."""
        covered: set[str] = set()
        for name, module in self.model.named_modules():
            fwd = installed_forward(module)
            if isinstance(fwd, GraphForward):
                prefix = f"{name}." if name else ""
                covered.update(prefix + used for used in fwd.modules_used())
        return {name: "graph" if name in covered else "eager" for name, _ in self._adapted()}

    @property
    def graph_roots(self) -> list[str]:
        """Names of the modules whose forward runs rewritten graph code ('' is the model)."""
        return [n for n, m in self.model.named_modules() if isinstance(installed_forward(m), GraphForward)]

    def set_optimizations(self, **switches: bool) -> None:
        """Turn the graph optimisation passes on or off (see `fxlora.passes.PassOptions`), e.g.
        ``model.set_optimizations(fold_scaling=False)``; the graph code is rebuilt, the gated code
        at once (proving the options here). The options are the adapter state's: they stay as set
        when adapters are added or removed. All or nothing: should rebuilding fail, the previous
        options and code are back."""
        known = set(PassOptions.__dataclass_fields__)
        unknown = set(switches) - known
        if unknown:
            raise ValueError(f"unknown optimisation(s) {sorted(unknown)}; known: {sorted(known)}")
        if switches.get("guard_idle") and not cond_keeps_state():
            raise ValueError(f"guard_idle=True is refused: {COND_DROPS_STATE}; the other optimisations: {sorted(known - {'guard_idle'})}")
        state = self.adapter_state
        forwards = graph_forwards(self.model)
        with CALL_LOCK.exclusive(), state.transaction(self.model) as tx:
            previous = state.options

            def rebuild_previous() -> None:
                state.options = previous
                refresh_all(forwards)

            tx.on_undo(rebuild_previous)
            state.options = dataclasses.replace(previous, **switches)
            refresh_all(forwards, build=True)

    def graph_code(self, root: str = "", training: Optional[bool] = None) -> str:
        """The generated code of a graph root (for inspection)."""
        fwd = installed_forward(self.model.get_submodule(root))
        if not isinstance(fwd, GraphForward):
            raise ValueError(f"{root or '<model>'!r} is not a graph root; graph roots: {self.graph_roots}")
        return fwd.graph_code(training)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts (both the original and the copy of each
        `modules_to_save` module count in ``all``, as in PEFT)."""
        state = self.adapter_state
        if state.flags_stale:
            state.sync_trainable(self.training, force=True)
        trainable = total = 0
        for p in self.parameters():
            total += counted_elements(p)
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
            f"LoraModel(adapters={list(self.peft_config)}, active={self.adapter_state.active}, "
            f"targets={len(paths)} ({n_graph} graph, {len(paths) - n_graph} eager))"
        )
        return head + "\n" + annotated_repr(self.model, paths)

    # ------------------------------------------------------------------ copying
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        refresh_all(graph_forwards(self.model))


def _generation_expansion(model: nn.Module, kwargs: dict) -> int:
    """How many rows `generate` makes of each input row (beams, or returned sequences)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
    sequences = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1) or 1)
    return beams if beams > 1 else sequences
