"""`fxlora.transform`: put a LoRA adapter on any PyTorch model."""

from __future__ import annotations

import torch.nn as nn

from fxlora.config import LoraConfig
from fxlora.model.lora_model import LoraModel
from fxlora.planning.plan import TracePolicy

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
    return LoraModel.adapt(model, config, adapter_name, trace)
