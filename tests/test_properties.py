"""Property-based tests over random architectures, random target sets and random configs."""

import copy
import math
import re

import torch
import torch.nn as nn
from hypothesis import assume, given, strategies as st

import fxlora
from fxlora import LoraConfig

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


class RandomNet(nn.Module):
    def __init__(self, body: list, head_in: int, n_classes: int, spatial_dims: int, branchy: bool):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(head_in, n_classes)
        self.spatial_dims = spatial_dims
        self.branchy = branchy

    def forward(self, x):
        h = self.body(x)
        if self.spatial_dims:
            h = h.mean(dim=tuple(range(2, 2 + self.spatial_dims)))
        if self.branchy and h.abs().sum() > 1e9:  # data-dependent: this forward cannot be traced
            h = h * 0
        return self.head(h)


ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.GELU, nn.Identity]


@st.composite
def architectures(draw):
    dims = draw(st.sampled_from([0, 1, 2, 3]))
    width = draw(st.integers(2, 6))
    size = {1: 16, 2: 10, 3: 6}.get(dims, 0)
    layers, channels = [], width
    in_channels = draw(st.integers(1, 4))
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(dims)
    current = in_channels
    for _ in range(draw(st.integers(1, 4))):
        out = draw(st.integers(2, 8))
        if conv is None:
            layers.append(nn.Linear(current, out, bias=draw(st.booleans())))
        else:
            k = draw(st.integers(1, 3))
            dilation = draw(st.integers(1, 2))
            stride = draw(st.integers(1, 2))
            padding = draw(st.integers(0, 2))
            mode = draw(st.sampled_from(PADDING_MODES)) if padding else "zeros"
            groups = 2 if draw(st.booleans()) and current % 2 == 0 and out % 2 == 0 else 1
            extent = dilation * (k - 1) + 1
            if mode != "zeros":
                assume(padding < size)
            size = (size + 2 * padding - extent) // stride + 1
            assume(size >= 1)
            layers.append(conv(current, out, k, stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode, bias=draw(st.booleans())))
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
        current = out
    branchy = draw(st.booleans())
    net = RandomNet(layers, current, draw(st.integers(1, 3)), dims, branchy)
    shape = (3, in_channels) + (({1: 16, 2: 10, 3: 6}[dims],) * dims if dims else ())
    return net, shape


@st.composite
def setups(draw):
    net, shape = draw(architectures())
    adaptable = [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    targets = draw(st.lists(st.sampled_from(adaptable), min_size=1, max_size=len(adaptable), unique=True))
    targets = [n for n in adaptable if n in targets]  # named_modules order
    save_head = "head" not in targets and draw(st.booleans())
    as_regex = draw(st.booleans())
    r = draw(st.sampled_from([2, 4]))
    config = LoraConfig(
        r=r,
        lora_alpha=draw(st.sampled_from([1, 4, 16])),
        use_rslora=draw(st.booleans()),
        bias=draw(st.sampled_from(["none", "all", "lora_only"])),
        lora_bias=draw(st.booleans()),
        target_modules="|".join(re.escape(t) for t in targets) if as_regex else targets,
        modules_to_save=["head"] if save_head else None,
    )
    return net, shape, targets, config


def expected_counts(net: nn.Module, targets: list, config: LoraConfig) -> tuple[int, int, int]:
    """(adapter numbers, modules_to_save copies, trainable base biases), in closed form."""
    total = 0
    for name in targets:
        m = net.get_submodule(name)
        if isinstance(m, nn.Linear):
            total += config.r * (m.in_features + m.out_features)
        else:
            total += config.r * m.in_channels * math.prod(m.kernel_size) + m.out_channels * config.r // m.groups
        total += m.out_channels if config.lora_bias and not isinstance(m, nn.Linear) else 0
        total += m.out_features if config.lora_bias and isinstance(m, nn.Linear) else 0
    saved = set(config.modules_to_save or [])
    copies = sum(p.numel() for p in net.head.parameters()) if saved else 0
    biases = 0
    for name, p in net.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if not name.endswith(".bias") or owner in saved:
            continue
        if config.bias == "all" or (config.bias == "lora_only" and owner in targets):
            biases += p.numel()
    return total, copies, biases


@given(setup=setups())
def test_identity_at_init_names_and_counts(setup):
    net, shape, targets, config = setup
    x = torch.randn(*shape)
    net.eval()
    ref = net(x)
    lora, copies, biases = expected_counts(net, targets, config)
    base_total = sum(p.numel() for p in net.parameters())
    model = fxlora.transform(net, config)
    model.eval()
    assert torch.equal(model(x), ref)
    assert model.targeted_module_names == targets
    assert model.get_nb_trainable_parameters() == (lora + copies + biases, base_total + lora + copies)
    paths = model.target_paths
    assert set(paths) == set(targets)
    if net.branchy:
        assert all(paths[t] == ("eager" if t == "head" else "graph") for t in targets)
    else:
        assert set(paths.values()) == {"graph"}


@given(setup=setups())
def test_graph_and_eager_paths_compute_the_same(setup):
    net, shape, targets, config = setup
    config = config.replace(init_lora_weights=False)
    x = torch.randn(*shape)
    graph = fxlora.transform(copy.deepcopy(net), config)
    eager = fxlora.transform(copy.deepcopy(net), config, trace="eager")
    eager.load_state_dict(graph.state_dict())
    graph.eval(), eager.eval()
    torch.testing.assert_close(graph(x), eager(x), rtol=1e-6, atol=1e-6)


@given(setup=setups(), steps=st.integers(1, 3))
def test_gradients_only_where_they_belong_and_base_never_moves(setup, steps):
    net, shape, targets, config = setup
    model = fxlora.transform(net, config.replace(init_lora_weights=False))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    x = torch.randn(*shape)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        for n, p in model.named_parameters():
            assert (p.grad is None) == (not p.requires_grad), n
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    lora_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".modules_to_save." in n or n.endswith("bias") for n in lora_names)


@given(setup=setups())
def test_disable_adapter_gives_base_outputs(setup):
    net, shape, targets, config = setup
    x = torch.randn(*shape)
    net.eval()
    ref = net(x)
    model = fxlora.transform(net, config.replace(init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(1.0)
    model.eval()
    with model.disable_adapter():
        assert torch.equal(model(x), ref)
