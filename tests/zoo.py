"""Tiny real-world models for tests: transformers architectures and timm models, built from configs.

Everything is built locally (no downloads, ``pretrained=False``) and kept tiny (hidden size 32,
two layers, a 96-token vocabulary; images of 32-64 pixels) so the whole matrix stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 96


@dataclass(frozen=True)
class TinyTransformer:
    config: str  # transformers config class name
    model: str  # transformers model class name
    kwargs: dict
    kind: str  # "decoder" | "encoder" | "seq2seq"

    def build(self, seed: int = 0, **overrides: Any) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        config = getattr(transformers, self.config)(**{**self.kwargs, **overrides})
        return getattr(transformers, self.model)(config).eval()


def _common(**kw: Any) -> dict:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )
    base.update(kw)
    return base


TRANSFORMERS: dict[str, TinyTransformer] = {
    "llama": TinyTransformer("LlamaConfig", "LlamaForCausalLM", _common(num_key_value_heads=2), "decoder"),
    "mistral": TinyTransformer("MistralConfig", "MistralForCausalLM", _common(num_key_value_heads=2), "decoder"),
    "qwen2": TinyTransformer("Qwen2Config", "Qwen2ForCausalLM", _common(num_key_value_heads=2), "decoder"),
    "gemma": TinyTransformer("GemmaConfig", "GemmaForCausalLM", _common(num_key_value_heads=2, head_dim=8), "decoder"),
    "phi": TinyTransformer("PhiConfig", "PhiForCausalLM", _common(), "decoder"),
    "gpt2": TinyTransformer(
        "GPT2Config", "GPT2LMHeadModel",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0), "decoder",
    ),
    "gpt_neox": TinyTransformer("GPTNeoXConfig", "GPTNeoXForCausalLM", _common(), "decoder"),
    "opt": TinyTransformer(
        "OPTConfig", "OPTForCausalLM",
        dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
             max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        "decoder",
    ),
    "bert": TinyTransformer("BertConfig", "BertForSequenceClassification", _common(pad_token_id=0), "encoder"),
    "roberta": TinyTransformer("RobertaConfig", "RobertaForSequenceClassification", _common(pad_token_id=1), "encoder"),
    "t5": TinyTransformer(
        "T5Config", "T5ForConditionalGeneration",
        dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
             pad_token_id=0, eos_token_id=1),
        "seq2seq",
    ),
    "bart": TinyTransformer(
        "BartConfig", "BartForConditionalGeneration",
        dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
        "seq2seq",
    ),
}


def text_inputs(model: nn.Module, batch: int = 2, length: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """``input_ids`` (tokens 3..VOCAB-1, no special tokens), a left-padding attention mask, and
    ``decoder_input_ids`` for encoder-decoders."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
    return inputs


def main_output(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


# ---------------------------------------------------------------------- timm
def _poolformer() -> nn.Module:
    from timm.layers import GroupNorm1
    from timm.models.metaformer import MetaFormer

    # poolformer_s12's definition with one block per stage and narrow stages
    return MetaFormer(
        depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True,
        norm_layers=GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None, use_mlp_head=False,
        num_classes=3,
    )


def _mobilenetv3() -> nn.Module:
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.mobilenetv3 import MobileNetV3

    arch = [["ds_r1_k3_s2_e1_c8_se0.25_nre"], ["ir_r1_k3_s2_e4_c16_nre"], ["ir_r1_k5_s2_e4_c24_se0.25"], ["cn_r1_k1_s1_c48"]]
    return MobileNetV3(decode_arch_def(arch), num_classes=3, stem_size=8, num_features=64)


def _regnet() -> nn.Module:
    from timm.models.regnet import RegNet, RegNetCfg

    return RegNet(RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=8, bottle_ratio=1.0, stem_width=8), num_classes=3)


def _create(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)

    return build


#: name -> (builder, image size)
TIMM: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet": (_create("test_resnet"), 32),
    "vit": (_create("test_vit"), 32),
    "deit": (_create("deit_tiny_distilled_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2), 32),
    "convnext": (_create("test_convnext"), 32),
    "efficientnet": (_create("test_efficientnet"), 32),
    "mobilenetv3": (_mobilenetv3, 32),
    "regnet": (_regnet, 32),
    "swin": (_create("swin_tiny_patch4_window7_224", img_size=56, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=7), 56),
    "poolformer": (_poolformer, 32),
    "levit": (_create("levit_conv_128s", img_size=32, depth=(1, 1, 1), embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4)), 32),
    "coatnet": (_create("test_coatnet", img_size=64), 64),
    "maxvit": (_create("test_maxvit", img_size=64), 64),
    "eva02": (_create("eva02_tiny_patch14_224", img_size=28, depth=2, embed_dim=32, num_heads=2, qkv_fused=False), 28),
}


def tiny_timm(name: str, seed: int = 0) -> tuple[nn.Module, int]:
    builder, size = TIMM[name]
    torch.manual_seed(seed)
    return builder().eval(), size


def linear_targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def conv_targets(model: nn.Module) -> list[str]:
    """Convolutions a rank-8 adapter fits (grouped, e.g. depthwise, ones need a rank divisible by
    their groups)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
