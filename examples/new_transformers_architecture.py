"""LoRA on a transformers architecture, built from a config, with PEFT's default targets.

A tiny Qwen3 decoder (any causal LM class works the same way: nothing in fxlora is specific to
it) is built from a ``Qwen3Config`` with random weights, wrapped with ``fxlora.LoraConfig()``
(``target_modules=None``: the default targets for ``config.model_type``, here ``q_proj`` and
``v_proj``) plus trainable copies of the embeddings and the output layer, and trained on the short
text in ``examples/data/tiny_text.txt`` with a character-level tokenizer built here (no hub
downloads). Prints the plan, samples from ``generate()`` (KV cache on) before and after, and the
loss.

    python examples/new_transformers_architecture.py [--steps 300] [--hidden 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import fxlora

DATA = Path(__file__).resolve().parent / "data" / "tiny_text.txt"


class CharTokenizer:
    """Characters of the training text as tokens; id 0 is padding, 1 marks the start of a text."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.ids = {c: i + 2 for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        return [1] + [self.ids[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 2] for i in ids if i >= 2)


def batches(tokens: torch.Tensor, length: int, size: int, generator: torch.Generator):
    """Endless random windows of `length` tokens, each starting with the start token."""
    while True:
        starts = torch.randint(0, len(tokens) - length, (size,), generator=generator)
        windows = torch.stack([tokens[s : s + length] for s in starts.tolist()])
        yield torch.cat([torch.ones(size, 1, dtype=torch.long), windows], dim=1)


def sample(model, tokenizer: CharTokenizer, prompt: str, new_tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=True, top_k=5, pad_token_id=0)
    return prompt + tokenizer.decode(out[0, ids.shape[1] :].tolist())


@torch.no_grad()
def text_loss(model, tokens: torch.Tensor, length: int) -> float:
    model.eval()
    windows = tokens[: (len(tokens) // length) * length].view(-1, length)
    windows = torch.cat([torch.ones(len(windows), 1, dtype=torch.long), windows], dim=1)
    return model(input_ids=windows, labels=windows).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--prompt", default="The keeper ")
    args = parser.parse_args()

    from transformers import Qwen3Config, Qwen3ForCausalLM

    text = DATA.read_text()
    tokenizer = CharTokenizer(text)
    tokens = torch.tensor(tokenizer.encode(text)[1:])

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=tokenizer.vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    base = Qwen3ForCausalLM(config)

    lora_config = fxlora.LoraConfig(r=16, lora_alpha=32, modules_to_save=["embed_tokens", "lm_head"])
    report = fxlora.explain(base, lora_config)  # target_modules=None: the defaults for "qwen3"
    print(f"model_type {config.model_type!r}: targets {sorted({t.rsplit('.', 1)[-1] for t in report.targets})}, "
          f"{len(report.targets)} layers, graph share {report.graph_share:.2f}")
    model = fxlora.transform(base, lora_config)
    model.print_trainable_parameters()

    print(f"sample before: {sample(model, tokenizer, args.prompt, 60)!r}")
    before = text_loss(model, tokens, args.length)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    data = batches(tokens, args.length, args.batch_size, torch.Generator().manual_seed(0))
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = next(data)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 5) == 0:
            print(f"step {step}/{args.steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.1f}s)")

    after = text_loss(model, tokens, args.length)
    print(f"sample after: {sample(model, tokenizer, args.prompt, 60)!r}")
    print(f"loss before: {before:.3f} | after: {after:.3f}")


if __name__ == "__main__":
    main()
