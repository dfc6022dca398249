"""Training on 2 processes (torchrun, gloo, CPU) equals PEFT's: DDP of a custom block model, and
transformers' Trainer with its default arguments (one torchrun for both: scripts/training.py)."""

import os

import pytest

from launcher import SCRIPTS, run_torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(not hasattr(os, "fork"), reason="torchrun on POSIX")]
pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("training")
    return out, run_torchrun(SCRIPTS / "training.py", str(out))


def test_ddp_of_a_block_model_trains_as_peft_and_rank_0_saves_a_loadable_adapter(runs):
    out, result = runs
    assert result["world"] == 2
    ranks = result["ddp"]
    for r in ranks:
        assert len(r["losses"]["fxlora"]) == 3 and r["losses"]["fxlora"] == r["losses"]["peft"]
        assert r["weights_equal_peft"] and r["weights_moved"]
        assert r["loaded_equal"] and r["peft_loaded_equal"]  # every rank loads what rank 0 saved
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank had its own batch ...
    assert ranks[0]["weights"] == ranks[1]["weights"]  # ... and DDP kept the replicas equal
    assert len(ranks[0]["weights"]) == 2 * 2 * 2  # fc1, fc2 of 2 blocks: A and B
    assert sorted(os.listdir(out / "adapter")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_default_trainer_under_torchrun_trains_as_peft(runs):
    _, result = runs
    ranks = result["trainer"]
    for r in ranks:
        assert r["world"] == 2 and r["steps"] == {"fxlora": 3, "peft": 3}
        assert r["columns"] == {name: ["attention_mask", "input_ids", "labels"] for name in ("fxlora", "peft")}  # extra column dropped
        assert len(r["losses"]["fxlora"]) == 3 and r["losses"]["fxlora"] == r["losses"]["peft"]
        assert r["weights_equal_peft"] and r["weights_moved"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the Trainer logs the mean over the ranks
    assert ranks[0]["weights"] == ranks[1]["weights"]
