"""Tiny diffusers models built from configs (no downloads) for the graph-coverage table and tests.

`DIFFUSERS` maps a name to a builder; `diffusers_inputs` gives a small real input for each;
`SD_TARGETS` are the attention projections Stable Diffusion LoRAs adapt.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

SD_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )


def _vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=32,
    )


def _dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=32,
    )


def _sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
    )


def _flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def seeded(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build().eval()

    return seeded


DIFFUSERS: dict[str, Callable[..., nn.Module]] = {
    "unet": _seeded(_unet), "vae": _seeded(_vae), "dit": _seeded(_dit), "sd3": _seeded(_sd3), "flux": _seeded(_flux),
}


def diffusers_inputs(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch of two for model `name` of `DIFFUSERS`."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    step = torch.tensor([3, 7])
    return {
        "unet": lambda: dict(sample=randn(2, 4, 16, 16), timestep=step, encoder_hidden_states=randn(2, 3, 32)),
        "vae": lambda: dict(sample=randn(2, 3, 32, 32)),
        "dit": lambda: dict(hidden_states=randn(2, 4, 8, 8), timestep=step, class_labels=torch.tensor([1, 2])),
        "sd3": lambda: dict(hidden_states=randn(2, 4, 8, 8), encoder_hidden_states=randn(2, 3, 16), pooled_projections=randn(2, 8), timestep=step),
        "flux": lambda: dict(
            hidden_states=randn(2, 16, 8), encoder_hidden_states=randn(2, 3, 16), pooled_projections=randn(2, 8),
            timestep=step.float() / 10, img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(3, 3),
        ),
    }[name]()
