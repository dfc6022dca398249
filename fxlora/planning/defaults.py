"""Default `target_modules` per transformers ``config.model_type`` (PEFT's table).

Used when ``LoraConfig.target_modules`` is None. Any other model needs explicit targets.
"""

from __future__ import annotations

from collections import Counter

import torch.nn as nn

from fxlora.kinds.hf_classes import is_pretrained_model
from fxlora.kinds import is_all_linear

__all__ = ["DEFAULT_TARGET_MODULES", "default_target_modules", "suggest_projection_names"]

_QV = ["q_proj", "v_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    **{
        t: _QV
        for t in (
            "bart", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral", "stablelm",
            "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
        )
    },
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    **{t: ["query_key_value"] for t in ("bloom", "gpt_neox", "chatglm", "RefinedWebModel", "RefinedWeb", "falcon")},
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    **{t: ["query", "value"] for t in ("bert", "roberta", "xlm-roberta", "electra", "layoutlm")},
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "mpt": ["Wqkv"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
}


def suggest_projection_names(model: nn.Module, limit: int = 10) -> list[str]:
    """`target_modules` entries for the model's linear layers, most frequent first: the last
    component of each name (the likely attention / MLP projections), or the full name where the
    last component is a bare index (``seq.0``: an index alone would match every container's)."""
    counts = Counter(
        last if not last.isdigit() else name
        for name, m in model.named_modules()
        if name and is_all_linear(m)
        for last in [name.rsplit(".", 1)[-1]]
    )
    return [n for n, _ in counts.most_common(limit)]


def _candidates(model: nn.Module) -> str:
    found = suggest_projection_names(model)
    if not found:
        return "(none: the model has no nn.Linear or transformers Conv1D; name its layers in target_modules)"
    return f"{found} (or target_modules='all-linear')"


def default_target_modules(model: nn.Module) -> list[str] | str:
    """PEFT's default targets for a transformers model; a clear error for anything else."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not is_pretrained_model(model) or model_type is None:
        raise ValueError(
            f"target_modules=None only works for transformers models with a known config.model_type; "
            f"{type(model).__name__} needs explicit target_modules (a list of names or a regex). "
            f"Likely candidates: {_candidates(model)}. Use fxlora.explain(model, config) "
            "to see what a config selects."
        )
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"fxlora has no default target_modules for model_type {model_type!r}; pass target_modules "
            f"explicitly. Likely attention/MLP projections of this model: {_candidates(model)}"
        )
    value = DEFAULT_TARGET_MODULES[model_type]
    return list(value) if isinstance(value, list) else value
