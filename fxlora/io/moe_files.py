"""Adapter tensors written for transformers 4's per-expert MoE modules, read into transformers 5's
fused experts: PEFT 0.21.2's conversion on load (``convert_peft_adapter_state_dict_for_transformers``),
done by fxlora itself.

transformers 5 stacks the experts of some MoE families (`fxlora.planning.parameters.moe_family`:
Mixtral, Qwen3-MoE, OLMoE, ...; as in PEFT not ``qwen2_moe`` itself) into 3-D parameters, and
`fxlora.planning.parameters.moe_resolution` turns a config naming the old modules into
``target_parameters`` (the fused ``gate_up_proj`` at rank ``n r``, alpha ``n α``).
This module turns the old *tensors* into the factors of the ``parameter`` kind
(`fxlora.kinds.parameter`: A ``(r E, in)``, B ``(out, r E)``, expert ``e``'s update
``B[:, e::E] @ A[e r:(e+1) r]``). File keys are without ``base_model.model.``:

- module renames of the family (Mixtral: the segment ``block_sparse_moe`` is now ``mlp``) apply to
  every key (the router ``...block_sparse_moe.gate.lora_A.weight`` -> ``...mlp.gate.lora_A.weight``:
  the router is one matrix in both, its factors are taken as they are);
- for a targeted fused parameter ``p`` of an experts module ``M`` (E experts), replacing the old
  modules ``o_1..o_n`` (`moe_expert_sources`: ``w1, w3`` / ``gate_proj, up_proj`` for ``gate_up_proj``,
  ``w2`` / ``down_proj`` for ``down_proj``), the keys ``M.<e>.<o_i>.lora_A.weight`` (``a[e,i]``:
  ``(r, in)``) and ``M.<e>.<o_i>.lora_B.weight`` (``b[e,i]``: ``(out, r)``) for every ``e < E`` and
  ``i`` become the kind's file keys of ``p``::

      A = [a[0,1]; ..; a[0,n]; a[1,1]; ..; a[E-1,n]]                  (E n r, in)
      B[:, j E + e] = blockdiag(b[e,1], .., b[e,n])[:, j]              (n out, n r E)

  so expert ``e``'s fused update is ``[b[e,1] a[e,1]; ..; b[e,n] a[e,n]]``, its old updates stacked
  on the output dimension as transformers 5 stacks the weights; with the config's rank ``n r`` and
  alpha ``n α`` its scaling is the old ``α / r``.

Contract: the tensors returned are those PEFT's conversion gives (``torch.equal``); keys this does
not name are returned as they are (the layout check then sees them). A file that cannot be
converted exactly is refused (`CheckpointError`, naming the keys and what would be valid) before
anything is changed: per-expert keys beside the fused keys of the same parameter (or a renamed
key beside its new name), missing experts or projections, keys of experts beyond ``E-1`` or other
factor names, ranks that differ between experts or projections or from the config's rank of ``p``
(``n r``), shapes that are not the expert's, and a per-expert scaling the fused parameter does not
keep (``use_rslora``: ``n α / sqrt(n r)`` is ``sqrt(n)`` times ``α / sqrt(r)``, which PEFT loads
as it is; or an ``alpha_pattern`` on old names); for a file load also the factors of a module named
like an old projection that the converted config no longer adapts (a shared expert's ``nn.Linear``
``gate_proj``, whose tensors PEFT drops). Where the file is not in the old layout nothing changes.
The conversion follows the adapter's plan (which parameters it targets, at which rank), so it applies
to any config that targets the fused parameters, converted or written for transformers 5.
"""

from __future__ import annotations

import json
import math
import re
from typing import Iterable, NamedTuple, Optional

import torch
import torch.nn as nn

from fxlora.config import LoraConfig, scaling_value
from fxlora.core.layers import AdapterSpec, target_meta
from fxlora.errors import CheckpointError
from fxlora.io.peft_format import PEFT_PREFIX
from fxlora.kinds.parameter import PARAMETER, ParamTarget, geometry, parameter_file_suffix
from fxlora.planning.parameters import moe_expert_sources, moe_family, moe_resolution
from fxlora.planning.names import matches_name_list

__all__ = ["Target", "adapter_targets", "convert_expert_tensors"]

#: module renames transformers 5 applies to the checkpoints of a family (old segment, new segment)
_RENAMED_SEGMENTS = {"mixtral": (("block_sparse_moe", "mlp"),)}
_HOLDERS = ("lora_A", "lora_B")
_LISTED = 6  # keys named in one message


class Target(NamedTuple):
    """An adapted module as the conversion sees it (`fxlora.planning.plan.TargetPlan` is one too)."""

    name: str
    module: nn.Module
    kind: object  # a `fxlora.kinds.LayerKind`
    spec: AdapterSpec  # for the ``parameter`` kind a `fxlora.planning.parameters.ParameterSpec`


def adapter_targets(model: nn.Module, adapter: str) -> list[Target]:
    """The modules the adapter `adapter` attached to `model` adapts."""
    found = []
    for name, module in model.named_modules():
        meta = target_meta(module)
        if meta is not None and adapter in meta.adapters:
            found.append(Target(name, module, meta.kind, meta.adapters[adapter]))
    return found


def convert_expert_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], targets: Iterable, config: LoraConfig, where: str, strict: bool = True
) -> dict[str, torch.Tensor]:
    """`tensors` (file keys without ``base_model.model.``) with transformers 4 per-expert keys
    converted for the adapter that adapts `targets` (`Target`s; module docstring); `tensors` itself
    where `model` is no converted MoE family or nothing is to convert. `config` is the adapter's,
    `where` names the file in errors. `strict` also refuses the factors of a module named like an
    old expert projection that the adapter does not adapt (a shared expert's ``gate_proj``: the old
    names now mean the fused parameters; PEFT drops these tensors); else they are left in.
    Raises `CheckpointError`; changes nothing."""
    family = moe_family(model)
    if family is None:
        return tensors
    targets = list(targets)
    renames = tuple((old, new) for old, new in _RENAMED_SEGMENTS.get(family, ()) if not _has_segment(model, old))
    out, names = _renamed(tensors, renames, where)
    sources = moe_expert_sources(family)
    for owner in (t for t in targets if t.kind is PARAMETER):
        params = owner.spec.params
        for position, target in enumerate(params):
            olds = sources.get(target.name)
            if olds is None or getattr(owner.module, target.name).dim() != 3:  # a router: one matrix, as before
                continue
            found = _per_expert_keys(out, owner.name, olds)
            if found:
                out = out if out is not tensors else dict(tensors)
                fused = {h: f"{owner.name}.{parameter_file_suffix(position, len(params), h)}" for h in _HOLDERS}
                _Conversion(owner, target, olds, names).apply(out, found, fused, config)
    if strict:
        _refuse_unadapted(model, out, targets, config, sources, names)
    return out


def _refuse_unadapted(model: nn.Module, tensors: dict, targets: list, config: LoraConfig, sources: dict, names: "_Names") -> None:
    """`CheckpointError` for factors of modules named like an old expert projection that are not
    adapted because the config's entries naming them now name the experts' parameters."""
    olds = {old for group in sources.values() for old in group}
    entries = () if isinstance(config.target_modules, str) else config.target_modules or ()
    if not config.is_all_linear and not any(matches_name_list(olds, e) for e in entries):
        return  # nothing was moved away from these modules: the layout check reports their keys
    modules, adapted = dict(model.named_modules()), {t.name for t in targets}
    owners = set()
    for key in tensors:
        owner, _, rest = key.rpartition(".lora_")
        if rest in ("A.weight", "B.weight") and owner in modules and owner not in adapted and owner.rpartition(".")[2] in olds:
            owners.add(owner)
    if not owners:
        return
    owners = sorted(owners)
    suggested = _config_as_trained(model, config, owners)
    how = (
        f"with the config fields {json.dumps(suggested)} (a regex target_modules is matched as written)"
        if suggested is not None
        else "with a regex target_modules naming them (matched as written) and target_parameters for the experts"
    )
    raise CheckpointError(
        f"{names.where}: the file holds factors of {len(owners)} modules ({', '.join(owners[:_LISTED])}"
        f"{', ...' if len(owners) > _LISTED else ''}) that this config does not adapt on this transformers 5 model: "
        f"there its entries {sorted(olds)} name the fused experts' parameters (as in PEFT, which drops these "
        f"tensors); fxlora refuses rather than drop them. To load the adapter as trained, load it {how}"
    )


def _config_as_trained(model: nn.Module, config: LoraConfig, owners: list[str]) -> Optional[dict]:
    """The config fields that adapt what `config` adapts on `model` (PEFT's conversion) plus the
    modules `owners`: a regex ``target_modules`` (never converted) and the conversion's parameter
    targets, ranks and alphas; None for a config that is not a list of names."""
    if not isinstance(config.target_modules, (list, tuple, set, frozenset)) or config.is_all_linear:
        return None
    resolution = moe_resolution(model, config, ())
    if resolution is None:
        return None
    listed = [rf"(.*\.)?{re.escape(entry)}" for entry in sorted(resolution.target_modules)]
    return {
        "target_modules": "|".join(listed + _patterns(model, owners)),
        "target_parameters": resolution.target_parameters,
        "rank_pattern": resolution.rank_pattern,
        "alpha_pattern": resolution.alpha_pattern,
    }


def _patterns(model: nn.Module, owners: list[str]) -> list[str]:
    """Regexes that match the modules `owners` and no other module of `model`: one per name with
    its numbers generalised where that matches only `owners`, else the names themselves."""
    general: dict[str, list[str]] = {}
    for name in owners:
        general.setdefault(r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in name.split(".")), []).append(name)
    names = [n for n, _ in model.named_modules()]
    patterns = []
    for pattern, group in sorted(general.items()):
        exact = all(n in group for n in names if re.fullmatch(pattern, n))
        patterns.extend([pattern] if exact else [re.escape(n) for n in group])
    return patterns


class _Names(NamedTuple):
    """How errors name keys: as the file does (``base_model.model.``, transformers 4's modules)."""

    where: str
    origin: dict[str, str]  # key after the renames -> key in the file
    renames: tuple[tuple[str, str], ...]

    def shown(self, key: str) -> str:
        if key not in self.origin:  # a key the file lacks: named as the file would name it
            parts = key.split(".")
            for old, new in self.renames:
                parts = [old if p == new else p for p in parts]
            key = ".".join(parts)
        return repr(PEFT_PREFIX + self.origin.get(key, key))

    def listed(self, keys: Iterable[str]) -> str:
        keys = sorted(keys)
        shown = ", ".join(self.shown(k) for k in keys[:_LISTED])
        return shown + (f", ... ({len(keys)} in all)" if len(keys) > _LISTED else "")


def _renamed(tensors: dict[str, torch.Tensor], renames: tuple, where: str) -> tuple[dict[str, torch.Tensor], _Names]:
    """`tensors` with the module `renames` applied (itself if none applies), and their `_Names`."""
    if not any(old in key.split(".") for key in tensors for old, _ in renames):
        return tensors, _Names(where, {}, ())
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        for old, new in renames:
            parts = [new if p == old else p for p in parts]
        renamed = ".".join(parts)
        if renamed in out or (renamed != key and renamed in tensors):
            raise CheckpointError(
                f"{where}: key {PEFT_PREFIX + key!r} (transformers 4's module names) is {PEFT_PREFIX + renamed!r} on "
                "this transformers 5 model, which the file also holds: it mixes both layouts and cannot be converted; "
                "keep one of the two"
            )
        out[renamed], origin[renamed] = tensor, key
    return out, _Names(where, origin, renames)


def _has_segment(model: nn.Module, segment: str) -> bool:
    return any(segment in name.split(".") for name, _ in model.named_modules())


def _per_expert_keys(tensors: dict[str, torch.Tensor], owner: str, olds: tuple[str, ...]) -> set[str]:
    """The keys ``<owner>.<expert index>.<old module>.<anything>``."""
    pattern = re.compile(rf"{re.escape(owner)}\.\d+\.({'|'.join(map(re.escape, olds))})\..+")
    return {key for key in tensors if pattern.fullmatch(key)}


class _Conversion(NamedTuple):
    """The conversion of the per-expert tensors of one fused parameter `target` of `owner`."""

    owner: Target
    target: ParamTarget
    olds: tuple[str, ...]
    names: _Names

    def fail(self, problem: str) -> CheckpointError:
        experts = geometry(self.owner.module, self.target.name).experts
        return CheckpointError(
            f"{self.names.where}: the transformers 4 per-expert tensors of {self.owner.name + '.' + self.target.name!r} "
            f"({', '.join(self.olds)} of {experts} experts) {problem}"
        )

    def key(self, expert, old: str, holder: str) -> str:
        return f"{self.owner.name}.{expert}.{old}.{holder}.weight"

    def apply(self, out: dict[str, torch.Tensor], found: set[str], fused: dict[str, str], config: LoraConfig) -> None:
        """Replace the keys `found` in `out` by the fused keys `fused` (``{"lora_A": key,
        "lora_B": key}``), after every check (`out` unchanged on error)."""
        experts = range(geometry(self.owner.module, self.target.name).experts)
        both = [k for k in fused.values() if k in out]
        if both:
            raise self.fail(
                f"are in the file beside its fused tensors {self.names.listed(both)}: it mixes both layouts and cannot "
                "be converted; keep either the per-expert keys or the fused ones"
            )
        expected = {self.key(e, o, h) for e in experts for o in self.olds for h in _HOLDERS}
        if found - expected:
            raise self.fail(
                f"include keys this model has no place for: {self.names.listed(found - expected)}; valid are "
                f"{self.names.shown(self.key('<e>', '|'.join(self.olds), 'lora_<A|B>'))} for experts e = 0..{len(experts) - 1}"
            )
        if expected - found:
            raise self.fail(
                f"are incomplete: missing {self.names.listed(expected - found)}; the fused parameter needs every "
                f"expert's lora_A and lora_B of {', '.join(self.olds)} (no exact conversion otherwise)"
            )
        rank = self._check_shapes(out, experts)
        self._check_rank_and_scaling(rank, config)
        lora_a = torch.cat([out[self.key(e, o, "lora_A")] for e in experts for o in self.olds], dim=0)
        blocks = torch.stack([torch.block_diag(*(out[self.key(e, o, "lora_B")] for o in self.olds)) for e in experts])
        lora_b = blocks.permute(1, 2, 0).reshape(blocks.shape[1], -1)  # column j E + e: expert e's column j
        for key in expected:
            del out[key]
        out[fused["lora_A"]], out[fused["lora_B"]] = lora_a, lora_b

    def _check_shapes(self, tensors: dict[str, torch.Tensor], experts: range) -> int:
        """The one rank of all the per-expert factors, their shapes checked against the experts'."""
        geo, n = geometry(self.owner.module, self.target.name), len(self.olds)
        if geo.out_features % n:
            raise self.fail(f"cannot be fused: the parameter's {geo.out_features} outputs do not split into {n} projections")
        ranks: dict[int, list[str]] = {}
        for e in experts:
            for old in self.olds:
                a, b = (tuple(tensors[self.key(e, old, h)].shape) for h in _HOLDERS)
                rank = a[0] if len(a) == 2 else 0
                for holder, shape, valid in (("lora_A", a, (rank, geo.in_features)), ("lora_B", b, (geo.out_features // n, rank))):
                    if shape != valid or not rank:
                        shown = f"(r, {geo.in_features})" if holder == "lora_A" or not rank else str(valid)
                        raise self.fail(f"do not fit: {self.names.shown(self.key(e, old, holder))} has shape {shape}, valid is {shown}")
                ranks.setdefault(rank, []).append(f"{e}.{old}")
        if len(ranks) > 1:
            shown = "; ".join(f"rank {r}: {', '.join(ms[:_LISTED])}{', ...' if len(ms) > _LISTED else ''}" for r, ms in sorted(ranks.items()))
            raise self.fail(
                f"have different ranks (experts.<e>.<module> of {shown}); a fused parameter takes one rank for all its "
                "experts and projections, so the file cannot be converted exactly"
            )
        return next(iter(ranks))

    def _check_rank_and_scaling(self, rank: int, config: LoraConfig) -> None:
        """The fused parameter must have rank ``n * rank`` and each old module's scaling."""
        target, n, rslora = self.target, len(self.olds), self.owner.spec.use_rslora
        if target.r != n * rank:
            raise self.fail(
                f"have rank {rank}, but the config gives the fused parameter rank {target.r}, where {n} x {rank} = "
                f"{n * rank} is needed (rank_pattern on the old module names is not converted); give the adapter the "
                f"rank it was trained with (r={rank}, or rank_pattern {{{target.name!r}: {n * rank}}})"
            )
        for old, e in ((o, e) for o in self.olds for e in range(geometry(self.owner.module, target.name).experts)):
            alpha = config.alpha_for(f"{self.owner.name}.{e}.{old}")
            trained = scaling_value(alpha, rank, rslora)
            if not math.isclose(trained, target.scaling, rel_tol=1e-9):
                formula = f"{alpha:g} / sqrt({rank})" if rslora else f"{alpha:g} / {rank}"
                needed = trained * (math.sqrt(target.r) if rslora else target.r)
                raise self.fail(
                    f"were trained with scaling {formula} = {trained:g} for {e}.{old}, but the fused parameter's rank "
                    f"{target.r} and alpha {target.alpha:g} give {target.scaling:g} (PEFT loads it so); to load it "
                    f"exactly, add alpha_pattern {{{target.name!r}: {needed!r}}} to the config"
                )
