"""torch.export of an adapted model, unmerged: the exported program computes what the model
computes in the adapter state it was exported in (the adapters' gates are constants of the
program), strict and not, from the `LoraModel` or the model inside it, as a PEFT model exports."""

import copy
import io

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from models import ConvNet2d, EmbeddingModel, MLP, copy_peft_adapter_weights, tiny_llama

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

TARGETS = dict(target_modules=["seq.0", "seq.2"])


def pair():
    torch.manual_seed(0)
    base = MLP(16).eval()
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(**TARGETS))
    ours.add_adapter("other", LoraConfig(**TARGETS, r=4))
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**TARGETS, init_lora_weights=False))
    reference.add_adapter("other", peft.LoraConfig(**TARGETS, r=4, init_lora_weights=False))
    copy_peft_adapter_weights(reference, ours)
    return base, ours.eval(), reference.eval()


def exported(module, x, strict):
    return torch.export.export(module, (x,), strict=strict).module()


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("inner", [False, True], ids=["lora_model", "inner_model"])
def test_an_unmerged_model_exports_and_its_program_computes_peft_s_result(strict, inner):
    base, ours, reference = pair()
    x = torch.randn(4, 20)
    program = exported(ours.model if inner else ours, x, strict)
    with torch.no_grad():
        torch.testing.assert_close(program(x), reference(x), rtol=0, atol=0)
    names = set(program.state_dict())
    assert {"seq.0.lora_A.default.weight", "seq.2.lora_B.other.weight"} <= {n.removeprefix("model.") for n in names}


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_a_program_keeps_the_state_it_was_exported_in(strict):
    base, ours, reference = pair()
    x = torch.randn(4, 20)
    ours.set_adapter("other"), reference.set_adapter("other")
    other = exported(ours, x, strict)
    with ours.disable_adapter():
        plain = exported(ours, x, strict)
    ours.set_adapter("default")  # the programs do not follow the model
    with torch.no_grad():
        torch.testing.assert_close(other(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(plain(x), base(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(ours, (x,), strict=strict), buffer)
    buffer.seek(0)
    reference.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(buffer).module()(x), reference(x), rtol=0, atol=0)


class Scalable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, scale=None):
        h = self.lin(x)
        return self.out(h if scale is None else h * scale)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_a_call_pattern_first_met_by_export_is_traced_for_it(strict):
    torch.manual_seed(0)
    base = Scalable().eval()
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["lin", "out"], init_lora_weights=False))
    x, scale = torch.randn(3, 8), torch.tensor(2.0)
    program = torch.export.export(ours, (x,), {"scale": scale}, strict=strict).module()
    with torch.no_grad():
        torch.testing.assert_close(program(x, scale=scale), ours(x, scale=scale), rtol=0, atol=0)
        assert not torch.equal(program(x, scale=scale), base(x, scale=scale))  # the adapters act in it


def test_a_mixed_batch_cannot_be_exported_and_says_so():
    _, ours, _ = pair()
    x = torch.randn(2, 20)
    with pytest.raises(ValueError, match="adapter_names cannot be exported"):
        torch.export.export(ours, (x,), {"adapter_names": ["default", "other"]}, strict=False)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_a_causal_lm_exports_from_the_model_inside_and_computes_peft_s_logits(strict):
    """A transformers ``*ForCausalLM`` has a child called ``model``, which the attribute
    ``lora_model.model`` shadows for non-strict export's name lookup: export ``lora_model.model``
    (the same program either way)."""
    base = tiny_llama()
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules="all-linear"))
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear", init_lora_weights=False))
    copy_peft_adapter_weights(reference, ours)
    ids = torch.randint(0, 96, (2, 6))
    program = torch.export.export(ours.model, (), {"input_ids": ids, "use_cache": False}, strict=strict).module()
    with torch.no_grad():
        torch.testing.assert_close(program(input_ids=ids, use_cache=False).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


KINDS = {
    "dora": (lambda: MLP(16), dict(target_modules=["seq.0", "seq.2"], use_dora=True), lambda: torch.randn(4, 20)),
    "modules_to_save": (lambda: MLP(16), dict(target_modules=["seq.0"], modules_to_save=["seq.4"]), lambda: torch.randn(4, 20)),
    "conv": (ConvNet2d, dict(target_modules=["conv1", "conv2"]), lambda: torch.randn(2, 3, 8, 8)),
    "embedding": (EmbeddingModel, dict(target_modules=["emb", "proj"]), lambda: torch.randint(0, 50, (2, 5))),
}


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_other_layer_kinds_and_options_export_and_equal_peft(kind, strict):
    make, config, make_x = KINDS[kind]
    torch.manual_seed(0)
    base = make().eval()
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(**config)).eval()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config, init_lora_weights=False)).eval()
    copy_peft_adapter_weights(reference, ours)
    x = make_x()
    program = exported(ours, x, strict)
    with torch.no_grad():
        torch.testing.assert_close(program(x), reference(x), rtol=0, atol=0)
