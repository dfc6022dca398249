"""`LoraConfig`: what to adapt and how, with PEFT's field names, defaults and meaning.

The config is plain data. It knows nothing of models, graphs or layers: matching lives in
`fxlora.planning.matching`, the runtime layers in `fxlora.core.layers`, the graph passes in `fxlora.passes`.

Every field is checked when the config is built and when it is assigned afterwards (an invalid
assignment raises and leaves the config as it was; `validate()`, which `fxlora.transform` calls,
checks it all again, e.g. after a ``rank_pattern`` dict was changed in place). A bad value raises `ValueError` or
`TypeError` with a message that names the field, the value, and what would be valid.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional, Union

__all__ = ["LoraConfig", "ALL_LINEAR"]

ALL_LINEAR = "all-linear"
SUPPORTED_BIAS = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter (PEFT-compatible field names, defaults and semantics).

    Args:
        r: rank of the update, a positive int.
        lora_alpha: the update is scaled by ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
            ``use_rslora``); a positive number.
        lora_dropout: dropout probability on the LoRA branch input, in ``[0, 1)``.
        target_modules: which modules to adapt. A ``str`` is a regular expression that must match
            the *whole* module name (``re.fullmatch``), or ``"all-linear"`` (any case) for every
            ``nn.Linear`` / transformers ``Conv1D``. A list holds literal names: an entry matches
            the exact name or a suffix of it that starts at a dot (``"seq.0"`` matches
            ``"model.seq.0"`` but not ``"seq.00"``). ``None`` takes the default list for a
            transformers model's ``config.model_type``.
        exclude_modules: modules never to adapt, same str/list rules; checked first.
        modules_to_save: modules (matched on a dot boundary) that are trained in full: the model
            computes with a trainable copy, the original is kept.
        bias: which biases train: ``"none"``, ``"all"`` (every bias of the model) or
            ``"lora_only"`` (biases of adapted layers).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        init_lora_weights: ``True`` (A kaiming-uniform, B zero: the adapted model starts equal
            to the base), ``"gaussian"`` (A ~ N(0, 1/r), B zero) or ``False`` (random A and B,
            for tests).
        fan_in_fan_out: the target stores its weight as (in, out), like transformers ``Conv1D``.
            fxlora decides this per layer from the layer's type and warns where it disagrees.
        layers_to_transform: keep only targets inside these indices of a numbered layer list.
        layers_pattern: name(s) of the layer list that ``layers_to_transform`` indexes.
        rank_pattern: ``{pattern: rank}``; the first pattern with
            ``re.match(rf"(.*\\.)?({pattern})$", name)`` gives that module's rank.
        alpha_pattern: ``{pattern: alpha}``, same rule, for ``lora_alpha``.
        lora_bias: give B a (zero-initialised) bias.
        use_dora: DoRA (weight-decomposed LoRA, `fxlora.variants.dora`): a learned magnitude per
            output feature rescales the adapted weight. Not with ``lora_bias`` (as in PEFT).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, Literal["gaussian"]] = True
    fan_in_fan_out: bool = False
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        for name in _FIELD_NAMES:
            object.__setattr__(self, name, _normalise(name, getattr(self, name)))
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning a field normalises and checks it as construction does; an invalid value
        raises and leaves the config as it was. Names that are not fields are refused."""
        if name not in _FIELD_NAMES:
            close = difflib.get_close_matches(name, _FIELD_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; its fields: {', '.join(_FIELD_NAMES)}"
            raise AttributeError(f"LoraConfig has no field {name!r}{hint}")
        if any(f not in self.__dict__ for f in _FIELD_NAMES):  # being built: __post_init__ checks
            object.__setattr__(self, name, value)
            return
        previous = self.__dict__[name]
        object.__setattr__(self, name, _normalise(name, value))
        try:
            self.validate()
        except BaseException:
            object.__setattr__(self, name, previous)
            raise

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise `ValueError`/`TypeError` naming the first invalid field and what would be valid."""
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        _check_bool_field("use_rslora", self.use_rslora)
        _check_bool_field("fan_in_fan_out", self.fan_in_fan_out)
        _check_bool_field("lora_bias", self.lora_bias)
        _check_bool_field("use_dora", self.use_dora)
        if self.use_dora and self.lora_bias:
            raise ValueError("lora_bias=True is not supported with use_dora=True (nor in PEFT); set one of them to False")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)):
            raise TypeError(f"lora_dropout must be a float in [0, 1), got {self.lora_dropout!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in SUPPORTED_BIAS:
            raise ValueError(f"bias must be one of {SUPPORTED_BIAS}, got {self.bias!r}")
        init = self.init_lora_weights
        if not (init is True or init is False or init == "gaussian" or (isinstance(init, str) and WEIGHT_INITS.fullmatch(init))):
            raise ValueError(
                f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<K>' (K an int >= 0), "
                f"'olora' or 'orthogonal', got {init!r} (PEFT's data-driven inits 'loftq', 'eva', 'corda' and "
                "'lora_ga' are not supported)"
            )
        _check_regex("target_modules", self.target_modules)
        _check_regex("exclude_modules", self.exclude_modules)
        self._validate_layers_filter()
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise TypeError(f"{name} must be a dict {{pattern: value}}, got {type(pattern).__name__}")
            for key, value in pattern.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(f"{name} keys must be non-empty regex strings, got {key!r}")
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ValueError(f"{name} key {key!r} is not a valid regular expression: {exc}") from None
                check = _check_rank if name == "rank_pattern" else _check_alpha
                check(f"{name}[{key!r}]", value)
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError(
                f"lora_bias=True needs init_lora_weights=True or False, got {self.init_lora_weights!r}"
            )

    def _validate_layers_filter(self) -> None:
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not isinstance(items, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
            ):
                raise TypeError(
                    f"layers_to_transform must be a non-negative int or a list of them, got {layers!r}"
                )
            if isinstance(self.target_modules, str):
                raise ValueError(
                    "layers_to_transform needs target_modules as a list of names; with a regex "
                    f"({self.target_modules!r}) put the layer indices in the regex instead"
                )
        if self.layers_pattern is not None:
            if layers is None:
                raise ValueError("layers_pattern is only used together with layers_to_transform; set both")
            if isinstance(self.target_modules, str):
                raise ValueError("layers_pattern needs target_modules as a list of names, not a regex")

    # -------------------------------------------------------------- derived values
    @property
    def is_all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def rank_for(self, name: str) -> int:
        """Rank of the module `name`: the first matching `rank_pattern` key, else `r`."""
        key = first_pattern_match(self.rank_pattern, name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, name: str) -> float:
        """Alpha of the module `name`: the first matching `alpha_pattern` key, else `lora_alpha`."""
        key = first_pattern_match(self.alpha_pattern, name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, name: str) -> float:
        """The factor the update of module `name` is multiplied by."""
        return scaling_value(self.alpha_for(name), self.rank_for(name), self.use_rslora)

    # ------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-able data (a deep copy)."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def replace(self, **changes: Any) -> "LoraConfig":
        """A validated copy with some fields changed (the original is not touched)."""
        data = self.to_dict()
        data.update(changes)
        return type(self)(**data)


_FIELD_NAMES: tuple[str, ...] = LoraConfig.field_names()

#: the ``init_lora_weights`` strings that read the base weight (`fxlora.kinds.weight_inits`)
WEIGHT_INITS = re.compile(r"pissa|pissa_niter_\d+|olora|orthogonal")


def scaling_value(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def first_pattern_match(patterns: dict[str, Any], name: str) -> Optional[str]:
    """PEFT's rule: the first key (dict order) with ``re.match(rf"(.*\\.)?({key})$", name)``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


# ---------------------------------------------------------------------- helpers
def _normalise(name: str, value: Any) -> Any:
    """The stored form of field `name` given `value` (names as lists, a tuple of layers as a
    list, ``None`` patterns as ``{}``, the init method's name in lower case); the type checks
    of the name lists are made here, every other check by `LoraConfig.validate`."""
    if name in ("target_modules", "exclude_modules", "layers_pattern"):
        return _normalise_names(name, value, allow_str=True)
    if name == "modules_to_save":
        return _normalise_names(name, value, allow_str=False)
    if name == "init_lora_weights" and isinstance(value, str):
        return value.lower()
    if name in ("rank_pattern", "alpha_pattern") and value is None:
        return {}
    if name == "layers_to_transform" and isinstance(value, tuple):
        return list(value)
    return value


def _normalise_names(name: str, value: Any, *, allow_str: bool) -> Any:
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


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int (r >= 1), got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def _check_bool_field(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_regex(name: str, value: Any) -> None:
    if isinstance(value, str) and value.lower() != ALL_LINEAR:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(
                f"{name}={value!r} is not a valid regular expression ({exc}); a str is matched with "
                "re.fullmatch against each module name, a list holds literal names"
            ) from None
