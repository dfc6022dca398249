"""timm: its notrace helpers stay opaque, its Sequentials are never roots, and gradient
checkpointing keeps working (switched on before transform) or fails loudly (after)."""

import copy

import pytest
import torch

import fxlora
import fxlora.integrations as integrations
from fxlora.tracing import CheckpointingAfterPlanning

timm = pytest.importorskip("timm")


def test_notrace_helpers_keep_the_whole_model_one_graph(monkeypatch):
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)  # dynamic_img_size: resample_abs_pos_embed
    config = fxlora.LoraConfig(target_modules="all-linear")
    report = fxlora.explain(model, config)
    assert report.graph_roots == ("",) and report.graph_share == 1.0
    plain = integrations.TraceHooks(root_refusals=integrations.hooks_for(model).root_refusals)
    monkeypatch.setattr(integrations, "_loaded", {"timm": plain})
    monkeypatch.setattr(integrations, "_merged", {})
    without = fxlora.explain(model, config)
    assert "" not in without.graph_roots
    assert "head" in without.eager_targets
    assert "control flow" in next(r.reason for r in without.rows if r.name == "head")


def grads(model, x):
    model.train()
    model.zero_grad()
    torch.manual_seed(0)
    out = model(x)
    out.sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_switched_on_before_transform():
    base = timm.create_model("test_vit", pretrained=False, num_classes=3)
    config = fxlora.LoraConfig(target_modules=r".*\.(qkv|proj|fc1|fc2)", init_lora_weights=False)
    torch.manual_seed(1)
    plain = fxlora.transform(copy.deepcopy(base), config)
    checkpointed_base = copy.deepcopy(base)
    checkpointed_base.set_grad_checkpointing(True)
    checkpointed = fxlora.transform(checkpointed_base, config)
    checkpointed.load_state_dict(plain.state_dict())
    # the model's forward checkpoints its blocks one by one: each block is a graph root
    assert checkpointed.graph_roots == ["patch_embed"] + [f"blocks.{i}" for i in range(len(base.blocks))]
    assert set(checkpointed.target_paths.values()) == {"graph"}
    runs = []
    checkpointed.get_submodule("blocks.0").register_forward_pre_hook(lambda *_: runs.append(1))
    x = torch.randn(2, 3, 32, 32)
    out, expected = grads(plain, x)
    out_c, got = grads(checkpointed, x)
    assert len(runs) == 2  # forward and recomputation in backward
    torch.testing.assert_close(out_c, out)
    assert got.keys() == expected.keys() and len(got) == 2 * len(checkpointed.targeted_module_names)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_switched_on_after_transform_fails_loudly():
    model = fxlora.transform(timm.create_model("test_vit", pretrained=False, num_classes=3), fxlora.LoraConfig(target_modules="all-linear"))
    x = torch.randn(1, 3, 32, 32)
    model(x)
    model.model.set_grad_checkpointing(True)
    with pytest.raises(CheckpointingAfterPlanning, match="before fxlora.transform"):
        model(x)
    model.model.set_grad_checkpointing(False)
    model(x)  # the graph serves again
