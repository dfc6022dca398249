import torch

import fxlora
from fxlora import LoraConfig
from fxlora.core.ops import shared_low_rank
from fxlora.passes import share_lora_a, skip_dropout
from graph_helpers import base_graph

from .pass_models import Attention


def test_projections_of_one_input_share_one_matmul():
    lora = fxlora.transform(Attention(), LoraConfig(target_modules="all-linear", rank_pattern={"k_proj": 2}))
    root, graph = base_graph(lora)
    skip_dropout(graph, root)
    assert sorted(share_lora_a(graph, root).sites) == ["gate", "k_proj", "q_proj", "up", "v_proj"]
    shared = graph.find_nodes(op="call_function", target=shared_low_rank)
    assert sorted(len(n.args[1]) for n in shared) == [2, 3]
    assert not any(n.target in ("q_proj.lora_A.default", "gate.lora_A.default") for n in graph.find_nodes(op="call_module"))
    assert any(n.target == "down.lora_A.default" for n in graph.find_nodes(op="call_module"))
    graph.lint()


def test_dropout_branches_keep_their_own_a():
    lora = fxlora.transform(Attention(), LoraConfig(target_modules=["q_proj", "k_proj"], lora_dropout=0.2))
    root, graph = base_graph(lora)
    skip_dropout(graph, root)
    assert share_lora_a(graph, root).count == 0


def test_outputs_and_gradients_equal():
    torch.manual_seed(0)
    on = fxlora.transform(Attention(), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    off = fxlora.transform(Attention(), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    off.load_state_dict(on.state_dict())
    off.set_optimizations(share_lora_a=False)
    assert "shared_low_rank" in on.graph_code() and "shared_low_rank" not in off.graph_code()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(on(x), off(x), rtol=1e-5, atol=1e-6)
    on(x).sum().backward(), off(x).sum().backward()
    ref = dict(off.named_parameters())
    for name, p in on.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-6)
