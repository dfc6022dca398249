"""FSDP2 (``fully_shard``) on 2 gloo processes: per block, per adapted layer and on the root,
before or after ``transform``, fp32 and bf16 mixed precision, on the block model and a tiny
llama: training losses equal peft's exactly. A sharded model saves the file an unsharded one
writes (rank 0 writes), and adapters load into a sharded model."""

import os

import pytest

from launcher import run_torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2") / "result.json"
    return run_torchrun(os.path.join(os.path.dirname(__file__), "scripts", "fsdp2.py"), str(out), result=out, timeout=240)


def test_every_sharding_trains_with_peft_losses(result):
    assert len(result["cases"]) == 11
    for case, losses in result["cases"].items():
        assert isinstance(losses["fxlora"], list), (case, losses["fxlora"])
        assert losses["fxlora"] == losses["peft"], case
        assert losses["fxlora"][-1] < losses["fxlora"][0], case  # it trains


def test_a_sharded_model_saves_whole_tensors_from_rank_0(result):
    assert "save_error" not in result, result.get("save_error")
    save = result["save"]
    assert save["entries"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # no temporary left
    assert save["same_weights"] and save["count"] == 8
    assert save["same_files_as_unsharded"]


def test_adapters_load_into_a_sharded_model(result):
    assert result["load"] == {"equal": True, "again_equal": True}
