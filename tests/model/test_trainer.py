"""transformers' Trainer with its default arguments (``remove_unused_columns=True``): it keeps the
columns the wrapper's ``forward`` signature names, which is the wrapped model's; training equals
PEFT's step for step."""

import inspect

import pytest
import torch

from models import peft_key_to_fxlora
from trainer_runs import EXTRA_COLUMN, MODEL_COLUMNS, TokenRows, lora_pair, lora_weights, train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_default_trainer_drops_unused_columns_and_trains_as_peft(tmp_path, gradient_checkpointing):
    ours, theirs = lora_pair()
    start = lora_weights(ours)
    data = TokenRows()
    runs = [
        train(model, str(tmp_path / name), data, gradient_checkpointing=gradient_checkpointing)
        for name, model in (("fxlora", ours), ("peft", theirs))
    ]
    mine, peft_run = runs
    for run in runs:
        assert run.collator.keys == MODEL_COLUMNS  # the extra column was dropped before collating
        assert run.trainer.state.global_step == 3
    assert len(mine.losses) == 3 and mine.losses == peft_run.losses
    trained = lora_weights(ours)
    assert trained.keys() == start.keys()
    assert all(not torch.equal(trained[k], start[k]) for k in start)  # every LoRA tensor moved
    theirs_trained = lora_weights(theirs, peft_key_to_fxlora)
    assert trained.keys() == theirs_trained.keys()
    assert all(torch.equal(trained[k], theirs_trained[k]) for k in trained)


def test_trainer_signature_columns_are_the_models_inputs(tmp_path):
    ours, _ = lora_pair()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=ours, args=args, train_dataset=TokenRows())
    trainer._set_signature_columns_if_needed()
    columns = set(trainer._signature_columns)
    assert MODEL_COLUMNS <= columns and EXTRA_COLUMN not in columns
    assert "args" not in columns
    # the wrapper takes **kwargs as the llama does: loss keywords (num_items_in_batch) reach it
    assert trainer.model_accepts_loss_kwargs


def test_forward_shows_the_wrapped_models_signature_plus_adapter_names():
    ours, _ = lora_pair()
    model_params = inspect.signature(ours.model.forward).parameters
    params = inspect.signature(ours.forward).parameters
    assert list(params) == [*[n for n in model_params if n != "kwargs"], "adapter_names", "kwargs"]
    assert params["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY and params["adapter_names"].default is None
    assert all(params[n] == p for n, p in model_params.items())
