"""DoRA (``use_dora=True``) against PEFT 0.21.2: same tensors give the same outputs, gradients,
merges and files, for Linear, Conv and Embedding; under torch.compile with no graph break; and
the refusals where fxlora cannot be exact."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter

import fxlora
from fxlora import LoraConfig
from fxlora.errors import MergeError, UnsupportedTargetError, VariantError
from models import row_by_row

peft = pytest.importorskip("peft")
from models import ConvNet2d, EmbeddingModel, copy_peft_adapter_weights  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


CASES = {
    "linear": (mlp, ["0", "2"], lambda: torch.randn(4, 5)),
    "conv": (ConvNet2d, ["conv1", "conv3", "head"], lambda: torch.randn(2, 3, 8, 8)),
    "embedding": (EmbeddingModel, ["emb", "proj"], lambda: torch.randint(0, 50, (3, 6))),
}


def pair(case: str, seed: int = 0, **options):
    """(peft model, fxlora model) of the same base with the same (non-trivial) adapter tensors:
    random B, magnitudes off their initial norms."""
    make, targets, make_input = CASES[case]
    torch.manual_seed(seed)
    base = make()
    settings = dict(target_modules=targets, r=2, lora_alpha=4, use_dora=True, **options)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(**settings))
    copy_peft_adapter_weights(theirs, ours.model)
    torch.manual_seed(seed + 1)
    return theirs, ours, make_input()


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_same_outputs_and_initial_magnitude(case):
    theirs, ours, x = pair(case)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # a fresh DoRA adapter starts at the base model: m = ||W + s B A|| (B = 0: ||W||)
    make, targets, make_input = CASES[case]
    torch.manual_seed(3)
    base = make().eval()
    fresh = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=targets, r=2, use_dora=True)).eval()
    torch.testing.assert_close(fresh(x), base(x), rtol=1e-5, atol=1e-6)
    names = {n for n, _ in fresh.named_parameters() if "lora_magnitude_vector" in n}
    assert names and all(n.endswith(".lora_magnitude_vector.default.weight") for n in names)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("trace", ["auto", "eager"])
def test_training_step_gradients_equal_peft(case, trace):
    theirs, ours, x = pair(case)
    if trace == "eager":
        make, targets, _ = CASES[case]
        ours = fxlora.transform(make(), LoraConfig(target_modules=targets, r=2, lora_alpha=4, use_dora=True), trace="eager")
        copy_peft_adapter_weights(theirs, ours.model)
        assert set(ours.target_paths.values()) == {"eager"}
    theirs.train(), ours.train()
    theirs(x).square().sum().backward()
    ours(x).square().sum().backward()
    grads = {n.removeprefix("base_model.model.").replace("base_layer.", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.model.named_parameters() if p.requires_grad}
    assert set(mine) == set(grads) and any("magnitude" in n for n in mine)
    for name, grad in grads.items():
        torch.testing.assert_close(mine[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["linear", "conv"])
def test_dropout_in_training_equals_peft_with_the_same_random_numbers(case):
    theirs, ours, x = pair(case, lora_dropout=0.5)
    theirs.train(), ours.train()
    torch.manual_seed(7)
    expected = theirs(x)
    torch.manual_seed(7)
    got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.manual_seed(7)
    theirs(x).sum().backward()
    got.sum().backward()
    for name, p in theirs.named_parameters():
        if "magnitude" in name:
            mine = ours.model.get_parameter(name.removeprefix("base_model.model."))
            torch.testing.assert_close(mine.grad, p.grad, rtol=1e-5, atol=1e-6)
    counter = CompileCounter()
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    torch.manual_seed(7)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_unmerged_output_and_unmerge_is_bit_exact(case):
    theirs, ours, x = pair(case)
    ours.eval()
    expected = ours(x)
    weights = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    ours.merge_adapter(safe_merge=True)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    theirs.eval()
    theirs.merge_adapter()
    for name, p in theirs.named_parameters():
        if "base_layer.weight" in name:
            mine = ours.model.get_parameter(name.removeprefix("base_model.model.").replace("base_layer.", ""))
            torch.testing.assert_close(mine, p, rtol=1e-5, atol=1e-6)
    ours.unmerge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in ours.model.named_parameters())


def test_merge_and_unload_and_merged_state_dict_agree():
    theirs, ours, x = pair("linear")
    ours.eval()
    expected = ours(x)
    exported = ours.merged_state_dict()
    plain = ours.merge_and_unload()
    assert not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
    assert exported.keys() == plain.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in plain.state_dict().items())
    merged_peft = theirs.eval().merge_and_unload()
    torch.testing.assert_close(plain(x), merged_peft(x), rtol=1e-5, atol=1e-5)


def test_unmerge_after_the_merged_weight_changed_recomputes_it():
    """Nothing kept applies once the merged weight changed: unmerge computes ``W' / k - delta``
    with the merge's ratio ``k = m / ||W + delta||``, so a change c of W' comes back as c / k."""
    _, ours, _ = pair("linear")
    layer = ours.model[0]
    before = layer.weight.detach().clone()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * 2.0).detach()
    k = layer.lora_magnitude_vector["default"].weight.detach().view(-1, 1) / torch.linalg.norm(before + delta, dim=1, keepdim=True)
    ours.merge_adapter()
    with torch.no_grad():
        layer.weight.add_(1e-3)
    ours.unmerge_adapter()
    torch.testing.assert_close(layer.weight.detach(), before + 1e-3 / k, rtol=1e-4, atol=1e-5)


def test_merge_refusals_leave_the_model_as_it_was():
    theirs, ours, x = pair("linear")
    ours.add_adapter("plain", LoraConfig(target_modules=["0", "2"], r=2, init_lora_weights=False))
    weights = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    with pytest.raises(MergeError, match="DoRA adapter 'default' .* merges alone"):
        ours.merge_adapter(["default", "plain"])
    assert not ours.merged_adapters and all(torch.equal(p, weights[n]) for n, p in ours.model.named_parameters())
    ours.merge_adapter("default")
    with pytest.raises(MergeError, match="a DoRA adapter is merged into it"):
        ours.merge_adapter("plain")
    assert ours.merged_adapters == ["default"]
    # a merged DoRA adapter cannot be switched off through its branch
    with pytest.raises(VariantError, match="'dora' cannot be switched"):
        ours.set_adapter("plain")
    assert ours.active_adapter == "default"
    with pytest.raises(VariantError):
        with ours.disable_adapter():
            pass
    assert ours.adapter_state.enabled
    ours.unmerge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in ours.model.named_parameters())


def test_safe_merge_refuses_non_finite_results():
    _, ours, _ = pair("linear")
    weights = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    with torch.no_grad():
        ours.model[0].lora_magnitude_vector["default"].weight[0] = float("inf")
    with pytest.raises(MergeError, match="non-finite"):
        ours.merge_adapter(safe_merge=True)
    assert all(torch.equal(p, weights[n]) for n, p in ours.model.named_parameters() if "magnitude" not in n)


@pytest.mark.parametrize("case", list(CASES))
def test_files_both_ways_with_peft(case, tmp_path):
    theirs, ours, x = pair(case)
    theirs.eval(), ours.eval()
    expected = theirs(x)
    theirs.save_pretrained(tmp_path / "peft")
    make, _, _ = CASES[case]
    torch.manual_seed(0)
    loaded = fxlora.LoraModel.from_pretrained(make(), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    torch.manual_seed(0)
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [False, True])
def test_compiles_fullgraph_without_graph_breaks(case, training):
    _, ours, x = pair(case)
    ours.train(training)
    expected = ours(x)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    ours.set_adapter_scale("default", 0.5)  # a new scale is a gate value: no recompile
    torch.testing.assert_close(compiled(x), ours(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    assert torch._dynamo.explain(ours)(x).graph_break_count == 0


def test_mixed_batch_is_per_row_dora():
    _, ours, x = pair("linear")
    ours.add_adapter("other", LoraConfig(target_modules=["0", "2"], r=2, lora_alpha=4, use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for p in ours.model[0].lora_magnitude_vector["other"].parameters():
            p.mul_(0.7)
    ours.eval()
    names = ["default", "__base__", "other", "default"]
    got = ours(x, adapter_names=names)
    torch.testing.assert_close(got, row_by_row(ours, x, names), rtol=1e-5, atol=1e-6)
    # compiled: one graph for every assignment of adapters to rows
    ours.set_adapter("default")
    counter = CompileCounter()
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    for names in (["default", "__base__", "other", "default"], ["other", "other", "__base__", "default"]):
        torch.testing.assert_close(compiled(x, adapter_names=names), ours(x, adapter_names=names), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_two_active_adapters_apply_in_turn_as_peft_does():
    theirs, ours, x = pair("linear")
    second = dict(target_modules=["0", "2"], r=2, lora_alpha=4, init_lora_weights=False)
    theirs.add_adapter("plain", peft.LoraConfig(**second))
    ours.add_adapter("plain", LoraConfig(**second))
    copy_peft_adapter_weights(theirs, ours.model)
    theirs.base_model.set_adapter(["default", "plain"])
    ours.set_adapter(["default", "plain"])
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    # another order would give another output (PEFT follows the list): refused, state kept
    with pytest.raises(VariantError, match=r"activate them as \['default', 'plain'\]"):
        ours.set_adapter(["plain", "default"])
    assert ours.active_adapter == ["default", "plain"]
    ours.set_adapter("plain")  # one adapter alone: any order
    ours.set_adapter(["default", "plain"])


def test_an_offloaded_layer_is_refused_before_anything_is_attached():
    from types import SimpleNamespace

    from fxlora.core.layers import AdapterSpec, attach_adapter
    from fxlora.kinds import kind_of
    from fxlora.variants import DORA

    with torch.device("meta"):
        layer = nn.Linear(3, 4)
    layer._hf_hook = SimpleNamespace(execution_device="cpu")  # as accelerate's offloading leaves it
    with pytest.raises(UnsupportedTargetError, match="offloaded"):
        attach_adapter(layer, "default", AdapterSpec(r=2, alpha=2, variant=DORA), True, kind_of(layer))
    assert not layer._modules


def test_refusals_are_clear():
    _, ours, _ = pair("linear")
    with pytest.raises(ValueError, match=r"cannot combine the DoRA adapter\(s\) \['default'\]"):
        ours.add_weighted_adapter(["default"], [1.0], "combined", combination_type="cat")
    assert list(ours.peft_config) == ["default"]
    with pytest.raises(ValueError, match="lora_bias=True is not supported with use_dora=True"):
        LoraConfig(use_dora=True, lora_bias=True)
    with pytest.raises(TypeError, match="use_dora"):
        LoraConfig(use_dora="yes")
    net = nn.Sequential(nn.ConvTranspose2d(3, 4, 3))
    with pytest.raises(UnsupportedTargetError, match="use_dora=True cannot adapt '0'"):
        fxlora.transform(net, LoraConfig(target_modules=["0"], use_dora=True))
    grouped = ConvNet2d(groups=2)
    with pytest.raises(UnsupportedTargetError, match="grouped convolution"):
        fxlora.transform(grouped, LoraConfig(target_modules=["conv2"], r=2, use_dora=True))
    assert not any("lora" in n for n, _ in grouped.named_parameters())


def test_transformers_conv1d_fan_in_fan_out_equals_peft(tmp_path):
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Gpt2Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(12, 5), Conv1D(5, 12)

        def forward(self, x):
            return self.c_proj(torch.tanh(self.c_fc(x)))

    torch.manual_seed(0)
    base = Gpt2Mlp()
    settings = dict(target_modules=["c_fc", "c_proj"], r=2, lora_alpha=4, use_dora=True, fan_in_fan_out=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.2)
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(**settings))
    copy_peft_adapter_weights(theirs, ours.model)
    assert ours.model.c_fc.lora_magnitude_vector["default"].weight.shape == (12,)
    x = torch.randn(2, 3, 5)
    theirs.eval(), ours.eval()
    expected = theirs(x)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
    weight = ours.model.c_fc.weight.detach().clone()
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    assert torch.equal(ours.model.c_fc.weight, weight)


def test_half_precision_base_with_float32_adapter_equals_peft():
    torch.manual_seed(0)
    base = mlp().to(torch.bfloat16)
    settings = dict(target_modules=["0", "2"], r=2, lora_alpha=4, use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **settings))
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(**settings))
    magnitude = ours.model[0].lora_magnitude_vector["default"].weight
    assert magnitude.dtype == theirs.base_model.model[0].lora_magnitude_vector["default"].weight.dtype == torch.float32
    copy_peft_adapter_weights(theirs, ours.model)
    x = torch.randn(4, 5, dtype=torch.bfloat16)
    theirs.eval(), ours.eval()
    out = ours(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, theirs(x), rtol=1e-2, atol=1e-2)
    weights = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    ours.merge_adapter()
    ours.unmerge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in ours.model.named_parameters())


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    r=st.integers(1, 3),
    scale=st.floats(-3, 3, allow_nan=False).filter(lambda v: abs(v) > 1e-3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_merge_then_unmerge_restores_every_bit(rows, cols, r, scale, dtype, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(cols, rows)).to(dtype)
    model = fxlora.transform(net, LoraConfig(target_modules=["0"], r=r, use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        model.model[0].lora_magnitude_vector["default"].weight.mul_(1.5)
    model.set_adapter_scale("default", scale)
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(3, cols, dtype=dtype)
    model.eval()
    expected = model(x).float()
    model.merge_adapter()
    if dtype == torch.float32:  # half precision: the merged weights' rounding alone moves outputs by a few %
        torch.testing.assert_close(model(x).float(), expected, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())
