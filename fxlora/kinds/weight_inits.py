"""The inits that read the base weight (PiSSA, OLoRA) or draw an orthogonal pair: PEFT 0.21.2's
``init_lora_weights="pissa"``, ``"pissa_niter_<K>"``, ``"olora"`` and ``"orthogonal"``, for the
layers whose update is a plain (out, in) matrix product (``nn.Linear``, transformers ``Conv1D``).

With ``W`` the base weight as an (out, in) matrix in float32 and ``s`` the adapter's scaling:

- ``"pissa"``: ``W = U S Vh`` (full SVD); ``A = diag(sqrt(S_r / s)) Vh_r``, ``B = U_r diag(sqrt(S_r / s))``,
  and the base weight becomes ``W - s B A`` (the residual), so the adapted model starts equal to
  the base (up to rounding) with the principal directions in the adapter.
- ``"pissa_niter_<K>"``: the same from ``torch.svd_lowrank(W, r, niter=K)`` (random: it draws from
  torch's generator, as PEFT does, so a seeded run gives PEFT's tensors).
- ``"olora"``: ``W = Q R`` (reduced QR); ``A = R_r``, ``B = Q_r`` and the base becomes ``W - s B A``.
  (PEFT takes the QR of the stored weight, which for a ``Conv1D`` is (in, out) and gives factors
  of the wrong shape; fxlora always uses the (out, in) matrix.)
- ``"orthogonal"``: ``Q`` from the QR of an (r, r) normal draw; ``A = (N_in Q_odd).T / 10``,
  ``B = N_out.T Q_even / 10`` (``Q_odd`` / ``Q_even``: rows 0, 2, ... / 1, 3, ...; ``N``: normal
  draws), so ``B A = 0`` up to rounding. Needs an even rank; the base is not changed.

The residual is rounded once into the base weight's dtype. ``r`` may not exceed ``min(out, in)``
for PiSSA/OLoRA (PEFT silently gives a smaller adapter there).
"""

from __future__ import annotations

import re
from typing import Union

import torch

from fxlora.config import WEIGHT_INITS

__all__ = ["changes_base_weights", "is_weight_init", "matrix_inits", "orthogonal_pair", "refuse_weight_init"]

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def is_weight_init(init: Union[bool, str]) -> bool:
    """Whether `init` is one of this module's inits (PiSSA, OLoRA, orthogonal)."""
    return isinstance(init, str) and WEIGHT_INITS.fullmatch(init) is not None


def changes_base_weights(init: Union[bool, str]) -> bool:
    """Whether `init` changes the base layer's weight (PiSSA and OLoRA do)."""
    return is_weight_init(init) and init != "orthogonal"


def refuse_weight_init(where: str, init: Union[bool, str]) -> None:
    """ValueError if `init` is one of this module's inits, which the layer `where` cannot take."""
    if is_weight_init(init):
        raise ValueError(
            f"init_lora_weights={init!r} is supported for nn.Linear and transformers Conv1D layers only, not "
            f"{where} (PEFT's version fails or silently falls back there); exclude such layers (exclude_modules) "
            "or use init_lora_weights=True"
        )


def _principal(weight: torch.Tensor, r: int, init: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, Vh_r) of `weight`: exact SVD, or `torch.svd_lowrank` with the init's niter."""
    niter = _PISSA_NITER.fullmatch(init)
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    u, s, v = torch.svd_lowrank(weight, r, niter=int(niter.group(1)))
    return u, s, v.t()


def matrix_inits(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r), residual (out, in)) for PiSSA or OLoRA of the (out, in) float32
    matrix `weight`; the residual is ``weight - scaling * B @ A`` (PEFT's arithmetic).

    Requires: ``changes_base_weights(init)`` and ``r <= min(weight.shape)``."""
    if init == "olora":
        q, rr = torch.linalg.qr(weight)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    else:
        u, s, vh = _principal(weight, r, init)
        root = torch.diag(torch.sqrt(s / scaling))
        a, b = root @ vh, u @ root
    return a, b, weight - scaling * b @ a


def orthogonal_pair(r: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, n_in), B (n_out, r)) of the orthogonal init, drawing in PEFT's order.

    Requires: `r` even."""
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(n_in, r // 2).mm(q[0::2, :]).T / 10.0
    b = torch.randn(r // 2, n_out).T.mm(q[1::2, :]) / 10.0
    return a.contiguous(), b.contiguous()
