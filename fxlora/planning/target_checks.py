"""Targets refused at transform (and by `explain`) although their type is supported: where fxlora
knows that a LoRA branch on the module could not act (`check_target`, at matching), or could not
be added to its output (`check_returns_one_tensor`, when planning the target).

- The ``out_proj`` of ``nn.MultiheadAttention`` on its own: the attention's forward reads
  ``out_proj.weight`` and never calls the module. The attention itself is a target (kind
  ``multihead_attention``: an adapter on it updates ``in_proj_weight`` and ``out_proj.weight``, as
  PEFT's does); PEFT accepts the ``out_proj`` alone (``"all-linear"`` selects it) and its adapter
  there has no effect.
- The ``out_proj`` and ``conv1d`` of Mamba-style models (``model_type`` ``falcon_h1``, ``mamba``,
  ``mamba2``, ``falcon_mamba``, ``nemotron_h``): their fused kernels read the weights directly.
  This is PEFT's own rule (``_check_lora_target_modules_mamba``, by the module's last name
  component and the model's ``config.model_type``), kept so that both refuse the same targets.
- A layer whose class has its own forward that does not return one tensor (transformers'
  ``Llama4Router`` returns ``(scores, logits)``): a LoRA update is added to the layer's output,
  which needs one tensor. fxlora calls such a forward once on a small zero input (in eval
  mode, without gradients or hooks; its width from the adapter's A factor, or the conv's channels
  and kernel) to see what it returns; where no such input can be built, or the call fails,
  nothing is concluded.

Parents that read a target's weight in code fxlora traces are found while planning paths
(`fxlora.planning.plan`): an ``F.linear`` on it becomes a call of it in the graph
(`fxlora.passes.weight_reads`), any other use is warned about (`fxlora.planning.notes`).

One parent reads its children's weights only sometimes, and can be told not to:
``nn.TransformerEncoderLayer`` in eval mode with ``batch_first=True`` runs a fused kernel on
``linear1.weight``, ``linear2.weight``, ``norm1.weight``, ... (PEFT's adapters on them then have no
effect in eval, silently), and skips that fast path when any module inside it has a forward hook.
`fused_parent` names such a parent; `fxlora.runtime.install.attach_plan` gives the adapter's own
modules (``lora_A``, the `modules_to_save` copy) a no-op forward pre-hook, so the layer computes
through its modules, and the adapter acts, in eval too (dropped with the adapter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from fxlora.errors import UnsupportedTargetError
from fxlora.tracing.probe import quiet_forwards
from fxlora.tracing.submodules import submodule

if TYPE_CHECKING:
    from fxlora.core.layers import AdapterSpec
    from fxlora.kinds import LayerKind

__all__ = ["check_target", "check_returns_one_tensor", "fused_parent", "MAMBA_MODEL_TYPES", "MAMBA_FUSED_MODULES", "FUSED_PARENTS"]

#: model types whose Mamba mixers read these modules' weights in fused kernels (PEFT's list)
MAMBA_MODEL_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
MAMBA_FUSED_MODULES = frozenset({"out_proj", "conv1d"})
#: parents with a fused fast path over their children's weights, skipped when a child has hooks
FUSED_PARENTS = (nn.TransformerEncoderLayer,)


def check_target(key: str, module: nn.Module, model: nn.Module) -> None:
    """Raise `UnsupportedTargetError` naming `key` and why, if a LoRA branch on `module` (a
    supported type, at `key` in `model`) would have no effect (see also `check_returns_one_tensor`)."""
    _check_weight_read_by_parent(key, model)
    _check_fused_mamba(key, model)


def fused_parent(model: nn.Module, name: str) -> Optional[str]:
    """The name of the innermost ancestor of module `name` that is one of `FUSED_PARENTS`, or None."""
    parts = name.split(".")
    for end in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:end])
        if isinstance(submodule(model, prefix), FUSED_PARENTS):
            return prefix
    return None


def weight_read_by_parent(key: str, model: nn.Module) -> Optional[str]:
    """Why the parent of module `key` never calls it (its forward reads the weight), or None."""
    parent_name, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return (
            f"it is the out_proj of nn.MultiheadAttention {parent_name or '<root>'!r}, whose forward reads "
            "out_proj.weight directly and never calls the module"
        )
    return None


def _check_weight_read_by_parent(key: str, model: nn.Module) -> None:
    reason = weight_read_by_parent(key, model)
    if reason is not None:
        raise UnsupportedTargetError(
            f"module {key!r} cannot carry LoRA: {reason}, so a LoRA branch on it would have no effect. "
            f"Target the attention itself ({key.rpartition('.')[0] or '<root>'!r}: its adapter updates in_proj_weight "
            "and out_proj.weight, as PEFT's does), or exclude it (exclude_modules=[...])."
        )


def _check_fused_mamba(key: str, model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    child = key.rpartition(".")[2]
    if model_type in MAMBA_MODEL_TYPES and child in MAMBA_FUSED_MODULES:
        raise UnsupportedTargetError(
            f"module {key!r} cannot carry a LoRA adapter in a {model_type!r} model: the Mamba mixer's fused "
            f"kernel reads its weight directly instead of calling it (PEFT refuses {sorted(MAMBA_FUSED_MODULES)} "
            "in Mamba-based models too). Exclude it (exclude_modules=[...]) or adapt other layers."
        )


def check_returns_one_tensor(key: str, module: nn.Module, kind: "LayerKind", spec: "AdapterSpec") -> None:
    """Raise `UnsupportedTargetError` naming `key` if the layer's class has its own forward and
    that returns anything but one tensor on a small zero input (the module docstring says how)."""
    forward = type(module).forward
    if forward.__module__.startswith(("torch.nn.", "bitsandbytes.")):
        return  # torch's and bitsandbytes' layers return one tensor (and a bitsandbytes call changes the layer's state)
    sample = _sample_input(module, kind.factor_shapes(module, spec).get("lora_A.weight"))
    if sample is None:
        return
    try:
        with quiet_forwards(module):
            out = forward(module, sample)
    except Exception:  # the sample does not suit it: nothing is known
        return
    if not isinstance(out, torch.Tensor):
        raise UnsupportedTargetError(
            f"module {key!r} ({type(module).__name__}) returns {_describe(out)} from its own forward, not one "
            "tensor, so a LoRA update cannot be added to its output. Exclude it (exclude_modules=[...]) or "
            "adapt the layers it is built from."
        )


def _sample_input(module: nn.Module, factor_a: Optional[tuple[int, ...]]) -> Optional[torch.Tensor]:
    """A small zero input the layer's base type accepts, or None. `factor_a`: the shape of the
    adapter's A factor, ``(r, in_features)`` for the linear kinds."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    floating = dict(dtype=weight.dtype if weight.is_floating_point() else torch.float32, device=weight.device)
    if factor_a is not None and len(factor_a) == 2:
        return torch.zeros(2, factor_a[1], **floating)
    kernel, channels = getattr(module, "kernel_size", None), getattr(module, "in_channels", None)
    if isinstance(kernel, tuple) and isinstance(channels, int):
        dilation = getattr(module, "dilation", (1,) * len(kernel))
        return torch.zeros(1, channels, *(d * (k - 1) + 1 for k, d in zip(kernel, dilation)), **floating)
    if isinstance(getattr(module, "num_embeddings", None), int):
        return torch.zeros(1, 2, dtype=torch.long, device=weight.device)
    return None


def _describe(value: object) -> str:
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in value[:4])
        return f"a {type(value).__name__} ({inner}{', ...' if len(value) > 4 else ''})"
    return f"a {type(value).__name__}"
