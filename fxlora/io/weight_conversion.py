"""Turning a trained PiSSA / OLoRA / CorDA adapter into a plain LoRA adapter for the original base model
(PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``).

Such an adapter was trained on the residual base ``W_res = W - s B0 A0`` (``A0``, ``B0``: its
initial factors); the trained model computes ``W_res + s B A = W + s (B A - B0 A0)``. So the plain
adapter ``A' = [A; A0]``, ``B' = [B, -B0]`` of rank ``2r`` with the same scaling (``lora_alpha``
doubled, or times sqrt(2) with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` likewise, where
PEFT leaves ``alpha_pattern`` alone and so halves those layers' scaling) on the *original* base
computes what the trained model computes. The initial factors are read from the adapter saved
right after the init (its files are not changed; PEFT rewrites their config). The other tensors
(``modules_to_save`` copies, trained biases) are kept as they are (PEFT drops them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fxlora.config import LoraConfig
from fxlora.kinds.weight_inits import converts_to_plain

if TYPE_CHECKING:  # pragma: no cover
    from fxlora.io.adapter_files import AdapterFiles

__all__ = ["to_plain_lora"]

_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def _converted_config(config: LoraConfig) -> LoraConfig:
    factor = math.sqrt(2) if config.use_rslora else 2
    return config.replace(
        r=2 * config.r,
        lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
        init_lora_weights=True,
    )


def _check_initial(adapter: str, tensors: dict[str, torch.Tensor], initial: "AdapterFiles", prefix: str) -> None:
    where = f"the initial adapter in {str(initial.directory)!r}"
    factor_keys = {k.removeprefix(prefix) for k in tensors if k.endswith((_A_SUFFIX, _B_SUFFIX))}
    initial_keys = {k for k in initial.tensors if k.endswith((_A_SUFFIX, _B_SUFFIX))}
    if factor_keys != initial_keys:
        missing, extra = sorted(factor_keys - initial_keys)[:3], sorted(initial_keys - factor_keys)[:3]
        raise ValueError(
            f"{where} does not have the layers of adapter {adapter!r} (missing there: {missing}, only there: {extra}); "
            "pass the directory the adapter was saved to right after its init"
        )
    for key in factor_keys:
        ours, theirs = tuple(tensors[prefix + key].shape), tuple(initial.tensors[key].shape)
        if ours != theirs:
            raise ValueError(f"{where} has {key} of shape {theirs}, adapter {adapter!r} has {ours}: not its initial state")


def to_plain_lora(
    adapter: str, tensors: dict[str, torch.Tensor], config: LoraConfig, initial: "AdapterFiles", prefix: str
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """(file tensors, config) of the plain rank-2r LoRA adapter equivalent to the trained
    adapter `adapter` (`tensors`: its file tensors, keys with `prefix`) on the original base.
    Raises ValueError (nothing written yet) where the adapter's init did not change the base
    weights (no conversion is needed: save it as it is) or `initial` is not its initial state."""
    if config.init_lora_weights == "loftq":
        raise ValueError(
            f"adapter {adapter!r} has init_lora_weights='loftq', whose base weights are quantized: no adapter of the "
            "original model computes what it computes; save it without path_initial_model_for_weight_conversion "
            "(it converts 'pissa', 'pissa_niter_<K>', 'olora' and 'corda' adapters)"
        )
    if not converts_to_plain(config.init_lora_weights):
        raise ValueError(
            f"adapter {adapter!r} has init_lora_weights={config.init_lora_weights!r}, which leaves the base weights "
            "as they are: it already is a plain LoRA adapter of the original model; save it without "
            "path_initial_model_for_weight_conversion (it converts 'pissa', 'pissa_niter_<K>', 'olora' and 'corda' adapters)"
        )
    _check_initial(adapter, tensors, initial, prefix)
    out = dict(tensors)
    for key, value in tensors.items():
        start = initial.tensors.get(key.removeprefix(prefix))
        if key.endswith(_A_SUFFIX):
            out[key] = torch.cat([value, start.to(value.dtype)], dim=0)
        elif key.endswith(_B_SUFFIX):
            out[key] = torch.cat([value, -start.to(value.dtype)], dim=1)
    return out, _converted_config(config)
