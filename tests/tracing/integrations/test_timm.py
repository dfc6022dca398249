"""timm: its notrace helpers stay opaque, its Sequentials are never roots, and gradient
checkpointing keeps working (switched on before transform) or fails loudly (after)."""

import copy

import pytest
import torch

import fxlora
import fxlora.tracing.integrations as integrations

timm = pytest.importorskip("timm")
from timm.layers import resample_abs_pos_embed  # noqa: E402  (a global name: what fx wraps)


class PosEmbedBlock(torch.nn.Module):
    """A block that resizes its position embedding to the input with timm's notrace helper
    ``resample_abs_pos_embed`` (which branches on the sizes)."""

    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(1, 16, 8))
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):  # x: (batch, height, width, 8)
        pos = resample_abs_pos_embed(self.pos, new_size=[x.shape[1], x.shape[2]], num_prefix_tokens=0)
        return self.fc(x.flatten(1, 2) + pos)


PosEmbedBlock.__module__ = "timm.layers.fxlora_test"  # a timm class, as far as fxlora can tell


def test_notrace_helpers_stay_opaque(monkeypatch):
    holder = torch.nn.Sequential(torch.nn.Linear(8, 8), PosEmbedBlock())
    config = fxlora.LoraConfig(target_modules=["1.fc"], init_lora_weights=False)
    report = fxlora.explain(holder, config)
    assert report.graph_roots == ("",) and report.graph_share == 1.0
    monkeypatch.setattr(integrations, "_loaded", {"timm": integrations.TraceHooks()})
    monkeypatch.setattr(integrations, "_merged", {})
    without = fxlora.explain(holder, config)
    assert without.graph_share == 0.0 and "control flow" in without.rows[0].reason
    monkeypatch.undo()
    reference = fxlora.transform(copy.deepcopy(holder), config, trace="eager")
    model = fxlora.transform(holder, config)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 4, 4, 8)
    torch.testing.assert_close(model(x), reference(x))
    y = torch.randn(2, 3, 5, 8)  # other sizes: the helper runs on them at run time
    torch.testing.assert_close(model(y), reference(y))


def test_the_model_and_its_blocks_are_roots_and_every_entry_point_still_uses_lora():
    base = timm.create_model("test_vit", pretrained=False, num_classes=3)
    config = fxlora.LoraConfig(target_modules="all-linear", init_lora_weights=False)
    model = fxlora.transform(copy.deepcopy(base), config).eval()
    eager = fxlora.transform(copy.deepcopy(base), config, trace="eager").eval()
    eager.load_state_dict(model.state_dict())
    # the head in the model's graph, each block in one of its own (`fxlora.planning.roots`)
    assert model.graph_roots == [""] + [f"blocks.{i}" for i in range(len(base.blocks))]
    assert set(model.target_paths.values()) == {"graph"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, eager(x))
        # entry points that reach into the layers bypass the graph, yet compute with LoRA
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), out)
        torch.testing.assert_close(model.forward_features(x), eager.forward_features(x))
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
        with model.disable_adapter():
            assert not torch.allclose(model.forward_intermediates(x, indices=1, intermediates_only=True)[-1], last)


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


def test_gradient_checkpointing_switched_on_after_transform():
    base = timm.create_model("test_vit", pretrained=False, num_classes=3)
    config = fxlora.LoraConfig(target_modules=r".*\.(qkv|fc1|fc2)", init_lora_weights=False)
    model = fxlora.transform(copy.deepcopy(base), config)
    x = torch.randn(2, 3, 32, 32)
    out, expected = grads(model, x)
    model.model.set_grad_checkpointing(True)
    runs = []
    model.get_submodule("blocks.0").register_forward_pre_hook(lambda *_: runs.append(1))
    out_c, got = grads(model, x)
    assert len(runs) == 2
    torch.testing.assert_close(out_c, out)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-6)


class Checkpointed(torch.nn.Module):
    """A graph root whose forward checkpoints its inner layer when asked to."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
        self.checkpointing = False

    def forward(self, x):
        if self.checkpointing:
            return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)
        return self.inner(x)


def test_checkpointing_a_graph_root_after_transform_runs_it_eagerly_and_works_before():
    model = fxlora.transform(Checkpointed(), fxlora.LoraConfig(target_modules=["inner.0"], init_lora_weights=False))
    assert model.graph_roots == [""]
    x = torch.randn(3, 4)
    model.train()
    expected, grads_expected = grads(model, x)
    model.model.checkpointing = True  # the graph would drop the checkpointing: run the forward eagerly
    got, grads_got = grads(model, x)
    torch.testing.assert_close(got, expected)
    for n in grads_expected:
        torch.testing.assert_close(grads_got[n], grads_expected[n])
    model.model.checkpointing = False
    model(x)  # the graph serves again
    before = Checkpointed()
    before.checkpointing = True
    planned = fxlora.transform(before, fxlora.LoraConfig(target_modules=["inner.0"], init_lora_weights=False))
    assert planned.graph_roots == ["inner"]  # planned inside the checkpointed part
    planned.train()
    planned(x).sum().backward()
    assert planned.get_submodule("inner.0").lora_B.default.weight.grad is not None
