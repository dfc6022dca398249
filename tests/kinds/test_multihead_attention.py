"""The multihead_attention kind (nn.MultiheadAttention), end to end on a tiny torchvision ViT, with
peft 0.21.2 as the oracle where PEFT is right, and a reference built here from the base class
where it is not (PEFT adds the out_proj update twice, in its forward and in its merge)."""

import copy

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torchvision
from safetensors.torch import load_file

import fxlora
from fxlora import LoraConfig
from fxlora.errors import UnsupportedTargetError

peft = pytest.importorskip("peft")

LAYERS = ["encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention"]


def vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every output would be its bias
    return model


def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def pair(targets=("self_attention",), init=False, seed=2, **options):
    """(PEFT model, fxlora model) from the same base and the same seed."""
    base = vit()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=list(targets), r=2, init_lora_weights=init, **options))
    torch.manual_seed(seed)
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=list(targets), r=2, init_lora_weights=init, **options))
    return theirs, ours


def peft_key(key: str) -> str:
    """fxlora's state_dict key of a PEFT model's LoRA key."""
    return key.removeprefix("base_model.model.").replace("base_layer.", "")


def zero_out_proj_b(*models) -> None:
    """Zero every out_proj B factor (PEFT's doubled out_proj update is then zero as well)."""
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "out_proj.lora_B" in name:
                    p.zero_()


def test_same_targets_names_tensors_and_trainable_count_as_peft():
    theirs, ours = pair()
    assert ours.targeted_module_names == theirs.targeted_module_names == LAYERS
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (384, 17332)
    peft_lora = {peft_key(k): v for k, v in theirs.state_dict().items() if "lora_" in k}
    ours_lora = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert sorted(peft_lora) == sorted(ours_lora)
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj.lora_A.default.weight" in ours_lora
    for key, tensor in peft_lora.items():  # seeded init in PEFT's random order (first out_proj pair built twice)
        assert torch.equal(tensor, ours_lora[key]), key


def test_outputs_equal_peft_bit_for_bit_where_peft_applies_each_update_once():
    theirs, ours = pair()
    zero_out_proj_b(theirs, ours)  # in_proj random, out_proj update zero
    x = images()
    assert torch.equal(ours(x), theirs(x))
    with ours.disable_adapter():
        plain = ours(x)
    assert not torch.allclose(ours(x), plain)
    theirs.eval(), ours.eval()
    with torch.no_grad():  # evaluation without grad: MHA's fused fast path, in both
        assert torch.equal(ours(x), theirs(x))


def reference(model: nn.Module, factors: dict, scaling: float) -> nn.Module:
    """The base ViT with each attention's weights replaced by weight + (B @ A) * scaling, once."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name in LAYERS:
            attn = out.get_submodule(name)
            attn.in_proj_weight += factors[name, "in"] * scaling
            attn.out_proj.weight += factors[name, "out"] * scaling
    return out


def factors_of(ours) -> dict:
    found = {}
    for name in LAYERS:
        attn = ours.model.get_submodule(name)
        found[name, "in"] = (attn.lora_B["default"].weight @ attn.lora_A["default"].weight).detach()
        found[name, "out"] = (attn.out_proj.lora_B["default"].weight @ attn.out_proj.lora_A["default"].weight).detach()
    return found


def test_each_update_applied_once_unlike_peft():
    base = vit()
    theirs, ours = pair()
    x = images()
    scaling = 8 / 2
    want = reference(base, factors_of(ours), scaling)(x)
    assert torch.allclose(ours(x), want, atol=1e-5)
    # PEFT 0.21.2 computes the out_proj update twice: it equals fxlora with that update doubled
    assert not torch.allclose(theirs(x), want, atol=1e-3)
    with torch.no_grad():
        for name in LAYERS:
            ours.model.get_submodule(name).out_proj.lora_B["default"].weight.mul_(2)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_training_step_gradients_equal_peft():
    theirs, ours = pair(init=True)  # PEFT's default init: every B zero, the first step is PEFT's exactly
    x, target = images(), torch.tensor([0, 1, 3])
    for model in (theirs, ours):
        nn.functional.cross_entropy(model(x), target).backward()
    peft_grads = {peft_key(k): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert sorted(peft_grads) == sorted(ours_grads)
    assert any(g.abs().sum() > 0 for g in ours_grads.values())
    for key, grad in peft_grads.items():
        assert torch.equal(grad, ours_grads[key]), key
    base_params = [p for n, p in ours.model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base_params)


def test_training_moves_the_adapter_and_the_loss():
    _, ours = pair(init=True)
    x, target = images(), torch.tensor([0, 1, 3])
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ours(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    out_b = ours.model.get_submodule(LAYERS[0]).out_proj.lora_B["default"].weight
    assert out_b.abs().sum() > 0  # out_proj's update trains too


def test_files_both_ways_with_peft(tmp_path):
    theirs, ours = pair()
    zero_out_proj_b(theirs, ours)
    with torch.no_grad():  # a distinct in_proj B, to see which adapter was loaded
        for name, p in ours.named_parameters():
            if name.endswith("self_attention.lora_B.default.weight"):
                p.mul_(3)
    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    theirs.save_pretrained(tmp_path / "theirs")
    assert keys == set(load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")))
    assert "base_model.model.encoder.layers.encoder_layer_0.self_attention.base_layer.out_proj.lora_A.weight" in keys
    x = images()
    # trainable, as `theirs` is: PEFT's own inference-mode model differs from it by rounding (7e-6)
    in_peft = peft.PeftModel.from_pretrained(vit(), tmp_path / "ours", is_trainable=True)
    assert torch.equal(in_peft(x), ours(x))
    in_ours = fxlora.LoraModel.from_pretrained(vit(), tmp_path / "theirs", is_trainable=True)
    assert torch.equal(in_ours(x), theirs(x))
    for model in (in_peft, in_ours, ours, theirs):
        model.eval()
    with torch.no_grad():  # inference: MHA's fused kernel
        assert torch.equal(in_peft(x), ours(x)) and torch.equal(in_ours(x), theirs(x))


def test_peft_file_tensors_load_as_they_are(tmp_path):
    theirs, _ = pair()
    theirs.save_pretrained(tmp_path)
    loaded = fxlora.LoraModel.from_pretrained(vit(), tmp_path)
    file = load_file(str(tmp_path / "adapter_model.safetensors"))
    state = loaded.state_dict()
    for key, tensor in file.items():
        name = peft_key(key).replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        assert torch.equal(state[name], tensor), key


def test_merge_unmerge_exact_and_merged_model_loads_into_the_plain_class():
    _, ours = pair()
    x = images()
    unmerged = ours(x)
    before = {k: v.clone() for k, v in ours.model.state_dict().items()}
    ours.merge_adapter()
    attn = ours.model.get_submodule(LAYERS[0])
    assert not torch.equal(attn.in_proj_weight, before[LAYERS[0] + ".in_proj_weight"])
    assert not torch.equal(attn.out_proj.weight, before[LAYERS[0] + ".out_proj.weight"])
    assert torch.allclose(ours(x), unmerged, atol=1e-5)
    ours.unmerge_adapter()
    after = ours.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    merged = ours.merge_and_unload()
    plain = vit()
    plain.load_state_dict(merged.state_dict())
    assert torch.allclose(plain(x), unmerged, atol=1e-5)
    factors_once = reference(vit(), factors_of_state(before), 4.0)
    assert torch.allclose(plain(x), factors_once(x), atol=1e-5)  # each update folded once


def factors_of_state(state: dict) -> dict:
    found = {}
    for name in LAYERS:
        found[name, "in"] = state[f"{name}.lora_B.default.weight"] @ state[f"{name}.lora_A.default.weight"]
        found[name, "out"] = state[f"{name}.out_proj.lora_B.default.weight"] @ state[f"{name}.out_proj.lora_A.default.weight"]
    return found


def test_disable_and_scale_after_merge():
    _, ours = pair()
    x = images()
    with ours.disable_adapter():
        plain = ours(x)
    ours.merge_adapter()
    with ours.disable_adapter():
        assert torch.allclose(ours(x), plain, atol=1e-5)  # the merged update taken out again in the call


def test_two_adapters_sum_in_order():
    _, ours = pair()
    torch.manual_seed(5)
    ours.add_adapter("other", LoraConfig(target_modules=["self_attention"], r=2, init_lora_weights=False))
    x = images()
    ours.set_adapter(["default", "other"])
    both = ours(x)
    ours.set_adapter("default")
    assert not torch.allclose(both, ours(x))
    state = ours.model.state_dict()
    want = copy.deepcopy(vit())
    with torch.no_grad():
        for adapter in ("default", "other"):
            for name in LAYERS:
                attn = want.get_submodule(name)
                attn.in_proj_weight += state[f"{name}.lora_B.{adapter}.weight"] @ state[f"{name}.lora_A.{adapter}.weight"] * 4.0
                attn.out_proj.weight += state[f"{name}.out_proj.lora_B.{adapter}.weight"] @ state[f"{name}.out_proj.lora_A.{adapter}.weight"] * 4.0
    assert torch.allclose(both, want(x), atol=1e-5)
    ours.delete_adapter("other")
    assert "lora_A" in ours.model.get_submodule(LAYERS[0]).out_proj._modules
    assert "other" not in ours.model.get_submodule(LAYERS[0]).out_proj.lora_A


def test_all_layers_of_the_vit_as_peft():
    targets = ("self_attention", "mlp.0", "mlp.3", "head")
    theirs, ours = pair(targets)
    zero_out_proj_b(theirs, ours)
    assert ours.targeted_module_names == theirs.targeted_module_names
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    x = images()
    assert torch.equal(ours(x), theirs(x))


def test_mixed_batches_each_row_as_its_adapter_alone():
    """PEFT refuses mixed batches here; fxlora serves batch-first layers (the ViT's) with one call per
    adapter, each row from its own (`fxlora.core.own_rows`; sequence-first layers are refused:
    tests/kinds/test_target_parameters_mixed.py)."""
    _, ours = pair()
    torch.manual_seed(4)
    ours.add_adapter("other", LoraConfig(target_modules=["self_attention"], r=2, init_lora_weights=False))
    x = images()
    names = ["default", "other", "__base__"]
    mixed = ours(x, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with ours.disable_adapter():
                want = ours(x)
        else:
            ours.set_adapter(name)
            want = ours(x)
        torch.testing.assert_close(mixed[row], want[row], rtol=1e-5, atol=1e-6)
        if name != "__base__":
            with ours.disable_adapter():
                assert not torch.allclose(mixed[row], ours(x)[row], atol=1e-4)  # the adapter acts on its row


def test_compiles_without_graph_breaks():
    _, ours = pair()
    x = images()
    want = ours(x)
    explanation = torch._dynamo.explain(ours)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), want, atol=1e-6)
    torch._dynamo.reset()


class Attention(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **options)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class OwnForward(nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        (Attention(kdim=4, vdim=4), {}, "separate weights"),
        (Attention(), {"lora_dropout": 0.1}, "lora_dropout=0.1"),
        (Attention(), {"lora_bias": True}, "lora_bias=True"),
        (Attention(), {"use_dora": True}, "use_dora=True cannot adapt 'attn'"),
    ],
)
def test_refusals(model, options, message):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((UnsupportedTargetError, ValueError), match=message):
        fxlora.transform(model, LoraConfig(target_modules=["attn"], **options))
    assert model.state_dict().keys() == before.keys()


def test_subclass_with_own_forward_is_refused():
    model = Attention()
    model.attn = OwnForward(8, 2)
    with pytest.raises(UnsupportedTargetError, match="its own forward"):
        fxlora.transform(model, LoraConfig(target_modules=["attn"]))


def test_out_proj_alone_stays_refused():
    with pytest.raises(UnsupportedTargetError, match=r"Target the attention itself \('attn'"):
        fxlora.transform(Attention(), LoraConfig(target_modules=["attn.out_proj"]))


def test_sequence_first_and_masks_match_peft():
    torch.manual_seed(0)
    base = Attention()
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["attn"], r=2, init_lora_weights=False))
    torch.manual_seed(3)
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["attn"], r=2, init_lora_weights=False))
    zero_out_proj_b(theirs, ours)
    x = torch.randn(5, 3, 8)  # (time, batch, features)
    assert torch.equal(ours(x), theirs(x))
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    got = ours.model.attn(x, x, x, attn_mask=mask, need_weights=True)
    want = theirs.base_model.model.attn(x, x, x, attn_mask=mask, need_weights=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bfloat16_base_weights_are_never_written():
    """PEFT merges and unmerges the weights at every call, which in bfloat16 drifts them (its
    in_proj_weight differs from the base after one call); fxlora never writes them."""
    base = vit().to(torch.bfloat16)
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["self_attention"], r=2, init_lora_weights=False))
    assert next(p for n, p in ours.named_parameters() if "lora_A" in n).dtype == torch.float32
    x = images().to(torch.bfloat16)
    out = ours(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    for key, tensor in base.state_dict().items():
        assert torch.equal(ours.model.state_dict()[key], tensor), key
    scaling = 4.0
    with torch.no_grad():
        want = copy.deepcopy(base)
        for name in LAYERS:
            attn, mine = want.get_submodule(name), ours.model.get_submodule(name)
            attn.in_proj_weight.copy_(attn.in_proj_weight + (mine.lora_B["default"].weight @ mine.lora_A["default"].weight * scaling).to(torch.bfloat16))
            attn.out_proj.weight.copy_(attn.out_proj.weight + (mine.out_proj.lora_B["default"].weight @ mine.out_proj.lora_A["default"].weight * scaling).to(torch.bfloat16))
        assert torch.equal(want(x), ours(x))


def test_replaced_instance_forward_is_refused_and_model_left_as_it_was():
    model = Attention()
    wrapper = model.attn.forward  # a bound method put on the instance, as accelerate's dispatch does
    model.attn.forward = wrapper
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedTargetError, match="forward was replaced on the instance"):
        fxlora.transform(model, LoraConfig(target_modules=["attn"]))
    assert model.attn.__dict__["forward"] is wrapper
    assert list(model.state_dict()) == list(before) and not hasattr(model.attn, "lora_A")
    assert not hasattr(model.attn.out_proj, "lora_A")


def test_calls_never_write_the_layer_so_other_threads_see_its_own_weights():
    """While one thread runs the adapted model, another runs the attention's class forward on the
    layer itself: it sees the base weights throughout (PEFT swaps them in and out at each call)."""
    import threading

    _, ours = pair()
    attn = ours.model.get_submodule(LAYERS[0])
    tokens = torch.randn(3, 5, 16)
    with torch.no_grad():
        plain = nn.MultiheadAttention.forward(attn, tokens, tokens, tokens)[0]
    x, stop, errors = images(), threading.Event(), []

    def adapted():
        while not stop.is_set():
            ours(x)

    worker = threading.Thread(target=adapted)
    worker.start()
    try:
        for _ in range(50):
            with torch.no_grad():
                if not torch.equal(nn.MultiheadAttention.forward(attn, tokens, tokens, tokens)[0], plain):
                    errors.append("changed")
    finally:
        stop.set()
        worker.join()
    assert not errors
