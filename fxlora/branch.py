"""The LoRA computation, written once.

`lora_output` is what an adapted layer returns: its base output plus, for every adapter on it,
``B(A(dropout(x))) * scaling * gate``. The eager path calls it directly; the graph path traces it
with torch.fx (`fxlora.passes.insert_lora`) and splices the nodes after the layer's own node, so
both paths run the very same operations. `saved_output` is the same for `modules_to_save`.

Requires of `module`: adapters attached by `fxlora.layers.attach_adapter`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .layers import target_meta, saved_meta
from .ops import add_update, cast_like, scale_update, select_output

__all__ = ["lora_output", "saved_output"]

# Keep the ops opaque when this module's functions are traced: one node each.
for _name in ("add_update", "cast_like", "scale_update", "select_output"):
    torch.fx.wrap(_name)


def _embedding_update(module: nn.Embedding, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    lora_a = module.lora_embedding_A[adapter]
    lora_b = module.lora_embedding_B[adapter]
    after_a = F.embedding(
        ids,
        lora_a.T,
        module.padding_idx,
        module.max_norm,
        module.norm_type,
        module.scale_grad_by_freq,
        module.sparse,
    )
    return after_a @ lora_b.T


def _low_rank_update(module: nn.Module, adapter: str, x: torch.Tensor) -> torch.Tensor:
    lora_a = module.lora_A[adapter]
    dropped = module.lora_dropout[adapter](cast_like(x, lora_a.weight))
    return module.lora_B[adapter](lora_a(dropped))


def lora_output(module: nn.Module, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`base` (the layer's own output for input `x`) plus every adapter's gated, scaled update."""
    meta = target_meta(module)
    total = None
    for adapter in meta.adapters:
        if meta.kind == "embedding":
            update = _embedding_update(module, adapter, x)
        else:
            update = _low_rank_update(module, adapter, x)
        update = scale_update(update, getattr(module.lora_scaling, adapter), getattr(module.lora_gates.scale, adapter))
        total = update if total is None else total + update
    return base if total is None else add_update(base, total)


def saved_output(module: nn.Module, base: Any, *args: Any, **kwargs: Any) -> Any:
    """`base` (the original module's output), replaced by a trainable copy's output wherever that
    copy's adapter is selected."""
    out = base
    for adapter in saved_meta(module).adapters:
        copy_out = module.modules_to_save[adapter](*args, **kwargs)
        out = select_output(getattr(module.lora_gates.select, adapter), copy_out, out)
    return out
