import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.core.gates import EagerKey
from fxlora.core.ops import add_update
from fxlora.passes import insert_lora, mark_base_calls, swap_saved_modules, tag_of
from fxlora.passes.insert_lora import branch_template
from fxlora.tracing.call_keys import canonical_key
from fxlora.tracing.traced import trace_through_ids, trace_variant


class Reuse(nn.Module):
    """One layer called twice, once with a keyword input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(input=self.fc(x))


def traced_after_transform(model, targets):
    """A transformed model (graph path) and a fresh base graph of its root, not yet rewritten."""
    lora = fxlora.transform(model, LoraConfig(target_modules=targets, init_lora_weights=False))
    root = lora.model
    interesting = [root.get_submodule(t) for t in targets]
    graph = trace_variant(root, trace_through_ids(root, interesting), canonical_key(root, True)).graph
    return lora, root, graph


def test_every_call_site_gets_a_branch_and_users_read_it():
    lora, root, graph = traced_after_transform(Reuse(), ["fc"])
    assert insert_lora(graph, root).sites == ("fc", "fc")
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == "fc"]
    for node in calls:
        outer = [u for u in node.users if u.target is add_update]
        assert len(outer) == 1
        assert all(tag_of(u).layer == "fc" and tag_of(u).site == node.name for u in node.users)
    # the keyword input of the second call (the first call's adapted output) feeds its branch
    first_out = next(u for u in calls[0].users if u.target is add_update)
    casts = [n for n in graph.nodes if n.op == "call_function" and n.target.__name__ == "cast_like"]
    assert [c.args[0] for c in casts] == [calls[0].args[0], first_out]
    graph.lint()


def test_pass_output_equals_eager_math():
    torch.manual_seed(0)
    lora, root, graph = traced_after_transform(Reuse(), ["fc"])
    insert_lora(graph, root)
    mark_base_calls(graph, root)  # the layers' own forwards would add the branch a second time
    from fxlora.runtime.forwards import compile_graph

    fn = compile_graph(graph)
    x = torch.randn(3, 4)
    eager = fxlora.transform(Reuse(), LoraConfig(target_modules=["fc"], init_lora_weights=False), trace="eager")
    eager.load_state_dict(lora.state_dict())
    torch.testing.assert_close(fn(root, lora.adapter_state.published, x), eager(x))
    torch.testing.assert_close(lora(x), eager(x))


def test_template_nodes_for_each_kind():
    model = nn.Module()
    model.lin = nn.Linear(3, 3)
    model.emb = nn.Embedding(5, 3)
    model.conv = nn.Conv2d(2, 2, 3)
    fxlora.transform(model, LoraConfig(target_modules=["lin", "emb", "conv"]), trace="eager")
    lin = [(n.op, str(n.target)) for n in branch_template(model.lin).nodes]
    assert ("call_module", "lora_dropout.default") in lin and ("call_module", "lora_A.default") in lin
    # the gate comes from the call's gate state, the scaling is a template input: no model tensor
    assert any(op == "call_function" and "adapter_gate" in t for op, t in lin)
    assert not any("lora_scaling" in t or "lora_gates" in t for _, t in lin)
    emb = [(n.op, str(n.target)) for n in branch_template(model.emb).nodes]
    assert ("get_attr", "lora_embedding_A.default") in emb and not any("dropout" in t for _, t in emb)
    assert any("embedding" in t for _, t in emb)


def test_untargeted_graph_is_unchanged():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    graph = torch.fx.Tracer().trace(model)
    before = [(n.op, n.target) for n in graph.nodes]
    assert insert_lora(graph, model).count == 0
    assert [(n.op, n.target) for n in graph.nodes] == before


def test_base_calls_are_marked_only_on_adapted_and_saved_modules():
    from fxlora.core.layers import BASE_ONLY
    from models import MLP

    lora = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"], modules_to_save=["seq.4"]))
    root = lora.model
    interesting = [root.seq[0], root.seq[4]]
    graph = trace_variant(root, trace_through_ids(root, interesting), canonical_key(root, True)).graph
    swap_saved_modules(graph, root)
    insert_lora(graph, root)
    assert mark_base_calls(graph, root).sites == ("seq.0", "seq.4")
    marked = {n.target for n in graph.find_nodes(op="call_module") if n.kwargs.get(BASE_ONLY)}
    assert marked == {"seq.0", "seq.4"}


def test_mixed_batch_eager_code_hands_each_linear_layer_to_one_node():
    """With row gates (gate values None), a linear layer's branch is one `stacked_layer_update`
    node reading the layer (a get_attr of its path), no attribute read per tensor."""
    from fxlora.core.ops import stacked_layer_update

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Conv1d(1, 1, 1))
    lora = fxlora.transform(model, LoraConfig(target_modules=["0"], init_lora_weights=False), adapter_name="a")
    lora.add_adapter("b", LoraConfig(target_modules=["0"], r=2, init_lora_weights=False))
    root = lora.model
    graph = trace_variant(root, trace_through_ids(root, [root[0]]), canonical_key(root, True)).graph
    assert insert_lora(graph, root, EagerKey(("a", "b"), None, rows=True)).sites == ("0",)
    (node,) = graph.find_nodes(op="call_function", target=stacked_layer_update)
    layer = node.args[2]
    assert layer.op == "get_attr" and layer.target == "0" and node.args[3] == ("a", "b")
    assert not [n for n in graph.nodes if n.op == "get_attr" and "lora_" in n.target]
    graph.lint()
