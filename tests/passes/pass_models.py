"""Models and graph states for the pass-contract tests: real adapted models, fresh base graphs of
their roots, and the graph as the pipeline leaves it just before a given pass."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlora
from fxlora import LoraConfig
from fxlora.core.gates import EagerKey
from fxlora.passes import PIPELINE, PassContext, PassOptions
from fxlora.tracing.call_keys import canonical_key
from fxlora.tracing.traced import trace_through_ids, trace_variant


class Mixed(nn.Module):
    """Embedding, Linear and Conv1d targets in one forward, and a head to save."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.proj(self.emb(ids))
        h = F.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h)


class Attention(nn.Module):
    """q/k/v projections of one input; gate/up of another."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        h = torch.cat([q[..., :4] * k + v] * 2, dim=-1)
        return self.down(torch.relu(self.gate(h)) * self.up(h))


class ReadAttention(nn.Module):
    """timm's beit / eva attention pattern: ``qkv`` (no bias) used through its weight with a q/k/v
    bias of the attention's own, ``proj`` through its weight and own bias; ``read=False`` calls
    them instead (the reference)."""

    def __init__(self, d: int = 8, read: bool = True) -> None:
        super().__init__()
        self.qkv, self.proj, self.read = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d), read
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.register_buffer("k_bias", torch.zeros(d), persistent=False)

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, weight=self.qkv.weight, bias=bias) if self.read else self.qkv(x) + bias
        q, k, v = qkv.chunk(3, dim=-1)
        h = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return F.linear(h, self.proj.weight, self.proj.bias) if self.read else self.proj(h)


class ReadNet(nn.Module):
    """A `ReadAttention`, then a Linear it calls."""

    def __init__(self, read: bool = True) -> None:
        super().__init__()
        self.attn = ReadAttention(read=read)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.attn(x))


def weight_reads():
    """Both projections used through their weights, fc called; two adapters, one with dropout."""
    lora = fxlora.transform(ReadNet(), LoraConfig(target_modules=["qkv", "proj", "fc"]))
    lora.add_adapter("d", LoraConfig(target_modules=["qkv"], lora_dropout=0.2))
    return lora, ("default", "d")


def mixed():
    """Two adapters (dropout 0 and 0.3) on Embedding / Linear / Conv targets, the head saved."""
    lora = fxlora.transform(Mixed(), LoraConfig(target_modules=["emb", "proj", "conv"], modules_to_save=["head"]))
    lora.add_adapter("noisy", LoraConfig(target_modules=["proj", "conv"], lora_dropout=0.3, modules_to_save=["head"]))
    return lora, ("default", "noisy")


def attention():
    """All linear layers adapted twice (one adapter with dropout and a B bias on q/k)."""
    lora = fxlora.transform(Attention(), LoraConfig(target_modules="all-linear", rank_pattern={"k_proj": 2}))
    lora.add_adapter("d", LoraConfig(target_modules=["q_proj", "k_proj"], lora_dropout=0.2, lora_bias=True))
    return lora, ("default", "d")


MODELS = {"mixed": mixed, "attention": attention, "weight_reads": weight_reads}


def contexts(adapters: tuple[str, ...]) -> dict[str, PassContext]:
    """The kinds of code `rewrite` builds: gated (train, eval with guard_idle), eager for a known
    state, eager for a mixed batch, eager with nothing live."""
    first = adapters[:1]
    return {
        "gated-train": PassContext(training=True),
        "gated-eval-guarded": PassContext(PassOptions(guard_idle=True), training=False),
        "gated-eval-unoptimised": PassContext(PassOptions.none(), training=False),
        "eager-known": PassContext(eager=EagerKey(tuple(adapters), first)),
        "eager-one": PassContext(eager=EagerKey(first, ())),
        "eager-mixed-batch": PassContext(eager=EagerKey(tuple(adapters), None, rows=True)),
        "eager-idle": PassContext(eager=EagerKey((), ()), training=False),
    }


def fresh_graph(lora, training: bool = True):
    """The root of `lora` and a new base graph of it (no pass run yet)."""
    root = lora.model
    names = lora.targeted_module_names + lora.modules_to_save_names
    interesting = [root.get_submodule(n) for n in names]
    return root, trace_variant(root, trace_through_ids(root, interesting), canonical_key(root, training)).graph


def graph_before(lora, ctx: PassContext, name: str):
    """The root and a base graph of `lora` that went through the stages before pass `name` that
    apply to `ctx` (contracts checked)."""
    root, graph = fresh_graph(lora, ctx.training)
    for stage in PIPELINE:
        if stage.pass_.name == name:
            return root, graph
        if stage.applies(ctx):
            stage.pass_(graph, root, ctx, check=True)
    raise KeyError(name)
