"""``A(dropout(x))`` for training without keeping the dropped copy of `x`.

Autograd of ``F.linear(F.dropout(x, p), A)`` keeps, per adapted layer, the dropped input (for A's
gradient) and the dropout's noise (on CPU a float tensor the size of `x`): two tensors the size of
the layer's input, of which the layer itself keeps none (its weight is frozen). `dropped_linear`
keeps `x` instead — one tensor, shared by every branch that reads the same input (q/k/v,
gate/up) and by anything else that keeps it — and which entries were kept, as a bool mask (a
quarter of a float32 noise tensor). Backward rebuilds the noise and the dropped input from them
(one multiply) and takes the products autograd takes for them, so it computes the very operations
autograd would have (the same noise, bit for bit, and the same gradients), at the cost of one
elementwise multiply more per layer. No generator state is saved or
restored: threads drawing random numbers meanwhile are not disturbed.

The forward draws the noise as ``F.dropout(x, p)`` does on the CPU (``bernoulli_(1 - p)`` on a
tensor like `x`, divided by ``1 - p``), so with the same seed it drops the same entries as PEFT's
``nn.Dropout``, and the generator ends where PEFT's does. Other devices take the plain path (their
dropout kernels draw differently). The backward is not differentiable itself: a second-order
gradient through it raises (``create_graph=True`` through a dropout branch needs
``lora_dropout=0``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fxlora.boundary import calls_plainly

__all__ = ["dropped_linear", "keeps_input"]


def _noise(x: torch.Tensor, p: float) -> torch.Tensor:
    """The noise ``F.dropout(x, p, True)`` multiplies `x` by on the CPU, drawn as it draws it."""
    return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)


class _DroppedLinear(torch.autograd.Function):
    """``F.linear(F.dropout(x, p, True), weight)`` keeping `x`, `weight` and the kept entries."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        noise = _noise(x, p)
        ctx.p = p
        ctx.save_for_backward(x, weight, noise != 0)
        return F.linear(x * noise, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, weight, kept = ctx.saved_tensors
        noise = kept.to(x.dtype).div_(1 - ctx.p)  # the forward's noise, bit for bit
        rows = grad.reshape(-1, grad.shape[-1])
        # the products autograd takes for F.linear (an mm of the flattened input) and the multiply
        grad_x = rows.mm(weight).view(x.shape) * noise if ctx.needs_input_grad[0] else None
        grad_w = rows.t().mm((x * noise).reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def keeps_input(dropout: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `dropped_linear` takes the saving path: a training-mode ``nn.Dropout`` with
    ``0 < p < 1`` called plainly, autograd recording a tensor that needs a gradient, a CPU
    tensor (whose dropout draws as `_noise` does), and not under ``torch.compile`` (which plans
    what to keep itself)."""
    return (
        type(dropout) is nn.Dropout
        and dropout.training
        and 0 < dropout.p < 1
        and not dropout.inplace
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.device.type == "cpu"
        and x.numel() > 0
        and not torch.compiler.is_compiling()
        and calls_plainly(dropout)
    )


def dropped_linear(x: torch.Tensor, weight: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
    """``F.linear(dropout(x), weight)``: the A product of a LoRA branch with dropout, equal to it
    bit for bit, gradients included; where `keeps_input` holds it keeps `x` and a bool mask
    instead of the dropped copy and the noise (see the module docstring)."""
    if not keeps_input(dropout, x, weight):
        return F.linear(dropout(x), weight)
    return _DroppedLinear.apply(x, weight, dropout.p)
