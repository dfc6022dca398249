"""Merge precision of fxlora against peft: the same layers, the same adapter weights.

For float32, bfloat16 and float16 base weights (adapters in float32, both libraries' default), with
updates of a trained adapter's size (rms 0.1 x the weight's) and with large random ones
(``init_lora_weights=False``: larger than the weights), it reports for fxlora and for peft:

- ``out err``: max |merged output - unmerged output| / max |unmerged output|;
- ``changed 1x`` / ``changed 10x``: the share of base-weight elements of the adapted layers that
  differ (bitwise) from the original after one / ten merge + unmerge cycles;
- ``max drift 10x``: the largest absolute change of a base-weight element after ten cycles;
- ``restore data``: the memory fxlora keeps per merged layer to unmerge exactly, as a share of the
  adapted layers' weight bytes (peft keeps nothing, and drifts);
- ``merge+unmerge ms``: median time of one cycle (interleaved rounds; indicative only on a shared
  machine).

    python benchmarks/bench_merge.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import interleaved, table  # noqa: E402

import fxlora  # noqa: E402
from fxlora.core.delta import delta_weight  # noqa: E402

TARGETS = ["emb", "fc1", "fc2", "conv"]


class Layers(nn.Module):
    """One of each layer type, at sizes where rounding statistics are stable."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4096, 256)
        self.fc1 = nn.Linear(256, 1024)
        self.fc2 = nn.Linear(1024, 256)
        self.conv = nn.Conv2d(32, 64, 3, padding=1)

    def forward(self, ids: torch.Tensor, image: torch.Tensor):
        return self.fc2(F.gelu(self.fc1(self.emb(ids)))), self.conv(image)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 4096, (8, 32), generator=generator), torch.randn(4, 32, 24, 24, generator=generator)


def build(dtype: torch.dtype, ratio: float | None):
    """(fxlora model, peft model) on the same base weights with the same adapter weights; with
    `ratio`, B is rescaled so that rms(update) = ratio * rms(weight) on every layer."""
    import peft

    torch.manual_seed(0)
    base = Layers().to(dtype).eval()
    kwargs = dict(target_modules=TARGETS, r=16, lora_alpha=32, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    fm = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(**kwargs)).eval()
    state = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v for k, v in pm.state_dict().items()}
    fm.load_state_dict(state, strict=True)
    if ratio is not None:
        with torch.no_grad():
            for name in TARGETS:
                ours, theirs = fm.model.get_submodule(name), pm.base_model.model.get_submodule(name)
                rms = lambda t: t.float().square().mean().sqrt()  # noqa: E731
                factor = float(ratio * rms(ours.weight) / rms(delta_weight(ours, "default")))
                b_name = "lora_embedding_B" if name == "emb" else "lora_B"
                for layer in (ours, theirs):
                    b = getattr(layer, b_name)["default"]
                    (b if isinstance(b, nn.Parameter) else b.weight).mul_(factor)
    return fm, pm


def base_tensors(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapted layers' own weights and biases (peft nests them under ``base_layer``)."""
    out = {}
    for name in TARGETS:
        layer = model.get_submodule(prefix + name)
        layer = getattr(layer, "base_layer", layer)
        for which in ("weight", "bias"):
            t = getattr(layer, which, None)
            if t is not None:
                out[f"{name}.{which}"] = t
    return out


def changed_share(now: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> tuple[float, float]:
    changed = total = 0
    drift = 0.0
    for name, t in before.items():
        diff = now[name].view(torch.int16 if t.element_size() == 2 else torch.int32) != t.view(torch.int16 if t.element_size() == 2 else torch.int32)
        changed += int(diff.sum())
        total += t.numel()
        drift = max(drift, float((now[name].float() - t.float()).abs().max()))
    return changed / total, drift


def out_error(merged, unmerged) -> float:
    return max(float((m.float() - u.float()).abs().max() / u.float().abs().max()) for m, u in zip(merged, unmerged))


def measure(dtype: torch.dtype, ratio: float | None, rounds: int) -> list[dict]:
    fm, pm = build(dtype, ratio)
    ids, image = inputs()
    x = (ids, image.to(dtype))
    fx_tensors, peft_tensors = base_tensors(fm.model), base_tensors(pm, "base_model.model.")
    fx_before = {k: v.detach().clone() for k, v in fx_tensors.items()}
    peft_before = {k: v.detach().clone() for k, v in peft_tensors.items()}
    assert all(torch.equal(fx_before[k], peft_before[k]) for k in fx_before)

    def fx_cycle() -> None:
        fm.merge_adapter()
        fm.unmerge_adapter()

    def peft_cycle() -> None:
        pm.merge_adapter()
        pm.unmerge_adapter()

    rows = []
    with torch.no_grad():
        for lib, model, cycle, tensors, before in (("fxlora", fm, fx_cycle, fx_tensors, fx_before), ("peft", pm, peft_cycle, peft_tensors, peft_before)):
            unmerged = model(*x)
            model.merge_adapter()
            err = out_error(model(*x), unmerged)
            extra = ""
            if lib == "fxlora":
                weight_bytes = sum(t.numel() * t.element_size() for t in before.values())
                record_bytes = sum(r.nbytes for step in fm.adapter_state.merge_steps for r in step.records.values())
                extra = f"{100 * record_bytes / weight_bytes:.1f}%"
            model.unmerge_adapter()
            one, _ = changed_share(tensors, before)
            for _ in range(9):
                cycle()
            ten, drift = changed_share(tensors, before)
            rows.append({
                "update": "random" if ratio is None else f"{ratio:g} x weight",
                "dtype": str(dtype).removeprefix("torch."),
                "library": lib,
                "out err": f"{err:.2e}",
                "changed 1x": f"{100 * one:.2f}%",
                "changed 10x": f"{100 * ten:.2f}%",
                "max drift 10x": f"{drift:.2e}",
                "restore data": extra or "-",
            })
        times = interleaved({"fxlora": fx_cycle, "peft": peft_cycle}, rounds=rounds, inner=1, warmup=1)
    for row in rows:
        row["merge+unmerge ms"] = f"{times[row['library']] * 1e3:.1f}"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        row
        for ratio in (0.1, None)
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
        for row in measure(dtype, ratio, args.rounds)
    ]
    print(f"layers: Embedding(4096, 256), Linear(256, 1024), Linear(1024, 256), Conv2d(32, 64, 3); r=16, alpha=32; torch {torch.__version__}")
    print("update: rms(B @ A * scaling) as a share of rms(weight) per layer, or 'random' (init_lora_weights=False as drawn)")
    print(table(rows, ["update", "dtype", "library", "out err", "changed 1x", "changed 10x", "max drift 10x", "restore data", "merge+unmerge ms"]))


if __name__ == "__main__":
    main()
