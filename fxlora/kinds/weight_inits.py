"""The inits that read the base weight (PiSSA, OLoRA, LoftQ, CorDA) or draw an orthogonal pair:
PEFT 0.21.2's ``init_lora_weights="pissa"``, ``"pissa_niter_<K>"``, ``"olora"``, ``"orthogonal"``,
``"loftq"`` (`fxlora.kinds.inits_loftq`) and ``"corda"`` (`fxlora.kinds.inits_corda`), for the
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

- ``"loftq"``: the base becomes its quantized-and-dequantized value, the adapter the rank-r SVD of
  what that lost (`fxlora.kinds.inits_loftq`; PEFT's, which only runs on a GPU with bitsandbytes).
- ``"corda"``: from the decomposition `fxlora.preprocess_corda` left on the layer (``eigens``, PEFT's
  attribute: a model PEFT's ``preprocess_corda`` ran on works too); the base becomes ``W - s B A``.

The new base weight is rounded once into its dtype. ``r`` may not exceed ``min(out, in)``
for PiSSA/OLoRA/LoftQ (PEFT silently gives a smaller adapter there). All work on the (out, in)
matrix, also for a ``Conv1D`` (PEFT's OLoRA and LoftQ there give factors of the wrong shape).
"""

from __future__ import annotations

import re
from typing import Callable, Union

import torch
import torch.nn as nn

from fxlora.config import WEIGHT_INITS, LoraConfig
from fxlora.kinds.inits_corda import EIGENS_ATTR, check_eigens, corda_factors
from fxlora.kinds.inits_loftq import LoftQ, loftq_factors

__all__ = [
    "changes_base_weights", "converts_to_plain", "init_of", "init_state_restorer", "is_weight_init", "matrix_inits",
    "orthogonal_pair", "refuse_weight_init", "check_layer_data", "weight_factors",
]

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def init_of(config: LoraConfig) -> Union[bool, str, LoftQ]:
    """What the layer kinds are given for `config`'s init: ``init_lora_weights``, or for
    ``"loftq"`` a `LoftQ` with the config's `loftq_config`."""
    init = config.init_lora_weights
    if init == "loftq":
        return LoftQ(config.loftq_config["loftq_bits"], config.loftq_config["loftq_iter"])
    return init


def is_weight_init(init: Union[bool, str, LoftQ]) -> bool:
    """Whether `init` is one of this module's inits (PiSSA, OLoRA, orthogonal, LoftQ, CorDA)."""
    return isinstance(init, LoftQ) or (isinstance(init, str) and WEIGHT_INITS.fullmatch(init) is not None)


def changes_base_weights(init: Union[bool, str, LoftQ]) -> bool:
    """Whether `init` changes the base layer's weight (all of this module's but orthogonal)."""
    return is_weight_init(init) and str(init) != "orthogonal"


def converts_to_plain(init: Union[bool, str]) -> bool:
    """Whether an adapter with `init` can be saved as a plain LoRA adapter of the original base
    (`fxlora.io.weight_conversion`): its base is ``W - s B0 A0`` (PiSSA, OLoRA, CorDA; PEFT's list).
    LoftQ's base is a quantized weight, which no adapter of the original base computes."""
    return changes_base_weights(init) and str(init) != "loftq"


def refuse_weight_init(where: str, init: Union[bool, str, LoftQ]) -> None:
    """ValueError if `init` is one of this module's inits (or EVA), which the layer `where` cannot take."""
    if is_weight_init(init) or init == "eva":
        raise ValueError(
            f"init_lora_weights={str(init)!r} is supported for nn.Linear and transformers Conv1D layers only, not "
            f"{where} (PEFT's version fails or silently falls back there); exclude such layers (exclude_modules) "
            "or use init_lora_weights=True"
        )


def check_layer_data(module: nn.Module, init: Union[str, LoftQ], r: int, fan_in_fan_out: bool) -> None:
    """ValueError where the layer lacks what `init` needs (CorDA: `preprocess_corda`'s decomposition
    for rank `r`); nothing is changed."""
    if init == "corda":
        out_dim, in_dim = module.weight.shape[::-1] if fan_in_fan_out else module.weight.shape
        check_eigens(getattr(module, EIGENS_ATTR, None), type(module).__name__, r, out_dim, in_dim)


def weight_factors(
    module: nn.Module, matrix: torch.Tensor, r: int, scaling: float, init: Union[str, LoftQ]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r), new base (out, in)) of `init` for the layer `module` whose weight is
    the (out, in) float32 `matrix`. CorDA's decomposition is taken off the layer (as PEFT does).

    Requires: ``changes_base_weights(init)`` and the checks of `check_layer_data` passed."""
    if isinstance(init, LoftQ):
        return loftq_factors(matrix, r, init)
    if init == "corda":
        eigens = module.__dict__.pop(EIGENS_ATTR)
        a, b = corda_factors(eigens, scaling)
        return a, b, matrix - scaling * b @ a
    return matrix_inits(matrix, r, scaling, init)


def init_state_restorer(modules: list[nn.Module]) -> Callable[[], None]:
    """A function that puts back what the inits change on these layers, as it is now: the weight's
    values and CorDA's decomposition (for a failed transform or load)."""
    saved = [(m, m.weight, m.weight.detach().clone(), m.__dict__.get(EIGENS_ATTR)) for m in modules]

    def restore() -> None:
        with torch.no_grad():
            for module, weight, value, eigens in saved:
                weight.copy_(value)
                if eigens is not None:
                    module.__dict__[EIGENS_ATTR] = eigens

    return restore


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
