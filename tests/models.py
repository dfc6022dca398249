"""Small models shared by the tests (no downloads, all built in code)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """The PEFT custom-models guide's MLP (20 -> hidden -> hidden -> 2)."""

    def __init__(self, num_units_hidden: int = 2000):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(20, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, X):
        return self.seq(X)

    def describe(self) -> str:  # a user method that must stay reachable
        return f"MLP with {len(self.seq)} layers"


class ConvNet1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 5, stride=2, padding=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(x.mean(-1))


class ConvNet2d(nn.Module):
    def __init__(self, dilation: int = 1, padding_mode: str = "zeros", groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=dilation, dilation=dilation, padding_mode=padding_mode)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=groups)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.conv3(x)
        return self.head(x.mean((2, 3)))


class ConvNet3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv3d(4, 4, (1, 1, 3), padding=(0, 0, 1))
        self.conv3 = nn.Conv3d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.conv3(x)
        return self.head(x.mean((2, 3, 4)))


class EmbeddingModel(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.proj = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, 5)

    def forward(self, ids):
        h = torch.tanh(self.proj(self.emb(ids)))
        return self.classifier(h.mean(1))


class Branchy(nn.Module):
    """Its own forward branches on tensor data: not traceable. Its children are."""

    def __init__(self):
        super().__init__()
        self.block_a = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.block_b = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.block_a(x)
        if h.sum() > 0:  # data-dependent control flow defeats symbolic tracing
            h = self.block_b(h)
        return self.out(h)


class Untraceable(nn.Module):
    """A block whose forward cannot be traced, with adaptable layers directly inside it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        if x.abs().max() > 100:
            return x
        return self.fc2(torch.relu(self.fc1(x)))


class Mixed(nn.Module):
    """Graph-path and eager-path targets in one model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([Untraceable(), nn.Sequential(nn.Linear(8, 8), nn.GELU())])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        if h.mean() > 1e6:
            h = h * 0
        return self.head(h)


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


class OptionalArgs(nn.Module):
    """forward with optional arguments that change the computation."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gate = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, mask=None, scale: float = 1.0, use_gate: bool = True):
        h = self.fc(x)
        if mask is not None:
            h = h * mask
        if use_gate:
            h = h * torch.sigmoid(self.gate(x))
        if self.training:
            h = self.drop(h)
        return h * scale


class Stateful(nn.Module):
    """A forward that changes the module's attributes: must not be captured as a graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls = self.calls + 1
        return self.fc(x)


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every `state_dict` tensor of `module` (to check that a refusal changed nothing)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """`module`'s `state_dict` has exactly the keys and values of `before` (`state_snapshot`)."""
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def peft_key_to_fxlora(key: str) -> str:
    """peft's name of a tensor -> fxlora's (peft moves base layers under ``base_layer`` and
    ``original_module``; fxlora leaves them where they were)."""
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")


def copy_peft_adapter_weights(peft_model: nn.Module, lora_model: nn.Module) -> None:
    """Load every tensor of the peft model (adapters, copies, trained biases) into fxlora's."""
    state = {peft_key_to_fxlora(k): v for k, v in peft_model.state_dict().items()}
    ours = lora_model.state_dict()
    missing = set(state) - set(ours)
    assert not missing, f"fxlora lacks peft tensors: {sorted(missing)[:5]}"
    lora_model.load_state_dict(state, strict=True)


def row_by_row(lora_model, x: torch.Tensor, names: list) -> torch.Tensor:
    """What a mixed batch should compute: each row alone, with its adapter active (or the
    adapters disabled for "__base__"). Leaves the last row's adapter active."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with lora_model.disable_adapter():
                rows.append(lora_model(x[i : i + 1]))
        else:
            lora_model.set_adapter(name)
            rows.append(lora_model(x[i : i + 1]))
    return torch.cat(rows)


class Block(nn.Module):
    """A pre-norm residual block: LayerNorm, then two Linears."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Scaled(Block):
    """A block whose forward multiplies by a plain attribute (a number in its graph)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


class Opaque(nn.Module):
    """Blocks called through a Python loop over a list: each block is its own root."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in list(self.blocks):
            if x.sum() > 1e9:  # data-dependent: the whole model does not trace
                break
            x = block(x)
        return x


class Blocks(nn.Module):
    """`Block`s in a ModuleList and a head: the shape FSDP2 and checkpoint wrappers are applied to."""

    def __init__(self, d: int = 8, n: int = 2, out: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, out)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def save_both_trained(tmp_path, peft_model: nn.Module, lora_model: nn.Module) -> None:
    """Both models' ``lora_B`` moved off its zero init (so the files hold an adapter that acts),
    then saved: PEFT's under ``tmp_path / "peft"``, fxlora's under ``tmp_path / "ours"``."""
    with torch.no_grad():
        for m in (peft_model, lora_model):
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.add_(0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    lora_model.save_pretrained(tmp_path / "ours")


def load_crosswise(tmp_path, ours_base: nn.Module, peft_base: nn.Module):
    """``(fxlora loading PEFT's file, PEFT loading fxlora's)`` after `save_both_trained`, in eval mode."""
    import fxlora
    import peft

    ours = fxlora.LoraModel.from_pretrained(ours_base, tmp_path / "peft").eval()
    theirs = peft.PeftModel.from_pretrained(peft_base, tmp_path / "ours").eval()
    return ours, theirs


def paired(base: nn.Module, targets):
    """peft and fxlora models of copies of `base` with the same (non-identity) adapter weights, in
    eval mode: ``(peft's, fxlora's)``."""
    import copy

    import fxlora
    import peft

    kwargs = dict(target_modules=targets, init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    ours = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(**kwargs)).eval()
    copy_peft_adapter_weights(reference, ours)
    return reference, ours


def assert_same_state_as_peft(peft_model: nn.Module, lora_model: nn.Module) -> None:
    """The fxlora model's state dict holds PEFT's tensors, bit for bit, under fxlora's names."""
    theirs = {peft_key_to_fxlora(k): v for k, v in peft_model.state_dict().items()}
    ours = lora_model.state_dict()
    assert set(theirs) == set(ours)
    unequal = [k for k, v in theirs.items() if not torch.equal(v, ours[k])]
    assert not unequal, unequal


def assert_same_cached_decoding(ours: nn.Module, reference: nn.Module, vocab: int) -> None:
    """Logits of a prompt, then of one decoding step on its KV cache, equal between two causal
    language models (a wrong layer index would mix the layers' caches)."""
    ids = torch.randint(0, vocab, (2, 7))
    with torch.no_grad():
        a, b = ours(input_ids=ids, use_cache=True), reference(input_ids=ids, use_cache=True)
        assert torch.allclose(a.logits, b.logits, atol=1e-5)
        step = torch.randint(0, vocab, (2, 1))
        a2 = ours(input_ids=step, past_key_values=a.past_key_values, use_cache=True)
        b2 = reference(input_ids=step, past_key_values=b.past_key_values, use_cache=True)
        assert torch.allclose(a2.logits, b2.logits, atol=1e-5)


def tiny_llama(layers: int = 2) -> nn.Module:
    """A transformers ``LlamaForCausalLM`` of `layers` tiny decoder layers (vocabulary 96, hidden
    32, grouped-query attention), seeded, in eval mode; skips the test without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()
