"""PIPELINE: the order of the passes as data, and each pass's contracts along it on real models."""

from __future__ import annotations

import dataclasses

import pytest

from fxlora.core.gates import EagerKey
from fxlora.passes import PIPELINE, PassContext, PassOptions, rewrite, run_pipeline
from fxlora.errors import PassContractError
from fxlora.passes.base import CHECK_ENV, Pass

from .pass_models import MODELS, contexts, fresh_graph

CASES = [(model, ctx) for model, build in MODELS.items() for ctx in contexts(build()[1])]
NAMES = [stage.pass_.name for stage in PIPELINE]


def test_order_and_switches_are_data():
    assert NAMES == [
        "call_weight_reads",
        "adapt_weight_uses",
        "swap_saved_modules",
        "guard_idle_branches",
        "insert_lora",
        "mark_base_calls",
        "skip_dropout",
        "share_lora_a",
        "fold_scaling",
    ]
    switches = [stage.option for stage in PIPELINE if stage.option is not None]
    assert sorted(switches) == sorted(f.name for f in dataclasses.fields(PassOptions))  # one stage per switch


def test_guard_idle_applies_to_gated_evaluation_code_only():
    (guard,) = [stage for stage in PIPELINE if stage.pass_.name == "guard_idle_branches"]
    on = PassOptions(guard_idle=True)
    assert guard.applies(PassContext(on, training=False))
    assert not guard.applies(PassContext(on, training=True))
    assert not guard.applies(PassContext(on, eager=EagerKey((), ()), training=False))
    assert not guard.applies(PassContext(PassOptions(), training=False))


@pytest.mark.parametrize("model, ctx_name", CASES)
def test_each_pass_requires_what_the_ones_before_it_ensure(model, ctx_name):
    """Walking PIPELINE: each applicable pass's `requires` holds on its predecessors' output and
    its `ensures` on its own; at the end, every pass's guarantee still holds."""
    lora, adapters = MODELS[model]()
    ctx = contexts(adapters)[ctx_name]
    root, graph = fresh_graph(lora, ctx.training)
    ran = []
    for stage in PIPELINE:
        if not stage.applies(ctx):
            continue
        stage.pass_.requires(graph, root, ctx)
        result = stage.pass_.run(graph, root, ctx)
        stage.pass_.ensures(graph, root, ctx)
        ran.append((stage.pass_, result))
    for done, _ in ran:
        done.ensures(graph, root, ctx)
    graph.lint()
    results = {p.name: r for p, r in ran}
    assert ("guard_idle_branches" in results) == (ctx_name == "gated-eval-guarded")
    if ctx_name == "gated-eval-guarded":
        assert results["guard_idle_branches"].count > 0 and results["insert_lora"].count == 0
    elif ctx_name == "eager-idle":
        assert results["insert_lora"].count == 0
    else:
        assert results["insert_lora"].count > 0
    if model == "attention" and ctx_name == "gated-train":
        assert sorted(results["share_lora_a"].sites) == ["gate", "k_proj", "q_proj", "up", "v_proj"]


@pytest.mark.parametrize("model", list(MODELS))
def test_a_pass_out_of_order_breaks_its_requirement(model):
    """Every pass after insert_lora refuses a base graph; every pass before it refuses the rewritten
    graph."""
    lora, _ = MODELS[model]()
    ctx = PassContext(PassOptions(guard_idle=True), training=False)
    root, base = fresh_graph(lora, training=False)
    root, done = fresh_graph(lora, training=False)
    run_pipeline(done, root, PassContext(training=False), check=True)
    split = NAMES.index("insert_lora")
    for stage in PIPELINE:
        graph = base if NAMES.index(stage.pass_.name) > split else done
        with pytest.raises(PassContractError, match=f"^{stage.pass_.name} requires: "):
            stage.pass_.requires(graph, root, ctx)


def test_checks_run_only_when_switched_on(monkeypatch):
    lora, _ = MODELS["mixed"]()
    checked = []
    real = Pass.check

    def spy(self, clause, condition, offender):
        checked.append((self.name, clause))
        return real(self, clause, condition, offender)

    monkeypatch.setattr(Pass, "check", spy)
    monkeypatch.delenv(CHECK_ENV, raising=False)
    rewrite(*reversed(fresh_graph(lora)))
    assert checked == []  # the hot path (graph code rebuilt on adapter changes) runs no check
    monkeypatch.setenv(CHECK_ENV, "1")
    rewrite(*reversed(fresh_graph(lora)))
    ran = [n for n in NAMES if n != "guard_idle_branches"]
    assert sorted({c for c in checked}) == sorted({(n, clause) for n in ran for clause in ("requires", "ensures")})
