"""A merge is exact or refused with a clear MergeError, the model unchanged.

- Layers whose weight is computed at each call (torch.nn.utils.parametrize weight_norm /
  spectral_norm, and their older hook-based versions): every merging operation is refused.
- Layers whose forward is not linear in the weight (subclasses with their own forward, not
  declared linear): refused; see tests/kinds/test_subclasses.py for timm's classes.
- lora_bias with every bias mode: merged output, merged file loaded into the unmodified class,
  merge_and_unload's state_dict, and adapter files saved while merged (read by fxlora and by peft)
  all give the unmerged output; loading an adapter over a tensor a merge changed is refused.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.utils import parametrizations, spectral_norm, weight_norm

import fxlora
from models import assert_same_state, state_snapshot
from fxlora import LoraConfig, LoraModel
from fxlora.errors import MergeError, UnsupportedTargetError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv1d(5, 4, 3, padding=1)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x).unsqueeze(-1).expand(-1, -1, 4)
        return self.out(self.conv(h).mean(-1))


def _perturb(lm) -> None:
    """Trained-looking adapters (and trained biases, where the bias mode trains them)."""
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)


# ---------------------------------------------------------------------- computed weights
NORMS = {
    "parametrize-weight_norm": (parametrizations.weight_norm, "_WeightNorm"),
    "parametrize-spectral_norm": (parametrizations.spectral_norm, "_SpectralNorm"),
    "hook-weight_norm": (weight_norm, "WeightNorm"),
    "hook-spectral_norm": (spectral_norm, "SpectralNorm"),
}
MERGES = {
    "merge_adapter": lambda lm, tmp: lm.merge_adapter(),
    "merge_adapter-safe": lambda lm, tmp: lm.merge_adapter(safe_merge=True),
    "merge_and_unload": lambda lm, tmp: lm.merge_and_unload(),
    "merged_state_dict": lambda lm, tmp: lm.merged_state_dict(),
    "save_merged": lambda lm, tmp: lm.save_merged(tmp / "merged.safetensors"),
}


@pytest.mark.parametrize("merge", list(MERGES), ids=list(MERGES))
@pytest.mark.parametrize("norm", list(NORMS), ids=list(NORMS))
@pytest.mark.parametrize("target", ["lin", "conv"])
def test_computed_weights_refuse_every_merge(norm, target, merge, tmp_path):
    make, hook_name = NORMS[norm]
    net = Net()
    make(getattr(net, target))
    net.eval()  # spectral_norm's power iteration would change the weights on every training call
    x = torch.randn(3, 6)
    lm = fxlora.transform(net, LoraConfig(target_modules=[target], init_lora_weights=False))
    lm.eval()
    expected = lm(x)
    before = state_snapshot(lm)
    with pytest.raises(MergeError) as info:
        MERGES[merge](lm, tmp_path)
    message = str(info.value)
    assert repr(target) in message and hook_name in message
    assert "keep this adapter unmerged" in message and "remove" in message
    assert_same_state(lm, before)
    assert lm.merged_adapters == []
    torch.testing.assert_close(lm(x), expected, rtol=0, atol=0)
    assert not (tmp_path / "merged.safetensors").exists()


def test_computed_bias_refuses_a_lora_bias_merge():
    """A parametrized bias cannot take a lora_bias either (the weight is a plain parameter)."""
    net = Net()
    torch.nn.utils.parametrize.register_parametrization(net.lin, "bias", nn.Identity())
    lm = fxlora.transform(net, LoraConfig(target_modules=["lin"], lora_bias=True, init_lora_weights=False))
    before = state_snapshot(lm)
    with pytest.raises(MergeError, match="its bias is not a tensor of its own"):
        lm.merge_adapter()
    assert_same_state(lm, before)


# ---------------------------------------------------------------------- forwards not linear in the weight
class DoubledLinear(nn.Linear):
    """Its own forward: twice the linear map, so a folded update would be doubled too."""

    def forward(self, x):
        return 2 * F.linear(x, self.weight, self.bias)


class ScaledEmbedding(nn.Embedding):
    """transformers' scaled word embeddings: the lookup times a constant."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class CroppedConvTranspose(nn.ConvTranspose1d):
    def forward(self, x):
        return super().forward(x)[..., 1:]


@pytest.mark.parametrize(
    "layer, x",
    [(DoubledLinear(6, 5), torch.randn(3, 6)), (ScaledEmbedding(10, 5), torch.randint(0, 10, (3, 4)))],
    ids=["linear-subclass", "embedding-subclass"],
)
def test_subclass_forward_refuses_merges(layer, x, tmp_path):
    net = nn.Sequential()
    net.add_module("layer", layer)
    lm = fxlora.transform(net, LoraConfig(target_modules=["layer"], init_lora_weights=False))
    _perturb(lm)
    expected = lm(x)
    before = state_snapshot(lm)
    for merge in MERGES.values():
        with pytest.raises(MergeError, match=f"{type(layer).__name__} computes its output with its own forward"):
            merge(lm, tmp_path)
        assert_same_state(lm, before)
    torch.testing.assert_close(lm(x), expected, rtol=0, atol=0)


def test_conv_transpose_subclass_with_its_own_forward_is_refused_at_transform():
    net = nn.Sequential()
    net.add_module("up", CroppedConvTranspose(4, 3, 3))
    before = state_snapshot(net)
    with pytest.raises(UnsupportedTargetError, match=r"'up' \(CroppedConvTranspose\).*its own forward"):
        fxlora.transform(net, LoraConfig(target_modules=["up"]))
    assert_same_state(net, before)
    assert type(net.up) is CroppedConvTranspose and "forward" not in vars(net.up)


# ---------------------------------------------------------------------- lora_bias x bias modes
BIAS_MODES = ["none", "lora_only", "all"]


def _adapted(bias: str, lora_bias: bool, trace: str = "auto"):
    torch.manual_seed(0)
    base = Net().eval()
    config = LoraConfig(target_modules=["lin", "conv"], init_lora_weights=False, bias=bias, lora_bias=lora_bias)
    lm = fxlora.transform(copy.deepcopy(base), config, trace=trace)
    _perturb(lm)
    lm.eval()
    return base, lm


@pytest.mark.parametrize("trace", ["auto", "eager"])
@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("bias", BIAS_MODES)
def test_merged_outputs_and_files_equal_the_unmerged_output(bias, lora_bias, trace, tmp_path):
    base, lm = _adapted(bias, lora_bias, trace)
    x = torch.randn(3, 6)
    expected = lm(x)

    lm.save_merged(tmp_path / "merged.safetensors")  # the unmodified class loads the merged file
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)

    lm.merge_adapter()
    torch.testing.assert_close(lm(x), expected, rtol=1e-5, atol=1e-5)
    lm.save_merged(tmp_path / "again.safetensors")  # exporting a merged model counts nothing twice
    fresh.load_state_dict(load_file(tmp_path / "again.safetensors"))
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)

    lm.save_pretrained(tmp_path / "adapter")  # an adapter saved while merged holds unmerged tensors
    reloaded = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-5)

    unloaded = lm.merge_and_unload()
    torch.testing.assert_close(unloaded(x), expected, rtol=1e-5, atol=1e-5)
    fresh.load_state_dict(unloaded.state_dict())
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_adapter_saved_while_merged_loads_in_peft(bias, tmp_path):
    peft = pytest.importorskip("peft")
    base, lm = _adapted(bias, lora_bias=True)
    x = torch.randn(3, 6)
    expected = lm(x)
    unmerged_file = tmp_path / "unmerged"
    lm.save_pretrained(unmerged_file)
    lm.merge_adapter()
    lm.save_pretrained(tmp_path / "merged")
    a = load_file(unmerged_file / "adapter_model.safetensors")
    b = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "merged")).eval()
    torch.testing.assert_close(pm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_loading_over_a_merged_bias_is_refused(bias, tmp_path):
    _, lm = _adapted(bias, lora_bias=True)
    lm.save_pretrained(tmp_path / "a")
    x = torch.randn(3, 6)
    lm.merge_adapter()
    expected = lm(x)
    before = state_snapshot(lm)
    with pytest.raises(MergeError, match=r"sets the base tensor '(lin|conv)\.bias'.*\['default'\].*unmerge_adapter\(\) first"):
        lm.load_adapter(tmp_path / "a", "other")
    assert "other" not in lm.peft_config
    assert_same_state(lm, before)
    torch.testing.assert_close(lm(x), expected, rtol=0, atol=0)
    lm.unmerge_adapter()
    lm.load_adapter(tmp_path / "a", "other")  # fine once unmerged
    assert "other" in lm.peft_config


def test_loading_a_bias_adapter_over_a_merge_without_lora_bias_is_allowed(tmp_path):
    """A merge without lora_bias leaves biases alone, so an adapter that sets them may load."""
    _, lm = _adapted("lora_only", lora_bias=False)
    lm.save_pretrained(tmp_path / "a")
    lm.merge_adapter()
    lm.load_adapter(tmp_path / "a", "other")
    assert "other" in lm.peft_config
