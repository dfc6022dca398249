"""transformers ``Trainer`` runs of fxlora and PEFT on the same tiny llama, the same adapter weights
and the same data (shared by tests/model/test_trainer.py and the torchrun scripts in
tests/distributed/scripts/, which run it on 2 processes)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

import fxlora
from models import copy_peft_adapter_weights
from zoo import TRANSFORMERS, VOCAB

EXTRA_COLUMN = "row_id"  # in every row; no forward takes it, so the Trainer must drop it
MODEL_COLUMNS = {"input_ids", "attention_mask", "labels"}


class TokenRows(torch.utils.data.Dataset):
    """Rows of random tokens (their own labels) and an extra column; a plain torch Dataset (no
    `datasets`): the Trainer then drops unused columns in its collator (`RemoveColumnsCollator`)."""

    def __init__(self, rows: int = 8, length: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (rows, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, EXTRA_COLUMN: torch.tensor(i)}


class KeyRecordingCollator:
    """transformers' default collator, recording the keys of the rows it is given."""

    def __init__(self) -> None:
        import transformers

        self.collate = transformers.default_data_collator
        self.keys: set[str] = set()

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        for f in features:
            self.keys |= set(f)
        return self.collate(features)


@dataclass
class Run:
    losses: list[float]  # the Trainer's logged loss per step (all processes' mean under DDP)
    model: nn.Module
    collator: KeyRecordingCollator
    trainer: Any


def lora_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(fxlora model, PEFT model) of the same tiny llama with the same adapter weights (PEFT's
    init, random B so that the adapters are not the identity)."""
    import peft

    base = TRANSFORMERS["llama"].build(seed)
    config = dict(r=4, lora_alpha=8, init_lora_weights=False)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(**config))
    copy_peft_adapter_weights(theirs, ours)
    return ours, theirs


def train(model: nn.Module, output_dir: str, dataset: torch.utils.data.Dataset, **arguments: Any) -> Run:
    """Train with default `TrainingArguments` but for 3 steps, no reporting, CPU, a loss logged
    per step; `arguments` override."""
    import transformers

    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=3, report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
        **arguments,
    )
    collator = KeyRecordingCollator()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return Run(losses, model, collator, trainer)


def lora_weights(model: nn.Module, rename: Callable[[str], str] = lambda k: k) -> dict[str, torch.Tensor]:
    """The model's LoRA tensors by fxlora's name (`rename` maps PEFT's names)."""
    return {rename(k): v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}
