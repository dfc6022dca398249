import copy

import torch
import torch.nn as nn
from hypothesis import given

import fxlora
from fxlora import LoraConfig
from fxlora.core.ops import add_scaled_linear, scale_update
from fxlora.passes import fold_scaling, insert_lora, skip_dropout
from models import ConvNet2d, MLP
from graph_helpers import base_graph


def test_linear_branch_becomes_one_addmm_node():
    lora = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0", "seq.2"]))
    root, graph = base_graph(lora)
    skip_dropout(graph, root)
    assert fold_scaling(graph, root).sites == ("seq.0", "seq.2")
    assert len(graph.find_nodes(op="call_function", target=add_scaled_linear)) == 2
    assert not any(".lora_B." in str(n.target) for n in graph.find_nodes(op="call_module"))
    graph.lint()


def test_conv_branch_scales_the_rank_channels():
    lora = fxlora.transform(ConvNet2d(), LoraConfig(target_modules=["conv1"]))
    root, graph = base_graph(lora)
    assert fold_scaling(graph, root).sites == ("conv1",)
    scale = graph.find_nodes(op="call_function", target=scale_update)[0]
    assert scale.args[0].target == "conv1.lora_A.default"
    assert [u.target for u in scale.users] == ["conv1.lora_B.default"]


def test_bias_in_b_is_left_alone():
    lora = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"], lora_bias=True))
    root, graph = base_graph(lora)
    assert fold_scaling(graph, root).count == 0


def test_mixed_batch_rows_still_scaled():
    torch.manual_seed(0)
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["seq.0"], lora_dropout=0.1, init_lora_weights=False))
    model.eval()
    x = torch.randn(4, 20)
    names = ["b", "default", "__base__", "default"]
    folded = model(x, adapter_names=names)
    model.set_optimizations(fold_scaling=False, share_lora_a=False, skip_dropout=False)
    torch.testing.assert_close(folded, model(x, adapter_names=names), rtol=1e-5, atol=1e-6)


from test_properties import setups  # noqa: E402  (random architectures, targets and configs)


@given(setup=setups())
def test_all_passes_keep_outputs_and_gradients(setup):
    net, shape, targets, config = setup
    config = config.replace(init_lora_weights=False)
    on = fxlora.transform(copy.deepcopy(net), config)
    off = fxlora.transform(copy.deepcopy(net), config)
    off.load_state_dict(on.state_dict())
    off.set_optimizations(skip_dropout=False, share_lora_a=False, fold_scaling=False)
    x = torch.randn(*shape)
    on.eval(), off.eval()
    torch.testing.assert_close(on(x), off(x), rtol=1e-5, atol=1e-6)
    on(x).square().sum().backward()
    off(x).square().sum().backward()
    grads_off = dict(off.named_parameters())
    for name, p in on.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_off[name].grad, rtol=1e-4, atol=1e-6)
