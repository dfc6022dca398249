"""Graph coverage mechanisms, each checked for exactness against peft on the same tensors:
an untraceable child called as a leaf (its siblings stay in the graph), ``torch.tensor`` /
``torch.finfo`` of traced values as nodes, probe inputs built from a config (pixels, audio,
multimodal), and the transformers specialisations (GPT-Neo, DeBERTa, MPT)."""


import pytest
import torch
import torch.nn as nn

from models import paired

peft = pytest.importorskip("peft")


class Moody(nn.Module):
    """Branches on tensor data: never traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.proj(x)
        return self.proj(-x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moody = Moody()
        self.plain = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        return self.out(self.plain(x) + self.moody(x))


class Sizes(nn.Module):
    """Builds a tensor from a size and reads a dtype's limit, as GPT-Neo and DeBERTa do."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)

    def forward(self, x):
        scores = self.q(x) @ x.transpose(-1, -2) / torch.sqrt(torch.tensor(x.size(-1), dtype=torch.float))
        low = torch.finfo(scores.dtype).min
        scores = torch.where(torch.ones_like(scores, dtype=torch.bool).tril(), scores, torch.tensor(low, dtype=scores.dtype))
        return scores.softmax(-1) @ self.v(x)



def test_untraceable_child_is_a_leaf_and_its_siblings_stay_in_the_graph():
    torch.manual_seed(0)
    base = nn.Sequential(Block(), nn.ReLU(), Block())
    reference, ours = paired(base, ["proj", "plain", "out"])
    report = ours.reports["default"]
    paths = {r.name: r.path for r in report.rows if r.role == "lora"}
    assert paths["0.plain"] == paths["0.out"] == paths["2.plain"] == "graph"
    assert paths["0.moody.proj"] == paths["2.moody.proj"] == "eager"
    reason = next(r.reason for r in report.rows if r.name == "0.moody.proj")
    assert reason.startswith("0.moody (Moody) does not trace") and "x.sum() > 0" in reason
    for sign in (1.0, -1.0):  # both branches of the leaf's data-dependent code
        x = sign * torch.rand(3, 8)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-6)


def test_leaf_retry_needs_no_probe_and_keeps_training_exact():
    torch.manual_seed(1)
    base = Block()
    reference, ours = paired(base, ["proj", "plain"])
    assert ours.reports["default"].graph_share == pytest.approx(1 / 2)
    ours.train(), reference.train()
    x = torch.rand(4, 8)
    ours(x).square().sum().backward()
    reference(x).square().sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    expected = {n.removeprefix("base_model.model.").replace(".default", ".default"): p.grad
                for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-6, atol=1e-6)


def test_tensor_and_finfo_of_traced_values_are_nodes():
    torch.manual_seed(2)
    base = Sizes()
    reference, ours = paired(base, ["q", "v"])
    assert ours.reports["default"].graph_share == 1.0
    for length in (3, 5):  # the size is read at run time, not baked in
        x = torch.rand(2, length, 8)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x), rtol=1e-6, atol=1e-6)
    assert torch.tensor(3).item() == 3 and torch.finfo(torch.float16).max == 65504  # restored


# ------------------------------------------------------------------ transformers
transformers = pytest.importorskip("transformers")
from zoo_sweep import SWEEP, build, image_tokens, sweep_inputs  # noqa: E402


def _logits(out):
    for name in ("logits", "logits_per_image", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]


@pytest.mark.parametrize(
    "name, share",
    [("gpt_neo", 1.0), ("mpt", 1.0), ("deberta-v2", 1.0), ("vit", 1.0), ("clip", 1.0), ("llava", 1.0), ("whisper", 1.0)],
)
def test_sweep_models_in_a_graph_compute_as_peft(name, share):
    base = build(name)
    reference, ours = paired(base, SWEEP[name].targets)
    assert ours.reports["default"].graph_share == pytest.approx(share)
    inputs = sweep_inputs(base)
    with torch.no_grad():
        out = _logits(ours(**inputs))
        torch.testing.assert_close(out, _logits(reference(**inputs)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, _logits(base(**inputs)), atol=1e-4)


def test_whisper_generates_as_peft_with_cross_attention_in_a_graph(eager_fallbacks):
    base = build("whisper")
    reference, ours = paired(base, SWEEP["whisper"].targets)
    paths = ours.target_paths
    assert paths["model.decoder.layers.1.encoder_attn.q_proj"] == "graph"  # `if cache` and is_updated: in the pattern
    features = sweep_inputs(base)["input_features"]
    start = torch.full((2, 1), base.config.decoder_start_token_id)
    with torch.no_grad():
        out = ours.generate(input_features=features, decoder_input_ids=start, max_new_tokens=4, do_sample=False)
        expected = reference.generate(input_features=features, decoder_input_ids=start, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(out, expected)
    assert eager_fallbacks == []  # every flag state of the cache got its graph


class Detached(nn.Module):
    """Builds an activation module during the call (as transformers' ``ACT2FN[name](x)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return nn.GELU(approximate="tanh")(self.lin(x))


def test_a_module_built_during_the_call_is_traced_inline():
    torch.manual_seed(3)
    reference, ours = paired(Detached(), ["lin"])
    assert ours.reports["default"].graph_share == 1.0
    x = torch.rand(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-6)


def test_probe_inputs_come_from_the_config():
    from fxlora.tracing.integrations.hf_inputs import example_inputs, image_token_count

    vit = build("vit")
    [(args, kwargs)] = example_inputs(vit)
    assert args == () and kwargs["pixel_values"].shape == (1, 3, 32, 32)
    whisper = build("whisper")
    features = example_inputs(whisper)[0][1]
    assert features["input_features"].shape == (1, 8, 32) and "decoder_input_ids" in features
    llava = build("llava")
    assert image_token_count(llava.config) == image_tokens(llava) == 16
    for _, kwargs in example_inputs(llava):
        assert (kwargs["input_ids"] == llava.config.image_token_index).sum() == 16
        with torch.no_grad():
            llava(**kwargs)  # the model accepts every example
    assert example_inputs(nn.Linear(2, 2)) == []
