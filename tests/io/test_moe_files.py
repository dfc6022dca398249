"""Adapter files trained on transformers 4's per-expert MoE modules, loaded into tiny transformers 5
Mixtral and Qwen3-MoE models (`fxlora.io.moe_files`), with peft 0.21.2's conversion on load as the
oracle: same fused tensors, same logits, saved files PEFT reads back; each expert's fused update is
its old updates stacked; files that cannot be converted exactly are refused, the model unchanged."""

import json
import math
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import fxlora
from fxlora import LoraConfig
from fxlora.config import scaling_value
from fxlora.errors import CheckpointError
from fxlora.io.moe_files import Target, convert_expert_tensors
from fxlora.kinds.parameter import PARAMETER, ParamTarget
from fxlora.planning.parameters import ParameterSpec
from models import assert_same_state, state_snapshot

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kinds"))
from test_target_parameters import ids, mixtral, qwen3_moe  # noqa: E402
from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers  # noqa: E402

PREFIX = "base_model.model."
#: per family: the builder, transformers 4's MoE block name, its expert projections (w1, w3, w2 roles)
FAMILIES = {
    "mixtral": (mixtral, "block_sparse_moe", ("w1", "w3", "w2")),
    "qwen3_moe": (qwen3_moe, "mlp", ("gate_proj", "up_proj", "down_proj")),
}


def v4_tensors(family: str, r: int = 2, seed: int = 0, attention=("q_proj", "v_proj")) -> dict[str, torch.Tensor]:
    """Random non-zero tensors of a transformers 4 adapter on attention, every expert's projections
    and the router, under PEFT's file keys, for the shapes of `family`'s tiny model."""
    build, block, (gate, up, down) = FAMILIES[family]
    model, g = build(), torch.Generator().manual_seed(seed)
    tensors = {}

    def factors(key: str, fan_in: int, fan_out: int) -> None:
        tensors[f"{PREFIX}{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=g)
        tensors[f"{PREFIX}{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=g)

    for i, layer in enumerate(model.model.layers):
        for proj in attention:
            linear = getattr(layer.self_attn, proj)
            factors(f"model.layers.{i}.self_attn.{proj}", linear.in_features, linear.out_features)
        experts, hidden, ffn = layer.mlp.experts.gate_up_proj.shape[0], layer.mlp.experts.down_proj.shape[1], layer.mlp.experts.down_proj.shape[2]
        for e in range(experts):
            for proj, fan_in, fan_out in ((gate, hidden, ffn), (up, hidden, ffn), (down, ffn, hidden)):
                factors(f"model.layers.{i}.{block}.experts.{e}.{proj}", fan_in, fan_out)
        factors(f"model.layers.{i}.{block}.gate", hidden, experts)
    return tensors


def write_v4(directory: Path, family: str, tensors: dict[str, torch.Tensor], **config) -> Path:
    """A transformers 4 adapter directory: `tensors` and a config naming the old modules."""
    _, _, projections = FAMILIES[family]
    fields = dict(peft_type="LORA", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", *projections, "gate"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({**fields, **config}))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def peft_load(family: str, directory: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(FAMILIES[family][0](), directory).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


def assert_same_tensors(mine: dict, theirs: dict) -> None:
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_expert_file_loads_as_in_peft(tmp_path, family):
    directory = write_v4(tmp_path / "v4", family, v4_tensors(family))
    theirs = peft_load(family, directory)
    ours = fxlora.LoraModel.from_pretrained(FAMILIES[family][0](), directory)
    mine = fxlora.get_peft_model_state_dict(ours)
    assert_same_tensors(mine, peft.get_peft_model_state_dict(theirs))
    assert f"{PREFIX}model.layers.1.mlp.experts.base_layer.lora_B.weight" in mine  # gate_up_proj, fused
    file = load_file(str(directory / "adapter_model.safetensors"))  # and PEFT's conversion function itself
    assert_same_tensors(mine, convert_peft_adapter_state_dict_for_transformers(theirs, theirs.peft_config["default"], file))
    want = logits(theirs)
    assert not torch.allclose(want, logits(FAMILIES[family][0]()), atol=1e-3)
    assert torch.equal(logits(ours), want)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_expert_update_is_its_old_updates_stacked(tmp_path, family):
    """Independent of PEFT: the fused gate_up_proj update of expert e is [s B1 A1; s B3 A3] and
    down_proj's is s B2 A2, with the old scaling s = alpha / r."""
    _, block, (gate, up, down) = FAMILIES[family]
    tensors = v4_tensors(family, seed=5)
    ours = fxlora.LoraModel.from_pretrained(FAMILIES[family][0](), write_v4(tmp_path / "v4", family, tensors))
    experts = ours.model.get_submodule("model.layers.0.mlp.experts")
    fused = {p: PARAMETER.lora_weight(experts, "default", False, torch.float32, p) for p in ("gate_up_proj", "down_proj")}

    def old(e: int, proj: str) -> torch.Tensor:
        key = f"{PREFIX}model.layers.0.{block}.experts.{e}.{proj}"
        return tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"] * (4 / 2)

    for e in range(experts.gate_up_proj.shape[0]):
        torch.testing.assert_close(fused["gate_up_proj"][e], torch.cat([old(e, gate), old(e, up)]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused["down_proj"][e], old(e, down), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_file_is_fused_and_peft_reads_it_back(tmp_path, family):
    ours = fxlora.LoraModel.from_pretrained(FAMILIES[family][0](), write_v4(tmp_path / "v4", family, v4_tensors(family)))
    ours.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert not any(".experts.0." in k or "block_sparse_moe" in k for k in saved)
    assert_same_tensors(saved, {k: v.contiguous() for k, v in fxlora.get_peft_model_state_dict(ours).items()})
    back = peft_load(family, tmp_path / "saved")
    assert_same_tensors(peft.get_peft_model_state_dict(back), saved)
    assert torch.equal(logits(back), logits(ours))


def test_load_adapter_hotswap_and_set_peft_model_state_dict_convert_too(tmp_path):
    family = "mixtral"
    tensors = v4_tensors(family, seed=2)
    directory = write_v4(tmp_path / "v4", family, tensors)
    theirs = peft.get_peft_model_state_dict(peft_load(family, directory))
    ours = fxlora.LoraModel.from_pretrained(mixtral(), write_v4(tmp_path / "first", family, v4_tensors(family, seed=7)))
    ours.load_adapter(directory, "second")
    assert_same_tensors(fxlora.get_peft_model_state_dict(ours, adapter_name="second"), theirs)
    result = fxlora.set_peft_model_state_dict(ours, tensors, adapter_name="default")  # per-expert keys, in memory
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same_tensors(fxlora.get_peft_model_state_dict(ours, adapter_name="default"), theirs)
    swapped = write_v4(tmp_path / "swapped", family, v4_tensors(family, seed=3))
    ours.hotswap_adapter(swapped, "second")
    assert_same_tensors(fxlora.get_peft_model_state_dict(ours, adapter_name="second"), peft.get_peft_model_state_dict(peft_load(family, swapped)))


def test_router_only_file_is_renamed(tmp_path):
    tensors = {k: v for k, v in v4_tensors("mixtral").items() if ".block_sparse_moe.gate." in k}
    directory = write_v4(tmp_path / "v4", "mixtral", tensors, target_modules=["gate"])
    theirs = peft_load("mixtral", directory)
    ours = fxlora.LoraModel.from_pretrained(mixtral(), directory)
    assert_same_tensors(fxlora.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs))
    assert torch.equal(logits(ours), logits(theirs))


def _drop_expert(t):
    del t[f"{PREFIX}model.layers.1.block_sparse_moe.experts.3.w3.lora_B.weight"]


def _rank_of_one_expert(t):
    key = f"{PREFIX}model.layers.0.block_sparse_moe.experts.2.w1"
    t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"] = torch.randn(3, 32), torch.randn(64, 3)


def _both_layouts(t):
    t[f"{PREFIX}model.layers.0.mlp.experts.lora_A.weight"] = torch.randn(8, 64)


def _renamed_twice(t):
    t[f"{PREFIX}model.layers.0.mlp.gate.lora_A.weight"] = torch.randn(2, 32)


def _expert_beyond(t):
    t[f"{PREFIX}model.layers.0.block_sparse_moe.experts.4.w2.lora_A.weight"] = torch.randn(2, 64)


def _wrong_shape(t):
    t[f"{PREFIX}model.layers.0.block_sparse_moe.experts.1.w2.lora_B.weight"] = torch.randn(31, 2)


REFUSALS = {
    "missing expert": (_drop_expert, {}, ["incomplete", "layers.1.block_sparse_moe.experts.3.w3.lora_B.weight"]),
    "ranks differ": (_rank_of_one_expert, {}, ["different ranks", "rank 3: 2.w1)"]),
    "rank of the config": (lambda t: None, {"r": 4}, ["rank 2", "rank 8", "r=2"]),
    "both layouts": (_both_layouts, {}, ["both layouts", "mlp.experts.lora_A.weight"]),
    "renamed beside new name": (_renamed_twice, {}, ["both layouts", "block_sparse_moe.gate.lora_A.weight"]),
    "expert beyond": (_expert_beyond, {}, ["no place for", "experts.4.w2", "block_sparse_moe.experts.<e>.w2.lora_<A|B>.weight' for experts e = 0..3"]),
    "shape": (_wrong_shape, {}, ["(31, 2)", "valid is (32, 2)", "block_sparse_moe.experts.1.w2.lora_B.weight"]),
    "rslora scaling": (lambda t: None, {"use_rslora": True}, ["sqrt(2)", "alpha_pattern {'gate_up_proj': 5.65685"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_files_that_cannot_be_converted_exactly_are_refused(tmp_path, case):
    edit, config, phrases = REFUSALS[case]
    tensors = v4_tensors("mixtral")
    edit(tensors)
    directory = write_v4(tmp_path / "v4", "mixtral", tensors, **config)
    model = mixtral()
    before = state_snapshot(model)
    with pytest.raises(CheckpointError) as caught:
        fxlora.LoraModel.from_pretrained(model, directory)
    for phrase in phrases:
        assert phrase in str(caught.value)
    assert_same_state(model, before)
    assert not any("lora" in name for name, _ in model.named_modules())
    lm = fxlora.LoraModel.from_pretrained(model, write_v4(tmp_path / "good", "mixtral", v4_tensors("mixtral", seed=1)))
    kept = {k: v.clone() for k, v in fxlora.get_peft_model_state_dict(lm).items()}
    with pytest.raises(CheckpointError):
        lm.load_adapter(directory, "other")
    assert list(lm.peft_config) == ["default"]
    if not config:  # the same refusal for a state dict, which leaves the adapter as it was
        with pytest.raises(CheckpointError):
            fxlora.set_peft_model_state_dict(lm, tensors)
    assert_same_tensors(fxlora.get_peft_model_state_dict(lm), kept)


def test_rslora_file_loads_exactly_with_the_alpha_the_refusal_names(tmp_path):
    """With use_rslora PEFT's fused scaling 2 alpha / sqrt(2 r) is sqrt(2) times the trained one; the
    alpha_pattern the refusal names restores alpha / sqrt(r) (the updates PEFT cannot give)."""
    tensors = v4_tensors("mixtral", seed=3)
    with pytest.raises(CheckpointError) as caught:
        fxlora.LoraModel.from_pretrained(mixtral(), write_v4(tmp_path / "as_is", "mixtral", tensors, use_rslora=True))
    alpha = float(re.search(r"alpha_pattern \{'gate_up_proj': ([0-9.e+-]+)\}", str(caught.value)).group(1))
    assert math.isclose(alpha, 4 * math.sqrt(2), rel_tol=1e-15)
    directory = write_v4(tmp_path / "v4", "mixtral", tensors, use_rslora=True, alpha_pattern={"gate_up_proj": alpha})
    ours = fxlora.LoraModel.from_pretrained(mixtral(), directory)
    experts = ours.model.get_submodule("model.layers.1.mlp.experts")
    fused = PARAMETER.lora_weight(experts, "default", False, torch.float32, "gate_up_proj")
    key = f"{PREFIX}model.layers.1.block_sparse_moe.experts.2"
    old = [tensors[f"{key}.{p}.lora_B.weight"] @ tensors[f"{key}.{p}.lora_A.weight"] * (4 / math.sqrt(2)) for p in ("w1", "w3")]
    torch.testing.assert_close(fused[2], torch.cat(old), rtol=1e-6, atol=1e-6)


def glm4_moe() -> nn.Module:
    """A tiny transformers 5 GLM-4-MoE (family qwen2_moe): fused routed experts beside a shared
    expert whose projections are still ``nn.Linear`` ``gate_proj`` / ``up_proj`` / ``down_proj``."""
    torch.manual_seed(0)
    config = transformers.Glm4MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, first_k_dense_replace=0,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        vocab_size=100, head_dim=8, n_group=1, topk_group=1,
    )
    return transformers.Glm4MoeForCausalLM(config).eval()


def _with_shared_experts(seed: int = 4) -> dict[str, torch.Tensor]:
    g, tensors = torch.Generator().manual_seed(seed), {}
    shapes = {"gate_proj": (32, 16), "up_proj": (32, 16), "down_proj": (16, 32)}
    for i in range(2):
        tensors[f"{PREFIX}model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 32, generator=g)
        tensors[f"{PREFIX}model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.randn(32, 2, generator=g)
        for owner in [f"experts.{e}" for e in range(4)] + ["shared_experts"]:
            for proj, (fan_in, fan_out) in shapes.items():
                key = f"{PREFIX}model.layers.{i}.mlp.{owner}.{proj}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(2, fan_in, generator=g)
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, 2, generator=g)
    return tensors


@pytest.mark.parametrize("shared_in", [(0, 1), (1,)])
def test_a_shared_experts_file_is_refused_and_loads_as_trained_with_the_config_the_error_names(tmp_path, shared_in):
    """PEFT's conversion of ``gate_proj`` etc. leaves a shared expert's ``nn.Linear`` unadapted and
    drops its tensors; fxlora refuses, and the regex + target_parameters config it names loads all
    (the shared experts of every layer, or of the one layer the file adapts)."""
    tensors = {k: v for k, v in _with_shared_experts().items() if ".shared_experts." not in k or int(k.split(".")[4]) in shared_in}
    directory = write_v4(tmp_path / "v4", "qwen3_moe", tensors, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    model = glm4_moe()
    before = state_snapshot(model)
    with pytest.raises(CheckpointError, match=r"shared_experts.*drops these tensors") as caught:
        fxlora.LoraModel.from_pretrained(model, directory)
    assert_same_state(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(glm4_moe(), directory)
    assert not any(".shared_experts." in k for k in peft.get_peft_model_state_dict(theirs))  # PEFT drops them
    config = json.loads(re.search(r"with the config fields (\{.*\}) \(a regex", str(caught.value)).group(1))
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 4} and config["alpha_pattern"] == {r".*\.gate_up_proj": 8}
    ours = fxlora.LoraModel.from_pretrained(model, write_v4(tmp_path / "as_trained", "qwen3_moe", tensors, **config))
    mine = fxlora.get_peft_model_state_dict(ours)
    unfused = {k: v for k, v in tensors.items() if ".experts." not in k}  # attention, shared experts
    assert_same_tensors({k: v for k, v in mine.items() if ".experts." not in k}, unfused)
    experts = ours.model.get_submodule("model.layers.1.mlp.experts")
    fused = PARAMETER.lora_weight(experts, "default", False, torch.float32, "gate_up_proj")
    key = f"{PREFIX}model.layers.1.mlp.experts.3"
    old = [tensors[f"{key}.{p}.lora_B.weight"] @ tensors[f"{key}.{p}.lora_A.weight"] * 2 for p in ("gate_proj", "up_proj")]
    torch.testing.assert_close(fused[3], torch.cat(old), rtol=1e-6, atol=1e-6)


class _Experts(nn.Module):
    """Fused experts as transformers 5 stores them (E, out, in), in a model of a converted family."""

    def __init__(self, experts: int, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(experts, 2 * ffn, hidden))
        self.down_proj = nn.Parameter(torch.zeros(experts, hidden, ffn))


@given(
    experts=st.integers(1, 5), hidden=st.integers(1, 6), ffn=st.integers(1, 6), r=st.integers(1, 4),
    alpha=st.sampled_from([1.0, 3.0, 16.0]), seed=st.integers(0, 2**16),
)
def test_property_each_fused_update_is_the_old_updates_stacked(experts, hidden, ffn, r, alpha, seed):
    """For any expert count, sizes, rank and alpha: expert e's update of the fused factors
    (``B[:, e::E] @ A[e n r:(e+1) n r]``, times the fused scaling) is its old updates stacked."""
    model = nn.Module()
    model.config = SimpleNamespace(model_type="qwen3_moe")
    model.experts = _Experts(experts, hidden, ffn)
    params = tuple(ParamTarget(p, n * r, n * alpha, scaling_value(n * alpha, n * r, False)) for p, n in (("gate_up_proj", 2), ("down_proj", 1)))
    target = Target("experts", model.experts, PARAMETER, ParameterSpec(r=2 * r, alpha=2 * alpha, params=params))
    g, tensors = torch.Generator().manual_seed(seed), {}
    for e in range(experts):
        for proj, fan_in, fan_out in (("gate_proj", hidden, ffn), ("up_proj", hidden, ffn), ("down_proj", ffn, hidden)):
            tensors[f"experts.{e}.{proj}.lora_A.weight"] = torch.randn(r, fan_in, generator=g, dtype=torch.float64)
            tensors[f"experts.{e}.{proj}.lora_B.weight"] = torch.randn(fan_out, r, generator=g, dtype=torch.float64)
    out = convert_expert_tensors(model, tensors, [target], LoraConfig(r=r, lora_alpha=alpha, target_modules=["x"]), "here")
    assert set(out) == {"experts.base_layer.lora_A.weight", "experts.base_layer.lora_B.weight", "experts.lora_A.weight", "experts.lora_B.weight"}

    def old(e: int, proj: str) -> torch.Tensor:
        return tensors[f"experts.{e}.{proj}.lora_B.weight"] @ tensors[f"experts.{e}.{proj}.lora_A.weight"] * (alpha / r)

    for key, target_param, projs in (("experts.base_layer", params[0], ("gate_proj", "up_proj")), ("experts", params[1], ("down_proj",))):
        a, b, rank = out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"], target_param.r
        for e in range(experts):
            fused = b[:, e::experts] @ a[e * rank:(e + 1) * rank] * target_param.scaling
            torch.testing.assert_close(fused, torch.cat([old(e, p) for p in projs]), rtol=1e-12, atol=1e-12)
