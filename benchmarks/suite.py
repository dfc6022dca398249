"""The benchmark suite: fxlora against peft and against the base model, in one run.

For each model (the seed MLP, 24 Linear(1024) layers with r=16 and batch 64, a timm ViT, a tiny
llama with all-linear targets) it measures, interleaving the contenders round by round so that
machine drift hits all alike:

- unmerged forward (eval, no grad), eager and torch.compile'd;
- training step (forward + backward + AdamW step), eager and compiled; the base's training step is
  full fine-tuning;
- merged forward (after ``merge_adapter()``) against the base forward, eager and compiled, and
  compiled with the opt-in ``guard_idle`` pass (unmerged and merged) where this torch allows it;
- transform time (``fxlora.transform`` vs ``peft.get_peft_model``) of a model in eval mode (as
  ``from_pretrained`` gives it), the first call after it (fxlora traces ahead at transform but
  builds the code for the adapter state in use on the first call, and torch.compile's code when
  it compiles) and the switch to training mode after that (fxlora traces the training patterns
  then): those costs are shown, not hidden;
- peak extra memory of an eager training step;
- training step time and peak memory with ``lora_dropout=0.1`` (fxlora against peft).

A fifth case, ``llama7b-meta``, builds a llama with 7B shapes (hidden 4096, 32 layers, MLP 11008)
on the meta device and measures only transform time, the first call and the switch to training
mode (meta tensors: Python work only, what the block count scales).

Prints a table of times and ratios and writes JSON.

    python benchmarks/suite.py [--models mlp,linear24,vit,llama,llama7b-meta] [--no-compile] [--transform-only] [--rounds 11] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import interleaved, peak_memory, table  # noqa: E402

import fxlora  # noqa: E402
from fxlora.core.layers import target_meta  # noqa: E402
from fxlora.runtime.cond_support import cond_keeps_state  # noqa: E402


@dataclass
class Case:
    name: str
    make_base: Callable[[], nn.Module]
    lora: dict
    make_input: Callable[[], object]
    loss: Callable[[object], torch.Tensor]
    transform_only: bool = False  # a meta-device model: transform time and first call only
    #: the unmerged forward written by hand with the same operations on the fxlora model's own
    #: tensors (the floor any library's generated code can reach), for models of plain Linear layers
    by_hand: Optional[Callable[[nn.Module, object], Callable[[], object]]] = None


class MLP(nn.Module):
    def __init__(self, num_units_hidden: int = 2000):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(20, num_units_hidden), nn.ReLU(), nn.Linear(num_units_hidden, num_units_hidden), nn.ReLU(),
            nn.Linear(num_units_hidden, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, X):
        return self.seq(X)


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def linear_stack_by_hand(fx_model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The adapted stack's forward as plain torch calls on its own tensors, each layer's base
    ``F.linear``, A product and scaled ``addmm`` of the B product: what fxlora's generated code
    computes (the outputs are equal), without any library around it."""
    F = torch.nn.functional
    layers = [m for m in fx_model.model.modules() if isinstance(m, nn.Linear) and hasattr(m, "lora_A")]
    scalings = [target_meta(m).adapters["default"].scaling for m in layers]

    def run() -> torch.Tensor:
        with torch.no_grad():
            h = x
            for layer, scaling in zip(layers, scalings):
                base = F.linear(h, layer.weight, layer.bias)
                h = torch.addmm(base, F.linear(h, layer.lora_A.default.weight), layer.lora_B.default.weight.t(), alpha=scaling)
            return h

    return run


def cases() -> dict[str, Case]:
    def vit():
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=112)

    def llama():
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128,
        )
        return transformers.LlamaForCausalLM(config)

    def llama7b_meta():
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=4096,
        )
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(config)

    squared = lambda out: _logits(out).float().square().mean()  # noqa: E731
    return {
        "mlp": Case("seed MLP (hidden 2000, batch 64)", MLP, dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]), lambda: torch.randn(64, 20), squared),
        "linear24": Case(
            "24x Linear(1024), r=16, batch 64",
            lambda: nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(24)]),
            dict(r=16, target_modules="all-linear"),
            lambda: torch.randn(64, 1024),
            squared,
            by_hand=linear_stack_by_hand,
        ),
        "vit": Case("timm vit_tiny (112px, batch 8)", vit, dict(r=16, target_modules=r".*\.(qkv|proj|fc1|fc2)"), lambda: torch.randn(8, 3, 112, 112), squared),
        "llama": Case(
            "tiny llama all-linear (batch 4 x 64 tokens)",
            llama,
            dict(r=16, target_modules="all-linear"),
            lambda: {"input_ids": torch.randint(0, 1000, (4, 64))},
            squared,
        ),
        "llama7b-meta": Case(
            "llama 7B shapes on meta, all-linear",
            llama7b_meta,
            dict(r=16, target_modules="all-linear"),
            lambda: {"input_ids": torch.randint(0, 32000, (1, 16), device="meta")},
            squared,
            transform_only=True,
        ),
    }


def build(case: Case):
    import peft

    torch.manual_seed(0)
    base = case.make_base().eval()
    fx_model = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(**case.lora))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**case.lora))
    return base, fx_model, peft_model


def forward_fn(model, x):
    def run():
        with torch.no_grad():
            return _call(model, x)

    return run


def step_fn(model, x, loss, params):
    opt = torch.optim.AdamW(params, lr=1e-5)

    def run():
        opt.zero_grad(set_to_none=True)
        loss(_call(model, x)).backward()
        opt.step()

    return run


def row(case: Case, measure: str, mode: str, t: dict[str, float], unit: str = "ms") -> dict:
    scale = 1e3 if unit == "ms" else 1 / 2**20
    out = {"model": case.name, "measure": measure, "mode": mode, "unit": unit}
    for k, v in t.items():
        out[k] = v
        out[f"{k} {unit}"] = f"{v * scale:.2f}"
    if "peft" in t:
        out["fxlora/peft"] = f"{t['fxlora'] / t['peft']:.3f}"
    if "base" in t:
        out["fxlora/base"] = f"{t['fxlora'] / t['base']:.3f}"
    if "by hand" in t:  # the same operations written by hand (`Case.by_hand`), over the base
        out["by hand/base"] = f"{t['by hand'] / t['base']:.3f}"
    return out


def measure_case(case: Case, rounds: int, compiled: bool, transform_only: bool = False) -> list[dict]:
    x = case.make_input()
    if transform_only and not case.transform_only:
        torch.manual_seed(0)
        return transform_rows(case, case.make_base().eval(), x)
    if case.transform_only:
        torch.manual_seed(0)
        return transform_rows(case, case.make_base().eval(), x, rounds=3)
    base, fxm, pm = build(case)
    rows = []
    fxm.eval(), pm.eval()
    unmerged = {"fxlora": forward_fn(fxm, x), "peft": forward_fn(pm, x), "base": forward_fn(base, x)}
    if case.by_hand is not None:
        unmerged["by hand"] = case.by_hand(fxm, x)
        with torch.no_grad():
            assert torch.equal(unmerged["by hand"](), fxm(x)), "the hand-written forward must compute what fxlora computes"
    rows.append(row(case, "unmerged forward", "eager", interleaved(unmerged, rounds)))

    full = copy.deepcopy(base).train()
    fxm.train(), pm.train()
    steps = {
        "fxlora": step_fn(fxm, x, case.loss, [p for p in fxm.parameters() if p.requires_grad]),
        "peft": step_fn(pm, x, case.loss, [p for p in pm.parameters() if p.requires_grad]),
        "base": step_fn(full, x, case.loss, list(full.parameters())),
    }
    rows.append(row(case, "training step", "eager", interleaved(steps, max(5, rounds // 2))))
    memory = {k: float(peak_memory(fn)) for k, fn in steps.items()}
    rows.append(row(case, "peak memory of a training step", "eager", memory, unit="MiB"))
    rows += dropout_rows(case, x, rounds)

    fxm.eval(), pm.eval()
    fxm.merge_adapter(), pm.merge_adapter()
    rows.append(row(case, "merged forward", "eager", interleaved({"fxlora": forward_fn(fxm, x), "peft": forward_fn(pm, x), "base": forward_fn(base, x)}, rounds)))
    fxm.unmerge_adapter(), pm.unmerge_adapter()

    if compiled:
        rows += measure_compiled(case, x, base, fxm, pm, full, rounds)
    return rows + transform_rows(case, base, x)


def dropout_rows(case: Case, x, rounds: int) -> list[dict]:
    """Training step time and peak memory with ``lora_dropout=0.1`` (fxlora keeps each branch's
    input and the generator state, not the dropped copy: `fxlora.core.dropped_linear`), against
    peft, interleaved."""
    noisy = Case(case.name, case.make_base, dict(case.lora, lora_dropout=0.1), case.make_input, case.loss)
    _, fxm, pm = build(noisy)
    fxm.train(), pm.train()
    steps = {
        "fxlora": step_fn(fxm, x, case.loss, [p for p in fxm.parameters() if p.requires_grad]),
        "peft": step_fn(pm, x, case.loss, [p for p in pm.parameters() if p.requires_grad]),
    }
    rows = [row(case, "training step, lora_dropout=0.1", "eager", interleaved(steps, max(5, rounds // 2)))]
    memory = {k: float(peak_memory(fn)) for k, fn in steps.items()}
    rows.append(row(case, "peak memory of a training step, lora_dropout=0.1", "eager", memory, unit="MiB"))
    return rows


def measure_compiled(case, x, base, fxm, pm, full, rounds) -> list[dict]:
    torch._dynamo.reset()
    rows = []
    cfx, cpm, cbase, cfull = (torch.compile(m) for m in (fxm, pm, base, full))
    fxm.eval(), pm.eval()
    rows.append(row(case, "unmerged forward", "compiled", interleaved({"fxlora": forward_fn(cfx, x), "peft": forward_fn(cpm, x), "base": forward_fn(cbase, x)}, rounds)))
    fxm.train(), pm.train(), full.train()
    steps = {
        "fxlora": step_fn(cfx, x, case.loss, [p for p in fxm.parameters() if p.requires_grad]),
        "peft": step_fn(cpm, x, case.loss, [p for p in pm.parameters() if p.requires_grad]),
        "base": step_fn(cfull, x, case.loss, list(full.parameters())),
    }
    rows.append(row(case, "training step", "compiled", interleaved(steps, max(5, rounds // 2))))
    fxm.eval(), pm.eval()
    fxm.merge_adapter(), pm.merge_adapter()
    rows.append(row(case, "merged forward", "compiled", interleaved({"fxlora": forward_fn(cfx, x), "peft": forward_fn(cpm, x), "base": forward_fn(cbase, x)}, rounds)))
    fxm.unmerge_adapter(), pm.unmerge_adapter()
    # the opt-in pass that skips idle branches at run time (torch.cond per layer): refused on a
    # torch whose dynamo drops state updates across a cond (fxlora.runtime.cond_support)
    if not cond_keeps_state():
        return rows
    fxm.set_optimizations(guard_idle=True)
    for label, change in (("unmerged forward, guard_idle", lambda: None), ("merged forward, guard_idle", lambda: (fxm.merge_adapter(), pm.merge_adapter()))):
        change()
        rows.append(row(case, label, "compiled", interleaved({"fxlora": forward_fn(cfx, x), "peft": forward_fn(cpm, x), "base": forward_fn(cbase, x)}, rounds)))
    fxm.unmerge_adapter(), pm.unmerge_adapter()
    fxm.set_optimizations(guard_idle=False)
    return rows


def transform_rows(case: Case, base: nn.Module, x: object, rounds: int = 5) -> list[dict]:
    """Transform time, the first call after it (eval, no grad) and the switch to training mode
    after that (``train()``: fxlora traces the training patterns then), fxlora and
    peft interleaved round by round, each round on a fresh copy of `base`; medians (the first
    round warms caches and is dropped)."""
    import peft

    adapt = {
        "fxlora": lambda m: fxlora.transform(m, fxlora.LoraConfig(**case.lora)),
        "peft": lambda m: peft.get_peft_model(m, peft.LoraConfig(**case.lora)),
    }
    phases = ("transform", "first call", "train()")
    samples: dict[str, dict[str, list[float]]] = {what: {"fxlora": [], "peft": []} for what in phases}
    for i in range(rounds + 1):
        for name, fn in adapt.items():
            model = copy.deepcopy(base)
            gc.collect()  # as `common.interleaved_samples` does: no earlier garbage collected inside a timing
            start = time.perf_counter()
            adapted = fn(model).eval()
            middle = time.perf_counter()
            with torch.no_grad():
                _call(adapted, x)
            called = time.perf_counter()
            adapted.train()
            end = time.perf_counter()
            if i:
                for what, seconds in zip(phases, (middle - start, called - middle, end - called)):
                    samples[what][name].append(seconds)
            del model, adapted
    medians = {what: {k: statistics.median(v) for k, v in by.items()} for what, by in samples.items()}
    return [
        row(case, "transform time", "eager", medians["transform"]),
        row(case, "first call after transform", "eager", medians["first call"]),
        row(case, "switch to training mode (train())", "eager", medians["train()"]),
    ]


COLUMNS = ["model", "measure", "mode", "fxlora/peft", "fxlora/base", "by hand/base", "fxlora ms", "peft ms", "base ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,linear24,vit,llama,llama7b-meta")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--transform-only", action="store_true", help="only the transform-time and first-call rows")
    parser.add_argument("--json", default="benchmarks/results/suite.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    all_cases = cases()
    rows = []
    for key in args.models.split(","):
        print(f"measuring {all_cases[key].name} ...", file=sys.stderr, flush=True)
        rows += measure_case(all_cases[key], args.rounds, not args.no_compile, args.transform_only)
        # each case starts as in a fresh process: the compiled code and models of the cases before
        # freed (a heap of ~1M objects left by them made a gen-2 collection cost 0.5 s inside the
        # last case's timings)
        torch._dynamo.reset()
        gc.collect()
    shown = []
    for r in rows:
        r = dict(r)
        if r["unit"] == "MiB":
            for k in ("fxlora", "peft", "base"):
                r[f"{k} ms"] = f"{r.get(k, 0) / 2**20:.1f} MiB" if k in r else ""
        shown.append(r)
    header = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    print(header)
    print(table(shown, COLUMNS))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"environment": header, "rows": rows}, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
