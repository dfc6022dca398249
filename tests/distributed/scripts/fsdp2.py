"""Run under ``torchrun --nproc_per_node=2`` (gloo, CPU) by test_fsdp2.py: FSDP2 training with
fxlora and with peft, same seeds; rank 0 writes what it saw as JSON to argv[1].

Every case builds the same model twice (fxlora, peft), shards it per block / per adapted layer /
root only, before or after adapting it, trains 3 SGD steps on per-rank data, and records the
losses. Then saving a sharded model, and loading an adapter into one."""

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import fxlora  # noqa: E402
import peft  # noqa: E402
from models import Blocks  # noqa: E402
from zoo import TRANSFORMERS  # noqa: E402

CONFIG = dict(r=4, lora_alpha=8, init_lora_weights=False)
BLOCK_TARGETS = ["fc1", "fc2"]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def blocks_of(net):
    return list(net.blocks) if hasattr(net, "blocks") else list(net.model.layers)


def shard(net, how, mp):
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)} if mp else {}
    if how == "block":
        for block in blocks_of(net):
            fully_shard(block, **kw)
    elif how == "layer":
        for name, module in net.named_modules():
            if name.rsplit(".", 1)[-1] in BLOCK_TARGETS + LLAMA_TARGETS:
                fully_shard(module, **kw)
    fully_shard(net, **kw)


def build(model_name):
    if model_name == "blocks":
        torch.manual_seed(0)
        return Blocks(d=16, n=2, out=4), BLOCK_TARGETS
    return TRANSFORMERS["llama"].build(), LLAMA_TARGETS


def adapt(lib, net, targets):
    torch.manual_seed(1)
    if lib == "fxlora":
        model = fxlora.transform(net, fxlora.LoraConfig(target_modules=targets, **CONFIG))
        return model, model.model
    model = peft.get_peft_model(net, peft.LoraConfig(target_modules=targets, **CONFIG))
    return model, model.base_model.model


def loss_of(model, model_name, g):
    if model_name == "blocks":
        x, y = torch.randn(4, 16, generator=g), torch.randn(4, 4, generator=g)
        return ((model(x).float() - y) ** 2).mean()
    ids = torch.randint(0, 64, (2, 6), generator=g)
    return model(input_ids=ids, labels=ids).loss


def train(lib, model_name, how, when, mp, steps=3):
    net, targets = build(model_name)
    if when == "before":
        shard(net, how, mp)
    model, inner = adapt(lib, net, targets)
    if when == "after":
        shard(inner, how, mp)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(steps):  # the same per-rank batch each step: the loss must fall
        loss = loss_of(model, model_name, torch.Generator().manual_seed(dist.get_rank()))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


CASES = [
    ("blocks", how, when, False) for how in ("block", "layer", "root") for when in ("after", "before")
] + [("blocks", "block", "after", True), ("blocks", "layer", "after", True), ("llama", "block", "after", False), ("llama", "block", "after", True), ("llama", "layer", "before", False)]


def save_and_load(result):
    """Save a sharded trained model; compare with the gathered weights; load it into another
    sharded model and into an unsharded one: same outputs."""
    model, _ = train("fxlora", "blocks", "block", "after", False)
    gathered = {n: p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    shared = [tempfile.mkdtemp(prefix="fsdp2-", dir=os.path.dirname(os.path.abspath(sys.argv[1]))) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared)
    directory = shared[0]
    model.save_pretrained(directory)  # every rank calls: gathering is collective; rank 0 writes
    dist.barrier()
    entries = sorted(os.listdir(directory))
    from safetensors.torch import load_file

    saved = load_file(os.path.join(directory, "adapter_model.safetensors"))
    result["save"] = {
        "entries": entries,
        "rank": dist.get_rank(),
        "same_weights": all(
            torch.equal(saved["base_model.model." + n.replace(".default", "")], gathered[n]) for n in gathered
        ),
        "count": len(saved),
    }
    # loading into a sharded model (every rank reads the file)
    net, _ = build("blocks")
    plain, _ = build("blocks")
    shard(net, "block", False)
    sharded = fxlora.LoraModel.from_pretrained(net, directory)
    sharded.load_adapter(directory, "again")
    reference = fxlora.LoraModel.from_pretrained(plain, directory)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
    out = sharded(x)
    sharded.set_adapter("again")
    result["load"] = {"equal": bool(torch.equal(out, reference(x))), "again_equal": bool(torch.equal(sharded(x), reference(x)))}
    if dist.get_rank() == 0:  # the unsharded model with the same weights writes the same files
        again = tempfile.mkdtemp(prefix="plain-", dir=os.path.dirname(os.path.abspath(sys.argv[1])))
        unsharded, _ = adapt("fxlora", *build("blocks"))
        with torch.no_grad():
            for n, p in unsharded.named_parameters():
                if n in gathered:
                    p.copy_(gathered[n])
        unsharded.save_pretrained(again)
        result["save"]["same_files_as_unsharded"] = same_files(directory, again)


def same_files(a: str, b: str) -> bool:
    """Same config text and model card, same tensors (names, dtypes, values) and the same metadata (whose order
    in the file safetensors leaves to a hash map)."""
    from safetensors import safe_open

    for text in ("adapter_config.json", "README.md"):
        with open(os.path.join(a, text)) as fa, open(os.path.join(b, text)) as fb:
            if fa.read() != fb.read():
                return False
    name = "adapter_model.safetensors"
    with safe_open(os.path.join(a, name), "pt") as fa, safe_open(os.path.join(b, name), "pt") as fb:
        if fa.metadata() != fb.metadata() or sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) and fa.get_tensor(k).dtype == fb.get_tensor(k).dtype for k in fa.keys())


def main():
    dist.init_process_group("gloo")
    result = {"cases": {}}
    for case in CASES:
        name = "/".join(map(str, case))
        got = {}
        for lib in ("fxlora", "peft"):
            try:
                got[lib] = train(lib, *case)[1]
            except Exception as exc:  # reported, then asserted by the test
                got[lib] = f"{type(exc).__name__}: {str(exc)[:300]}"
        result["cases"][name] = got
    try:
        save_and_load(result)
    except Exception as exc:
        result["save_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    dist.barrier()
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
