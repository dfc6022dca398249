"""Target selection: which modules of a model a `LoraConfig` adapts, with PEFT's rules.

Names are those of ``model.named_modules()``. The rules, in order:

1. ``exclude_modules`` is checked first (str: ``re.fullmatch``; list: exact or dot-boundary suffix).
2. Modules in ``modules_to_save`` (and everything under them) are never targets.
3. ``target_modules`` as a str is a regex that must match the whole name; ``"all-linear"`` selects
   every ``nn.Linear`` / transformers ``Conv1D`` (leaving out the output embedding of a transformers
   ``PreTrainedModel``); as a list, an entry matches the exact name or a suffix starting at a dot.
   ``None`` takes the default list for a transformers model's ``config.model_type``.
4. ``layers_to_transform`` keeps targets whose layer index (the number after ``layers_pattern``,
   or the first numbered segment) is listed. Unlike PEFT, this holds for exact names as well.

5. ``target_parameters`` selects parameters (`fxlora.planning.parameters`); with them,
   ``target_modules=[]`` asks for no module, and on a transformers 5 MoE model ``"all-linear"`` and
   the old expert / router names resolve as PEFT resolves them (experts and router by parameter).

``modules_to_save`` entries match on a dot boundary (PEFT uses a bare ``endswith``, so ``"head"``
would also pick ``"subhead"``); when both a module and one inside it match, the outer one is saved.

Errors never leave anything changed (nothing here mutates) and name the closest real modules.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch.nn as nn

from fxlora.errors import NoTargetFoundError, UnsupportedTargetError
from fxlora.config import LoraConfig
from fxlora.planning.names import is_under, matches_name_list
from fxlora.planning.defaults import default_target_modules
from fxlora.planning.parameters import check_module_target, moe_resolution, select_parameters
from fxlora.planning.target_checks import check_target, weight_read_by_parent
from fxlora.kinds.hf_classes import is_pretrained_model
from fxlora.kinds import is_all_linear, kind_of, supported_types
from fxlora.core.layers import fxlora_internal_names

__all__ = [
    "TargetSelection",
    "select_modules",
    "matches_name_list",
    "closest_names",
]


@dataclass(frozen=True)
class TargetSelection:
    """The outcome of matching a config against a model (names in ``named_modules()`` order)."""

    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    #: ``target_parameters``: module name -> its targeted parameters (`fxlora.planning.parameters`)
    parameters: dict = field(default_factory=dict)
    #: the rank / alpha patterns to use (the config's, plus PEFT's for a converted MoE model)
    patterns: tuple = ({}, {})


def _matches(spec: str | Sequence[str], key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return matches_name_list(spec, key)


def _layer_index(key: str, layers_pattern: Optional[Sequence[str]]) -> Optional[int]:
    """The layer number in `key`, found with PEFT's regexes (first numbered segment)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _in_layers(config: LoraConfig, key: str) -> bool:
    layers = config.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    pattern = config.layers_pattern
    patterns = [pattern] if isinstance(pattern, str) else pattern
    index = _layer_index(key, patterns)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _match_modules_to_save(config: LoraConfig, names: Sequence[str], model: nn.Module) -> tuple[str, ...]:
    """Modules trained in full: every `modules_to_save` entry must match; the task type's modules
    (`LoraConfig.task_modules_to_save`) are added where the model has them, as PEFT's task models do."""
    entries = list(config.modules_to_save or [])
    optional = [n for n in config.task_modules_to_save if n not in entries]
    if not entries and not optional:
        return ()
    chosen: list[str] = []
    for entry in entries + optional:
        hits = [n for n in names if n and matches_name_list([entry], n)]
        if not hits and entry not in optional:
            raise NoTargetFoundError(
                f"modules_to_save entry {entry!r} matched no module of {type(model).__name__} "
                f"(entries match a full name or a suffix starting at a dot). "
                f"Closest module names: {_format_names(closest_names([entry], names))}"
            )
        chosen.extend(hits)
    # keep the outermost of nested matches, in named_modules order
    outer = [n for n in names if n in chosen and not any(n.startswith(o + ".") for o in chosen if o != n)]
    return tuple(outer)


def _resolve_target_spec(config: LoraConfig, model: nn.Module, names: Sequence[str]):
    """``(spec, exact, resolution)``: what `target_modules` matches (exact names or PEFT's rules),
    and PEFT's MoE resolution of the config (`fxlora.planning.parameters.moe_resolution`) or None."""
    linear: list[str] = []
    if config.is_all_linear:
        modules = dict(model.named_modules())
        excluded = _output_embedding_names(model)
        linear = [n for n in names if n and is_all_linear(modules[n]) and n not in excluded]
    resolution = moe_resolution(model, config, linear)
    if resolution is not None:
        return resolution.target_modules, False, resolution
    if config.target_modules is None:
        try:
            return default_target_modules(model), False, None
        except ValueError:
            if not config.target_parameters:
                raise
            return [], False, None  # PEFT: the model type's defaults if any, else parameters alone
    if config.is_all_linear:
        return linear, True, None
    return config.target_modules, False, None


def _output_embedding_names(model: nn.Module) -> set[str]:
    if not is_pretrained_model(model):
        return set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is None:
        return set()
    return {n for n, m in model.named_modules() if m is out}


def select_modules(model: nn.Module, config: LoraConfig) -> TargetSelection:
    """Apply the config's rules to `model`; raise a clear error if nothing (usable) matched.

    Guarantees: every returned target is a supported layer type; none lies inside a
    `modules_to_save` module or inside fxlora's own modules; nothing of the model is changed.
    """
    internal = fxlora_internal_names(model)
    names = [n for n, _ in model.named_modules() if n not in internal]
    modules = dict(model.named_modules())
    saved = _match_modules_to_save(config, names, model)
    spec, exact_list, resolution = _resolve_target_spec(config, model, names)

    targets: list[str] = []
    set_aside: dict[str, list[str]] = {"exclude_modules": [], "modules_to_save": []}
    for key in names:
        if not key:
            continue  # the root itself is never a target
        hit = (key in spec) if exact_list else _matches(spec, key)
        if not hit or not _in_layers(config, key):
            continue
        if config.exclude_modules and _matches(config.exclude_modules, key):
            set_aside["exclude_modules"].append(key)
            continue
        if is_under(key, saved):
            set_aside["modules_to_save"].append(key)
            continue
        module = modules[key]
        if kind_of(module) is None:
            raise UnsupportedTargetError(_unsupported_message(key, module, model, names))
        check_target(key, module, model)
        check_module_target(key, module)
        targets.append(key)

    entries = resolution.target_parameters if resolution is not None else (config.target_parameters or [])
    if not targets and (spec or not entries):  # modules were asked for and none matched
        raise NoTargetFoundError(_no_match_message(config, spec, model, names, set_aside))
    parameters = select_parameters(model, entries, targets, saved) if entries else {}
    patterns = (resolution.rank_pattern, resolution.alpha_pattern) if resolution else (config.rank_pattern, config.alpha_pattern)
    return TargetSelection(tuple(targets), saved, parameters, patterns)


def _adaptable(model: nn.Module, names: Sequence[str]) -> list[tuple[str, str]]:
    """(name, type name) of the modules fxlora can adapt: a supported type, not read through its
    weight by its parent."""
    modules = dict(model.named_modules())
    return [
        (n, type(modules[n]).__name__)
        for n in names
        if n and kind_of(modules[n]) is not None and weight_read_by_parent(n, model) is None
    ]


# ---------------------------------------------------------------------- messages
def closest_names(queries: Iterable[str], names: Sequence[str], n: int = 5) -> list[str]:
    """Real module names closest to the queries (whole names and last components)."""
    pool = [x for x in names if x]
    found: list[str] = []
    for q in queries:
        plain = re.sub(r"[\\^$.*+?()\[\]{}|]", "", q) if _looks_like_regex(q) else q
        candidates = difflib.get_close_matches(q, pool, n=n, cutoff=0.4)
        last = {x.rsplit(".", 1)[-1]: x for x in pool}
        for tail in difflib.get_close_matches(plain.rsplit(".", 1)[-1], list(last), n=n, cutoff=0.5):
            candidates += [x for x in pool if x.rsplit(".", 1)[-1] == tail][:2]
        for c in candidates:
            if c not in found:
                found.append(c)
    return found[:n]


def _looks_like_regex(s: str) -> bool:
    return any(ch in s for ch in "\\^$*+?()[]{}|")


def _format_names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "(none)"


def _adaptable_summary(model: nn.Module, names: Sequence[str], limit: int = 8) -> str:
    adaptable = _adaptable(model, names)
    if not adaptable:
        return "The model has no module of a supported type."
    shown = ", ".join(f"{n} ({t})" for n, t in adaptable[:limit])
    more = f", ... ({len(adaptable)} in all)" if len(adaptable) > limit else ""
    return f"Adaptable modules: {shown}{more}."


def _no_match_message(
    config: LoraConfig, spec: str | list[str], model: nn.Module, names: Sequence[str], set_aside: dict[str, list[str]]
) -> str:
    if any(set_aside.values()):
        return _set_aside_message(spec, model, names, set_aside)
    queries = [spec] if isinstance(spec, str) else list(spec)
    how = (
        "a str is a regex that must match the whole name (re.fullmatch)"
        if isinstance(spec, str)
        else "list entries match a full name or a suffix starting at a dot"
    )
    msg = (
        f"target_modules={spec!r} matched no module of {type(model).__name__} ({how}). "
        f"Closest module names: {_format_names(closest_names(queries, names))}. "
        f"{_adaptable_summary(model, names)}"
    )
    if config.layers_to_transform is not None:
        msg += (
            f" layers_to_transform={config.layers_to_transform!r} keeps only names with that layer index"
            f" (layers_pattern={config.layers_pattern!r}); set layers_pattern to the name of the layer list."
        )
    return msg


def _set_aside_message(spec: str | list[str], model: nn.Module, names: Sequence[str], set_aside: dict[str, list[str]]) -> str:
    """target_modules matched, but every match is excluded or in modules_to_save."""
    parts = []
    if set_aside["modules_to_save"]:
        parts.append(
            f"{_format_names(set_aside['modules_to_save'])} also in modules_to_save (a module in modules_to_save is "
            "trained in full as a copy and never gets LoRA: list it in one of the two)"
        )
    if set_aside["exclude_modules"]:
        parts.append(f"{_format_names(set_aside['exclude_modules'])} in exclude_modules (checked first)")
    return (
        f"target_modules={spec!r} matched only modules set aside: {'; '.join(parts)}. Nothing is left to "
        f"adapt. {_adaptable_summary(model, [n for n in names if n not in set_aside['modules_to_save']])}"
    )


def _unsupported_message(key: str, module: nn.Module, model: nn.Module, names: Sequence[str]) -> str:
    below = [n for n, _ in module.named_modules(prefix=key) if n != key]
    inside = [f"{n} ({t})" for n, t in _adaptable(model, below)][:6]
    read = [f"{n} ({reason})" for n in below if (reason := weight_read_by_parent(n, model)) is not None]
    hint = f" Supported layers inside it: {', '.join(inside)}." if inside else " No layer inside it can carry LoRA."
    if read:
        hint += f" Layers inside it that cannot, though of a supported type: {', '.join(read[:3])}."
    return (
        f"module {key!r} of type {type(module).__name__} matched target_modules, but fxlora can only adapt "
        f"{supported_types()}.{hint} Narrow target_modules (a str regex must match the whole name)."
    )

