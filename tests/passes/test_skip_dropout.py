import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.passes import PassOptions, skip_dropout
from graph_helpers import base_graph
from models import MLP


def test_removes_only_noop_dropout():
    lora = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    lora.add_adapter("noisy", LoraConfig(target_modules=["seq.0"], lora_dropout=0.3, lora_bias=True))
    root, graph = base_graph(lora)
    assert skip_dropout(graph, root).sites == ("seq.0",)
    called = [n.target for n in graph.find_nodes(op="call_module")]
    assert "seq.0.lora_dropout.default" not in called and "seq.0.lora_dropout.noisy" in called
    graph.lint()


def test_outputs_equal_with_and_without():
    torch.manual_seed(0)
    a = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False))
    x = torch.randn(3, 20)
    before = a(x)
    a.set_optimizations(skip_dropout=False)
    assert "lora_dropout" in a.graph_code()
    torch.testing.assert_close(a(x), before)
    a.set_optimizations(skip_dropout=True)
    assert "lora_dropout" not in a.graph_code()


def test_options_validation():
    lora = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    import pytest

    with pytest.raises(ValueError, match="unknown optimisation"):
        lora.set_optimizations(fuse_everything=True)
    assert PassOptions.none() == PassOptions(skip_dropout=False, share_lora_a=False, fold_scaling=False)
