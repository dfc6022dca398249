"""What calling a module does beyond its class's ``forward``: fxlora's rules, in one place.

A module *has a boundary* (`boundary_of`) when its ``__call__`` does more than run its class's
``forward``: hooks registered on it (forward, pre, backward: FSDP2's unshard and reshard, an
activation capture, a profiler's), ``module.compile()``, a ``forward`` replaced on the instance
(accelerate's dispatch and offload, a nested graph root), an activation-checkpoint wrapper, a
layer that checkpoints its own call (transformers' ``gradient_checkpointing_enable()``). Code
that would skip such a call (a graph tracing through it, a branch reading an adapter's weights
instead of calling its module) must call the module instead.
"""

from __future__ import annotations

from typing import Optional

import torch

import torch.nn as nn
import torch.nn.modules.module as _module_impl
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper

__all__ = ["HOOK_TABLES", "GLOBAL_HOOK_TABLES", "boundary_of", "can_be_root", "calls_plainly", "execution_device"]

#: the per-module hook tables ``nn.Module.__call__`` runs
HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")

#: the process-wide hook tables every module call runs (``torch.nn.modules.module.register_module_*``)
GLOBAL_HOOK_TABLES = tuple(
    getattr(_module_impl, f"_global{name}") for name in HOOK_TABLES
)


def boundary_of(module: nn.Module) -> Optional[str]:
    """Why calling `module` does more than its class's ``forward`` (None: it does not)."""
    hooks = [name.strip("_").replace("_", " ") for name in HOOK_TABLES if getattr(module, name)]
    if hooks:
        return "it has " + ", ".join(hooks)
    if module._compiled_call_impl is not None:
        return "it is compiled on its own (module.compile())"
    if "forward" in module.__dict__:
        return "its forward is replaced on the instance"
    if isinstance(module, ActivationWrapper):
        return "it is an activation-checkpoint wrapper"
    if getattr(module, "gradient_checkpointing", False) is True and type(module).__call__ is not nn.Module.__call__:
        return "it checkpoints its own call (gradient checkpointing)"
    return None


def calls_plainly(module: nn.Module) -> bool:
    """Calling `module` only runs its class's ``forward`` on its own tensors (as far as code
    reading its weights directly needs: no hooks, no replaced forward)."""
    return "forward" not in module.__dict__ and not any(getattr(module, name) for name in HOOK_TABLES)


def can_be_root(module: nn.Module) -> bool:
    """A graph of `module`'s class forward would run inside its ``__call__`` exactly as the
    forward does now (no wrapper replaced it, it is no checkpoint wrapper)."""
    if "forward" in module.__dict__:
        return False
    return not isinstance(module, ActivationWrapper)


def execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device accelerate's hook on `module` runs it on (it keeps an offloaded module's weights
    on the meta device and loads them for each call), or None without such a hook."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None
