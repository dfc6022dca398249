"""`fxlora.tracing.tracer.LoraTracer` turns arguments into graph arguments as torch.fx does."""

import torch
import torch.fx as fx
import torch.nn as nn

from fxlora.tracing.tracer import LoraTracer


def test_create_arg_gives_what_torch_fx_gives():
    root = nn.Sequential(nn.Linear(2, 2))
    ours, theirs = LoraTracer({id(root)}), fx.Tracer()
    graphs = []
    for tracer in (ours, theirs):
        tracer.root, tracer.graph, tracer.tensor_attrs = root, fx.Graph(), {}
        tracer.submodule_paths = None
        x = tracer.create_proxy("placeholder", "x", (), {})
        values = [1, 2.5, True, "s", None, ..., torch.float16, x, (x, 1), [x, "a"], {"k": x}, slice(1, x), root[0].weight]
        graphs.append((tracer.graph, [tracer.create_arg(v) for v in values]))
    (g1, a1), (g2, a2) = graphs
    assert [type(a) for a in a1] == [type(a) for a in a2]
    assert str(a1) == str(a2)  # nodes print by name: the same names, the same structure
    assert [(n.op, n.target) for n in g1.nodes] == [(n.op, n.target) for n in g2.nodes]  # the weight: one get_attr
