"""The tags passes leave on nodes: set from the branch template by object identity (so a module
path or an adapter name that looks like fxlora's own names cannot fool them), one site per call."""

from __future__ import annotations

import operator

import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.core.ops import shared_low_rank
from fxlora.passes import PassContext, Role, run_pipeline, tag_of
from fxlora.passes.base_calls import MARK_BASE_CALLS
from fxlora.passes.insert_lora import INSERT_LORA
from fxlora.passes.swap_saved import SWAP_SAVED
from fxlora.passes.tags import BRANCH_ROLES, tagged

from .pass_models import MODELS, fresh_graph
from .test_insert_lora import Reuse

_MODULE_ROLES = {Role.LORA_A: "lora_A", Role.LORA_B: "lora_B", Role.DROPOUT: "lora_dropout"}


def inserted(lora, ctx=PassContext()):
    root, graph = fresh_graph(lora, ctx.training)
    for p in (SWAP_SAVED, INSERT_LORA, MARK_BASE_CALLS):
        p(graph, root, ctx, check=True)
    return root, graph


def by_site(graph):
    sites = {}
    for node in tagged(graph, *BRANCH_ROLES):
        sites.setdefault(tag_of(node).site, []).append(node)
    return sites


def check_module_roles(graph, root):
    """Every tagged adapter-module call calls the module its role and adapter say."""
    for node in tagged(graph, *_MODULE_ROLES):
        if node.op != "call_module":
            continue
        tag = tag_of(node)
        layer = root.get_submodule(tag.layer)
        assert root.get_submodule(node.target) is layer.get_submodule(_MODULE_ROLES[tag.role])[tag.adapter], node


def test_every_branch_node_names_its_layer_call_role_and_adapter():
    lora, _ = MODELS["mixed"]()
    root, graph = inserted(lora)
    sites = by_site(graph)
    layers = {n.name: n for n in tagged(graph, Role.LAYER)}
    assert set(sites) == set(layers)
    for site, nodes in sites.items():
        assert {tag_of(n).layer for n in nodes} == {layers[site].target}
        assert [tag_of(n).role for n in nodes].count(Role.ADD) == 1
    check_module_roles(graph, root)
    proj = [tag_of(n) for n in sites[layers_named(layers, "proj")]]
    for adapter in ("default", "noisy"):
        assert {t.role for t in proj if t.adapter == adapter} >= {Role.DROPOUT, Role.LORA_A, Role.LORA_B, Role.SCALE}
    emb = [tag_of(n) for n in sites[layers_named(layers, "emb")]]
    assert Role.READ in {t.role for t in emb if t.adapter == "default"}  # the A table, no A call
    assert Role.LORA_A not in {t.role for t in emb}


def layers_named(layers, path):
    (name,) = [site for site, node in layers.items() if node.target == path]
    return name


def test_saved_module_nodes_are_tagged_by_swap_saved():
    lora, _ = MODELS["mixed"]()
    root, graph = inserted(lora)
    (saved,) = tagged(graph, Role.SAVED)
    copies = tagged(graph, Role.COPY)
    assert saved.target == "head" and [tag_of(c).adapter for c in copies] == ["default", "noisy"]
    assert all(root.get_submodule(c.target) is root.head.modules_to_save[tag_of(c).adapter] for c in copies)
    assert all(tag_of(n).site == saved.name for n in copies + tagged(graph, Role.SELECT))


def test_a_layer_called_twice_has_two_sites():
    lora = fxlora.transform(Reuse(), LoraConfig(target_modules=["fc"]))
    root, graph = inserted(lora)
    calls = tagged(graph, Role.LAYER)
    assert [c.target for c in calls] == ["fc", "fc"]
    sites = by_site(graph)
    assert set(sites) == {c.name for c in calls}
    for call in calls:
        assert all(tag_of(u).site == call.name for u in call.users)


class Misleading(nn.Module):
    """Module paths spelled like fxlora's adapter children."""

    def __init__(self):
        super().__init__()
        self.lora_A = nn.ModuleDict({"q": nn.Linear(6, 6), "k": nn.Linear(6, 6)})
        self.lora_dropout = nn.Linear(6, 6)

    def forward(self, x):
        return self.lora_dropout(self.lora_A["q"](x) + self.lora_A["k"](x))


def test_names_that_look_like_fxlora_children_do_not_fool_the_passes():
    torch.manual_seed(0)
    config = LoraConfig(target_modules=["lora_A.q", "lora_A.k", "lora_dropout"], init_lora_weights=False)
    lora = fxlora.transform(Misleading(), config, adapter_name="lora_B")
    root, graph = fresh_graph(lora)
    results = {r.name: r for r in run_pipeline(graph, root, PassContext(), check=True)}
    assert results["skip_dropout"].sites == ("lora_A.q", "lora_A.k", "lora_dropout")
    assert sorted(results["share_lora_a"].sites) == ["lora_A.k", "lora_A.q"]
    assert results["fold_scaling"].sites == ("lora_A.q", "lora_A.k", "lora_dropout")
    (shared,) = graph.find_nodes(op="call_function", target=shared_low_rank)
    assert tag_of(shared).role is Role.SHARED_A and tag_of(shared).adapter == "lora_B"
    assert {tag_of(u).layer for u in shared.users if u.target is operator.getitem} == {"lora_A.q", "lora_A.k"}
    check_module_roles(graph, root)
    x = torch.randn(3, 6)
    out = lora(x)
    lora.set_optimizations(skip_dropout=False, share_lora_a=False, fold_scaling=False)
    torch.testing.assert_close(lora(x), out, rtol=1e-5, atol=1e-6)
