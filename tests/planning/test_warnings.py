"""Adapters that may not act: warned (true warnings only) or refused at transform, on either path."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlora
from fxlora import LoraConfig, UnsupportedTargetError
from fxlora.planning.notes import call_notes
from models import copy_peft_adapter_weights
from zoo import TRANSFORMERS


def _transform(model, config, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lora = fxlora.transform(model, config, **kwargs)
    return lora, [str(w.message) for w in seen if str(w.message).startswith("fxlora:")]


# ---------------------------------------------------------------- read through the weight
class WindowAttention(nn.Module):
    """Both projections used through their weights, in code no rewrite turns into a call of them
    (a transposed weight; ``F.linear(x, layer.weight, layer.bias)`` is called instead, see
    tests/passes/test_weight_reads.py)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = (x @ self.qkv.weight.t() + self.qkv.bias).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return (attn @ v) @ self.proj.weight.t() + self.proj.bias


class Traced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = WindowAttention()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.attn(x))


class Untraced(Traced):
    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: the model does not trace, its children do
            x = x * 2
        return self.fc(self.attn(x))


@pytest.mark.parametrize("model_type", [Traced, Untraced])
def test_a_target_used_through_its_weight_gets_the_adapted_weight(model_type):
    """A pure weight update (no dropout, DoRA or B bias) acts where the parent uses the weight
    (`fxlora.passes.weight_uses`), in the graph, and merges exactly."""
    model = model_type().eval()
    x = torch.randn(2, 5, 8)
    lora, notes = _transform(model, LoraConfig(target_modules=["attn.qkv", "attn.proj"], init_lora_weights=False))
    assert lora.target_paths == {"attn.qkv": "graph", "attn.proj": "graph"}
    assert notes == ([] if model_type is Untraced else [notes[0]])
    with torch.no_grad():
        adapted = lora(x)
        with lora.disable_adapter():
            assert not torch.allclose(lora(x), adapted)
        lora.merge_adapter()
        assert torch.equal(lora(x), adapted)  # the merged weight is the one the parent computed with


@pytest.mark.parametrize("model_type", [Traced, Untraced])
def test_every_target_read_through_its_weight_warns_and_indeed_does_nothing(model_type):
    """With dropout on the branch input the adapter is no weight update: warned, and it does nothing."""
    model = model_type().eval()
    x = torch.randn(2, 5, 8)
    base = model(x)
    dropped = dict(init_lora_weights=False, lora_dropout=0.1)
    lora, notes = _transform(model, LoraConfig(target_modules=["attn.qkv", "attn.proj", "fc"], **dropped))
    assert len(notes) == 1 and notes[0].startswith("fxlora: attn.qkv, attn.proj: the parent reads the weight directly")
    report = lora.reports["default"]
    assert set(report.eager_targets) >= {"attn.qkv", "attn.proj"}
    assert "qkv, proj are used through their weights" in {r.name: r for r in report.rows}["attn.proj"].reason
    # the warning is true: adapters on the weight-read layers alone change nothing
    only_read, _ = _transform(model_type().eval(), LoraConfig(target_modules=["attn.qkv", "attn.proj"], **dropped))
    y = torch.randn(2, 5, 8)
    with torch.no_grad(), only_read.disable_adapter():
        plain = only_read(y)
    with torch.no_grad():
        assert torch.equal(only_read(y), plain)
        assert not torch.allclose(lora(x), base)  # fc's adapter does act


def test_a_second_adapter_on_a_weight_read_target_warns_too():
    lora, _ = _transform(Traced(), LoraConfig(target_modules=["fc"]))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lora.add_adapter("other", LoraConfig(target_modules=["attn.proj"], lora_dropout=0.1))
    assert any("attn.proj: the parent reads the weight directly" in str(w.message) for w in seen)
    assert any("attn.proj: the parent reads" in w for w in lora.reports["other"].warnings)


def test_torchvision_swin_t_projections_with_dropout_warn_and_do_nothing():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.swin_t(weights=None).eval()
    config = LoraConfig(
        target_modules=["features.1.0.attn.qkv", "features.1.0.attn.proj"], init_lora_weights=False, lora_dropout=0.1
    )
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
    lora, notes = _transform(model, config)
    assert len(notes) == 1 and "features.1.0.attn.qkv, features.1.0.attn.proj: the parent reads the weight" in notes[0]
    with torch.no_grad():
        assert torch.equal(lora(x), base)


# ---------------------------------------------------------------- reached only by some calls
class JointProcessor:
    """diffusers' JointAttnProcessor2_0 pattern: the context projections run only when the call
    passes encoder_hidden_states (diffusers is not installed here; this mimics SD3's blocks)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None):
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            return attn.to_out(query)
        joint = torch.cat([query, attn.add_q_proj(encoder_hidden_states)], dim=1)
        out = attn.to_out(joint)
        n = hidden_states.shape[1]
        return out[:, :n], attn.to_add_out(out[:, n:])


class JointAttention(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.to_q, self.add_q_proj, self.to_out, self.to_add_out = (nn.Linear(d, d) for _ in range(4))
        self.processor = JointProcessor()

    def forward(self, hidden_states, encoder_hidden_states=None):
        return self.processor(self, hidden_states, encoder_hidden_states)


class JointBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = JointAttention()

    def forward(self, hidden_states, encoder_hidden_states):
        if hidden_states.sum() > 1e9:  # data-dependent: the block does not trace, its attention does
            hidden_states = hidden_states * 2
        return self.attn(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states)


def test_context_projection_is_not_called_no_effect_and_does_act():
    model = JointBlock().eval()
    h, e = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    lora, notes = _transform(model, LoraConfig(target_modules=["to_q", "add_q_proj"], init_lora_weights=False))
    assert len(notes) == 1
    assert "attn.add_q_proj: not reached when attn is called with its required arguments only" in notes[0]
    assert "no effect" not in notes[0]
    with torch.no_grad():
        out = lora(h, e)
        with lora.disable_adapter():
            base = lora(h, e)
    assert not torch.allclose(out[1], base[1])  # add_q_proj's adapter acts in the real call
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    reference = peft.get_peft_model(JointBlock().eval(), peft.LoraConfig(target_modules=["to_q", "add_q_proj"], init_lora_weights=False))
    copy_peft_adapter_weights(reference, lora)
    with torch.no_grad():
        expected, ours = reference(h, e), lora(h, e)
    torch.testing.assert_close(ours[0], expected[0])
    torch.testing.assert_close(ours[1], expected[1])


def test_targets_the_probe_never_calls_warn_whichever_path():
    model = TRANSFORMERS["llama"].build()
    model.model.layers[0].mlp.spare = nn.Linear(model.config.hidden_size, model.config.hidden_size)
    lora, notes = _transform(model, LoraConfig(target_modules=["spare", "q_proj"]))
    assert len(notes) == 1
    assert notes[0].startswith("fxlora: model.layers.0.mlp.spare: not called in the forward fxlora ran on an example input")


def test_call_notes_say_only_what_is_known():
    class T:
        def __init__(self, name, path="graph", calls=1, weight_read=False, probed=None, planned_for="plainest", root="r", linear_reads=0):
            self.name, self.path, self.calls, self.weight_read = name, path, calls, weight_read
            self.probed, self.planned_for, self.root, self.linear_reads = probed, planned_for, root, linear_reads

    assert call_notes([T("a"), T("b", path="eager")]) == []  # nothing known: nothing said
    notes = call_notes([T(f"l{i}", path="eager", weight_read=True) for i in range(6)])
    assert notes[0].startswith("l0, l1, l2, l3, ... (6 layers): the parent reads")
    assert call_notes([T("g", calls=0, planned_for="probe", probed=False), T("e", path="eager", probed=False)])[0].startswith("g, e: not called")
    # a linear read the graph calls instead: said only where the root is not the parent, never "not called"
    assert call_notes([T("r.attn.qkv", probed=False, linear_reads=1, root="r")])[0].startswith("r.attn.qkv: the parent uses the weight")
    assert call_notes([T("r.qkv", probed=False, linear_reads=1, root="r")]) == []


# ---------------------------------------------------------------- refused at transform
class Router(nn.Linear):
    """transformers' Llama4Router pattern: a Linear subclass returning (scores, logits)."""

    def forward(self, x):
        logits = super().forward(x)
        return torch.sigmoid(logits), logits


class Routed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router(8, 4)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        scores, _ = self.router(x)
        return self.fc(x) * scores.sum(-1, keepdim=True)


@pytest.mark.parametrize("target_modules", [["router"], "all-linear"])
def test_a_layer_whose_forward_returns_a_tuple_is_refused(target_modules):
    model = Routed()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedTargetError, match=r"'router' \(Router\) returns a tuple \(Tensor, Tensor\).*not one tensor"):
        fxlora.transform(model, LoraConfig(target_modules=target_modules))
    assert list(model.state_dict()) == list(state) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not hasattr(model.router, "lora_A")
    fxlora.transform(model, LoraConfig(target_modules=["fc"]))  # the rest of the model is fine


def test_llama4_router_is_refused():
    transformers = pytest.importorskip("transformers")
    config = transformers.Llama4TextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, intermediate_size_mlp=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
        interleave_moe_layer_step=1, max_position_embeddings=64,
    )
    model = transformers.Llama4ForCausalLM(config).eval()
    with pytest.raises(UnsupportedTargetError, match=r"model.layers.0.feed_forward.router' \(Llama4Router\) returns a tuple"):
        fxlora.transform(model, LoraConfig(target_modules=["router"]))
    lora = fxlora.transform(model, LoraConfig(target_modules=["q_proj", "v_proj"]))  # the rest works
    lora(torch.randint(0, 64, (2, 5)))


def _nemotron_h():
    transformers = pytest.importorskip("transformers")
    config = transformers.NemotronHConfig(
        vocab_size=64, hidden_size=16, layers_block_type=["mamba", "attention"], num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_size=32, ssm_state_size=4, mamba_num_heads=2,
        mamba_head_dim=8, n_groups=1, conv_kernel=2, expand=1, chunk_size=4,
    )
    return transformers.NemotronHForCausalLM(config)


@pytest.mark.parametrize("target_modules", [["out_proj"], ["conv1d"], "all-linear"])
def test_mamba_fused_modules_are_refused_as_peft_refuses_them(target_modules):
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="incompatible with Mamba"):
        peft.get_peft_model(_nemotron_h(), peft.LoraConfig(target_modules=target_modules))
    with pytest.raises(UnsupportedTargetError, match=r"mixer\.(out_proj|conv1d)' cannot carry a LoRA adapter in a 'nemotron_h' model"):
        fxlora.transform(_nemotron_h(), LoraConfig(target_modules=target_modules))


def test_mamba_rule_needs_the_mamba_model_type():
    class Config:
        model_type = "llama"

    model = nn.Sequential()
    model.add_module("out_proj", nn.Linear(4, 4))
    model.config = Config()
    fxlora.transform(model, LoraConfig(target_modules=["out_proj"]))


# ---------------------------------------------------------------- read through the weight only sometimes
def _encoder(stack: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True) if stack else nn.Sequential(layer)


@pytest.mark.parametrize("stack", [False, True], ids=["layer", "encoder-nested"])
@pytest.mark.parametrize("trace", ["auto", "eager"])
def test_encoder_layer_fast_path_does_not_bypass_adapters_in_eval(stack, trace):
    """An eval-mode batch-first nn.TransformerEncoderLayer runs a fused kernel on linear1/linear2/
    norm weights (PEFT's adapters then do nothing in eval, silently): fxlora's adapters and saved
    copies act in eval as in training."""
    config = LoraConfig(target_modules=["linear1", "linear2"], modules_to_save=["norm1"], init_lora_weights=False)
    lora = fxlora.transform(_encoder(stack), config, trace=trace)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.5)
    x = torch.randn(2, 3, 8)
    mask = torch.tensor([[False, False, True], [False, False, False]]) if stack else None
    kwargs = {"src_key_padding_mask": mask} if stack else {}
    keep = ~mask if stack else torch.ones(2, 3, dtype=torch.bool)
    lora.train()
    trained = lora(x, **kwargs)
    lora.eval()
    with torch.no_grad():
        served = lora(x, **kwargs)
        with lora.disable_adapter():
            base = lora(x, **kwargs)
    torch.testing.assert_close(served[keep], trained[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(served[keep], base[keep])
    lora.add_adapter("other", LoraConfig(target_modules=["linear2"]))
    hooked = lambda: sum(len(m._forward_pre_hooks) for m in lora.model.modules())  # noqa: E731
    layers = 2 if stack else 1
    assert hooked() == 4 * layers  # one per adapted layer and saved copy, per adapter
    lora.delete_adapter("default")
    assert hooked() == layers  # "other"'s, on each linear2
    assert not any(m._forward_pre_hooks for m in lora.unload().modules())


def test_peft_adapters_on_an_encoder_layer_do_nothing_in_eval():
    """The PEFT defect fxlora does not copy (measured on peft 0.21.2)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_encoder(False), peft.LoraConfig(target_modules=["linear1", "linear2"], init_lora_weights=False)).eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        out = model(x)
        with model.disable_adapter():
            assert torch.equal(model(x), out)


def test_a_conv1d_subclass_returning_a_tuple_is_refused():
    transformers = pytest.importorskip("transformers")

    class Pair(transformers.pytorch_utils.Conv1D):
        def forward(self, x):
            out = super().forward(x)
            return out, out

    model = nn.Sequential()
    model.add_module("proj", Pair(6, 4))
    with pytest.raises(UnsupportedTargetError, match=r"'proj' \(Pair\) returns a tuple"):
        fxlora.transform(model, LoraConfig(target_modules=["proj"]))
