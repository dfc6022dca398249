import pytest
import torch
import torch._dynamo

import fxlora
from fxlora import LoraConfig
from fxlora.core.layers import BASE_ONLY, GUARD_IDLE
from fxlora.passes import PassOptions, guard_idle_branches, rewrite
from fxlora.tracing.call_keys import canonical_key
from fxlora.tracing.traced import trace_through_ids, trace_variant
from models import MLP


def adapted(**config):
    torch.manual_seed(0)
    config = {"target_modules": ["seq.0", "seq.2"], "modules_to_save": ["seq.4"], "init_lora_weights": False, **config}
    return fxlora.transform(MLP(16), LoraConfig(**config))


def traced(lora, training):
    root = lora.model
    interesting = [root.get_submodule(n) for n in lora.targeted_module_names + ["seq.4"]]
    return root, trace_variant(root, trace_through_ids(root, interesting), canonical_key(root, training)).graph


def test_marks_adapted_calls_and_keeps_the_rest():
    lora = adapted()
    root, graph = traced(lora, training=False)
    assert guard_idle_branches(graph, root).sites == ("seq.0", "seq.2")
    marked = {n.target for n in graph.find_nodes(op="call_module") if n.kwargs.get(GUARD_IDLE)}
    assert marked == {"seq.0", "seq.2"}  # the saved module is not an adapted layer


def test_rewrite_guards_only_gated_evaluation_code():
    lora = adapted()
    options = PassOptions(guard_idle=True)
    root, graph = traced(lora, training=False)
    code = rewrite(graph, root, options, training=False).python_code("self").src
    assert GUARD_IDLE in code and "lora_A" not in code  # the layers compute their own branches
    assert code.count(BASE_ONLY) == 1  # only the saved module is asked for its base output
    root, graph = traced(lora, training=True)
    assert GUARD_IDLE not in rewrite(graph, root, options, training=True).python_code("self").src
    root, graph = traced(lora, training=False)
    assert GUARD_IDLE not in rewrite(graph, root, PassOptions(), training=False).python_code("self").src


def _graphs_with_cond(model):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    return compiled, graphs


@pytest.mark.parametrize("grad", [False, True])
def test_compiled_outputs_follow_every_state_without_recompiling(grad, cond_kept):
    torch._dynamo.reset()
    lora = adapted()
    lora.add_adapter("other", LoraConfig(target_modules=["seq.0"], r=4, init_lora_weights=False))
    lora.set_optimizations(guard_idle=True)
    lora.eval()
    compiled, graphs = _graphs_with_cond(lora)
    x = torch.randn(5, 20)
    seen = []
    with torch.set_grad_enabled(grad):
        for label, change in [
            ("unmerged", lambda: None),
            ("merged", lora.merge_adapter),
            ("unmerged again", lora.unmerge_adapter),
            ("other", lambda: lora.set_adapter("other")),
            ("disabled", lora.disable_adapter_layers),
        ]:
            change()
            got, want = compiled(x), lora(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=label)
            seen.append(got.detach())
    assert len(graphs) == 1
    assert any("cond" in str(n.target) for n in graphs[0].graph.nodes)
    assert not torch.allclose(seen[0], seen[3]) and not torch.allclose(seen[0], seen[4])
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_gradients_through_guarded_code_equal_eager(cond_kept):
    torch._dynamo.reset()
    lora = adapted()
    lora.set_optimizations(guard_idle=True)
    lora.eval()
    x = torch.randn(5, 20)
    compiled = torch.compile(lora, fullgraph=True, backend="aot_eager")
    grads = []
    for model in (compiled, lora):
        lora.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)
    torch._dynamo.reset()
