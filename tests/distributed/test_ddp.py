"""Training on 2 processes (torchrun, gloo, CPU) equals PEFT's: DDP of a custom block model, and
transformers' Trainer with its default arguments."""

import os

import pytest

from launcher import SCRIPTS, run_torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(not hasattr(os, "fork"), reason="torchrun on POSIX")]
pytest.importorskip("peft")


def test_ddp_of_a_block_model_trains_as_peft_and_rank_0_saves_a_loadable_adapter(tmp_path):
    result = run_torchrun(SCRIPTS / "ddp_blocks.py", str(tmp_path / "adapter"))
    assert result["world"] == 2
    ranks = result["ranks"]
    for r in ranks:
        assert len(r["losses"]["fxlora"]) == 3 and r["losses"]["fxlora"] == r["losses"]["peft"]
        assert r["weights_equal_peft"] and r["weights_moved"]
        assert r["loaded_equal"] and r["peft_loaded_equal"]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank had its own batch ...
    assert ranks[0]["weights"] == ranks[1]["weights"]  # ... and DDP kept the replicas equal
    assert len(result["lora_keys"]) == 2 * 2 * 2  # fc1, fc2 of 2 blocks: A and B
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_default_trainer_under_torchrun_trains_as_peft(tmp_path):
    pytest.importorskip("transformers")
    ranks = run_torchrun(SCRIPTS / "trainer_ddp.py", str(tmp_path))
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["steps"] == {"fxlora": 3, "peft": 3}
        assert r["columns"] == {name: ["attention_mask", "input_ids", "labels"] for name in ("fxlora", "peft")}  # extra column dropped
        assert len(r["losses"]["fxlora"]) == 3 and r["losses"]["fxlora"] == r["losses"]["peft"]
        assert r["weights_equal_peft"] and r["weights_moved"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the Trainer logs the mean over the ranks
    assert ranks[0]["weights"] == ranks[1]["weights"]
