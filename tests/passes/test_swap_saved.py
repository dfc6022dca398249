import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.runtime.forwards import compile_graph
from fxlora.core.ops import select_output
from fxlora.passes import swap_saved_modules
from fxlora.tracing.call_keys import canonical_key
from fxlora.tracing.traced import trace_through_ids, trace_variant
from models import MLP


def test_saved_module_node_is_rewired_to_copy_with_gate():
    lora = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"], modules_to_save=["seq.4"]), trace="eager")
    root = lora.model
    graph = trace_variant(root, trace_through_ids(root, [root.seq[4]]), canonical_key(root, True)).graph
    assert swap_saved_modules(graph, root).sites == ("seq.4",)
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == "seq.4")
    copy_node = next(n for n in graph.nodes if n.target == "seq.4.modules_to_save.default")
    select = next(n for n in graph.nodes if n.target is select_output)
    assert copy_node.args == node.args
    assert select.args[1] is copy_node and select.args[2] is node
    assert [u.target for u in select.users] == ["seq.5"]
    fn = compile_graph(graph)
    with torch.no_grad():
        root.seq[4].modules_to_save.default.weight.add_(1.0)
    x = torch.randn(2, 20)
    torch.testing.assert_close(fn(root, lora.adapter_state.published, x), lora(x))
    with lora.disable_adapter():  # the code reads the gates it is handed
        torch.testing.assert_close(fn(root, lora.adapter_state.published, x), lora(x))
