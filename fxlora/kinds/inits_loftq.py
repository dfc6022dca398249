"""LoftQ (PEFT 0.21.2's ``init_lora_weights="loftq"`` with ``loftq_config``): the base weight
becomes its quantized-then-dequantized value ``Q``, and the adapter holds the best rank-r
approximation of what quantizing lost, so that ``Q + B A`` is close to the original weight.

With ``W`` the (out, in) float32 weight and ``T`` iterations (``loftq_iter``)::

    residual = W
    repeat T times:
        Q = dequantize(quantize(residual))        # NF4 (4 bits) or int8 (8 bits)
        L, R = rank-r SVD factors of (W - Q)       # L = U_r sqrt(S_r), R = sqrt(S_r) Vh_r
        residual = W - L @ R                       # (not after the last pass)
    B, A, base = L, R, Q

As in PEFT, the adapter's scaling is not taken into account (use ``lora_alpha = r`` for
``Q + s B A`` to start near ``W``).

The quantizers are those bitsandbytes applies (PEFT's LoftQ calls it), written here in plain torch
so that no GPU and no bitsandbytes are needed:

- NF4 (`nf4_round_trip`): the flattened weight in blocks of 64 values, each scaled by the inverse
  of its largest magnitude, each value rounded to the nearest of the 16 NF4 levels (a value on a
  midpoint goes to the lower level), then level times the block's largest magnitude.
- int8 (`int8_round_trip`): the weight rounded to float16 (bitsandbytes' ``Int8Params`` does), each
  row scaled by ``127 / max |row|``, rounded half to even, then times ``max |row|`` times ``1/127``.

Everything runs on the weight's device (PEFT always computes on the GPU: for PEFT's bits there,
move the model to the GPU first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LoftQ", "LOFTQ_BITS", "loftq_factors", "nf4_round_trip", "int8_round_trip"]

#: the quantization widths LoftQ offers (PEFT's): NF4 and int8
LOFTQ_BITS = (4, 8)
_BLOCK = 64
#: the 16 NormalFloat4 levels (QLoRA), as bitsandbytes stores them in float32
_NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
_INV_127 = 7.874015718698502e-3


@dataclass(frozen=True)
class LoftQ:
    """The LoftQ init with its settings, as the layer kinds receive it (`fxlora.kinds.weight_inits.init_of`)."""

    bits: int
    iters: int

    def __str__(self) -> str:
        return "loftq"


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (float32) quantized to NF4 in blocks of 64 (row-major order) and dequantized."""
    flat = weight.reshape(-1)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, (-n) % _BLOCK)).view(-1, _BLOCK)
    absmax = padded.abs().amax(dim=1, keepdim=True)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))).clamp(-1, 1)
    levels = torch.tensor(_NF4_LEVELS, dtype=torch.float32, device=weight.device)
    midpoints = (levels[:-1] + levels[1:]) / 2
    index = torch.bucketize(scaled, midpoints)  # x == midpoint: the lower level
    return (levels[index] * absmax).reshape(-1)[:n].view_as(weight)


def int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (float32, 2-d) quantized row-wise to int8 and dequantized."""
    half = weight.to(torch.float16)
    row_max = half.abs().amax(dim=1).float().unsqueeze(1)
    codes = torch.round(half * (127.0 / row_max)).nan_to_num(0.0).to(torch.int8)  # a zero row: codes 0
    return codes * row_max * _INV_127


def _rank_factors(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (out, r), R (r, in)) with ``L @ R`` the best rank-r approximation of `matrix`."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root.unsqueeze(1) * vh[:r]


def loftq_factors(weight: torch.Tensor, r: int, init: LoftQ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r), dequantized base (out, in)) of LoftQ for the (out, in) float32 `weight`.

    Requires: ``init.bits in LOFTQ_BITS``, ``init.iters >= 1``, ``r <= min(weight.shape)``."""
    round_trip = nf4_round_trip if init.bits == 4 else int8_round_trip
    residual = weight
    for step in range(init.iters):
        quantized = round_trip(residual)
        low, high = _rank_factors(weight - quantized, r)
        if step + 1 < init.iters:
            residual = weight - low @ high
    return high.contiguous(), low.contiguous(), quantized
