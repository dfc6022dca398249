"""`LoraConfig`: what to adapt and how, with PEFT's field names, defaults and meaning.

The config is plain data. It knows nothing of models, graphs or layers: matching lives in
`fxlora.planning.matching`, the runtime layers in `fxlora.core.layers`, the graph passes in `fxlora.passes`.

Every field is checked when the config is built and when it is assigned afterwards (an invalid
assignment raises and leaves the config as it was; `validate()`, which `fxlora.transform` calls,
checks it all again, e.g. after a ``rank_pattern`` dict was changed in place). A bad value raises `ValueError` or
`TypeError` with a message that names the field, the value, and what would be valid.

Every field of PEFT 0.21.2's ``LoraConfig`` is a field here, in one of three kinds: implemented
(it works as in PEFT), bookkeeping (`BOOKKEEPING_FIELDS`: kept, checked as PEFT checks it, written
to ``adapter_config.json``) or a feature fxlora does not implement (`UNIMPLEMENTED_FIELDS`:
accepted at PEFT's default, `UnsupportedFieldError` for any other value).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal, Optional, Union

from fxlora.config_values import (ALL_LINEAR, CordaConfig, EvaConfig, LoftQConfig, check_alpha, check_bool_field, check_rank,
                                  check_regex, check_target_parameters, normalise_names, sub_config)
from fxlora.errors import UnsupportedFieldError

__all__ = ["LoraConfig", "LoftQConfig", "CordaConfig", "EvaConfig", "ALL_LINEAR", "BOOKKEEPING_FIELDS", "UNIMPLEMENTED_FIELDS", "TASK_TYPES", "field_status"]

SUPPORTED_BIAS = ("none", "all", "lora_only")
#: PEFT's ``TaskType`` values
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
#: modules PEFT's task model for a task type trains in full, where the model has them (added to
#: ``modules_to_save`` as PEFT's ``PeftModelFor<Task>`` does)
TASK_MODULES_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}

#: PEFT fields that record facts about the adapter (kept, checked, written to adapter_config.json)
BOOKKEEPING_FIELDS: dict[str, str] = {
    "task_type": "PEFT's task type (TASK_TYPES or None); some train more modules in full (TASK_MODULES_TO_SAVE)",
    "peft_type": "always 'LORA'",
    "auto_mapping": "the base model's class: written from the model without a task_type (as PEFT), else this value",
    "peft_version": "kept as set; fxlora writes 0.21.2, the format it writes (not read from files)",
    "base_model_name_or_path": "the base model's hub id or path; fxlora writes the model's name_or_path unless set here",
    "revision": "the base model's revision",
    "inference_mode": "True: the adapter's weights do not train (as in PEFT); from_pretrained sets it from is_trainable",
    "megatron_core": "module of Megatron-LM; PEFT uses it only with megatron_config (not implemented)",
    "qalora_group_size": "group size of QA-LoRA; PEFT uses it only with use_qalora (not implemented)",
}
#: PEFT fields of features fxlora does not implement, and the feature: PEFT's default (or None/False/empty) only.
#: Implementing one = deleting its line here (and updating its README "Coming from PEFT" row).
UNIMPLEMENTED_FIELDS: dict[str, str] = {
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "megatron_config": "Megatron-LM parallel layers",
    "lora_ga_config": "the LoRA-GA init",
    "velora_config": "VeLoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "monteclora_config": "MonteCLoRA",
    "runtime_config": "PEFT's runtime options (ephemeral GPU offload)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "ensure_weight_tying": "weight tying of modules_to_save copies",
}


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
            for tests); for Linear / Conv1D also PEFT's ``"pissa"``, ``"pissa_niter_<K>"``,
            ``"olora"``, ``"orthogonal"`` (`fxlora.kinds.weight_inits`), ``"loftq"`` (with
            `loftq_config`), ``"corda"`` (after `fxlora.preprocess_corda`) and ``"eva"`` (then
            `fxlora.initialize_lora_eva_weights`).
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
        target_parameters: ``nn.Parameter``s to adapt by name (full name or a suffix at a dot,
            e.g. ``["experts.gate_up_proj", "gate.weight"]``): 2-D weights and 3-D stacked experts
            that a forward reads directly (`fxlora.kinds.parameter`, PEFT's ``ParamWrapper``).

    The bookkeeping fields (`BOOKKEEPING_FIELDS`) and PEFT's fields of features fxlora does not
    implement (`UNIMPLEMENTED_FIELDS`, refused unless at their default) follow.
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
    #: ``init_lora_weights="loftq"``'s settings: PEFT's dict ``{"loftq_bits": 4|8, "loftq_iter": n}``
    #: (a `LoftQConfig`, PEFT's or fxlora's, is stored as that dict); used only with that init
    loftq_config: dict = field(default_factory=dict)
    #: ``init_lora_weights="corda"``'s settings (`CordaConfig`, PEFT's is taken too); the default
    #: one with that init
    corda_config: Optional[CordaConfig] = None
    #: ``init_lora_weights="eva"``'s settings (`EvaConfig`, PEFT's is taken too); the default one with that init
    eva_config: Optional[EvaConfig] = None
    # bookkeeping
    task_type: Optional[str] = None
    peft_type: Optional[str] = None
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    megatron_core: Optional[str] = "megatron.core"
    qalora_group_size: int = 16
    target_parameters: Optional[list[str]] = None
    # not implemented: only PEFT's default is accepted
    layer_replication: Optional[list] = None
    trainable_token_indices: Optional[Union[list[int], dict]] = None
    megatron_config: Optional[dict] = None
    lora_ga_config: Optional[Any] = None
    velora_config: Optional[Any] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    monteclora_config: Optional[Any] = None
    runtime_config: Optional[Any] = None
    use_bdlora: Optional[Any] = None
    arrow_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        for name in _FIELD_NAMES:
            object.__setattr__(self, name, _normalise(name, getattr(self, name)))
        if self.loftq_config and self.init_lora_weights != "loftq":  # as PEFT
            warnings.warn("loftq_config is ignored (cleared) as init_lora_weights is not 'loftq'", stacklevel=3)
            object.__setattr__(self, "loftq_config", {})
        if self.init_lora_weights == "corda" and self.corda_config is None:  # as PEFT, with its warning
            warnings.warn("init_lora_weights is 'corda' but corda_config is not specified: using the default CordaConfig", stacklevel=3)
            object.__setattr__(self, "corda_config", CordaConfig())
        if self.init_lora_weights == "eva" and self.eva_config is None:  # as PEFT, with its warning
            warnings.warn("init_lora_weights is 'eva' but eva_config is not specified: using the default EvaConfig", stacklevel=3)
            object.__setattr__(self, "eva_config", EvaConfig())
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
        check_rank("r", self.r)
        check_alpha("lora_alpha", self.lora_alpha)
        check_bool_field("use_rslora", self.use_rslora)
        check_bool_field("fan_in_fan_out", self.fan_in_fan_out)
        check_bool_field("lora_bias", self.lora_bias)
        check_bool_field("use_dora", self.use_dora)
        if self.use_dora and self.lora_bias:
            raise ValueError("lora_bias=True is not supported with use_dora=True (nor in PEFT); set one of them to False")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)):
            raise TypeError(f"lora_dropout must be a float in [0, 1), got {self.lora_dropout!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in SUPPORTED_BIAS:
            raise ValueError(f"bias must be one of {SUPPORTED_BIAS}, got {self.bias!r}")
        init = self.init_lora_weights
        if not (init is True or init is False or init in ("gaussian", "eva") or (isinstance(init, str) and WEIGHT_INITS.fullmatch(init))):
            raise ValueError(
                f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<K>' (K an int >= 0), "
                f"'olora', 'orthogonal', 'loftq', 'corda' or 'eva', got {init!r} (PEFT's init 'lora_ga' is "
                "not supported)"
            )
        if init == "loftq" and not self.loftq_config:
            raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. LoftQConfig(loftq_bits=4) (as PEFT)")
        if self.loftq_config:
            sub_config("loftq_config", self.loftq_config, LoftQConfig)
        for name, cls in (("corda_config", CordaConfig), ("eva_config", EvaConfig)):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__} or None, got {getattr(self, name)!r}")
        check_target_parameters(self.target_parameters, self.target_modules)
        check_regex("target_modules", self.target_modules)
        check_regex("exclude_modules", self.exclude_modules)
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
                check = check_rank if name == "rank_pattern" else check_alpha
                check(f"{name}[{key!r}]", value)
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError(
                f"lora_bias=True needs init_lora_weights=True or False, got {self.init_lora_weights!r}"
            )
        self._validate_bookkeeping()
        for name, feature in UNIMPLEMENTED_FIELDS.items():
            if getattr(self, name) != _DEFAULTS[name]:
                raise UnsupportedFieldError(
                    f"{name}={getattr(self, name)!r} asks for {feature}, which fxlora does not support (not implemented yet); "
                    f"leave {name} at its default ({_DEFAULTS[name]!r})"
                )

    def _validate_bookkeeping(self) -> None:
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES} (PEFT's TaskType) or None, got {self.task_type!r}")
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type of a LoraConfig is 'LORA' (or None), got {self.peft_type!r}")
        for name in ("peft_version", "base_model_name_or_path", "revision", "megatron_core"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str or None, got {getattr(self, name)!r}")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            raise TypeError(f"auto_mapping must be a dict or None, got {self.auto_mapping!r}")
        check_bool_field("inference_mode", self.inference_mode)
        check_rank("qalora_group_size", self.qalora_group_size)

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

    @property
    def task_modules_to_save(self) -> tuple[str, ...]:
        """Modules the task type trains in full where the model has them (as PEFT's task models)."""
        return TASK_MODULES_TO_SAVE.get(self.task_type or "", ())

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
_DEFAULTS: dict[str, Any] = {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(LoraConfig)}


def field_status(name: str) -> str:
    """``"implemented"``, ``"bookkeeping"`` or ``"not implemented"`` for a field of `LoraConfig`."""
    if name not in _FIELD_NAMES:
        raise KeyError(f"LoraConfig has no field {name!r}")
    return "bookkeeping" if name in BOOKKEEPING_FIELDS else "not implemented" if name in UNIMPLEMENTED_FIELDS else "implemented"

#: the ``init_lora_weights`` strings that read the base weight (`fxlora.kinds.weight_inits`); all
#: but "orthogonal" change it
WEIGHT_INITS = re.compile(r"pissa|pissa_niter_\d+|olora|orthogonal|loftq|corda")


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
    if name == "target_modules" and isinstance(value, (list, tuple, set, frozenset)) and not value:
        return []  # no module targets: allowed with target_parameters (PEFT's way to ask for parameters only)
    if name in ("target_modules", "exclude_modules", "layers_pattern"):
        return normalise_names(name, value, allow_str=True)
    if name == "modules_to_save":
        return normalise_names(name, value, allow_str=False)
    if name == "init_lora_weights" and isinstance(value, str):
        return value.lower()
    if name == "loftq_config":
        return {} if value is None or value == {} else asdict(sub_config(name, value, LoftQConfig))
    if name in ("corda_config", "eva_config"):
        return sub_config(name, value, CordaConfig if name == "corda_config" else EvaConfig)
    if name in ("rank_pattern", "alpha_pattern") and value is None:
        return {}
    if name == "layers_to_transform" and isinstance(value, tuple):
        return list(value)
    if name == "target_parameters":  # PEFT: a list (a set after its MoE conversion), [] is off
        value = sorted(value) if isinstance(value, (set, frozenset)) else list(value) if isinstance(value, tuple) else value
        return None if value == [] else value
    if name in ("task_type", "peft_type"):  # PEFT's str enums, or None (a LoraConfig's peft_type is LORA)
        value = getattr(value, "value", value)
        return "LORA" if name == "peft_type" and value is None else value
    if name in UNIMPLEMENTED_FIELDS and _is_off(value):
        return copy.deepcopy(_DEFAULTS[name])
    return value


def _is_off(value: Any) -> bool:
    """A value that leaves a PEFT feature off: None, False, empty, or an options object (PEFT's
    ``LoraRuntimeConfig``) whose every option is off."""
    if value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and not value):
        return True
    options = value if isinstance(value, dict) else getattr(value, "__dict__", None)
    return type(value).__name__ in ("LoraRuntimeConfig", "dict") and bool(options) and all(v is False or v is None for v in options.values())
