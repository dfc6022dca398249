"""Tiny transformers 5 MoE models (fused experts), built from configs, seeded: Mixtral and Qwen3-MoE."""

from __future__ import annotations

import torch
import torch.nn as nn


def mixtral(layers: int = 2, **config) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=100, **config,
    )
    return transformers.MixtralForCausalLM(config).eval()


def qwen3_moe(layers: int = 2, **config) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=100, head_dim=8, **config,
    )
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():  # transformers starts Qwen3-MoE's router at zero: every expert would tie
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(std=0.5)
    return model


MODELS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe}
