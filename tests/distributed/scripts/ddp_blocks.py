"""DDP (``DistributedDataParallel``, gloo) training of the block model adapted by fxlora, and by
PEFT from the same adapter weights, on every rank, 3 steps on each rank's own batch; then rank 0
alone saves the adapter, which every rank loads back (fxlora and PEFT). Run by training.py."""

import copy

import peft
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import fxlora
from models import Blocks, copy_peft_adapter_weights, peft_key_to_fxlora

STEPS = 3


def lora_tensors(model, rename=lambda k: k):
    return {rename(k): v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def train(model, x, y):
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = F.mse_loss(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run(save_dir: str) -> dict:
    """This rank's losses (fxlora's and PEFT's), whether the trained weights agree and moved,
    whether the saved adapter loads back to the same outputs, and the trained weights."""
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    base = Blocks(d=16)
    config = dict(target_modules=["fc1", "fc2"], r=4, lora_alpha=8, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(**config))
    copy_peft_adapter_weights(theirs, ours)
    start = lora_tensors(ours)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    x, y = torch.randn(4, 16, generator=g), torch.randn(4, 3, generator=g)
    losses = {"fxlora": train(ours, x, y), "peft": train(theirs, x, y)}
    trained, peft_trained = lora_tensors(ours), lora_tensors(theirs, peft_key_to_fxlora)
    if rank == 0:
        ours.save_pretrained(save_dir)  # rank 0 only
    torch.distributed.barrier()
    ours.eval()
    probe = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ours(probe)
        loaded = fxlora.LoraModel.from_pretrained(copy.deepcopy(base), save_dir)(probe)
        peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), save_dir)(probe)
    return {
        "losses": losses,
        "weights_equal_peft": trained.keys() == peft_trained.keys() and all(torch.equal(trained[k], peft_trained[k]) for k in trained),
        "weights_moved": all(not torch.equal(trained[k], start[k]) for k in start),
        "loaded_equal": torch.equal(loaded, expected),
        "peft_loaded_equal": torch.equal(peft_loaded, expected),
        "weights": {k: v.tolist() for k, v in trained.items()},
    }
