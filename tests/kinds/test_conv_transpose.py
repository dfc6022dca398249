"""The conv_transpose kind (nn.ConvTranspose1d/2d/3d), checked against references built here from
torch's functional ops: A is a transposed convolution in -> r with the base's geometry, B a 1x..x1
convolution r -> out, and the update folds exactly into the base weight (in, out, *kernel)."""

import copy
import math

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxlora
from fxlora import LoraConfig
from fxlora.errors import MergeError
from fxlora.core.delta import delta_weight
from fxlora.io.peft_format import layout_of_adapter

TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Up(nn.Module):
    """Two transposed convolutions around a ReLU; `output_size` is passed on to the last one."""

    def __init__(self, dims=2, groups=1, bias=True):
        super().__init__()
        cls = TRANSPOSED[dims]
        self.up = cls(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=bias)
        self.act = nn.ReLU()
        self.out = cls(6, 4, 2, stride=1, dilation=2, groups=groups, bias=bias)

    def forward(self, x, output_size=None):
        return self.out(self.act(self.up(x)), output_size=output_size)


def make_input(dims, batch=2, size=5):
    return torch.randn(batch, 4, *[size + i for i in range(dims)])


def adapted(dims=2, groups=1, **config):
    torch.manual_seed(0)
    config = {"target_modules": ["up", "out"], "r": 4, "lora_alpha": 6, "init_lora_weights": False, **config}
    return fxlora.transform(Up(dims, groups), LoraConfig(**config))


def reference_update(layer, adapter, x, output_size=None):
    """``B(A(x))`` from functional ops and the adapter's weights (independent of fxlora's code)."""
    a = layer.lora_A[adapter].weight
    b = layer.lora_B[adapter]
    base = layer.__class__.forward(layer, x, output_size)  # the class's own forward: base output only
    padding = [o - m for o, m in zip(base.shape[2:], _min_size(layer, x))]
    hidden = CONV_T[a.dim() - 2](x, a, None, layer.stride, layer.padding, padding, 1, layer.dilation)
    return CONV[a.dim() - 2](hidden, b.weight, b.bias, groups=layer.groups)


def _min_size(layer, x):
    return [
        (n - 1) * s - 2 * p + d * (k - 1) + 1
        for n, s, p, d, k in zip(x.shape[2:], layer.stride, layer.padding, layer.dilation, layer.kernel_size)
    ]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("trace", ["auto", "eager"])
def test_forward_is_base_plus_scaled_update(dims, trace):
    torch.manual_seed(0)
    net = Up(dims)
    x = make_input(dims)
    base_up = net.up(x)
    model = fxlora.transform(net, LoraConfig(target_modules=["up"], r=3, lora_alpha=5, init_lora_weights=False), trace=trace)
    assert model.target_paths["up"] == ("graph" if trace == "auto" else "eager")
    expected_up = base_up + reference_update(net.up, "default", x) * (5 / 3)
    torch.testing.assert_close(net.up(x), expected_up, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), net.out(net.act(expected_up)), rtol=1e-5, atol=1e-6)


def test_factor_layout_is_transposed_a_and_pointwise_b():
    model = adapted(dims=2)
    layer = model.get_submodule("up")
    assert isinstance(layer.lora_A["default"], nn.ConvTranspose2d)
    assert tuple(layer.lora_A["default"].weight.shape) == (4, 4, 3, 3)  # (in, r, *kernel)
    assert tuple(layer.lora_B["default"].weight.shape) == (6, 4, 1, 1)  # (out, r, 1, 1)
    layout = layout_of_adapter(model.model, "default", "none")
    stored = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".lora_" in k}
    assert {s.key: s.shape for s in layout.slots.values()} == stored  # the file holds exactly these
    actual = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert model.reports["default"].trainable_params == actual  # the planner's count


def test_default_init_starts_at_the_base_with_a_conv_like_a():
    torch.manual_seed(0)
    net = Up(2)
    x = make_input(2)
    before = net(x)
    model = fxlora.transform(net, LoraConfig(target_modules=["up", "out"], r=4))
    assert torch.equal(model(x), before)  # B = 0
    a = net.up.lora_A["default"].weight
    bound = 1 / math.sqrt(4 * 9)  # kaiming-uniform(a=sqrt(5)) over fan-in in * prod(kernel)
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    torch.manual_seed(0)
    twin = Up(2)
    make_input(2)  # the same random draws as above: a seeded run gives the same A
    again = fxlora.transform(twin, LoraConfig(target_modules=["up", "out"], r=4))
    assert torch.equal(again.get_submodule("up").lora_A["default"].weight, a)


def test_disabled_adapter_computes_the_base_exactly():
    torch.manual_seed(0)
    net = Up(3)
    x = make_input(3, size=3)
    before = net(x)
    model = fxlora.transform(net, LoraConfig(target_modules=["up", "out"], r=2, init_lora_weights=False))
    assert not torch.allclose(model(x), before)
    with model.disable_adapter():
        assert torch.equal(model(x), before)


def test_training_reduces_the_loss_and_moves_only_lora_weights():
    model = adapted(dims=1, init_lora_weights=True)
    model.train()
    x = make_input(1, batch=8)
    with torch.no_grad():
        target = model(x) + 0.5
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_merge_is_exact_and_unmerge_restores_the_weights_bit_for_bit(dims, lora_bias):
    model = adapted(dims, lora_alpha=3, lora_bias=lora_bias).eval()
    if lora_bias:
        with torch.no_grad():
            for name in ("up", "out"):
                model.get_submodule(name).lora_B["default"].bias.normal_()
    x = make_input(dims, size=4)
    unmerged = model(x)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters() if "lora_" not in n}
    model.set_adapter_scale("default", 0.6)
    scaled = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), scaled, rtol=1e-5, atol=1e-6)
    with model.disable_adapter():  # the merged update is subtracted by the branch
        torch.testing.assert_close(model(x), Up.forward(model.model, x), rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    for n, p in model.model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    model.set_adapter_scale("default", 1.0)
    assert torch.equal(model(x), unmerged)


def test_merge_and_unload_gives_plain_layers_with_the_adapted_outputs():
    model = adapted(dims=2).eval()
    x = make_input(2)
    expected = model(x)
    plain = model.merge_and_unload()
    assert type(plain.up) is nn.ConvTranspose2d and not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)


def test_grouped_layers_compute_but_refuse_merges():
    model = adapted(dims=2, groups=2, r=4).eval()
    layer = model.get_submodule("up")
    assert tuple(layer.lora_B["default"].weight.shape) == (6, 2, 1, 1)  # B carries the base's groups
    x = make_input(2)
    expected = layer.__class__.forward(layer, x) + reference_update(layer, "default", x) * 1.5
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    weights = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    with pytest.raises(MergeError, match=r"grouped convolution \(groups=2\)"):
        model.merge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in model.model.named_parameters())
    with pytest.raises(ValueError, match="grouped convolution"):
        model.add_weighted_adapter(["default"], [1.0], "svd_mix", combination_type="svd")


def test_rank_must_divide_groups():
    with pytest.raises(ValueError, match=r"rank 3 of 'up' is not divisible by its groups=2"):
        fxlora.transform(Up(2, groups=2), LoraConfig(target_modules=["up"], r=3))


@pytest.mark.parametrize("trace", ["auto", "eager"])
def test_output_size_argument_is_honoured_by_the_branch(trace):
    torch.manual_seed(0)
    net = Up(1)
    x = make_input(1, size=6)
    hidden = net.act(net.up(x))
    natural = net.out(hidden).shape[-1]
    model = fxlora.transform(net, LoraConfig(target_modules=["out"], r=2, init_lora_weights=False), trace=trace)
    for size in (None, [natural]):  # stride 1: the base allows only its natural size
        out = model(x, output_size=size)
        expected = net.out.__class__.forward(net.out, hidden, size) + reference_update(net.out, "default", hidden, size) * 4.0  # alpha 8 / r 2
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    strided = nn.ConvTranspose1d(4, 3, 3, stride=3)
    fxlora.transform(nn.Sequential(strided), LoraConfig(target_modules=["0"], r=2, init_lora_weights=False), trace=trace)
    for size in ([18], [19], [20]):  # the three output sizes a stride-3 layer can give for length 6
        out = strided(x, output_size=size)
        assert out.shape[-1] == size[0]
        expected = strided.__class__.forward(strided, x, size) + reference_update(strided, "default", x, size) * 4.0
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_unbatched_input():
    net = nn.Sequential(nn.ConvTranspose1d(4, 3, 3, stride=2))
    model = fxlora.transform(net, LoraConfig(target_modules=["0"], r=2, init_lora_weights=False))
    layer = model.get_submodule("0")
    x = torch.randn(4, 7)
    torch.testing.assert_close(model(x), model(x[None])[0], rtol=1e-5, atol=1e-6)
    assert model(x).shape == layer.__class__.forward(layer, x).shape


def test_save_and_load_round_trip(tmp_path):
    model = adapted(dims=2, lora_bias=True).eval()
    with torch.no_grad():
        model.get_submodule("up").lora_B["default"].bias.normal_()
    x = make_input(2)
    expected = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = Up(2)  # same seed: the same base weights as `adapted`
    loaded = fxlora.LoraModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded(x), expected)
    saved = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for n, p in loaded.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, saved[n]), n


def two_adapters(dims=2):
    model = adapted(dims, r=4, lora_alpha=8)
    model.add_adapter("b", LoraConfig(target_modules=["up"], r=2, lora_alpha=3, init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_weighted_adapter_is_the_weighted_sum(combination):
    model = two_adapters()
    x = make_input(2)
    model.set_adapter(["default", "b"])
    model.set_adapter_scale("default", 0.7)
    model.set_adapter_scale("b", -1.3)
    expected = model(x)
    model.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix", combination_type=combination, svd_rank=6)
    model.set_adapter("mix")
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    layer = model.get_submodule("up")
    total = delta_weight(layer, "default", 0.7) + delta_weight(layer, "b", -1.3)
    if combination == "cat":
        torch.testing.assert_close(delta_weight(layer, "mix"), total, rtol=1e-5, atol=1e-6)


def test_low_rank_svd_is_the_best_approximation():
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "low", combination_type="svd", svd_rank=2)
    layer = model.get_submodule("up")
    total = delta_weight(layer, "default") + delta_weight(layer, "b")
    as_matrix = total.transpose(0, 1).reshape(total.shape[1], -1)  # (out, in * kernel)
    s = torch.linalg.svdvals(as_matrix)
    got = delta_weight(layer, "low")
    assert got.shape == total.shape
    assert torch.linalg.matrix_rank(got.transpose(0, 1).reshape(got.shape[1], -1)) == 2
    torch.testing.assert_close(torch.linalg.norm(total - got), s[2:].norm(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_mixed_batch_rows_equal_single_adapter_runs(grad):
    model = two_adapters(dims=1)
    x = make_input(1, batch=4)
    names = ["b", "default", "__base__", "b"]
    with torch.set_grad_enabled(grad):
        mixed = model(x, adapter_names=names)
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model(x[row : row + 1])
            else:
                model.set_adapter(name)
                single = model(x[row : row + 1])
            torch.testing.assert_close(mixed[row : row + 1], single, rtol=1e-5, atol=1e-6)


def test_compiles_whole_with_no_graph_break():
    torch._dynamo.reset()
    try:
        model = adapted(dims=2).eval()
        x = make_input(2)
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_deep_copy_keeps_working():
    model = adapted(dims=1).eval()
    x = make_input(1)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), model(x))
    twin.merge_adapter()
    torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- properties
@st.composite
def geometries(draw):
    dims = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    size = tuple(draw(st.integers(2, 4)) for _ in range(dims))
    # padding up to what leaves an output of at least one element along each axis
    room = [((n - 1) * s + d * (k - 1) + op) // 2 for n, s, d, k, op in zip(size, stride, dilation, kernel, output_padding)]
    padding = tuple(draw(st.integers(0, min(high, d * (k - 1)))) for high, k, d in zip(room, kernel, dilation))
    return dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, output_padding=output_padding), size


@settings(max_examples=15)
@given(geometries(), st.integers(1, 4), st.booleans())
def test_any_geometry_forward_is_exact_and_merges_exactly(geometry, r, bias):
    options, size = geometry
    torch.manual_seed(0)
    layer = TRANSPOSED[len(size)](3, 2, bias=bias, **options)
    x = torch.randn(2, 3, *size)
    base = layer(x)
    model = fxlora.transform(nn.Sequential(layer), LoraConfig(target_modules=["0"], r=r, init_lora_weights=False)).eval()
    out = model(x)
    torch.testing.assert_close(out, base + reference_update(layer, "default", x) * (8 / r), rtol=1e-5, atol=1e-5)
    # the delta folds into the base weight exactly: the base op with weight + delta gives the output
    folded = CONV_T[len(size)](
        x, layer.weight + delta_weight(layer, "default"), layer.bias, layer.stride, layer.padding, layer.output_padding, 1, layer.dilation
    )
    torch.testing.assert_close(folded, out, rtol=1e-5, atol=1e-5)
    weight = layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(layer.weight, weight)
