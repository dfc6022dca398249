"""transformers forward wrappers fxlora sees through. Models whose ``forward`` is wrapped by
``can_return_tuple`` and returns a ``ModelOutput``: heads on them (BERT's ``classifier``, ViT's,
CLIP's projections) are in the graph, which returns the output's items and the call rebuilds the
same type; ``return_dict=False`` in the call or the config keeps the wrapper's tuple, exactly as
peft. Layers sitting directly in a ``GradientCheckpointingLayer`` (OPT's ``fc1`` / ``fc2``) are in
its graph while it does not checkpoint."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from models import paired  # noqa: E402
from zoo_sweep import build, sweep_inputs  # noqa: E402

HEADS = {"bert": ["classifier"], "distilbert": ["pre_classifier", "classifier"], "vit": ["classifier"], "clip": ["visual_projection", "text_projection"]}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_on_a_wrapped_top_level_forward_are_in_the_graph_and_equal_peft(name, eager_fallbacks):
    base = build(name)
    reference, ours = paired(base, "all-linear")
    assert all(ours.target_paths[head] == "graph" for head in HEADS[name])
    assert set(ours.target_paths.values()) == {"graph"}
    inputs = sweep_inputs(base)
    with torch.no_grad():
        out, expected = ours(**inputs), reference(**inputs)
        assert type(out) is type(expected) and list(out.keys()) == list(expected.keys())
        for key in out.keys():
            if isinstance(out[key], torch.Tensor):
                assert torch.equal(out[key], expected[key]), key
    assert eager_fallbacks == []


def test_return_dict_false_keeps_the_tuple_in_the_call_and_in_the_config():
    base = build("bert")
    reference, ours = paired(base, "all-linear")
    inputs = sweep_inputs(base)
    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)
        got = ours(**inputs, return_dict=False)  # the wrapper acts: the original forward runs
        assert type(got) is tuple and all(torch.equal(a, b) for a, b in zip(got, expected))
        ours.config.return_dict = False  # a guard of the graph: traced again, and refused (the wrapper acts)
        got = ours(**inputs)
        assert type(got) is tuple and torch.equal(got[0], expected[0])
        ours.config.return_dict = True
        assert type(ours(**inputs)) is transformers.modeling_outputs.SequenceClassifierOutput


def test_a_rebuilt_output_compiles_without_graph_breaks():
    base = build("bert")
    _, ours = paired(base, "all-linear")
    inputs = sweep_inputs(base)
    with torch.no_grad():
        expected = ours(**inputs).logits
        compiled = torch.compile(ours, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(**inputs).logits, expected)  # the gated code: equal up to rounding


def test_training_through_the_graph_matches_peft():
    base = build("bert")
    reference, ours = paired(base, "all-linear")
    inputs = sweep_inputs(base)
    labels = torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long)
    ours.train(), reference.train()  # the model's own dropout draws the same masks under one seed
    torch.manual_seed(0)
    ours(**inputs, labels=labels).loss.backward()
    torch.manual_seed(0)
    reference(**inputs, labels=labels).loss.backward()
    grad = ours.model.classifier.lora_B["default"].weight.grad
    assert grad is not None and torch.equal(grad, reference.base_model.model.classifier.lora_B["default"].weight.grad)


# ------------------------------------------------------------------ layers sitting in a GradientCheckpointingLayer
def test_layers_directly_in_a_checkpointing_layer_are_in_its_graph_and_checkpointing_still_works(eager_fallbacks):
    """OPT's ``fc1`` / ``fc2`` sit in the decoder layer itself: the layer is a graph root of its own,
    whose graph calls the attention (a root too). After ``gradient_checkpointing_enable()`` the
    layer's own wrapper checkpoints it (the layer is recomputed in backward) and gradients stay
    those of the plain run."""
    base = build("opt")
    reference, ours = paired(base, "all-linear")
    assert ours.target_paths["model.decoder.layers.0.fc1"] == "graph"
    assert "model.decoder.layers.0" in ours.graph_roots and "model.decoder.layers.0.self_attn" in ours.graph_roots
    inputs = sweep_inputs(base)
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, reference(**inputs).logits)
    ours.train(), reference.train()
    attention = ours.model.get_submodule("model.decoder.layers.0.self_attn")
    runs = []
    attention.register_forward_pre_hook(lambda *_: runs.append(1))

    def gradients(model):
        runs.clear()
        model.zero_grad()
        torch.manual_seed(0)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n.replace("base_model.model.", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients(ours)
    assert runs == [1]
    expected = gradients(reference)
    assert plain.keys() == expected.keys() and all(torch.equal(plain[n], expected[n]) for n in plain)
    assert eager_fallbacks == []
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = gradients(ours)
    assert runs == [1, 1]  # recomputed in backward: the layer's wrapper checkpointed it
    layers = len(ours.model.model.decoder.layers)
    assert eager_fallbacks == ["OPTDecoderLayer"] * layers  # each layer ran its own (checkpointing) forward
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)
    ours.gradient_checkpointing_disable()
    again = gradients(ours)
    assert runs == [1] and all(torch.equal(again[n], plain[n]) for n in plain)
    assert len(eager_fallbacks) == layers  # and their graphs serve again
