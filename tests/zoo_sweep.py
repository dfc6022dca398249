"""The graph-coverage sweep: 44 transformers model types, tiny, built from configs (no downloads).

`SWEEP` maps a ``config.model_type`` to how to build a tiny model of it and which targets are its
"default" ones: PEFT's table (``targets=None``) where it has the type, else the attention's query
and value projections. `sweep_inputs` builds a small real input for each (tokens, pixels, audio
features, or both). `benchmarks/graph_share.py` prints the graph share of every entry; the tests
check a few entries' outputs against peft.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 96
_TEXT = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
)
_VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
    num_channels=3,
)


@dataclass(frozen=True)
class SweepModel:
    model: str  # transformers model class name
    kwargs: dict  # config keyword arguments (the model's config class: CONFIG_MAPPING[model_type])
    targets: Optional[list[str]] = None  # None: PEFT's default targets for the type
    common: dict = field(default_factory=lambda: _TEXT)
    #: with "all-linear": layers no LoRA fits (a router returning a tuple, nn.MultiheadAttention's out_proj)
    exclude: tuple[str, ...] = ()

    def build(self, model_type: str, seed: int = 0) -> nn.Module:
        import transformers
        from transformers import CONFIG_MAPPING

        torch.manual_seed(seed)
        config = CONFIG_MAPPING[model_type](**{**self.common, **self.kwargs})
        return getattr(transformers, self.model)(config).eval()


def _text(model: str, targets: Optional[list[str]] = None, **kwargs: Any) -> SweepModel:
    return SweepModel(model, kwargs, targets)


def _plain(model: str, targets: Optional[list[str]] = None, **kwargs: Any) -> SweepModel:
    return SweepModel(model, kwargs, targets, common={})


_QV = ["q_proj", "v_proj"]
_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
_BART = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=2,
)
_LLAMA_TEXT = dict(_TEXT, model_type="llama")

SWEEP: dict[str, SweepModel] = {
    # decoders
    "llama": _text("LlamaForCausalLM"),
    "mistral": _text("MistralForCausalLM"),
    "mixtral": _text("MixtralForCausalLM", num_local_experts=2, num_experts_per_tok=1),
    "qwen2": _text("Qwen2ForCausalLM"),
    "qwen3": _text("Qwen3ForCausalLM", head_dim=8),
    "gemma": _text("GemmaForCausalLM", head_dim=8),
    "gemma2": _text("Gemma2ForCausalLM", head_dim=8),
    "gemma3_text": _text("Gemma3ForCausalLM", head_dim=8, sliding_window=4),
    "phi": _text("PhiForCausalLM"),
    "phi3": _text("Phi3ForCausalLM", ["qkv_proj"]),
    "stablelm": _text("StableLmForCausalLM"),
    "olmo": _text("OlmoForCausalLM", _QV),
    "starcoder2": _text("Starcoder2ForCausalLM", _QV),
    "gpt2": _plain("GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "gpt_bigcode": _plain(
        "GPTBigCodeForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
    ),
    "gpt_neo": _plain(
        "GPTNeoForCausalLM", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
        attention_types=[[["global", "local"], 1]], window_size=4, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    ),
    "gptj": _plain("GPTJForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
    "codegen": _plain("CodeGenForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
    "gpt_neox": _text("GPTNeoXForCausalLM"),
    "bloom": _plain("BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    "falcon": _text("FalconForCausalLM", num_kv_heads=4, new_decoder_architecture=False),
    "opt": _text("OPTForCausalLM", ffn_dim=64, word_embed_proj_dim=32),
    "mpt": _plain("MptForCausalLM", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
    "rwkv": _plain(
        "RwkvForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
        intermediate_size=64, context_length=64,
    ),
    "llama4_text": SweepModel(
        "Llama4ForCausalLM", dict(head_dim=8, num_local_experts=2, intermediate_size_mlp=64), _QV, exclude=("router",)
    ),
    # encoders
    "bert": _text("BertForSequenceClassification", pad_token_id=0),
    "roberta": _text("RobertaForSequenceClassification"),
    "xlm-roberta": _text("XLMRobertaForSequenceClassification"),
    "electra": _text("ElectraForSequenceClassification", embedding_size=32),
    "layoutlm": _text("LayoutLMForSequenceClassification", pad_token_id=0),
    "deberta": _text("DebertaForSequenceClassification", pad_token_id=0),
    "deberta-v2": _text("DebertaV2ForSequenceClassification", pad_token_id=0),
    "distilbert": _plain(
        "DistilBertForSequenceClassification", ["q_lin", "v_lin"], vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4,
        hidden_dim=64, max_position_embeddings=64, pad_token_id=0,
    ),
    # encoder-decoders
    "t5": _plain("T5ForConditionalGeneration", vocab_size=VOCAB, **_T5),
    "mt5": _plain("MT5ForConditionalGeneration", vocab_size=VOCAB, **_T5),
    "bart": _text("BartForConditionalGeneration", **_BART),
    "mbart": _text("MBartForConditionalGeneration", _QV, **_BART),
    "whisper": _text(
        "WhisperForConditionalGeneration", _QV, **_BART, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, suppress_tokens=[], begin_suppress_tokens=[],
    ),
    # vision and multimodal
    "vit": SweepModel("ViTForImageClassification", dict(num_labels=3), _QV, common=_VISION),
    "clip": _plain("CLIPModel", _QV, text_config=dict(_TEXT, eos_token_id=2), vision_config=_VISION, projection_dim=16),
    "siglip": SweepModel(
        "SiglipModel", dict(text_config=dict(_TEXT), vision_config=_VISION), _QV, common={}, exclude=("out_proj",)
    ),
    "llava": _plain(
        "LlavaForConditionalGeneration", _QV, text_config=_LLAMA_TEXT, vision_config=dict(_VISION, model_type="clip_vision_model"),
        image_token_index=VOCAB - 1, projector_hidden_act="gelu", vision_feature_layer=-1,
    ),
    "blip-2": _plain(
        "Blip2ForConditionalGeneration", None, vision_config=_VISION, text_config=dict(_TEXT, model_type="opt", ffn_dim=64, word_embed_proj_dim=32),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32, vocab_size=VOCAB),
        num_query_tokens=4, image_token_index=VOCAB - 1,
    ),
    "llama4": SweepModel(
        "Llama4ForConditionalGeneration",
        dict(
            text_config=dict(_TEXT, head_dim=8, num_local_experts=2, intermediate_size_mlp=64),
            vision_config=dict(
                _VISION, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, intermediate_size=128,
                pixel_shuffle_ratio=0.5, projector_dropout=0.0, rope_theta=10000,
            ),
            image_token_index=VOCAB - 1,
        ),
        common={}, exclude=("router",),
    ),
}


def build(model_type: str, seed: int = 0) -> nn.Module:
    return SWEEP[model_type].build(model_type, seed)


def sweep_inputs(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch of two for `model`: tokens (3..VOCAB-2), pixels or audio features where its config
    describes them, ``decoder_input_ids`` for encoder-decoders; image tokens for llava-like models."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    inputs: dict[str, torch.Tensor] = {}
    vision = getattr(config, "vision_config", None) or (config if hasattr(config, "image_size") else None)
    if vision is not None:
        size = vision.image_size
        inputs["pixel_values"] = torch.randn(2, getattr(vision, "num_channels", 3), size, size, generator=g)
    if hasattr(config, "num_mel_bins"):
        inputs["input_features"] = torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions, generator=g)
    if getattr(model, "main_input_name", "") == "input_ids" or hasattr(config, "text_config"):
        ids = torch.randint(3, VOCAB - 1, (2, 6), generator=g)
        image = getattr(config, "image_token_index", getattr(config, "image_token_id", None))
        if image is not None and vision is not None:
            count = image_tokens(model)
            ids = torch.cat([torch.full((2, count), image), ids], dim=1)
        inputs["input_ids"] = ids
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB - 1, (2, 4), generator=g)
    return inputs


def image_tokens(model: nn.Module) -> int:
    """How many image placeholder tokens one image takes in `model`'s text."""
    config = model.config
    if hasattr(config, "num_query_tokens"):
        return config.num_query_tokens
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    ratio = getattr(vision, "pixel_shuffle_ratio", None)
    return int(patches * ratio * ratio) if ratio else patches
