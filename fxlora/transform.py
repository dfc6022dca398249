"""`fxlora.transform`: put a LoRA adapter on any PyTorch model."""

from __future__ import annotations

import copy

import torch.nn as nn

from .apply import fxlora_present, strip
from .calls import CALL_LOCK
from .config import LoraConfig
from .model import LoraModel
from .planning import TracePolicy, emit_warnings, make_plan
from .state import AdapterState

__all__ = ["transform"]


def transform(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    *,
    trace: TracePolicy = "auto",
) -> LoraModel:
    """Adapt `model` in place with LoRA as `config` says, and return it wrapped as a `LoraModel`.

    The model is traced with torch.fx and each targeted layer's node gets the low-rank branch as
    graph nodes; modules that cannot be traced get an eager LoRA forward with the same math
    (`LoraModel.target_paths` shows which path each took; `fxlora.explain` shows it beforehand).

    Args:
        model: any ``nn.Module``; it is changed in place (like PEFT), its modules keep their types,
            names and ``state_dict()`` keys.
        config: the adapter's `LoraConfig` (copied; the caller's object is never changed).
        adapter_name: name of the adapter (PEFT's default is ``"default"``).
        trace: ``"auto"`` (graph where possible, eager elsewhere), ``"eager"`` (no tracing) or
            ``"graph"`` (raise if any target cannot be in a graph).

    Raises:
        ValueError / TypeError: invalid config, no matching module (the message lists the closest
            names), unsupported module type, already-transformed model. The model is then left
            exactly as it was.
    """
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
        wrapped = LoraModel(model, state)
        try:
            wrapped._add_planned(plan)
        except BaseException:
            strip(model)  # the forwards of a first adapter replace none of fxlora's
            raise
    return wrapped
