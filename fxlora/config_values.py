"""Checks of single `LoraConfig` values (`fxlora.config`): each raises `ValueError` / `TypeError`
naming the field, the value and what would be valid; and the settings objects of the inits LoftQ,
CorDA and EVA (PEFT's ``LoftQConfig``, ``CordaConfig``, ``EvaConfig``, with the same fields)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Optional

__all__ = [
    "ALL_LINEAR", "normalise_names", "check_rank", "check_alpha", "check_bool_field", "check_regex",
    "LoftQConfig", "CordaConfig", "EvaConfig", "sub_config",
]

ALL_LINEAR = "all-linear"


def normalise_names(name: str, value: Any, *, allow_str: bool) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if allow_str:
            if not value:
                raise ValueError(f"{name} must not be an empty string")
            return value
        value = [value]  # a single module name, the obvious intent
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, (list, tuple)):
        kinds = "a str (regex), a list of names or None" if allow_str else "a list of names or None"
        raise TypeError(f"{name} must be {kinds}, got {type(value).__name__}: {value!r}")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise TypeError(f"{name} entries must be non-empty str, got {item!r} in {value!r}")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError(f"{name} is an empty list; give at least one module name or use None")
    return out


def check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int (r >= 1), got {value!r}")


def check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def check_bool_field(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_target_parameters(value: Any, target_modules: Any) -> None:
    """``target_parameters``: None or a list of non-empty names (PEFT takes no regex here); an
    empty ``target_modules`` list only beside some."""
    if target_modules == [] and not value:
        raise ValueError(
            "target_modules is an empty list; give at least one module name or use None (an empty list "
            "asks for no module targets, which needs target_parameters)"
        )
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(
            f"target_parameters must be a list of parameter names (full names or suffixes at a dot, e.g. "
            f"['experts.gate_up_proj']) or None, got {value!r} (a str regex is not supported, nor in PEFT)"
        )


def check_regex(name: str, value: Any) -> None:
    if isinstance(value, str) and value.lower() != ALL_LINEAR:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(
                f"{name}={value!r} is not a valid regular expression ({exc}); a str is matched with "
                "re.fullmatch against each module name, a list holds literal names"
            ) from None


# ---------------------------------------------------------------- settings of the data-driven inits
@dataclass
class LoftQConfig:
    """PEFT's ``LoftQConfig``: settings of ``init_lora_weights="loftq"`` (`fxlora.kinds.inits_loftq`).

    Args:
        loftq_bits: 4 (NF4) or 8 (int8), the quantization the base weight goes through.
        loftq_iter: alternating quantize / SVD passes, >= 1.
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits not in (4, 8) or isinstance(self.loftq_bits, bool):
            raise ValueError(f"loftq_config loftq_bits must be 4 (NF4) or 8 (int8), got {self.loftq_bits!r}")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"loftq_config loftq_iter must be an int >= 1, got {self.loftq_iter!r}")


@dataclass
class CordaConfig:
    """PEFT's ``CordaConfig``: settings of ``init_lora_weights="corda"`` (`fxlora.preprocess_corda`).

    Args:
        cache_file: a file for the per-layer decomposition (PEFT's ``torch.save`` format): read if
            it exists (then neither data nor a covariance is needed), else written.
        covariance_file: a file for the per-layer input covariances, read if it exists, else written.
        corda_method: ``"ipm"`` (the adapter takes the largest components) or ``"kpm"`` (the smallest).
        verbose: accepted, as PEFT's; fxlora prints no progress.
        use_float16_for_covariance: keep layer inputs in their own dtype (PEFT's name: a float32
            model stays in float32) instead of float32.
        prune_temporary_fields: accepted, as PEFT's; fxlora keeps no temporary fields on modules.
    """

    cache_file: Optional[str] = None
    covariance_file: Optional[str] = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        for name in ("cache_file", "covariance_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"corda_config {name} must be a path or None, got {value!r}")
            if value is not None:
                setattr(self, name, os.fspath(value))
        if self.corda_method not in ("ipm", "kpm"):
            raise ValueError(f"corda_config corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}")
        for name in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
            check_bool_field(f"corda_config {name}", getattr(self, name))


@dataclass
class EvaConfig:
    """PEFT's ``EvaConfig``: settings of ``init_lora_weights="eva"`` (`fxlora.initialize_lora_eva_weights`).

    Args:
        rho: a layer's rank may grow to ``round(r * rho)`` in the redistribution (>= 1; 1: none).
        tau: a decomposition has converged when its directions' cosine similarity to the previous
            batch's reaches tau (in [0, 1]).
        use_label_mask: leave out the tokens whose ``labels`` are `label_mask_value`.
        label_mask_value: see `use_label_mask`.
        whiten: divide each direction by the square root of its singular value.
        adjust_scaling_factors: scale a layer's alpha by its new rank over r (same scale for all).
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not self.rho >= 1.0:
            raise ValueError(f"eva_config rho must be a number >= 1.0, got {self.rho!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"eva_config tau must be a number in [0, 1], got {self.tau!r}")
        if isinstance(self.label_mask_value, bool) or not isinstance(self.label_mask_value, int):
            raise TypeError(f"eva_config label_mask_value must be an int, got {self.label_mask_value!r}")
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            check_bool_field(f"eva_config {name}", getattr(self, name))


def sub_config(name: str, value: Any, cls: type) -> Any:
    """`value` (None, a dict, a `cls`, or PEFT's class of the same name) as a `cls` (None stays None);
    unknown keys and wrong types raise naming the field `name`."""
    if value is None or isinstance(value, cls):
        return value
    if type(value).__name__ == cls.__name__ and is_dataclass(value):  # PEFT's own class
        value = {f.name: getattr(value, f.name) for f in fields(value)}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a {cls.__name__} (fxlora's or PEFT's), a dict or None, got {type(value).__name__}: {value!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{name} has unknown key(s) {unknown}; its keys: {sorted(known)}")
    return cls(**value)
