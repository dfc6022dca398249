"""CorDA's math (PEFT 0.21.2's ``init_lora_weights="corda"``): context-oriented decomposition of
a layer's weight by the covariance of its inputs. `fxlora.preprocess_corda` collects the inputs
and leaves a `CordaEigens` on each target; the init (`corda_factors`) takes it from there.

With ``W`` the (out, in) float32 weight and ``C`` the mean over calls of ``X^T X`` (``X``: one
call's inputs, rows = tokens, divided by the absolute value of their largest entry):

1. ``C' = C + d * mean(diag C) * I`` with ``d = 0.01``, doubled until ``||C' inv(C') - I|| < 0.05``;
2. ``U S Vh = svd(W C')``, ``V = (Vh inv(C'))^T`` (so ``U S V^T = W``);
3. ``"ipm"`` keeps the r largest components, ``"kpm"`` the r smallest;
4. ``A = diag(sqrt(S / s)) V^T``, ``B = U diag(sqrt(S / s))`` (``s``: the scaling), and the base
   becomes ``W - s B A``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["CordaEigens", "EIGENS_ATTR", "check_eigens", "corda_factors", "eigens_from_covariance", "input_covariance"]

#: the attribute of a target layer that holds its decomposition until the init (PEFT's name)
EIGENS_ATTR = "eigens"
_TOLERANCE = 0.05


@dataclass
class CordaEigens:
    """One layer's decomposition for rank r: ``S_WC`` (r,), ``U_WC`` (out, r), ``V_WC`` (in, r)
    (PEFT's field names; its own ``CordaEigens`` is read as well)."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def input_covariance(x: torch.Tensor, keep_dtype: bool) -> torch.Tensor:
    """``X^T X`` of one call's input `x` (..., in) with all leading dimensions as rows, after
    dividing by ``|max(X)|`` (PEFT's normalisation); float32 unless `keep_dtype`. ValueError for
    non-finite values. (PEFT drops only a leading batch dimension of 1, and fails on larger batches.)"""
    x = x.detach().reshape(-1, x.shape[-1])
    if not keep_dtype:
        x = x.float()
    x = x / torch.max(x).abs()
    if not torch.isfinite(x).all():
        raise ValueError(
            "preprocess_corda: a layer input has non-finite values after dividing by its largest value "
            "(an all-zero input, or inf/nan in the data); check the data run_model feeds the model"
        )
    covariance = x.t() @ x
    if not torch.isfinite(covariance).all():
        raise ValueError("preprocess_corda: the input covariance overflowed; use float32 covariances (use_float16_for_covariance=False)")
    return covariance


def _damped(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C', inv(C')) with the smallest damping ``0.01 * 2^k`` that makes the inverse accurate."""
    n = covariance.shape[0]
    eye = torch.eye(n, device=covariance.device)
    damp = 0.01
    while True:
        damped = covariance + torch.diag(torch.ones(n, device=covariance.device) * torch.mean(torch.diag(covariance)) * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < _TOLERANCE:
            return damped, inverse
        damp *= 2


def eigens_from_covariance(weight: torch.Tensor, covariance: torch.Tensor, r: int, method: str) -> CordaEigens:
    """The decomposition of the (out, in) float32 `weight` by the (in, in) `covariance`, cropped
    to rank `r` by `method` (``"ipm"``: largest, ``"kpm"``: smallest components)."""
    damped, inverse = _damped(covariance.float())
    u, s, vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    v = (vh @ inverse).transpose(0, 1)
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    return CordaEigens(S_WC=s[keep].clone(), U_WC=u[:, keep].clone(), V_WC=v[:, keep].clone())


def check_eigens(eigens: Optional[Any], where: str, r: int, out_dim: int, in_dim: int) -> None:
    """ValueError unless `eigens` is a finite decomposition of rank `r` for an (out_dim, in_dim) layer."""
    if eigens is None:
        raise ValueError(
            f"init_lora_weights='corda' needs the layer's decomposition, which {where} does not have: run "
            "fxlora.preprocess_corda(model, config, run_model) on the model first, with the same config "
            "(a loaded CorDA adapter needs it too, as in PEFT)"
        )
    s, u, v = (getattr(eigens, f, None) for f in ("S_WC", "U_WC", "V_WC"))
    if not all(isinstance(t, torch.Tensor) for t in (s, u, v)):
        raise ValueError(f"{where}.{EIGENS_ATTR} is not a CorDA decomposition (S_WC, U_WC, V_WC tensors): {eigens!r}")
    want = {"S_WC": (r,), "U_WC": (out_dim, r), "V_WC": (in_dim, r)}
    for name, tensor in zip(want, (s, u, v)):
        if tuple(tensor.shape) != want[name]:
            raise ValueError(
                f"{where}.{EIGENS_ATTR}.{name} has shape {tuple(tensor.shape)}, rank {r} needs {want[name]}: run "
                "preprocess_corda with the config (rank, rank_pattern) the model is transformed with"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{where}.{EIGENS_ATTR}.{name} has non-finite values; preprocess_corda again with other data")


def corda_factors(eigens: Any, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) from a checked decomposition (`check_eigens`) and the adapter's scaling."""
    root = (eigens.S_WC / scaling).sqrt()
    a = eigens.V_WC.t().mul(root.view(-1, 1)).contiguous()
    b = eigens.U_WC.mul(root).contiguous()
    return a, b
