import pytest
import torch

import fxlora
from fxlora import LoraConfig
from models import MLP, Mixed


def test_report_table_and_fields():
    report = fxlora.explain(MLP(), LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], rank_pattern={"seq.2": 4}))
    assert report.targets == ["seq.0", "seq.2"] and report.modules_to_save == ["seq.4"]
    rows = {r.name: r for r in report.rows}
    assert (rows["seq.0"].rank, rows["seq.2"].rank, rows["seq.2"].alpha) == (8, 4, 8)
    assert rows["seq.0"].params == 8 * (20 + 2000) and rows["seq.2"].params == 4 * 4000
    assert rows["seq.0"].path == "graph" and rows["seq.0"].calls == 1
    text = str(report).splitlines()
    assert text[0].startswith("fxlora plan for MLP (adapter 'default'): 2 LoRA targets (2 graph, 0 eager), 1 modules_to_save")
    assert text[1].split() == ["module", "type", "r", "alpha", "params", "path"]
    assert any(line.startswith("seq.2") and "16,000" in line and "graph" in line for line in text)
    assert report.graph_share == 1.0


def test_report_explains_eager_reasons():
    report = fxlora.explain(Mixed(), LoraConfig(target_modules="all-linear"))
    assert report.graph_targets == ["blocks.1.0"]
    reason = next(r.reason for r in report.rows if r.name == "blocks.0.fc1")
    assert reason.startswith("blocks.0 (Untraceable) does not trace:")
    assert "eager: <model> (Mixed) does not trace" in str(report)
    assert 0 < report.graph_share < 1


def test_explain_raises_what_transform_raises():
    with pytest.raises(fxlora.NoTargetFoundError):
        fxlora.explain(MLP(8), LoraConfig(target_modules=["nope"]))


def test_poolformer_seed_figures():
    timm = pytest.importorskip("timm")
    model = timm.create_model("poolformer_m36", pretrained=False, num_classes=3)
    config = LoraConfig(target_modules=r".*\.mlp\.fc\d", modules_to_save=["head.fc"])
    report = fxlora.explain(model, config)
    assert len(report.targets) == 72 and report.graph_share == 1.0
    assert (report.trainable_params, report.all_params) == (1_062_147, 56_467_974)
    lora = fxlora.transform(model, config)
    assert lora.get_nb_trainable_parameters() == (1_062_147, 56_467_974)
    assert len(lora.targeted_module_names) == 72
    lora.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = lora(x)
        with lora.disable_adapter():
            assert torch.equal(lora(x), out)  # identity at init, head copy equal to the original


def test_explain_says_whether_the_probe_reached_a_module_or_its_parent_reaches_into_it():
    pytest.importorskip("transformers")
    import torch.nn as nn
    from zoo import TRANSFORMERS

    model = TRANSFORMERS["llama"].build()
    model.model.extra = nn.Sequential(nn.Linear(4, 4))  # never run by the model's forward
    report = fxlora.explain(model, LoraConfig(target_modules=["q_proj", "extra.0"]))
    reason = next(r.reason for r in report.rows if r.name == "model.extra.0")
    assert "never reached it nor anything inside it" in reason
    assert "its parent calls into it" not in reason and "parent reaches into it" not in reason


def test_a_module_not_called_itself_but_whose_inside_ran_is_said_to_be_reached_into():
    import torch.nn as nn
    from fxlora.errors import TraceFailure
    from fxlora.planning.roots import check_callable_root

    layers = nn.ModuleList([nn.Linear(2, 2)])
    observed = {id(layers[0]): []}  # the probe saw the layer called, never the list
    with pytest.raises(TraceFailure, match="modules inside it ran, but it was never called itself"):
        check_callable_root(layers, False, observed)
    with pytest.raises(TraceFailure, match="never reached it nor anything inside it"):
        check_callable_root(nn.ModuleList([nn.Linear(2, 2)]), False, observed)
    check_callable_root(layers[0], False, observed)  # called: a possible root
