"""diffusers: probe inputs built from a model's config, so its attention is traced for the way it
is really called.

A diffusers ``Attention`` is called with ``encoder_hidden_states`` (cross-attention), a
``temb``, image rotary embeddings and 4-D feature maps (the VAE's mid-block); planned for its
plainest call (``hidden_states`` alone) its code takes the wrong branches or reads the missing
arguments. `example_inputs` gives `fxlora.tracing.probe` one tiny call of each model class below,
at the smallest size its down-sampling allows, so every block's real call pattern is observed
and traced ahead. A model whose config does not fit (or that rejects the input) gets no
observation, as before.

``apply_rotary_emb`` unpacks ``x.reshape(*x.shape[:-1], -1, 2).unbind(-1)`` (a length that the
ranks cannot tell): while tracing, every diffusers module's name for it is an opaque leaf (one
node calling the very same function; its result has the rank of its input), `rotary_leaf`.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from fxlora.tracing.integrations import TraceHooks, opaque
from fxlora.tracing.proxies import info_of

__all__ = ["trace_hooks", "example_inputs"]


def _device_dtype(model: nn.Module) -> dict[str, Any]:
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return {"device": first.device if first is not None else torch.device("cpu"), "dtype": first.dtype if first is not None else torch.float32}


def _get(config: Any, name: str, default: Any = None) -> Any:
    return getattr(config, name, default) if not isinstance(config, dict) else config.get(name, default)


def _unet(config: Any, t: dict) -> dict[str, Any]:
    size = 2 ** len(_get(config, "block_out_channels"))  # two pixels per group-norm group at the bottom
    cross = _get(config, "cross_attention_dim")
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    return dict(
        sample=torch.zeros(1, _get(config, "in_channels"), size, size, **t),
        timestep=torch.tensor([1], device=t["device"]),
        encoder_hidden_states=torch.zeros(1, 2, cross, **t),
    )


def _autoencoder(config: Any, t: dict) -> dict[str, Any]:
    size = 2 ** len(_get(config, "block_out_channels"))
    return dict(sample=torch.zeros(1, _get(config, "in_channels"), size, size, **t))


def _dit(config: Any, t: dict) -> dict[str, Any]:
    size = _get(config, "sample_size")
    return dict(
        hidden_states=torch.zeros(1, _get(config, "in_channels"), size, size, **t),
        timestep=torch.tensor([1], device=t["device"]),
        class_labels=torch.tensor([0], device=t["device"]),
    )


def _sd3(config: Any, t: dict) -> dict[str, Any]:
    size = 2 * _get(config, "patch_size")
    return dict(
        hidden_states=torch.zeros(1, _get(config, "in_channels"), size, size, **t),
        encoder_hidden_states=torch.zeros(1, 2, _get(config, "joint_attention_dim"), **t),
        pooled_projections=torch.zeros(1, _get(config, "pooled_projection_dim"), **t),
        timestep=torch.tensor([1], device=t["device"]),
    )


def _flux(config: Any, t: dict) -> dict[str, Any]:
    inputs = dict(
        hidden_states=torch.zeros(1, 4, _get(config, "in_channels"), **t),
        encoder_hidden_states=torch.zeros(1, 2, _get(config, "joint_attention_dim"), **t),
        pooled_projections=torch.zeros(1, _get(config, "pooled_projection_dim"), **t),
        timestep=torch.ones(1, **t),
        img_ids=torch.zeros(4, 3, **t),
        txt_ids=torch.zeros(2, 3, **t),
    )
    if _get(config, "guidance_embeds", False):
        inputs["guidance"] = torch.ones(1, **t)
    return inputs


#: model class name -> config -> keyword inputs
BUILDERS: dict[str, Callable[[Any, dict], dict[str, Any]]] = {
    "UNet2DConditionModel": _unet,
    "AutoencoderKL": _autoencoder,
    "DiTTransformer2DModel": _dit,
    "SD3Transformer2DModel": _sd3,
    "FluxTransformer2DModel": _flux,
}


def example_inputs(model: nn.Module) -> list[tuple[tuple, dict[str, Any]]]:
    """One tiny call of a diffusers model of a class in `BUILDERS`; none for other models."""
    build = BUILDERS.get(type(model).__name__)
    config = getattr(model, "config", None)
    if build is None or config is None or not type(model).__module__.startswith("diffusers."):
        return []
    return [((), build(config, _device_dtype(model)))]


def _same_rank(args: tuple, kwargs: dict) -> Any:
    return info_of(args[0] if args else kwargs.get("x"))


@contextlib.contextmanager
def rotary_leaf() -> Iterator[None]:
    """While active, diffusers' ``apply_rotary_emb`` is an opaque leaf wherever it was imported."""
    from diffusers.models import embeddings

    original = embeddings.apply_rotary_emb
    leaf = opaque(original, _same_rank)
    shadowed = [
        module.__dict__
        for name, module in list(sys.modules.items())
        if name.startswith("diffusers.") and module is not None and module.__dict__.get("apply_rotary_emb") is original
    ]
    try:
        for namespace in shadowed:
            namespace["apply_rotary_emb"] = leaf
        yield
    finally:
        for namespace in shadowed:
            namespace["apply_rotary_emb"] = original


def trace_hooks() -> TraceHooks:
    return TraceHooks(patches=(rotary_leaf,), example_inputs=example_inputs)
