"""Probe inputs for transformers models, built from the model's config: tokens, pixels, audio
features, or tokens with image placeholders for multimodal models.

`example_inputs` gives `fxlora.tracing.probe` small forward passes that reach every tower a
model has: a text model gets four tokens (plain and with the first one padded out, each with and
without the KV cache); a vision model one image at its config's resolution; a speech model
(Whisper) one clip of log-mel features; a model with both (CLIP, SigLIP, LLaVA, BLIP-2, Llama 4)
tokens and one image, with as many image placeholder tokens as its image takes; an
encoder-decoder also ``decoder_input_ids``. An example the model rejects adds nothing (the probe
skips it), so a config read wrongly never changes a result, only what is traced ahead.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from fxlora.boundary import execution_device
from fxlora.kinds.hf_classes import is_pretrained_model

__all__ = ["example_inputs", "image_token_count"]


def _input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: accelerate's execution device when it offloads the model
    (whose weights then wait on the meta device), else its first parameter's (meta for a model
    built on the meta device: the probe then runs on meta too)."""
    offloaded = next((d for d in map(execution_device, model.modules()) if d is not None), None)
    if offloaded is not None:
        return offloaded
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _vocab(config: Any) -> Optional[int]:
    return getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)


def _vision_config(config: Any) -> Optional[Any]:
    vision = getattr(config, "vision_config", None)
    if vision is None and isinstance(getattr(config, "image_size", None), (int, tuple, list)):
        vision = config
    return vision


def _pixels(model: nn.Module, vision: Any, device: torch.device) -> Optional[torch.Tensor]:
    size = getattr(vision, "image_size", None)
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    channels = getattr(vision, "num_channels", 3)
    return torch.zeros(1, channels, height, width, device=device, dtype=_float_dtype(model))


def image_token_count(config: Any) -> Optional[int]:
    """How many placeholder tokens one image takes in a multimodal model's text, from its config
    (None when the config does not say)."""
    for name in ("num_query_tokens", "mm_tokens_per_image"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    vision = getattr(config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not isinstance(size, int) or not isinstance(patch, int) or patch <= 0:
        stated = getattr(config, "image_seq_length", None)
        return stated if isinstance(stated, int) else None
    patches = (size // patch) ** 2
    ratio = getattr(vision, "pixel_shuffle_ratio", None)
    if ratio:
        return int(patches * ratio * ratio)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    return patches if strategy == "default" else patches + 1


def _image_token(config: Any) -> Optional[int]:
    for name in ("image_token_index", "image_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _text_examples(config: Any, vocab: int, device: torch.device, prefix: Optional[torch.Tensor]) -> list[dict[str, Any]]:
    ids = torch.tensor([[3, 4, 5, 6]], device=device) % vocab
    if prefix is not None:
        ids = torch.cat([prefix, ids], dim=1)
    mask = torch.ones_like(ids)
    mask[:, 0] = 0
    plain: dict[str, Any] = {"input_ids": ids}
    examples = [plain, {"input_ids": ids, "attention_mask": mask}]
    if getattr(config, "use_cache", None) is not None:  # without the KV cache: checkpointed training, export, ...
        examples += [{**e, "use_cache": False} for e in list(examples)]
    return examples


def example_inputs(model: nn.Module) -> list[tuple[tuple, dict[str, Any]]]:
    """Small inputs for a transformers model (see the module docstring); none for other models,
    nor for a transformers model whose config names no input fxlora knows how to build."""
    if not is_pretrained_model(model):
        return []
    config, main = model.config, getattr(model, "main_input_name", None)
    device = _input_device(model)
    vision = _vision_config(config)
    pixels = _pixels(model, vision, device) if vision is not None else None
    vocab = _vocab(config)
    takes_text = main == "input_ids" or (vocab is not None and getattr(config, "text_config", None) is not None)
    examples: list[dict[str, Any]] = []
    if takes_text and vocab and vocab >= 8:
        prefix = None
        token, count = _image_token(config), image_token_count(config)
        if pixels is not None and token is not None and count:
            prefix = torch.full((1, count), token, device=device)
        examples = _text_examples(config, vocab, device, prefix)
        if pixels is not None:
            examples = [{**e, "pixel_values": pixels} for e in examples]
    elif main == "pixel_values" and pixels is not None:
        examples = [{"pixel_values": pixels}]
    elif main == "input_features" and isinstance(getattr(config, "num_mel_bins", None), int):
        frames = 2 * getattr(config, "max_source_positions", 1500)
        examples = [{"input_features": torch.zeros(1, config.num_mel_bins, frames, device=device, dtype=_float_dtype(model))}]
    if getattr(config, "is_encoder_decoder", False) and vocab:
        for inputs in examples:
            inputs["decoder_input_ids"] = torch.tensor([[3, 4]], device=device) % vocab
    return [((), inputs) for inputs in examples]
