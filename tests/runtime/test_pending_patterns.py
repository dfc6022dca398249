"""Call patterns planning saw but left untraced (`GraphForward.pending`): traced by the first call
meeting one, or all when torch.compile compiles; one that does not trace warns and runs the
root's own forward."""

import copy
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.runtime.forwards import GraphForward, graph_forwards, installed_forward
import models
from models import copy_peft_adapter_weights
from test_install import count_traces

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 4) -> nn.Module:
    return models.tiny_llama(layers)


def attention_forwards(model) -> list[GraphForward]:
    return [installed_forward(layer.self_attn) for layer in model.model.model.layers]


def padded_batch() -> dict:
    ids = torch.randint(0, 96, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_planning_traces_each_block_family_for_its_first_pattern_and_a_masked_call_traces_its_own(monkeypatch):
    """At transform each decoder family is traced once (plus the lifted ``layer_idx`` trace) for
    the first pattern the probe saw; the probe's other three (mask, no cache) wait. The first
    padded call traces its pattern once for all blocks, and its logits equal peft's."""
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    calls = count_traces(monkeypatch)
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules="all-linear"))
    assert Counter(calls) == {"LlamaAttention": 1, "LlamaAttention lifted": 1, "LlamaMLP": 1}
    for forward in attention_forwards(ours):
        assert len(forward.variants) == 1 and len(forward.pending) == 3
    report = fxlora.explain(copy.deepcopy(base), LoraConfig(target_modules="all-linear"))  # says so
    assert (report.traced_patterns, report.pending_patterns) == (8, 12) and "call patterns: 8 traced, 12 more" in str(report)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear", init_lora_weights=False))
    copy_peft_adapter_weights(reference, ours)
    calls.clear()
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    assert Counter(calls) == {"LlamaAttention": 1, "LlamaAttention lifted": 1}  # one trace for the four blocks
    for forward in attention_forwards(ours):
        assert len(forward.variants) == 2 and len(forward.pending) == 2


def test_torch_compile_traces_the_pending_patterns_first_and_breaks_no_graph():
    """Dynamo's compile start traces every pending pattern (once per block family) before the
    model's frame is traced: a padded call compiles with no graph break and equals the eager one."""
    import torch._dynamo

    model = fxlora.transform(tiny_llama(2), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    batch = padded_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    forwards = attention_forwards(model)
    assert all(f.pending for f in forwards)
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(model)(**batch)
        assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons][:2]
        assert not any(f.pending for f in graph_forwards(model.model))
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(model, backend="eager")(**batch).logits, expected, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


class MaskedConfig(transformers.PretrainedConfig):
    model_type = "fxlora_masked_test"

    def __init__(self, vocab_size: int = 32, hidden_size: int = 8, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)


class MaskedBlock(nn.Module):
    """Traceable without a mask; with one, its code decides on the mask's values (no graph)."""

    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, hidden, attention_mask=None):
        hidden = self.fc1(hidden)
        if attention_mask is not None and bool((attention_mask == 0).any()):
            hidden = hidden * attention_mask[..., None]
        return self.fc2(torch.relu(hidden))


class MaskedModel(transformers.PreTrainedModel):
    config_class = MaskedConfig
    main_input_name = "input_ids"

    def __init__(self, config: MaskedConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(MaskedBlock(config.hidden_size) for _ in range(2))

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden, attention_mask) if attention_mask is not None else block(hidden)
        return hidden


def test_a_pending_pattern_that_does_not_trace_warns_once_and_runs_the_roots_own_forward():
    torch.manual_seed(0)
    base = MaskedModel(MaskedConfig()).eval()
    config = LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights=False)
    ours = fxlora.transform(copy.deepcopy(base), config)
    eager = fxlora.transform(copy.deepcopy(base), config, trace="eager")
    eager.load_state_dict(ours.state_dict())
    blocks = [installed_forward(block) for block in ours.model.blocks]
    assert all(isinstance(f, GraphForward) and f.pending for f in blocks)
    ids = torch.randint(0, 32, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with torch.no_grad():
        assert torch.equal(ours(ids), eager(ids))
        with pytest.warns(UserWarning, match="MaskedBlock does not trace for one of the call patterns .* its own forward"):
            out = ours(ids, mask)
        assert torch.equal(out, eager(ids, mask))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            assert torch.equal(ours(ids, mask), out)
    assert all(not f.pending and len(f.failures) == 1 for f in blocks)


class WeightOnlyWithScale(nn.Module):
    """Calls ``fc`` for ``x`` alone; with a scale, uses its weight in a way no call equals."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale=None):
        if scale is None:
            return self.fc(x)
        return x * self.fc.weight.sum() * scale


def test_a_pattern_met_after_planning_gets_planning_s_call_checks():
    """A pattern whose graph would use an adapted layer's weight without calling it (so its
    branch could not act there) is refused, as planning refuses such a graph: the call runs the
    module's own forward, and the pattern is remembered as failed."""
    torch.manual_seed(0)
    model = fxlora.transform(WeightOnlyWithScale(), LoraConfig(target_modules=["fc"], lora_dropout=0.1, init_lora_weights=False))
    [forward] = graph_forwards(model.model)
    x, scale = torch.randn(2, 4), torch.tensor(2.0)
    assert torch.equal(model(x, scale=scale), x * model.model.fc.weight.sum() * scale)
    [reason] = forward.failures.values()
    assert "fc is used through its weights, not called as a module" in reason
    assert len(forward.variants) == 1  # the planned pattern only


def test_threads_meeting_a_pending_pattern_at_once_trace_it_once_and_all_compute_it(monkeypatch):
    """Four threads make the first padded call together: one traces the pattern (holding the
    call lock exclusively), the others wait and run its code; every result equals the eager one."""
    import threading

    base = tiny_llama(2)
    model = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    eager = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules="all-linear", init_lora_weights=False), trace="eager")
    eager.load_state_dict(model.state_dict())
    batch = padded_batch()
    with torch.no_grad():
        expected = eager(**batch).logits
    calls = count_traces(monkeypatch)
    start, results = threading.Barrier(4), []

    def call():
        start.wait()
        with torch.no_grad():
            results.append(model(**batch).logits)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(torch.equal(r, expected) for r in results)
    assert Counter(calls) == {"LlamaAttention": 1, "LlamaAttention lifted": 1}
