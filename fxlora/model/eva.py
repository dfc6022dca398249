"""EVA (PEFT 0.21.2's ``init_lora_weights="eva"``): `get_eva_state_dict` and
`initialize_lora_eva_weights`, PEFT's calls with PEFT's arguments and defaults.

Contract (PEFT's): ``lm = fxlora.transform(model, LoraConfig(init_lora_weights="eva", ...))`` gives
each target A as ``nn.Linear``'s own init and B zero; ``initialize_lora_eva_weights(lm, dataloader)``
runs the model (adapters off) over batches of `dataloader` (cycled) with a forward hook on each
target, takes an incremental SVD of each target's inputs until the leading directions stop moving
(cosine similarity >= ``eva_config.tau``), splits the total rank ``sum(r)`` among the targets by
explained variance (at most ``round(r * rho)`` each), and rebuilds the adapter with those ranks
(``rank_pattern``; ``alpha_pattern`` scaled by the new rank with ``adjust_scaling_factors``; targets
given rank 0 dropped), A the top directions of the layer's inputs (``/ sqrt(singular value)`` with
``whiten``) and B zero. `get_eva_state_dict` (on a `LoraModel` or, with `peft_config`, on the plain
model) computes just ``{layer name: A}``, which `initialize_lora_eva_weights` also takes.
Targets whose inputs are equal (same tensor on the first batch) share one decomposition.

Differences from PEFT: the model's layers must all be ``nn.Linear`` / transformers ``Conv1D``
(PEFT initialises other targets with ``True`` and warns); the `LoraModel` holds this one adapter only
(PEFT: one active); gathering inputs over processes is not implemented (``ValueError`` under
``torch.distributed``; pass ``gather_distributed_inputs=False``); no progress bar is shown.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from itertools import cycle
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from fxlora.config import EvaConfig, LoraConfig
from fxlora.core.layers import target_meta
from fxlora.kinds import kind_of
from fxlora.kinds.inits_eva import IncrementalSVD, rank_distribution
from fxlora.model.lora_model import LoraModel
from fxlora.model.peft_functions import as_fxlora_config
from fxlora.planning.matching import select_modules
from fxlora.runtime.install import strip

__all__ = [
    "get_eva_state_dict", "initialize_lora_eva_weights", "forward_fn_dict",
    "prepare_model_inputs_fn_language_modeling", "prepare_layer_inputs_fn_language_modeling",
]

_RHO_CAP = 1000
_PEFT_PREFIX = "base_model.model."


def forward_fn_dict(model: nn.Module, inputs: Any) -> Any:
    """PEFT's default: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: LoraConfig) -> torch.Tensor:
    """PEFT's default: the (token, position) indices to use, from ``attention_mask`` (all if absent)
    and, with ``eva_config.use_label_mask``, ``labels != label_mask_value``."""
    if not isinstance(model_input, dict):
        raise TypeError("prepare_model_inputs_fn_language_modeling needs dict batches (input_ids, attention_mask, ...)")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    settings = peft_config.eva_config or EvaConfig()
    if settings.use_label_mask and "labels" in model_input:
        mask = torch.logical_and(mask, model_input["labels"] != settings.label_mask_value)
    return mask.nonzero()


def _first_input(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(f"the input of {layer_name} is a {type(layer_input).__name__}; give a prepare_layer_inputs_fn for it")
    return layer_input


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, layer_name: str) -> torch.Tensor:
    """PEFT's default: the layer's input rows at the indices `prepare_model_inputs_fn_language_modeling` gave."""
    return _first_input(layer_input, layer_name)[model_input.T.unbind()]


def _rows(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """PEFT's rule without a prepare_layer_inputs_fn: the first input, leading dimensions as rows."""
    x = _first_input(layer_input, layer_name)
    return x.view(-1, x.size(-1)) if x.ndim > 2 else x


class _Collector:
    """One target's forward hook: its prepared inputs, hashed once or decomposed batch by batch."""

    def __init__(self, name: str, prepare: Callable, k: int, tau: float) -> None:
        self.name, self.prepare, self.tau = name, prepare, tau
        self.model_input: Any = None
        self.first: Optional[torch.Tensor] = None
        self.svd = IncrementalSVD(k)
        self.converged = torch.zeros((k,), dtype=torch.bool)
        self.decomposing = False

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        rows = self.prepare(args, self.model_input, self.name)
        if not self.decomposing:
            if self.first is None:
                self.first = rows.detach().cpu().clone()
            return
        if rows.size(0) < self.svd.k:  # as PEFT: too few rows in this batch
            return
        previous = None if self.svd.components is None else self.svd.components.clone()
        self.svd.update(rows.to(torch.float32))
        if previous is not None:
            self.converged = torch.nn.functional.cosine_similarity(self.svd.components, previous) >= self.tau


def _targets(model: nn.Module, config: LoraConfig, adapter: str) -> dict[str, nn.Module]:
    if isinstance(model, LoraModel):
        found = {n: m for n, m in model.model.named_modules() if (meta := target_meta(m)) is not None and adapter in meta.adapters}
    else:
        found = {n: model.get_submodule(n) for n in select_modules(model, config).targets}
    others = [n for n, m in found.items() if not getattr(kind_of(m), "takes_weight_inits", False)]
    if others:
        raise ValueError(f"EVA adapts nn.Linear and transformers Conv1D layers only, not {others}; exclude them (exclude_modules)")
    return found


def _layer_fn(prepare_layer_inputs_fn: Union[Callable, Mapping, None], names: list[str]) -> dict[str, Callable]:
    if not isinstance(prepare_layer_inputs_fn, Mapping):
        return dict.fromkeys(names, prepare_layer_inputs_fn or _rows)
    unknown = sorted(set(prepare_layer_inputs_fn) - set(names))
    if unknown:
        raise ValueError(f"prepare_layer_inputs_fn names modules that are not EVA targets: {unknown}")
    return {n: prepare_layer_inputs_fn.get(n) or _rows for n in names}


def _hooked(targets: dict[str, nn.Module], collectors: dict[str, _Collector]) -> dict[str, Any]:
    return {n: targets[n].register_forward_hook(c) for n, c in collectors.items()}


def _model_input(inputs: Any, prepare_model_inputs_fn: Optional[Callable], config: LoraConfig) -> Any:
    return prepare_model_inputs_fn(inputs, config) if prepare_model_inputs_fn is not None else copy.deepcopy(inputs)


def _device(model: nn.Module) -> Optional[torch.device]:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return next(iter(devices)) if len(devices) == 1 else None


def _to(inputs: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


@torch.no_grad()
def _state_dict(
    runner: nn.Module, targets: dict[str, nn.Module], config: LoraConfig, dataloader: Iterable,
    forward_fn: Callable, prepare_model_inputs_fn: Optional[Callable], prepare_layer_inputs_fn: Any,
) -> dict[str, torch.Tensor]:
    """{target: its EVA A} from running `runner` (the model, adapters off) over `dataloader`."""
    settings = config.eva_config or EvaConfig()
    rho = settings.rho
    if rho > _RHO_CAP:  # PEFT's bound for very large rho
        rho = min(rho, max(max(p.shape) for p in runner.parameters()) // config.r)
    ranks = {n: config.rank_for(n) for n in targets}
    most = {n: round(r * rho) for n, r in ranks.items()}
    fns = _layer_fn(prepare_layer_inputs_fn, list(targets))
    device = _device(runner)
    inputs = _to(next(iter(dataloader)), device)
    collectors = {n: _Collector(n, fns[n], 0, settings.tau) for n in targets}
    model_input = _model_input(inputs, prepare_model_inputs_fn, config)
    for c in collectors.values():
        c.model_input = model_input
    handles = _hooked(targets, collectors)
    try:
        forward_fn(runner, inputs)
    finally:
        for h in handles.values():
            h.remove()
    silent = [n for n, c in collectors.items() if c.first is None]
    if silent:
        raise ValueError(f"the first batch did not reach the target(s) {silent}: EVA needs the inputs of every target")
    shared: dict[str, str] = {}
    for i, name in enumerate(targets):
        owner = next((o for o in list(targets)[:i] if o not in shared and _same(collectors[o].first, collectors[name].first)), None)
        if owner is not None:
            shared[name] = owner
    for owner in set(shared.values()):
        group = [owner, *(n for n, o in shared.items() if o == owner)]
        largest = max(most[n] for n in group)
        most.update(dict.fromkeys(group, largest))
    decomposed = {n: _Collector(n, fns[n], most[n], settings.tau) for n in targets if n not in shared}
    for c in decomposed.values():
        c.decomposing = True
    owners = {**{n: n for n in decomposed}, **shared}
    budget = sum(ranks.values())
    dist_ranks = dict(most)
    handles = _hooked(targets, decomposed)
    done = dict.fromkeys(decomposed, False)
    try:
        for inputs in cycle(dataloader):
            inputs = _to(inputs, device)
            model_input = _model_input(inputs, prepare_model_inputs_fn, config)
            for name, c in decomposed.items():
                converged = bool(torch.all(c.converged[: dist_ranks[name]]))
                if not done[name] and converged:
                    handles.pop(name).remove()
                    done[name] = True
                    continue
                if done[name] and not converged:
                    handles[name] = targets[name].register_forward_hook(c)
                    done[name] = False
                c.model_input = model_input
            if all(done.values()):
                break
            forward_fn(runner, inputs)
            if all(c.svd.components is not None for c in decomposed.values()):
                ratios = {n: c.svd.explained_variance_ratio[: most[n]] for n, c in decomposed.items()}
                dist_ranks = rank_distribution(ratios, owners, shared, budget)
    finally:
        for h in handles.values():
            h.remove()
    out = {}
    for name, rank in dist_ranks.items():
        svd = decomposed[owners[name]].svd
        a = svd.components[:rank]
        if settings.whiten:
            a = a / svd.singular_values[:rank].sqrt().reshape(-1, 1)
        out[name] = a if device is None else a.to(device)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def _check_run(dataloader: Iterable, gather_distributed_inputs: bool) -> None:
    if dataloader is None or len(dataloader) == 0:
        raise ValueError("EVA needs a dataloader with at least one batch (or an eva_state_dict)")
    if dist.is_available() and dist.is_initialized() and gather_distributed_inputs:
        raise ValueError("gathering EVA's layer inputs over processes is not implemented; pass gather_distributed_inputs=False")


def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Optional[Any] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, Mapping, None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """{target name: A (rank, in)} of EVA (module docstring) for the targets of `model`: a
    `LoraModel` (its adapter `adapter_name`, run with adapters off) or a plain model with
    `peft_config` (a `fxlora.LoraConfig` or ``peft.LoraConfig``). The model's mode is put back."""
    _check_run(dataloader, gather_distributed_inputs)
    if isinstance(model, LoraModel):
        config = as_fxlora_config(peft_config) if peft_config is not None else model.peft_config[adapter_name]
        context = model.disable_adapter()
    elif peft_config is None:
        raise ValueError("get_eva_state_dict needs peft_config for a model that is not a fxlora LoraModel")
    else:
        config, context = as_fxlora_config(peft_config), None
    targets = _targets(model, config, adapter_name)
    training = model.training
    model.eval()
    try:
        if context is None:
            return _state_dict(model, targets, config, dataloader, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn)
        with context:
            return _state_dict(model, targets, config, dataloader, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn)
    finally:
        model.train(training)


def _eva_config(config: LoraConfig, state: dict[str, torch.Tensor], names: list[str]) -> LoraConfig:
    """The adapter's config after EVA (PEFT's): the targets that keep a rank, each layer's new
    rank in ``rank_pattern`` and, with ``adjust_scaling_factors``, its alpha scaled likewise."""
    settings = config.eva_config or EvaConfig()
    ranks, alphas = {}, {}
    for name in names:
        r, alpha, new = config.rank_for(name), config.alpha_for(name), state[name].shape[0]
        if new and new != r and settings.adjust_scaling_factors:
            alpha *= new / r
        if new:
            ranks[name], alphas[name] = new, alpha
    return config.replace(
        target_modules=list(ranks), exclude_modules=None, layers_to_transform=None, layers_pattern=None,
        rank_pattern={n: r for n, r in ranks.items() if r != config.r},
        alpha_pattern={n: a for n, a in alphas.items() if a != config.lora_alpha},
    )


def _rebuild(lm: LoraModel, adapter: str, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    """Replace `lm`'s one adapter by `config`'s with A from `state` and B zero, in place; on any
    error the old adapter is put back."""
    model, old = lm.model, lm.adapter_state
    old_tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}
    flags = old.base_requires_grad

    def adapt(cfg: LoraConfig) -> LoraModel:
        strip(model)
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        return LoraModel.adapt(model, cfg, adapter, old.trace_policy)

    try:
        new = adapt(config)
        with torch.no_grad():
            for name in config.target_modules:
                model.get_submodule(name).lora_A[adapter].weight.copy_(state[name])
    except BaseException:
        back = adapt(old.configs[adapter].replace(init_lora_weights=False))
        back.model.load_state_dict(old_tensors, strict=False)
        back.adapter_state.configs[adapter] = old.configs[adapter]
        object.__setattr__(lm, "adapter_state", back.adapter_state)
        raise
    object.__setattr__(lm, "adapter_state", new.adapter_state)


@torch.no_grad()
def initialize_lora_eva_weights(
    model: LoraModel,
    dataloader: Optional[Iterable] = None,
    eva_state_dict: Optional[dict] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, Mapping, None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> None:
    """Give the EVA adapter `adapter_name` of `model` (a `LoraModel` from `fxlora.transform` with
    ``init_lora_weights="eva"``) its data-driven A and ranks (module docstring), from
    `dataloader` or a ready `eva_state_dict` (`get_eva_state_dict`'s; PEFT's keys with
    ``base_model.model.`` work too). Raises ValueError, model unchanged, without either, for another
    init, with other adapters, or a state dict that does not fit the targets."""
    if not isinstance(model, LoraModel):
        raise ValueError("initialize_lora_eva_weights needs the fxlora.LoraModel that fxlora.transform returned")
    model.adapter_state.check_known(adapter_name)
    if list(model.peft_config) != [adapter_name] or model.merged_adapters:
        raise ValueError(f"initialize_lora_eva_weights works on a model with the one unmerged adapter {adapter_name!r}, "
                         f"this one has {list(model.peft_config)} (merged: {model.merged_adapters})")
    config = model.peft_config[adapter_name]
    if config.init_lora_weights != "eva":
        raise ValueError(f"initialize_lora_eva_weights needs init_lora_weights='eva', adapter {adapter_name!r} has {config.init_lora_weights!r}")
    names = model.targeted_module_names
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights needs a dataloader (or an eva_state_dict from get_eva_state_dict)")
        eva_state_dict = get_eva_state_dict(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs, show_progress_bar)
    state = {k.removeprefix(_PEFT_PREFIX): v for k, v in eva_state_dict.items()}
    _check_state(state, names, {n: model.get_submodule(n) for n in names})
    _rebuild(model, adapter_name, _eva_config(config, state, names), state)


def _check_state(state: dict[str, torch.Tensor], names: list[str], modules: dict[str, nn.Module]) -> None:
    missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or extra:
        raise ValueError(f"eva_state_dict does not fit the adapter's targets (missing: {missing}, not targets: {extra})")
    for name, a in state.items():
        n_in = modules[name].lora_A[next(iter(modules[name].lora_A))].weight.shape[1]
        if not isinstance(a, torch.Tensor) or a.ndim != 2 or a.shape[1] != n_in:
            raise ValueError(f"eva_state_dict[{name!r}] must be a (rank, {n_in}) tensor, got {getattr(a, 'shape', a)!r}")
