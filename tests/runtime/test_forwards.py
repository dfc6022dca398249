"""The installed forwards: graph code per call pattern, eager fallback, copying and pickling."""

import copy
import dataclasses
import pickle
import re

import pytest

import torch

import fxlora
from fxlora import LoraConfig
from fxlora.core.gates import EagerKey
from fxlora.runtime.forwards import EagerLoraForward, GraphForward, SavedForward, installed_forward
from models import MLP, Mixed, OptionalArgs


def test_train_and_eval_both_run_graph_code(eager_fallbacks):
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    fwd = installed_forward(model.model)
    assert isinstance(fwd, GraphForward)
    x = torch.randn(2, 20)
    model.train()
    model(x)
    model.eval()
    model(x)
    assert eager_fallbacks == [] and fwd.failures == {}
    assert {key[0] for key in fwd.gated_code()} == {True, False}


def test_eval_variant_traced_on_mode_switch_not_on_call():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    fwd = installed_forward(model.model)
    assert [key[0] for key in fwd.gated_code()] == [True]
    model.eval()
    assert sorted(key[0] for key in fwd.gated_code()) == [False, True]


def test_new_call_patterns_are_traced_once(eager_fallbacks):
    model = fxlora.transform(OptionalArgs(), LoraConfig(target_modules=["fc", "gate"]))
    fwd = installed_forward(model.model)
    x = torch.randn(2, 8)
    model(x, mask=torch.ones(2, 8))
    model(x, mask=torch.zeros(2, 8))
    model(x, None, 2.0)
    assert eager_fallbacks == []
    assert len(fwd.variants) == 3


def test_unsupported_arguments_run_eagerly_with_the_same_math(eager_fallbacks):
    base = OptionalArgs()
    ref_model = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["fc", "gate"], init_lora_weights=False), trace="eager")
    model = fxlora.transform(base, LoraConfig(target_modules=["fc", "gate"], init_lora_weights=False))
    model.load_state_dict(ref_model.state_dict())
    model.eval(), ref_model.eval()
    x = torch.randn(2, 8)
    weird = torch.tensor(2.0).item  # a callable: not a tensor nor a constant
    scale = [1.5]  # a list: not traced
    out = model(x, None, torch.tensor(1.5))
    assert torch.equal(out, ref_model(x, None, torch.tensor(1.5)))
    with pytest.raises(TypeError):
        model(x, None, weird)  # the original forward raises its own error
    assert len(eager_fallbacks) == 1


def test_eager_and_saved_forwards_installed_where_expected():
    model = fxlora.transform(Mixed(), LoraConfig(target_modules="all-linear", exclude_modules=["head"], modules_to_save=["head"]))
    assert isinstance(installed_forward(model.get_submodule("stem")), EagerLoraForward)
    assert isinstance(installed_forward(model.get_submodule("head")), SavedForward)
    assert isinstance(installed_forward(model.get_submodule("blocks.1")), GraphForward)
    # inside a graph too: any call outside the graph code computes with LoRA
    assert isinstance(installed_forward(model.get_submodule("blocks.1.0")), EagerLoraForward)
    x = torch.randn(2, 8)
    eager = fxlora.transform(Mixed(), LoraConfig(target_modules="all-linear", exclude_modules=["head"], modules_to_save=["head"]), trace="eager")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    eager.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.get_submodule("blocks.1")(x), eager.get_submodule("blocks.1")(x))


def test_pickle_keeps_graphs_and_rebuilds_code():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"], init_lora_weights=False))
    model.eval()
    x = torch.randn(2, 20)
    clone = pickle.loads(pickle.dumps(model))
    fwd = installed_forward(clone.model)
    assert fwd.root is clone.model
    assert sorted(key[0] for key in fwd.gated_code()) == [False, True]  # rebuilt on load
    assert torch.equal(clone(x), model(x))


def test_graph_code_is_straight_line():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"], lora_dropout=0.1))
    model.set_optimizations(fold_scaling=False)
    code = model.graph_code()
    assert "lora_dropout.default(" in code and "lora_A.default(" in code and "lora_B.default(" in code
    # gates come from the call's gate state (the first input), the scaling is a number in the code
    assert "def forward(self, _fxlora_gates," in code and "adapter_gate(_fxlora_gates, 'default'" in code
    assert " if " not in code and "for " not in code
    with pytest.raises(ValueError, match="not a graph root"):
        model.graph_code("seq.0")


def test_eager_code_runs_only_live_branches_and_compiled_code_is_gated():
    torch.manual_seed(0)
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["seq.2"], init_lora_weights=False))
    model.eval()
    fwd = installed_forward(model.model)
    x = torch.randn(2, 20)
    model(x)
    eager = next(code for (_, key), code in fwd._eager.items() if key == EagerKey(("default",), ("default",)))[0]
    import inspect

    code = inspect.getsource(eager)
    # module reads are shared (`share_module_reads`): adapter modules appear as `.lora_A`, then `.default`
    assert not re.search(r"\.b\b", code) and re.search(r"\.default\b", code) and "select_output" not in code
    assert "modules_to_save.default(" in code  # the copy is called instead of the original
    with model.disable_adapter():
        model(x)
    off = next(code for (_, key), code in fwd._eager.items() if key == EagerKey((), ()))[0]
    off_code = inspect.getsource(off).replace("fxlora_runtime_lowering_base_forward", "").replace("_fxlora_gates", "")
    assert "lora" not in off_code and "modules_to_save" not in off_code
    with torch.no_grad():  # a NaN in an inactive adapter does not reach eager outputs
        model.get_submodule("seq.2.lora_B.b").weight.fill_(float("nan"))
    assert torch.isfinite(model(x)).all()


from hypothesis import given, strategies as st  # noqa: E402

from test_properties import setups  # noqa: E402


def gated_output(model, x):
    """The output of the gated code (what torch.compile runs): a gate state without eager key."""
    state = model.adapter_state
    with state.calling(dataclasses.replace(state.published, eager=None)):
        return model(x)


@given(setup=setups(), data=st.data())
def test_eager_state_code_equals_gated_code(setup, data):
    net, shape, targets, config = setup
    model = fxlora.transform(net, config.replace(init_lora_weights=False))
    second = data.draw(st.lists(st.sampled_from(targets), min_size=1, unique=True))
    model.add_adapter("b", LoraConfig(target_modules=second, r=2, init_lora_weights=False))
    model.eval()
    x = torch.randn(*shape)
    steps = [
        lambda: model.set_adapter("b"),
        lambda: model.set_adapter(["default", "b"]),
        lambda: model.set_adapter_scale("b", 0.5),
        lambda: model.disable_adapter_layers(),
        lambda: model.enable_adapter_layers(),
        lambda: model.set_adapter("default"),
    ]
    for step in steps:
        step()
        torch.testing.assert_close(model(x), gated_output(model, x), rtol=1e-5, atol=1e-6)


def test_a_root_that_needed_ranks_traces_a_new_pattern_with_ranks_at_once(monkeypatch):
    """A call pattern first met at run time on a root planned with ranks (transformers' attention)
    is traced with ranks, without a rank-free attempt that would fail again, for both blocks at
    once; its code computes what the attention's own forward computes with the eager branches."""
    transformers = pytest.importorskip("transformers")
    from fxlora.tracing import traced

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    model = fxlora.transform(transformers.LlamaForCausalLM(config).eval(), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    attention = model.model.model.layers[0].self_attn
    forward = installed_forward(attention)
    assert isinstance(forward, GraphForward) and forward.ranked
    hidden = torch.randn(2, 5, 32)
    rotary = model.model.model.rotary_emb(hidden, torch.arange(5)[None])
    outcomes = []

    def spy(*args, _trace=traced._trace, **kwargs):
        try:
            result = _trace(*args, **kwargs)
        except Exception:
            outcomes.append("failed")
            raise
        outcomes.append("traced")
        return result

    monkeypatch.setattr(traced, "_trace", spy)
    known = set(forward.variants)
    with torch.no_grad():
        out, _ = attention(hidden_states=hidden, position_embeddings=rotary, attention_mask=None)
        new = set(forward.variants) - known
        assert outcomes == ["traced", "traced"] and new  # no rank-free attempt; the second block's trace lifts layer_idx
        assert new <= set(installed_forward(model.model.model.layers[1].self_attn).variants)  # traced with the first
        expected, _ = forward._run_eagerly((), dict(hidden_states=hidden, position_embeddings=rotary, attention_mask=None))
    assert torch.equal(out, expected)
