"""Planning a transform without changing the model: targets, per-target settings, and the path
(graph or eager) each adapted module will take.

`make_plan` is the dry run behind both `fxlora.explain` and `fxlora.transform`: the latter only
applies a plan, so what `explain` reports is what `transform` does.

Path choice ("trace the largest traceable sub-modules that contain targets"): starting at the
model, try to trace a module for the way it is really called (the first call pattern seen in one
small forward pass, `fxlora.tracing.probe`, where the model's integration provides an input;
otherwise its plainest call; the other patterns seen are traced when first needed:
`fxlora.planning.roots.trace_root`), in the module's current train/eval mode; if it traces, it becomes a graph root
that covers every target inside it, except in the sub-modules it calls as leaves because their
code does not trace (planned the same way, on their own). If not, try each child that contains targets. A target
reached this way with no traceable ancestor takes the eager path; its reason is the failure of its nearest ancestor.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch.nn as nn

from fxlora.config import LoraConfig
from fxlora.kinds import LayerKind, kind_of
from fxlora.core.layers import AdapterSpec, check_adapter_name
from fxlora.core.trainable import bias_slots
from fxlora.variants import variant_for
from fxlora.planning.matching import TargetSelection, select_modules
from fxlora.planning.call_checks import WeightRead, check_calls, weight_use_targets
from fxlora.planning.notes import call_notes
from fxlora.planning.parameters import parameter_specs
from fxlora.kinds.parameter import PARAMETER
from fxlora.planning.target_checks import check_returns_one_tensor, fused_parent
from fxlora.tracing.boundaries import nested_roots
from fxlora.tracing.integrations import hooks_fixed
from fxlora.tracing.submodules import named_submodules, trees_fixed
from fxlora.tracing.probe import observe_calls
from fxlora.errors import TraceFailure, UnsupportedTargetError
from fxlora.tracing.reuse import TraceCache
from fxlora.planning.roots import check_callable_root, trace_root

__all__ = [
    "TracePolicy",
    "TargetPlan",
    "SavedPlan",
    "RootPlan",
    "PathInfo",
    "Plan",
    "make_plan",
    "assign_paths",
    "place",
    "lora_param_count",
]

TracePolicy = Literal["auto", "eager", "graph"]


@dataclass
class TargetPlan:
    name: str
    module: nn.Module
    kind: LayerKind
    spec: AdapterSpec
    fan_in_fan_out: bool
    path: str = "eager"  # "graph" | "eager"
    root: Optional[str] = None  # graph root covering it
    reason: str = ""  # why eager
    calls: int = 0  # call sites in the root's graph
    weight_read: bool = False  # see PathInfo
    linear_reads: int = 0  # see PathInfo
    probed: Optional[bool] = None
    planned_for: str = ""

    @property
    def added_params(self) -> int:
        return lora_param_count(self.module, self.spec, self.kind)


@dataclass
class SavedPlan:
    name: str
    module: nn.Module
    path: str = "eager"
    root: Optional[str] = None
    reason: str = ""

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


@dataclass
class RootPlan:
    name: str
    module: nn.Module
    variants: dict = field(default_factory=dict)
    #: observed call patterns traced when first needed (`fxlora.planning.roots.TracedRoot`)
    pending: tuple = ()


@dataclass
class Plan:
    adapter: str
    config: LoraConfig
    model_type: str
    targets: list[TargetPlan]
    saved: list[SavedPlan]
    roots: list[RootPlan]
    base_params: int
    trainable_params: int
    all_params: int
    warnings: list[str] = field(default_factory=list)
    order: dict[str, int] = field(default_factory=dict)  # position in named_modules()
    unfused: frozenset = frozenset()  # targets and saved modules inside a fused parent (`target_checks`)


def lora_param_count(module: nn.Module, spec: AdapterSpec, kind: Optional[LayerKind] = None) -> int:
    """Numbers an adapter with `spec` adds to `module` (the sizes of its kind's factor shapes)."""
    kind = kind or kind_of(module)
    return sum(math.prod(shape) for shape in kind.factor_shapes(module, spec).values())


def _fan_in_fan_out_note(config: LoraConfig, targets: list["TargetPlan"]) -> Optional[str]:
    """One warning naming the linear layers whose layout contradicts ``config.fan_in_fan_out``
    (PEFT warns and overwrites the config; fxlora leaves the config as the user wrote it)."""
    wrong = [t for t in targets if t.kind.fan_in_fan_out(t.module) not in (None, config.fan_in_fan_out)]
    if not wrong:
        return None
    kinds = sorted({type(t.module).__name__ for t in wrong})
    names = ", ".join(t.name for t in wrong[:4]) + (f", ... ({len(wrong)} layers)" if len(wrong) > 4 else "")
    layout = "(in, out)" if wrong[0].fan_in_fan_out else "(out, in)"
    return (
        f"fan_in_fan_out={config.fan_in_fan_out} does not fit {'/'.join(kinds)} (weight stored {layout}); "
        f"using fan_in_fan_out={wrong[0].fan_in_fan_out} for {names}. The config object is left unchanged."
    )


def _check_dora(name: str, module: nn.Module, kind: LayerKind, spec: AdapterSpec) -> None:
    """`UnsupportedTargetError` where the config asks for DoRA on a layer its kind cannot give it."""
    why = kind.dora_obstacle(module) if spec.variant.magnitude else None
    if why is not None:
        raise UnsupportedTargetError(
            f"use_dora=True cannot adapt {name!r} ({type(module).__name__}): {why}; exclude it (exclude_modules) "
            "or use plain LoRA (use_dora=False)"
        )


def _target_plans(model: nn.Module, config: LoraConfig, selection: TargetSelection, notes: list[str]) -> list[TargetPlan]:
    """One plan per selected target. fxlora always uses the layer's own weight layout
    (`LayerKind.fan_in_fan_out`); the config's ``fan_in_fan_out`` is only checked."""
    plans = []
    for name in selection.targets:
        module = model.get_submodule(name)
        kind = kind_of(module)
        spec = AdapterSpec(
            r=config.rank_for(name),
            alpha=config.alpha_for(name),
            use_rslora=config.use_rslora,
            lora_bias=config.lora_bias,
            dropout=float(config.lora_dropout),
            variant=variant_for(config),
        )
        kind.check_spec(repr(name), module, spec)
        _check_dora(name, module, kind, spec)
        check_returns_one_tensor(name, module, kind, spec)
        if spec.lora_bias and getattr(module, "bias", None) is None:
            notes.append(f"{name}: lora_bias=True on a layer without bias: merging it will not be possible")
        plans.append(TargetPlan(name, module, kind, spec, bool(kind.fan_in_fan_out(module))))
    return plans


def _parameter_plans(model: nn.Module, config: LoraConfig, selection: TargetSelection) -> list[TargetPlan]:
    """One plan per module with targeted parameters, after the module targets (PEFT adds them last)."""
    specs = parameter_specs(model, config, selection.parameters, *selection.patterns)
    return [TargetPlan(name, model.get_submodule(name), PARAMETER, spec, False) for name, spec in specs.items()]


# ---------------------------------------------------------------------- paths
@dataclass
class PathInfo:
    """How one adapted (or saved) module computes: in a graph root's code, or eagerly.

    ``weight_read``: a traced graph of an ancestor used its weights without calling it, in a way
    no rewrite turns into a call (`fxlora.planning.call_checks`).
    ``linear_reads``: how many ``F.linear`` uses of its weight the graph calls it at instead.
    ``probed``: whether the forward of `fxlora.tracing.probe` called it (None: no probe ran).
    ``planned_for``: what the graph root's call patterns came from: ``"probe"`` (observed calls)
    or ``"plainest"`` (its required arguments only: `fxlora.tracing.call_keys.canonical_key`).
    """

    path: str = "eager"
    root: Optional[str] = None
    reason: str = ""
    calls: int = 0
    weight_read: bool = False
    linear_reads: int = 0
    probed: Optional[bool] = None
    planned_for: str = ""


def assign_paths(
    model: nn.Module, modules: dict[str, nn.Module], policy: TracePolicy, weight_uses: frozenset[str] = frozenset()
) -> tuple[list[RootPlan], dict[str, PathInfo]]:
    """Choose the graph roots covering the named modules (adapted layers and `modules_to_save`),
    top-down: the largest traceable module containing them wins. `weight_uses`: the targets
    whose adapters may act on their weight where a parent uses it (`check_calls`).

    Requires: no fxlora forward installed on `model` (they are uninstalled before re-planning).
    """
    info = {name: PathInfo() for name in modules}
    if policy == "eager":
        for p in info.values():
            p.reason = "trace='eager' was requested"
        return [], info
    roots: list[RootPlan] = []
    observed = observe_calls(model, modules.values())
    with trees_fixed():  # the probe has run: planning adds, removes and replaces no module
        cache = TraceCache(model)  # identical blocks are traced once
        for name, module in modules.items():
            info[name].probed = (id(module) in observed) if observed else None

        def inside(prefix: str) -> list[str]:
            return [n for n in modules if not prefix or n.startswith(prefix + ".")]

        def visit(name: str, module: nn.Module, reason: str) -> None:
            if name in modules:
                info[name].reason = reason or "no traceable module contains it"
                return
            names = inside(name)
            try:
                check_callable_root(module, not name, observed)
                traced = trace_root(module, [modules[n] for n in names], observed, cache)
                leaves = traced.leaves
                if not (covered := _in_graph(module, name, names, traced.through)) and leaves:
                    raise TraceFailure(f"every adapted module in it is inside a module it calls as a leaf: {next(iter(leaves.values()))}")
                counts = check_calls(name, module, traced.variants, covered, weight_uses)
            except TraceFailure as exc:
                for read in exc.names if isinstance(exc, WeightRead) else ():
                    info[read].weight_read = True
                failure = f"{name or '<model>'} ({type(module).__name__}) does not trace: {exc}"
                for child_name, child in module.named_children():
                    full = f"{name}.{child_name}" if name else child_name
                    if full in modules or inside(full):
                        visit(full, child, failure)
                return
            roots.append(RootPlan(name, module, traced.variants, traced.pending))
            planned_for = "probe" if id(module) in observed else "plainest"
            for n in covered:
                calls, reads = counts[n]
                info[n] = PathInfo("graph", name, "", calls, info[n].weight_read, reads, info[n].probed, planned_for)
            leaf_ids = {id(module.get_submodule(rel)) for rel in leaves}
            for nested in nested_roots(module, [modules[n] for n in names], lambda m: id(m) in leaf_ids):
                visit(_name_of(model, nested), nested, "")
            for rel, why in leaves.items():  # planned on their own, as roots or inside
                if inside(full := f"{name}.{rel}" if name else rel):
                    visit(full, module.get_submodule(rel), f"{name or '<model>'} ({type(module).__name__}) calls it as a leaf: {why}")

        visit("", model, "")
    if policy == "graph":
        eager = [(n, p) for n, p in info.items() if p.path == "eager"]
        if eager:
            detail = "; ".join(f"{n}: {p.reason}" for n, p in eager[:5])
            raise TraceFailure(f"trace='graph' was requested but {len(eager)} module(s) cannot be in a graph: {detail}")
    return roots, info


def _in_graph(root: nn.Module, root_name: str, names: list[str], through: set[int]) -> list[str]:
    """The names among `names` a graph of `root` calls itself: those whose parent it traces
    through (not those in a nested root, `fxlora.tracing.boundaries`, nor in a leaf)."""
    prefix = len(root_name) + 1 if root_name else 0
    return [n for n in names if id(root.get_submodule(n[prefix:].rpartition(".")[0])) in through]


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in named_submodules(model) if m is module)


# ---------------------------------------------------------------------- counts
def _count_params(model: nn.Module, config: LoraConfig, targets: list[TargetPlan], saved: list[SavedPlan]):
    base = sum(p.numel() for p in model.parameters())
    lora = sum(t.added_params for t in targets)
    copies = sum(s.params for s in saved)
    slots = bias_slots(model, config.bias, [t.module for t in targets], [s.module for s in saved])
    biases = {id(p): p.numel() for p in (owner._parameters[name] for owner, name in slots)}
    trainable = lora + copies + sum(biases.values())
    return base, trainable, base + lora + copies


def make_plan(model: nn.Module, config: LoraConfig, adapter_name: str = "default", trace: TracePolicy = "auto") -> Plan:
    """Everything `transform` would do, computed without changing `model`.

    Raises the errors of matching (no target, unsupported type), of invalid settings, and of
    ``trace='graph'`` when some module cannot be in a graph.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a fxlora.LoraConfig, got {type(config).__name__}")
    if trace not in ("auto", "eager", "graph"):
        raise ValueError(f"trace must be 'auto', 'eager' or 'graph', got {trace!r}")
    check_adapter_name(adapter_name)
    config.validate()
    notes: list[str] = []
    with hooks_fixed():  # planning changes no module tree
        selection = select_modules(model, config)
        targets = _target_plans(model, config, selection, notes) + _parameter_plans(model, config, selection)
        saved = [SavedPlan(n, model.get_submodule(n)) for n in selection.modules_to_save]
        roots, paths = assign_paths(model, {p.name: p.module for p in [*targets, *saved]}, trace, weight_use_targets(model, config, targets))
    place(targets, saved, paths)
    layout = _fan_in_fan_out_note(config, targets)
    if layout:
        notes.insert(0, layout)
    notes += call_notes(targets)
    base, trainable, total = _count_params(model, config, targets, saved)
    return Plan(
        adapter=adapter_name,
        config=config,
        model_type=type(model).__name__,
        targets=targets,
        saved=saved,
        roots=roots,
        base_params=base,
        trainable_params=trainable,
        all_params=total,
        warnings=notes,
        order={name: i for i, (name, _) in enumerate(model.named_modules())},
        unfused=frozenset(p.name for p in [*targets, *saved] if fused_parent(model, p.name) is not None),
    )


def place(targets: list[TargetPlan], saved: list[SavedPlan], paths: dict[str, PathInfo]) -> None:
    """Record in the plans the paths `assign_paths` chose for them."""
    for p in [*targets, *saved]:
        info = paths[p.name]
        p.path, p.root, p.reason = info.path, info.root, info.reason
    for t in targets:
        info = paths[t.name]
        t.calls, t.weight_read, t.probed, t.planned_for = info.calls, info.weight_read, info.probed, info.planned_for
        t.linear_reads = info.linear_reads


def emit_warnings(plan: Plan) -> None:
    for note in plan.warnings:
        warnings.warn(f"fxlora: {note}", stacklevel=3)
