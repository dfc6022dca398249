"""torch.compile: the rewritten code compiles whole (fullgraph, 0 graph breaks) and matches eager."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import fxlora
from fxlora import LoraConfig
from models import MLP, Mixed

timm = pytest.importorskip("timm")


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def perturb(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or ".modules_to_save." in n:
                p.add_(torch.randn_like(p) * 0.1)


def test_mlp_fullgraph_inductor_matches_eager():
    model = fxlora.transform(MLP(64), LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]))
    perturb(model)
    model.eval()
    x = torch.randn(8, 20)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, targets",
    [("test_vit", r".*\.(qkv|fc1|fc2)"), ("test_resnet", r".*\.conv\d"), ("test_efficientnet", r".*conv_(pw|pwl)")],
)
def test_timm_fullgraph_zero_breaks(name, targets):
    model = timm.create_model(name, pretrained=False, num_classes=3)
    lora = fxlora.transform(model, LoraConfig(target_modules=targets, modules_to_save=["head"] if name == "test_vit" else None))
    assert set(lora.target_paths.values()) == {"graph"}
    perturb(lora)
    lora.eval()
    x = torch.randn(2, 3, 64, 64)
    explanation = torch._dynamo.explain(lora)(x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    compiled = torch.compile(lora, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), lora(x), rtol=1e-5, atol=1e-5)


def test_adapter_state_changes_do_not_recompile():
    model = fxlora.transform(MLP(16), LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]))
    perturb(model)
    model.eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 20)
    on = compiled(x)
    with model.disable_adapter():
        off = compiled(x)
        torch.testing.assert_close(off, model(x))
    again = compiled(x)
    assert counter.frame_count == 1
    torch.testing.assert_close(on, again)
    assert not torch.allclose(on, off)


def test_eager_path_model_compiles_and_matches():
    model = fxlora.transform(Mixed(), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    x = torch.randn(3, 6)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))


def test_training_step_compiled_matches_eager():
    torch.manual_seed(0)
    model = fxlora.transform(MLP(32), LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False))
    x, y = torch.randn(16, 20), torch.randint(0, 2, (16,))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = torch.nn.functional.nll_loss(compiled(x), y)
    loss_c.backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch.nn.functional.nll_loss(model(x), y).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_c[n], rtol=1e-5, atol=1e-6)
