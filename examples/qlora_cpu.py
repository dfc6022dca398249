"""QLoRA on CPU: LoRA on a tiny Llama whose linear weights are stored in int8 (torchao).

Builds a small ``LlamaForCausalLM`` from a config (random weights, no downloads), quantizes every
decoder linear layer with torchao's ``Int8WeightOnlyConfig`` (int8 weights, one scale per row),
puts LoRA adapters on all of them (``target_modules="all-linear"``; the output layer stays plain),
trains a few steps on random tokens, and prints the memory of the weights and the peak memory of
one training step, each against the same model and adapters in float32. Then it merges the adapter
(dequantize, add, requantize: not exact, the printed difference is the requantization error) and
unmerges it (the original int8 weights come back bit for bit).

    python examples/qlora_cpu.py [--steps 5] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from torchao.quantization import Int8WeightOnlyConfig, quantize_

import fxlora
from fxlora.kinds.quantized import requantize_with

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import PeakMemory  # noqa: E402  (the repository's CPU peak-memory tracker)

MiB = 2**20


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, inner tensors of a quantized tensor subclass included."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(storage_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: nn.Module) -> int:
    return sum(storage_bytes(p.detach()) for p in model.parameters())


def train(model: nn.Module, steps: int, batch: torch.Tensor) -> tuple[list[float], int]:
    """`steps` AdamW steps on next-token loss; returns the losses and the peak bytes of the last
    step's allocations (activations, gradients, transient dequantized weights)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, peak = [], 0

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    for _ in range(steps - 1):
        step()
    with PeakMemory() as tracker:
        step()
    return losses, tracker.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    fp32 = transformers.LlamaForCausalLM(config)
    int8 = copy.deepcopy(fp32)
    quant = Int8WeightOnlyConfig()
    quantize_(int8, quant, filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "lm_head")
    batch = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))

    results = {}
    for name, base in (("fp32", fp32), ("int8", int8)):
        before = weight_bytes(base)
        torch.manual_seed(2)
        model = fxlora.transform(base, fxlora.LoraConfig(target_modules="all-linear", r=8, lora_alpha=16))
        losses, peak = train(model, args.steps, batch)
        results[name] = (before, peak, losses, model)
    (w32, p32, l32, _), (w8, p8, l8, model) = results["fp32"], results["int8"]
    model.print_trainable_parameters()
    print(f"base weights: fp32 {w32 / MiB:.2f} MiB | int8 {w8 / MiB:.2f} MiB ({w8 / w32:.2f}x)")
    print(f"peak of a training step: fp32 {(w32 + p32) / MiB:.2f} MiB | int8 {(w8 + p8) / MiB:.2f} MiB ({(w8 + p8) / (w32 + p32):.2f}x) (weights + step allocations)")
    print(f"loss fp32: {l32[0]:.3f} -> {l32[-1]:.3f} | int8: {l8[0]:.3f} -> {l8[-1]:.3f}")

    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=batch).logits
        layer = model.model.get_submodule(model.targeted_module_names[0])
        original = layer.weight
        requantize_with(model.model, quant)  # torchao tensors do not record their config
        model.merge_adapter()
        merged = model(input_ids=batch).logits
        model.unmerge_adapter()
        restored = layer.weight is original and torch.equal(model(input_ids=batch).logits, adapted)
    print(f"merged ({type(layer.weight).__name__} requantized): max |merged - adapted| = {(merged - adapted).abs().max():.4f}")
    print(f"unmerged: original int8 weights back bit for bit: {restored}")


if __name__ == "__main__":
    main()
