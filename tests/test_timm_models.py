"""timm zoo: 13 architectures, each with a Linear and a Conv target config.

Per config: every target takes the graph path (``forward_features``/``forward_head``, which reach
into the layers, compute with LoRA too: each adapted layer keeps its eager forward); the adapted
model is the base model
at init, gives peft's outputs for the same adapter weights from every entry point, and a training
step moves adapter weights only. Per model (Linear and Conv targets together): ``torch.compile``
captures it with no graph break.
"""

import copy

import pytest
import torch
import torch._dynamo

import fxlora
from models import copy_peft_adapter_weights
from zoo import TIMM, conv_targets, linear_targets, tiny_timm

timm = pytest.importorskip("timm")
peft = pytest.importorskip("peft")

CONFIGS = {"linear": linear_targets, "conv": conv_targets}
#: share of targets on the graph path where it is below 1: the classifier head and stem conv of the
#: model itself (and poolformer's head, whose layers forward_head calls one by one) are reached by
#: the model's own methods, so they take the eager path (same math, every entry point)


@pytest.fixture(scope="module")
def bases():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny_timm(name)
        return copy.deepcopy(cache[name][0]), cache[name][1]

    return get


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(TIMM))
def test_identity_peft_and_training_step(bases, name, config):
    base, size = bases(name)
    targets = CONFIGS[config](base)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = base(x)

    model = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(target_modules=targets))
    report = model.reports["default"]
    assert report.graph_share == 1.0, [(r.name, r.reason) for r in report.rows if r.path == "eager"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)

    kwargs = dict(target_modules=targets, init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    ours = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(**kwargs)).eval()
    copy_peft_adapter_weights(reference, ours)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
        assert not torch.equal(out, expected)  # the adapter really acts
        features = ours.forward_features(x)  # the other entry points compute with LoRA too
        torch.testing.assert_close(features, reference.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.forward_head(features), out, rtol=1e-5, atol=1e-5)

    ours.train()
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(ours(x), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    moved = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_" in n for n in moved), sorted(moved)[:5]


@pytest.mark.parametrize("name", list(TIMM))
def test_compiles_without_graph_breaks(bases, name):
    base, size = bases(name)
    model = fxlora.transform(base, fxlora.LoraConfig(target_modules=linear_targets(base) + conv_targets(base), init_lora_weights=False))
    model.eval()
    x = torch.randn(2, 3, size, size)
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(model)(x)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1
