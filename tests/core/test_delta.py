"""fxlora.core.delta: per-layer-type updates. The reference is the base layer's own functional op run on
``weight + delta`` (and ``bias + B.bias * scaling``), compared with the adapted layer's output."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxlora.dtypes import compute_dtype
import fxlora
from fxlora.errors import MergeError
from fxlora.core.delta import check_mergeable, delta_bias, delta_weight

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


class One(nn.Module):
    """A model made of one layer (so the layer is the only target)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def adapted(layer, **config):
    model = fxlora.transform(One(layer), fxlora.LoraConfig(target_modules=["layer"], init_lora_weights=False, **config))
    return model.eval(), model.model.layer


def as_merged(layer, delta, bias_delta=None):
    """The layer's own functional op with weight + delta (bias + bias_delta)."""
    weight = layer.weight + delta
    bias = getattr(layer, "bias", None)
    bias = bias if bias_delta is None else bias + bias_delta
    if isinstance(layer, nn.Linear):
        return lambda x: F.linear(x, weight, bias)
    if isinstance(layer, Conv1D):
        return lambda x: torch.addmm(bias, x.view(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)
    if isinstance(layer, nn.Embedding):
        return lambda ids: F.embedding(ids, weight, layer.padding_idx)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[layer.weight.dim() - 2]

    def run(x):
        if layer.padding_mode != "zeros":
            pad = [p for p in reversed(layer.padding) for _ in range(2)]
            return conv(F.pad(x, pad, mode=layer.padding_mode), weight, bias, layer.stride, 0, layer.dilation, layer.groups)
        return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    return run


LAYERS = [
    ("linear", lambda: nn.Linear(7, 5), lambda: torch.randn(3, 7)),
    ("conv1d-k3-stride2", lambda: nn.Conv1d(3, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 15)),
    ("conv1d-k1", lambda: nn.Conv1d(3, 6, 1), lambda: torch.randn(2, 3, 9)),
    ("conv2d-k3", lambda: nn.Conv2d(3, 5, 3, padding=1), lambda: torch.randn(2, 3, 9, 9)),
    ("conv2d-dilated", lambda: nn.Conv2d(3, 5, 3, padding=2, dilation=2), lambda: torch.randn(2, 3, 9, 9)),
    ("conv2d-reflect", lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), lambda: torch.randn(2, 3, 8, 8)),
    ("conv2d-circular-k(1,3)", lambda: nn.Conv2d(3, 5, (1, 3), padding=(0, 1), padding_mode="circular"), lambda: torch.randn(2, 3, 6, 7)),
    ("conv3d-k1", lambda: nn.Conv3d(2, 4, 1), lambda: torch.randn(2, 2, 3, 4, 5)),
    ("conv3d-k(1,1,3)", lambda: nn.Conv3d(2, 4, (1, 1, 3), padding=(0, 0, 1)), lambda: torch.randn(2, 2, 3, 4, 5)),
    ("conv3d-k3-replicate", lambda: nn.Conv3d(2, 4, 3, padding=1, padding_mode="replicate"), lambda: torch.randn(1, 2, 4, 4, 4)),
    ("hf-conv1d", lambda: Conv1D(5, 7), lambda: torch.randn(2, 3, 7)),
    ("embedding", lambda: nn.Embedding(11, 6, padding_idx=0), lambda: torch.randint(0, 11, (3, 4))),
]


@pytest.mark.parametrize("name, make, make_input", LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize("config", [{}, {"r": 3, "lora_alpha": 5, "use_rslora": True}, {"lora_bias": True}], ids=["plain", "rslora", "lora_bias"])
def test_delta_reproduces_the_adapted_layer(name, make, make_input, config):
    if name == "embedding" and config.get("lora_bias"):
        pytest.skip("embeddings have no lora_bias")
    model, layer = adapted(make(), **config)
    x = make_input()
    scale = 0.7
    model.set_adapter_scale("default", scale)
    d_w = delta_weight(layer, "default", scale)
    d_b = delta_bias(layer, "default", scale)
    assert d_w.shape == layer.weight.shape and d_w.dtype == torch.float32
    assert (d_b is not None) == bool(config.get("lora_bias"))
    with torch.no_grad():
        torch.testing.assert_close(as_merged(layer, d_w, d_b)(x), model(x), rtol=1e-5, atol=1e-5)
        assert d_w.abs().max() > 0  # a real update, not the identity


def test_hf_conv1d_delta_is_transposed():
    _, layer = adapted(Conv1D(5, 7))  # weight (in=7, out=5)
    product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # (out, in)
    torch.testing.assert_close(delta_weight(layer, "default"), product.T * layer._fxlora.adapters["default"].scaling)


def test_scaling_follows_rank_and_alpha():
    _, plain = adapted(nn.Linear(6, 6), r=4, lora_alpha=8)
    _, rs = adapted(nn.Linear(6, 6), r=4, lora_alpha=8, use_rslora=True)
    for layer, scaling in ((plain, 2.0), (rs, 4.0)):
        product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(delta_weight(layer, "default"), product * scaling)
        torch.testing.assert_close(delta_weight(layer, "default", 0.5), product * scaling * 0.5)


def test_half_precision_layers_get_float32_deltas_and_float64_stays_wide():
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)):
        _, layer = adapted(nn.Linear(6, 4).to(dtype))
        assert delta_weight(layer, "default").dtype == expected
        assert compute_dtype(layer.weight) == expected


@pytest.mark.parametrize(
    "layer, config, words",
    [
        (nn.Conv2d(4, 4, 3, groups=2), {"r": 2}, ["grouped convolution", "groups=2"]),
        (nn.Embedding(10, 4, max_norm=1.0), {}, ["max_norm=1.0"]),
        (nn.Linear(4, 4, bias=False), {"lora_bias": True}, ["lora_bias=True", "has none"]),
    ],
    ids=["grouped-conv", "embedding-max_norm", "lora_bias-without-bias"],
)
def test_unmergeable_layers_are_named_with_the_reason(layer, config, words):
    _, layer = adapted(layer, **config)
    with pytest.raises(MergeError) as info:
        check_mergeable("blocks.3.layer", layer, "default")
    message = str(info.value)
    assert "'blocks.3.layer'" in message and "'default'" in message
    for word in words:
        assert word in message


def test_mergeable_layers_pass_the_check():
    for layer in (nn.Linear(4, 4), nn.Conv2d(4, 4, 3), nn.Embedding(10, 4), Conv1D(4, 4)):
        _, layer = adapted(layer, lora_bias=not isinstance(layer, nn.Embedding))
        assert check_mergeable("layer", layer, "default") is None
