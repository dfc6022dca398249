"""save_merged / merged_state_dict: merged weights for the original model class, no fxlora needed
to load them; atomic writes; the live model is never changed; bad paths are refused up front."""

import copy
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import fxlora
from fxlora import LoraConfig
from fxlora.errors import MergeError
from models import MLP, ConvNet2d, ConvNet3d, EmbeddingModel, Mixed

CASES = [
    ("mlp+modules_to_save", lambda: MLP(32), ["seq.0", "seq.2"], ["seq.4"], lambda: torch.randn(5, 20)),
    ("conv3d", ConvNet3d, ["conv1", "conv2", "conv3"], ["head"], lambda: torch.randn(2, 2, 5, 6, 7)),
    ("embedding", EmbeddingModel, ["emb", "proj"], None, lambda: torch.randint(0, 50, (3, 7))),
    ("mixed-graph-and-eager", Mixed, "all-linear", None, lambda: torch.randn(4, 6)),
]


def crash_mid_write(tensors, filename, metadata=None):
    """A safetensors writer that dies half-way through the file (a full disk)."""
    with open(filename, "wb") as fh:
        fh.write(b"half a file")
    raise OSError("disk full")


def trained(make, targets, saved, **extra):
    """A transformed model whose adapters and copies are non-trivial (as after training)."""
    torch.manual_seed(0)
    model = fxlora.transform(make(), LoraConfig(target_modules=targets, modules_to_save=saved, init_lora_weights=False, **extra))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    now = model.state_dict()
    assert now.keys() == before.keys()
    assert all(torch.equal(now[k], before[k]) for k in before)
    assert model.merged_adapters == []


@pytest.mark.parametrize("name, make, targets, saved, make_input", CASES, ids=[c[0] for c in CASES])
def test_export_loads_into_a_fresh_original_and_gives_the_trained_outputs(tmp_path, name, make, targets, saved, make_input):
    model = trained(make, targets, saved)
    x = make_input()
    expected = model(x)
    before = snapshot(model)
    path = model.save_merged(tmp_path / "merged.safetensors")
    assert path == tmp_path / "merged.safetensors"
    assert sorted(os.listdir(tmp_path)) == ["merged.safetensors"]  # no temporary files left
    assert_unchanged(model, before)
    fresh = make().eval()
    fresh.load_state_dict(load_file(path))  # strict: exactly the original keys
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


def test_export_equals_merge_and_unload_bit_for_bit_whether_or_not_merged_already(tmp_path):
    model = trained(lambda: MLP(32), ["seq.0", "seq.2"], ["seq.4"])
    model.set_adapter_scale("default", 0.5)
    first = load_file(model.save_merged(tmp_path / "a.safetensors"))
    model.merge_adapter()
    second = load_file(model.save_merged(tmp_path / "b.safetensors"))
    unloaded = model.merge_and_unload().state_dict()
    assert sorted(first) == sorted(unloaded)  # safetensors stores keys sorted
    for key in unloaded:
        assert torch.equal(first[key], unloaded[key]) and torch.equal(second[key], unloaded[key]), key


def test_merged_state_dict_has_the_original_keys_and_new_tensors_for_merged_layers():
    user = MLP(16)
    keys = list(user.state_dict())
    model = trained(lambda: user, ["seq.0"], ["seq.4"])
    state = model.merged_state_dict()
    assert list(state) == keys
    assert state["seq.0.weight"].data_ptr() != user.seq[0].weight.data_ptr()
    assert torch.equal(state["seq.4.weight"], user.seq[4].modules_to_save["default"].weight)


def test_tied_weights_that_are_not_merged_are_written_under_every_name(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.mid(self.emb(ids)))

    model = trained(Tied, ["mid"], None)
    ids = torch.randint(0, 10, (2, 5))
    path = model.save_merged(tmp_path / "tied.safetensors")
    fresh = Tied().eval()
    fresh.load_state_dict(load_file(path))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_the_merged_model_works_with_torch_export():
    model = trained(lambda: ConvNet2d(dilation=2, padding_mode="reflect"), ["conv1", "conv2", "conv3"], None)
    x = torch.randn(2, 3, 11, 11)
    expected = model(x)
    merged = model.merge_and_unload()
    program = torch.export.export(merged, (x,))
    assert not any("lora" in k for k in program.state_dict)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- atomic writes and bad paths
def test_a_failure_mid_write_leaves_the_earlier_file_intact(tmp_path, monkeypatch):
    import safetensors.torch as st

    model = trained(lambda: MLP(16), ["seq.0"], None)
    path = model.save_merged(tmp_path / "merged.safetensors")
    earlier = path.read_bytes()
    with torch.no_grad():
        model.model.seq[0].lora_B["default"].weight.add_(1.0)  # a new export would differ

    monkeypatch.setattr(st, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        model.save_merged(path)
    assert path.read_bytes() == earlier
    assert sorted(os.listdir(tmp_path)) == ["merged.safetensors"]


def test_bad_paths_are_refused_before_anything_is_written(tmp_path):
    model = trained(lambda: MLP(16), ["seq.0"], None)
    before = snapshot(model)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(IsADirectoryError, match="is a directory; give a file path"):
        model.save_merged(tmp_path)
    with pytest.raises(NotADirectoryError, match="file.txt"):
        model.save_merged(a_file / "merged.safetensors")  # its parent cannot hold files
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]
    assert a_file.read_text() == "x"
    assert_unchanged(model, before)


def test_unmergeable_and_non_finite_adapters_write_nothing(tmp_path):
    grouped = trained(lambda: ConvNet2d(groups=2), ["conv2"], None, r=2)
    with pytest.raises(MergeError, match="'conv2'"):
        grouped.save_merged(tmp_path / "g.safetensors")
    model = trained(lambda: MLP(16), ["seq.0", "seq.2"], None)
    with torch.no_grad():
        model.model.seq[2].lora_A["default"].weight[0, 0] = float("inf")
    with pytest.raises(MergeError, match=r"adapter 'default'.*'seq\.2'"):
        model.save_merged(tmp_path / "m.safetensors", safe_merge=True)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.save_merged(tmp_path / "m.safetensors", adapter_names=["nope"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- transformers
transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_transformers_model_exports_a_directory_its_class_loads_with_tied_weights(tmp_path):
    model = trained(tiny_gpt2, ["c_attn", "c_fc"], None)
    ids = torch.randint(0, 64, (2, 9))
    expected = model(ids).logits
    before = snapshot(model)
    target = tmp_path / "export"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")  # someone else's file in the directory
    model.save_merged(target)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(target))
    assert_unchanged(model, before)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(target).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name != "export"]  # no temporary directory left


def test_transformers_directory_export_failing_mid_write_keeps_the_earlier_export(tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    model = trained(tiny_gpt2, ["c_attn"], None)
    target = model.save_merged(tmp_path / "export")
    earlier = {p.name: p.read_bytes() for p in target.iterdir()}

    monkeypatch.setattr(modeling_utils, "safe_save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        model.save_merged(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == earlier
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_transformers_model_to_a_safetensors_path_gets_one_file(tmp_path):
    model = trained(tiny_gpt2, ["c_fc"], None)
    path = model.save_merged(tmp_path / "gpt2.safetensors")
    fresh = tiny_gpt2()
    fresh.load_state_dict(load_file(path))
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
