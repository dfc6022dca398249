"""`preprocess_corda`: PEFT's call that prepares ``init_lora_weights="corda"``.

Contract (PEFT's): call it on the plain model, before `fxlora.transform`, with the config the
model will be transformed with; it runs `run_model` (which feeds the model a sample of the data)
with a forward hook on every target, collects each target's input covariance, decomposes each
target's weight by it (`fxlora.kinds.inits_corda`) and leaves the result on the layer as
``layer.eigens`` (PEFT's attribute, so a model PEFT's ``preprocess_corda`` ran on can be
transformed by fxlora, and the other way round). `fxlora.transform` then takes it off each layer
into the adapter and the residual base weight. Until then the model computes as before.

Differences from PEFT: a call's input is taken with all its leading dimensions as rows (PEFT drops
only a leading batch dimension of 1 and fails for larger batches, and for a 2-d input of one row
takes a dot product); the model's train/eval mode is put back afterwards (PEFT leaves it in eval
mode); a target that `run_model` never calls, or a target that is not a ``nn.Linear`` /
transformers ``Conv1D``, is an error before anything is changed (PEFT divides by zero, or skips it).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from fxlora.config import CordaConfig, LoraConfig
from fxlora.errors import CheckpointError
from fxlora.kinds import kind_of
from fxlora.kinds.inits_corda import EIGENS_ATTR, CordaEigens, eigens_from_covariance, input_covariance
from fxlora.model.peft_functions import as_fxlora_config
from fxlora.planning.matching import select_modules
from fxlora.runtime.install import fxlora_present

__all__ = ["preprocess_corda"]

_FIELDS = ("S_WC", "U_WC", "V_WC")


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: Any,
    run_model: Optional[Callable[[], None]] = None,
    hooked_model: Optional[nn.Module] = None,
) -> None:
    """Leave CorDA's decomposition on every target of `lora_config` (a `fxlora.LoraConfig` or a
    ``peft.LoraConfig``, with its `CordaConfig` in ``corda_config``) in `model`.

    `run_model()` runs the model on sample data (PEFT's advice: about
    ``hidden_dim / tokens_per_sample * 128`` samples); it may be None where ``corda_config``'s
    ``cache_file`` or ``covariance_file`` exists (then read, PEFT's ``torch.save`` format; else written).
    `hooked_model`: a different model to collect the inputs on (targets matched by name).
    Raises ValueError (model unchanged) for a model fxlora already adapted, a config without
    ``corda_config``, unsupported targets, a target `run_model` does not call, non-finite inputs."""
    config = as_fxlora_config(lora_config)
    settings = config.corda_config
    if settings is None:
        raise ValueError("preprocess_corda needs lora_config.corda_config (a CordaConfig; init_lora_weights='corda' sets the default)")
    targets = _targets(model, config)
    cached = _read(settings.cache_file)
    if cached is not None:
        found = {name: _on_device(_cached_eigens(cached, name, settings.cache_file), m) for name, m in targets.items()}
    else:
        covariances = _read(settings.covariance_file)
        if covariances is None:
            covariances = _collect(hooked_model or model, targets, config, settings, run_model)
            _write(settings.covariance_file, covariances)
        missing = sorted(set(targets) - set(covariances))
        if missing:
            raise ValueError(f"covariance file {settings.covariance_file!r} has no covariance for {missing}")
        found = {
            name: _on_device(eigens_from_covariance(_matrix(m), covariances[name].to(m.weight.device), config.rank_for(name), settings.corda_method), m)
            for name, m in targets.items()
        }
        _write(settings.cache_file, {f"{n}.{EIGENS_ATTR}.{f}": getattr(e, f) for n, e in found.items() for f in _FIELDS})
    for name, module in targets.items():
        module.__dict__[EIGENS_ATTR] = found[name]


def _targets(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    if fxlora_present(model):
        raise ValueError("preprocess_corda runs on the model before fxlora.transform (as PEFT's before get_peft_model)")
    targets = {}
    for name in select_modules(model, config).targets:
        module = model.get_submodule(name)
        if not getattr(kind_of(module), "takes_weight_inits", False):
            raise ValueError(
                f"CorDA adapts nn.Linear and transformers Conv1D layers only; the config also targets {name!r} "
                f"({type(module).__name__}): exclude it (exclude_modules) or narrow target_modules"
            )
        if config.rank_for(name) > min(module.weight.shape):
            raise ValueError(f"CorDA needs r <= min(out, in) = {min(module.weight.shape)} on {name!r}, got r={config.rank_for(name)}")
        targets[name] = module
    return targets


def _matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out, in) float32 matrix."""
    weight = module.weight.detach().float()
    return weight.T if kind_of(module).fan_in_fan_out(module) else weight


def _on_device(eigens: CordaEigens, module: nn.Module) -> CordaEigens:
    device = module.weight.device
    return CordaEigens(*(getattr(eigens, f).to(device) for f in _FIELDS))


def _collect(
    hooked: nn.Module, targets: dict[str, nn.Module], config: LoraConfig, settings: CordaConfig, run_model: Optional[Callable[[], None]]
) -> dict[str, torch.Tensor]:
    """{target: mean over its calls of its input covariance} from running `run_model` on `hooked`."""
    if run_model is None:
        raise ValueError("preprocess_corda needs run_model (a function that runs the model on sample data) unless "
                         "corda_config's cache_file or covariance_file exists")
    modules = dict(hooked.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(targets, 0)

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            covariance = input_covariance(x, settings.use_float16_for_covariance)
            sums[name] = covariance if name not in sums else sums[name] + covariance
            counts[name] += 1

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n), with_kwargs=True) for n in targets if n in modules]
    training = hooked.training
    hooked.eval()
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
        hooked.train(training)
    uncalled = [n for n, c in counts.items() if c == 0]
    if uncalled:
        raise ValueError(f"run_model did not call the target(s) {uncalled}: CorDA needs inputs of every target")
    return {name: sums[name] / counts[name] for name in targets}


def _read(path: Optional[str]) -> Optional[dict]:
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} does not hold a dict of tensors (PEFT's CorDA cache / covariance file)")
    return data


def _write(path: Optional[str], tensors: dict[str, torch.Tensor]) -> None:
    if path is None:
        return
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    torch.save(tensors, path)


def _cached_eigens(cache: dict, name: str, path: str) -> CordaEigens:
    keys = [f"{name}.{EIGENS_ATTR}.{f}" for f in _FIELDS]
    missing = [k for k in keys if k not in cache]
    if missing:
        raise CheckpointError(f"CorDA cache file {path!r} lacks {missing}: built for another model or config? delete it to rebuild")
    return CordaEigens(*(cache[k] for k in keys))
