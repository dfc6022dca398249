"""target_parameters (the ``parameter`` kind): LoRA on fused MoE experts and routers of tiny
transformers 5 Mixtral and Qwen3-MoE models, with peft 0.21.2 as the oracle: same targets and
trainable count, same outputs with the same tensors, same gradients and training step, same merged
weights, files both ways; fullgraph compile; refusals that leave the model as it was."""

import copy
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import fxlora
from fxlora import LoraConfig
from fxlora.errors import NoTargetFoundError, UnsupportedTargetError
from models import assert_same_state, state_snapshot
from moe_models import MODELS, mixtral, qwen3_moe  # noqa: F401

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


CONFIGS = {
    "experts": dict(target_modules=["q_proj"], target_parameters=EXPERTS),
    "all-linear": dict(target_modules="all-linear"),
    "router-only": dict(target_modules=[], target_parameters=["gate.weight"]),
}


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    return model(ids()).logits


def pair(build=mixtral, seed=3, **options):
    """(PEFT model, fxlora model) from the same base, the same seed and ``init_lora_weights=False``."""
    options = dict(init_lora_weights=False, **options)
    base = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(options)))
    torch.manual_seed(seed)
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(**options))
    return theirs.eval(), ours.eval()


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A PEFT or fxlora model's LoRA tensors under their PEFT file keys."""
    if isinstance(model, peft.PeftModel):
        return peft.get_peft_model_state_dict(model)
    return fxlora.get_peft_model_state_dict(model)


def peft_targets(model) -> set[str]:
    """The modules PEFT adapts: its module targets and the owners of its parameter targets."""
    owners = {name.rpartition(".")[0] for name in model.base_model.targeted_parameter_names}
    return set(model.targeted_module_names) | owners


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("model", list(MODELS))
def test_targets_count_tensors_and_outputs_as_peft(model, config):
    theirs, ours = pair(MODELS[model], **CONFIGS[config])
    assert set(ours.targeted_module_names) == peft_targets(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    mine, peft_ones = lora_tensors(ours), lora_tensors(theirs)
    assert mine.keys() == peft_ones.keys()
    assert all(torch.equal(mine[k], peft_ones[k]) for k in mine)  # PEFT's random draws, in PEFT's order
    want = logits(theirs)
    assert not torch.allclose(want, logits(MODELS[model]()), atol=1e-3)  # the adapters change the output
    assert torch.equal(logits(ours), want)


def test_all_linear_adapts_attention_experts_and_router_with_peft_ranks():
    theirs, ours = pair(target_modules="all-linear", r=4, lora_alpha=8)
    assert set(ours.targeted_module_names) == peft_targets(theirs)
    experts = ours.model.get_submodule("model.layers.0.mlp.experts")
    assert experts.lora_A["default"]["gate_up_proj"].weight.shape == (4 * 8, 32)  # fused w1/w3: rank 2r per expert
    assert experts.lora_A["default"]["down_proj"].weight.shape == (4 * 4, 64)
    assert "lm_head" not in ours.targeted_module_names
    assert torch.equal(logits(ours), logits(theirs))


def test_gradients_and_a_training_step_as_peft():
    theirs, ours = pair(target_modules="all-linear")
    for model in (theirs, ours):
        model.train()
        logits(model).square().mean().backward()
    grads = {k: v.grad for k, v in ours.named_parameters() if v.requires_grad}
    peft_grads = {k: v.grad for k, v in theirs.named_parameters() if v.requires_grad}
    assert len(grads) == len(peft_grads) and all(g is not None for g in grads.values())
    ours_file = {k: p.grad for k, p in zip(lora_tensors(ours), _ordered(ours))}
    theirs_file = {k: p.grad for k, p in zip(lora_tensors(theirs), _ordered(theirs))}
    for key in ours_file:
        torch.testing.assert_close(ours_file[key], theirs_file[key], rtol=1e-5, atol=1e-7)
    assert any(bool(g.abs().sum() > 0) for k, g in ours_file.items() if "experts" in k)
    for model in (theirs, ours):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
        model.eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def _ordered(model) -> list[nn.Parameter]:
    """The model's LoRA parameters in the order of its PEFT file keys."""
    tensors = lora_tensors(model)
    by_data = {p.data_ptr(): p for p in model.parameters()}
    return [by_data[t.data_ptr()] for t in tensors.values()]


@pytest.mark.parametrize("model", list(MODELS))
def test_files_both_ways_with_peft(tmp_path, model):
    theirs, ours = pair(MODELS[model], target_modules="all-linear", seed=4)
    torch.manual_seed(9)
    with torch.no_grad():  # a distinct adapter in each model, to see which one was loaded
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert keys == set(load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys  # gate_up_proj, inner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(MODELS[model](), tmp_path / "ours").eval()
    assert torch.equal(logits(in_peft), logits(ours))
    in_ours = fxlora.LoraModel.from_pretrained(MODELS[model](), tmp_path / "theirs").eval()
    assert torch.equal(logits(in_ours), logits(theirs))
    assert not torch.allclose(logits(in_ours), logits(in_peft), atol=1e-3)


def test_merge_unmerge_exact_and_merged_weights_as_peft():
    theirs, ours = pair(target_modules="all-linear")
    unmerged = logits(ours)
    before = state_snapshot(ours.model)
    ours.merge_adapter()
    theirs.merge_adapter()
    experts = "model.layers.0.mlp.experts"
    merged_ours = ours.model.get_submodule(experts).gate_up_proj
    assert not torch.equal(merged_ours, before[experts + ".gate_up_proj"])
    assert torch.equal(merged_ours, theirs.base_model.model.get_submodule(experts).base_layer.base_layer.gate_up_proj)
    assert torch.equal(ours.model.get_submodule("model.layers.1.mlp.gate").weight, theirs.base_model.model.get_submodule("model.layers.1.mlp.gate").base_layer.weight)
    torch.testing.assert_close(logits(ours), unmerged, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    assert_same_state(ours.model, before)  # bit for bit
    plain = ours.merge_and_unload()
    fresh = mixtral()
    fresh.load_state_dict(plain.state_dict())
    torch.testing.assert_close(logits(fresh), unmerged, rtol=1e-5, atol=1e-5)


def test_disable_scale_and_two_adapters():
    _, ours = pair(target_modules=[], target_parameters=EXPERTS)
    base = logits(mixtral())
    with ours.disable_adapter():
        assert torch.equal(logits(ours), base)
    torch.manual_seed(5)
    ours.add_adapter("other", LoraConfig(target_modules=[], target_parameters=EXPERTS, init_lora_weights=False))
    ours.set_adapter(["default", "other"])
    both = logits(ours)
    ours.merge_adapter()  # both folded: the same weights the call computed
    torch.testing.assert_close(logits(ours), both, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    ours.set_adapter("default")
    assert not torch.allclose(logits(ours), both, atol=1e-3)


def test_compiles_fullgraph_without_graph_breaks():
    _, ours = pair(target_modules="all-linear")
    want = logits(ours)
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(ours)(ids())
        assert explanation.graph_break_count == 0
        compiled = torch.compile(ours, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(ids()).logits, want, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


class Stacked(nn.Module):
    """A plain module whose forward reads a 3-D expert stack (E, in, out) and a 2-D weight."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed
        self.stack = nn.Parameter(torch.randn(3, 6, 5) if transposed else torch.randn(3, 5, 6))
        self.proj = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        stack = self.stack if self.is_transposed else self.stack.transpose(1, 2)
        h = torch.bmm(x, stack).relu()  # (E, n, out=5)
        return F.linear(torch.cat([h.sum(0), h.sum(0)[:, :1]], dim=-1), self.proj)


class Holder(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = Stacked(transposed)

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize("transposed", [False, True])
def test_plain_module_parameters_as_peft(transposed):
    config = dict(target_parameters=["block.stack", "block.proj"], r=2, init_lora_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(Holder(transposed), peft.LoraConfig(**config))
    torch.manual_seed(1)
    ours = fxlora.transform(Holder(transposed), LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    x = torch.randn(3, 2, 6)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(target_parameters=["experts.up_proj"]), NoTargetFoundError, r"matched no parameter.*experts\.gate_up_proj"),
        (dict(target_parameters=["mlp.experts"]), NoTargetFoundError, r"names a parameter, not a module"),
        (dict(target_parameters=["input_layernorm.weight"]), UnsupportedTargetError, r"2-D and 3-D parameters only"),
        (dict(target_parameters=EXPERTS, lora_dropout=0.1), ValueError, r"lora_dropout=0.1"),
        (dict(target_parameters=EXPERTS, lora_bias=True), ValueError, r"lora_bias=True"),
        (dict(target_parameters=EXPERTS, use_dora=True), UnsupportedTargetError, r"use_dora=True"),
        (dict(target_parameters=["q_proj.weight"], target_modules=["q_proj"]), UnsupportedTargetError, r"also a target of target_modules"),
        (dict(target_parameters=EXPERTS, init_lora_weights="pissa"), ValueError, r"init_lora_weights='pissa'"),
    ],
)
def test_refusals_leave_the_model_as_it_was(options, error, message):
    model = mixtral()
    before = state_snapshot(model)
    options.setdefault("target_modules", [])
    with pytest.raises(error, match=message):
        fxlora.transform(model, LoraConfig(**options))
    assert_same_state(model, before)
    assert not any(hasattr(m, "_fxlora") for m in model.modules())


def test_a_regex_is_refused_as_in_peft():
    with pytest.raises(TypeError, match=r"target_parameters must be a list"):
        LoraConfig(target_parameters="experts.gate_up_proj")


def test_a_second_adapter_on_other_parameters_is_refused_and_changes_nothing():
    _, ours = pair(target_modules=[], target_parameters=EXPERTS)
    before = state_snapshot(ours.model)
    with pytest.raises(UnsupportedTargetError, match=r"all adapters on one module target the same parameters"):
        ours.add_adapter("other", LoraConfig(target_modules=[], target_parameters=["experts.down_proj"]))
    assert_same_state(ours.model, before)
    assert list(ours.peft_config) == ["default"]


def test_weighted_combination_is_refused():
    _, ours = pair(target_modules=[], target_parameters=EXPERTS)
    ours.add_adapter("other", LoraConfig(target_modules=[], target_parameters=EXPERTS))
    with pytest.raises(Exception, match=r"target_parameters"):
        ours.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")


def test_a_module_with_parameter_adapters_is_refused_as_a_module_target():
    model = fxlora.transform(mixtral(), LoraConfig(target_modules=[], target_parameters=["q_proj.weight"]))
    before = state_snapshot(model.model)
    with pytest.raises(UnsupportedTargetError, match=r"carries adapters on its parameters"):
        model.add_adapter("other", LoraConfig(target_modules=["q_proj"]))
    assert_same_state(model.model, before)
    assert list(model.peft_config) == ["default"]


def test_bfloat16_model_tensors_and_outputs_as_peft():
    """PEFT keeps float32 factors on a bfloat16 model, their random start rounded through bfloat16."""
    theirs, ours = pair(lambda: mixtral().to(torch.bfloat16), target_modules=[], target_parameters=[*EXPERTS, "gate.weight"])
    mine, peft_ones = lora_tensors(ours), lora_tensors(theirs)
    assert all(t.dtype == torch.float32 for t in mine.values())
    assert all(torch.equal(mine[k], peft_ones[k]) for k in mine)
    assert torch.equal(logits(ours), logits(theirs))
