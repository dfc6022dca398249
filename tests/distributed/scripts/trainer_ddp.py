"""transformers' Trainer with its default arguments (``ddp_backend="gloo"``, CPU) on every rank of a
torchrun, training fxlora's and PEFT's adapters of the same tiny llama from the same weights (the
setup of tests/trainer_runs.py). Run by training.py."""

import torch
import torch.distributed as dist

from models import peft_key_to_fxlora
from trainer_runs import TokenRows, lora_pair, lora_weights, train


def run(output_dir: str) -> dict:
    """This rank's view: the losses (the Trainer's, averaged over the ranks), the columns the
    model was given, the steps, whether the trained weights agree with PEFT's and moved, and the
    trained weights."""
    ours, theirs = lora_pair()
    start = lora_weights(ours)
    data = TokenRows(rows=16)
    runs = {
        name: train(model, f"{output_dir}/{name}", data, ddp_backend="gloo", ddp_timeout=60, save_strategy="no")
        for name, model in (("fxlora", ours), ("peft", theirs))
    }
    trained, peft_trained = lora_weights(ours), lora_weights(theirs, peft_key_to_fxlora)
    return {
        "world": dist.get_world_size(),
        "losses": {name: run.losses for name, run in runs.items()},
        "columns": {name: sorted(run.collator.keys) for name, run in runs.items()},
        "steps": {name: run.trainer.state.global_step for name, run in runs.items()},
        "weights_equal_peft": trained.keys() == peft_trained.keys() and all(torch.equal(trained[k], peft_trained[k]) for k in trained),
        "weights_moved": all(not torch.equal(trained[k], start[k]) for k in start),
        "weights": {k: v.tolist() for k, v in trained.items()},
    }
