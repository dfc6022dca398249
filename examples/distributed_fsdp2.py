"""Fine-tune a tiny llama with LoRA on several processes with FSDP2 (``fully_shard``).

Each decoder layer and the root are sharded after ``fxlora.transform``; every layer keeps its
hooks (FSDP2 unshards a layer's weights in a forward pre-hook) and runs its own graph code. Rank 0
prints a progress bar and the loss per step; the adapter is saved at the end (every rank calls
``save_pretrained``: gathering the sharded tensors is collective; rank 0 writes).

    torchrun --standalone --nproc_per_node=2 examples/distributed_fsdp2.py [--steps 30] [--out DIR]

CPU and gloo by default (``--backend nccl`` on GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import fxlora


def tiny_llama(hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)  # the same base weights on every rank
    return LlamaForCausalLM(config)


def batches(rank: int, steps: int, batch: int = 4, length: int = 16):
    """A toy language: counting sequences modulo the vocabulary, different per rank."""
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        start = torch.randint(0, 64, (batch, 1), generator=g)
        ids = (start + torch.arange(length)) % 64
        yield ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default=None, help="adapter directory (default: a new temporary one)")
    parser.add_argument("--backend", default="gloo")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = fxlora.transform(tiny_llama(args.hidden), fxlora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for layer in model.model.model.layers:
        fully_shard(layer)
    fully_shard(model.model)
    if rank == 0:
        model.print_trainable_parameters()
        print(f"{world} processes, FSDP2 per decoder layer; graph roots: {model.graph_roots}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for step, ids in enumerate(batches(rank, args.steps), 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            done = int(30 * step / args.steps)
            print(f"step {step}/{args.steps} [{'#' * done}{'.' * (30 - done)}] loss {mean.item() / world:.4f}", flush=True)
    out = args.out
    if out is None:
        shared = [tempfile.mkdtemp(prefix="fxlora-fsdp2-") if rank == 0 else None]
        dist.broadcast_object_list(shared)
        out = shared[0]
    model.save_pretrained(out)
    dist.barrier()
    if rank == 0:
        print(f"adapter saved to {out}: {sorted(os.listdir(out))}")
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
