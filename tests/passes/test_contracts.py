"""Each pass's contract is real: `requires` refuses a graph it cannot work on, `ensures` refuses a
graph where the pass's work is not done, and the error names the pass and the condition."""

from __future__ import annotations

import pytest

from fxlora.core.layers import BASE_ONLY
from fxlora.core.ops import scale_update
from fxlora.passes import PIPELINE, PassContext, Role, tag_of
from fxlora.errors import PassContractError
from fxlora.passes.tags import tagged
from fxlora.tracing.call_keys import canonical_key
from fxlora.tracing.traced import trace_through_ids, trace_variant

from .pass_models import MODELS, contexts, fresh_graph, graph_before

PASSES = {stage.pass_.name: stage.pass_ for stage in PIPELINE}


def refused(name, clause, condition):
    """pytest.raises for `name`'s contract error on `condition` (a part of its text)."""
    return pytest.raises(PassContractError, match=f"^{name} {clause}: .*{condition}")


def traced_through(lora, path):
    """A base graph of `lora`'s root traced *through* the module at `path` (not a leaf)."""
    root = lora.model
    names = lora.targeted_module_names + lora.modules_to_save_names
    through = trace_through_ids(root, [root.get_submodule(n) for n in names]) | {id(root.get_submodule(path))}
    return root, trace_variant(root, through, canonical_key(root, True)).graph


# ------------------------------------------------------------------ ensures: the work is done
WORK = [
    ("call_weight_reads", "weight_reads", "gated-train"),
    ("call_weight_reads", "weight_reads", "eager-mixed-batch"),
    ("swap_saved_modules", "mixed", "gated-train"),
    ("swap_saved_modules", "mixed", "eager-known"),
    ("guard_idle_branches", "mixed", "gated-eval-guarded"),
    ("insert_lora", "mixed", "gated-train"),
    ("insert_lora", "attention", "eager-mixed-batch"),
    ("mark_base_calls", "mixed", "gated-train"),
    ("skip_dropout", "mixed", "gated-train"),
    ("share_lora_a", "attention", "gated-train"),
    ("fold_scaling", "attention", "gated-train"),
]


@pytest.mark.parametrize("name, model, ctx_name", WORK)
def test_ensures_fails_before_the_pass_and_holds_after(name, model, ctx_name):
    lora, adapters = MODELS[model]()
    ctx = contexts(adapters)[ctx_name]
    root, graph = graph_before(lora, ctx, name)
    target = PASSES[name]
    target.requires(graph, root, ctx)
    with refused(name, "ensures", ""):
        target.ensures(graph, root, ctx)
    assert target.run(graph, root, ctx).count > 0
    target.ensures(graph, root, ctx)


# ------------------------------------------------------------------ requires: one violation per pass
def test_swap_saved_refuses_a_graph_it_already_rewrote():
    lora, _ = MODELS["mixed"]()
    root, graph = graph_before(lora, PassContext(), "guard_idle_branches")
    with refused("swap_saved_modules", "requires", "no node is tagged"):
        PASSES["swap_saved_modules"].requires(graph, root, PassContext())


def test_swap_saved_refuses_a_saved_module_traced_into():
    lora, _ = MODELS["mixed"]()
    root, graph = traced_through(lora, "head")
    with refused("swap_saved_modules", "requires", "every saved module is a leaf"):
        PASSES["swap_saved_modules"].requires(graph, root, PassContext())


def test_guard_idle_refuses_a_graph_with_branches():
    lora, adapters = MODELS["mixed"]()
    ctx = contexts(adapters)["gated-train"]
    root, graph = graph_before(lora, ctx, "mark_base_calls")
    with refused("guard_idle_branches", "requires", "no adapted call is tagged"):
        PASSES["guard_idle_branches"].requires(graph, root, ctx)


def test_insert_lora_refuses_an_adapted_layer_traced_into():
    lora, _ = MODELS["mixed"]()
    root, graph = traced_through(lora, "proj")
    with refused("insert_lora", "requires", "every adapted layer is a leaf"):
        PASSES["insert_lora"].requires(graph, root, PassContext())


def test_insert_lora_refuses_a_graph_with_branches():
    lora, _ = MODELS["mixed"]()
    root, graph = graph_before(lora, PassContext(), "mark_base_calls")
    with refused("insert_lora", "requires", "no LoRA branch is inserted yet"):
        PASSES["insert_lora"].requires(graph, root, PassContext())


def test_mark_base_calls_refuses_saved_calls_not_swapped():
    lora, _ = MODELS["mixed"]()
    root, graph = fresh_graph(lora)
    PASSES["insert_lora"].run(graph, root, PassContext())  # swap_saved_modules skipped
    with refused("mark_base_calls", "requires", "every call of a saved module is tagged"):
        PASSES["mark_base_calls"].requires(graph, root, PassContext())


def test_mark_base_calls_refuses_a_graph_without_branches():
    lora, _ = MODELS["mixed"]()
    root, graph = graph_before(lora, PassContext(), "insert_lora")
    with refused("mark_base_calls", "requires", "every call of an adapted layer is tagged LAYER"):
        PASSES["mark_base_calls"].requires(graph, root, PassContext())


def test_skip_dropout_refuses_a_dropout_node_with_keywords():
    lora, _ = MODELS["mixed"]()
    root, graph = graph_before(lora, PassContext(), "skip_dropout")
    node = tagged(graph, Role.DROPOUT)[0]
    node.kwargs = {"inplace": False}
    with refused("skip_dropout", "requires", "every DROPOUT node is a module call on one positional input"):
        PASSES["skip_dropout"].requires(graph, root, PassContext())


def test_share_lora_a_refuses_a_graph_without_branches():
    lora, _ = MODELS["attention"]()
    root, graph = graph_before(lora, PassContext(), "insert_lora")
    with refused("share_lora_a", "requires", "every call of an adapted layer is tagged LAYER"):
        PASSES["share_lora_a"].requires(graph, root, PassContext())


def test_share_lora_a_refuses_an_a_node_that_is_no_call():
    lora, _ = MODELS["attention"]()
    root, graph = graph_before(lora, PassContext(), "share_lora_a")
    node = tagged(graph, Role.LORA_A)[0]
    with graph.inserting_after(node):
        clone = graph.call_function(scale_update, (node, node, node))
    clone.meta.update(node.meta)
    with refused("share_lora_a", "requires", "every LORA_A node is a module call"):
        PASSES["share_lora_a"].requires(graph, root, PassContext())


def test_fold_scaling_refuses_a_scale_without_its_gate():
    lora, _ = MODELS["attention"]()
    root, graph = graph_before(lora, PassContext(), "fold_scaling")
    node = tagged(graph, Role.SCALE)[0]
    node.args = node.args[:2]
    with refused("fold_scaling", "requires", r"takes \(update, scaling, gate\)"):
        PASSES["fold_scaling"].requires(graph, root, PassContext())


def test_fold_scaling_refuses_a_graph_without_branches():
    lora, _ = MODELS["attention"]()
    root, graph = fresh_graph(lora)
    with refused("fold_scaling", "requires", "insert_lora"):
        PASSES["fold_scaling"].requires(graph, root, PassContext())


# ------------------------------------------------------------------ ensures: a broken result
def test_insert_lora_ensures_catches_a_user_left_on_the_base_output():
    lora, _ = MODELS["mixed"]()
    root, graph = graph_before(lora, PassContext(), "insert_lora")
    PASSES["insert_lora"].run(graph, root, PassContext())
    layer = next(n for n in tagged(graph, Role.LAYER) if n.target == "proj")
    (add,) = [n for n in graph.nodes if tag_of(n) and tag_of(n).site == layer.name and tag_of(n).role is Role.ADD]
    user = next(iter(add.users))
    user.replace_input_with(add, layer)
    with refused("insert_lora", "ensures", "feeds only its own branch"):
        PASSES["insert_lora"].ensures(graph, root, PassContext())


def test_mark_base_calls_ensures_catches_a_copy_asked_for_its_base_output():
    lora, _ = MODELS["mixed"]()
    root, graph = graph_before(lora, PassContext(), "skip_dropout")
    copy = tagged(graph, Role.COPY)[0]
    copy.kwargs = {BASE_ONLY: True}
    with refused("mark_base_calls", "ensures", "no other node passes it"):
        PASSES["mark_base_calls"].ensures(graph, root, PassContext())


def test_error_names_the_node():
    lora, _ = MODELS["mixed"]()
    root, graph = fresh_graph(lora)
    with pytest.raises(PassContractError) as info:
        PASSES["skip_dropout"].requires(graph, root, PassContext())
    error = info.value
    assert (error.pass_name, error.clause) == ("skip_dropout", "requires")
    assert error.node is not None and error.node.name in str(error)
