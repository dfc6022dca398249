"""``A(dropout(x))`` for training without keeping the dropped copy of `x`.

Autograd of ``F.linear(F.dropout(x, p), A)`` keeps, per adapted layer, the dropped input (for A's
gradient) and the dropout's noise (on CPU a float tensor the size of `x`; on CUDA a bool mask):
two tensors the size of the layer's input, of which the layer itself keeps none (its weight is
frozen). `dropped_linear` keeps `x` instead — one tensor, shared by every branch that reads the
same input (q/k/v, gate/up) and by anything else that keeps it — and the random-number
generator's state before the dropout. Backward restores that state, replays the dropout and A
with autograd, and takes their gradients, so it computes the very operations autograd would have
(the same mask, bit for bit, and the same gradients), at the cost of one dropout and one rank-r
matmul more per layer.

The forward draws from the generator exactly as ``F.dropout(x, p)`` does (it calls it), so with
the same seed it drops the same entries as PEFT's ``nn.Dropout``.

Replaying sets the device's generator state for the duration of the replay and puts the state
of that moment back after (as ``torch.utils.checkpoint`` does): a thread drawing random numbers
on the same device while another runs a backward can see the replayed state. The backward is
not differentiable itself: a second-order gradient through it raises (``create_graph=True``
through a dropout branch needs ``lora_dropout=0``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fxlora.boundary import calls_plainly

__all__ = ["dropped_linear", "keeps_input"]


def _rng_state(device: torch.device) -> Optional[torch.Tensor]:
    """The state of the generator a dropout on `device` draws from (None: a device whose
    generator state fxlora does not save and restore)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return None


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


class _DroppedLinear(torch.autograd.Function):
    """``F.linear(F.dropout(x, p, True), weight)`` keeping `x`, `weight` and the generator state."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float, state: torch.Tensor) -> torch.Tensor:
        ctx.p, ctx.state = p, state
        ctx.save_for_backward(x, weight)
        return F.linear(F.dropout(x, p, True), weight)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        wants = ctx.needs_input_grad[:2]
        inputs = [t.detach().requires_grad_(w) for t, w in zip((x, weight), wants)]
        now = _rng_state(x.device)
        _set_rng_state(x.device, ctx.state)
        try:
            with torch.enable_grad():
                out = F.linear(F.dropout(inputs[0], ctx.p, True), inputs[1])
        finally:
            _set_rng_state(x.device, now)
        needed = [t for t, w in zip(inputs, wants) if w]
        grads = iter(torch.autograd.grad(out, needed, grad))
        return (*(next(grads) if w else None for w in wants), None, None)


def keeps_input(dropout: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `dropped_linear` takes the saving path: a training-mode ``nn.Dropout`` with
    ``0 < p < 1`` called plainly, autograd recording a tensor that needs a gradient, a device
    whose generator state can be restored, and not under ``torch.compile`` (which plans what to
    keep itself)."""
    return (
        type(dropout) is nn.Dropout
        and dropout.training
        and 0 < dropout.p < 1
        and not dropout.inplace
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.device.type in ("cpu", "cuda")
        and not torch.compiler.is_compiling()
        and calls_plainly(dropout)
    )


def dropped_linear(x: torch.Tensor, weight: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
    """``F.linear(dropout(x), weight)``: the A product of a LoRA branch with dropout, equal to it
    bit for bit, gradients included; where `keeps_input` holds it keeps `x` and the generator
    state instead of the dropped copy and the noise (see the module docstring)."""
    if not keeps_input(dropout, x, weight):
        return F.linear(dropout(x), weight)
    return _DroppedLinear.apply(x, weight, dropout.p, _rng_state(x.device))
