"""The examples run as a user would run them (small sizes to keep CI fast)."""

import os
import re
import subprocess
import warnings
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_custom_mlp_example_learns():
    out = run("custom_mlp.py", "--epochs", "4", "--hidden", "256")
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", out)
    assert "targeted modules: ['seq.0', 'seq.2']" in out
    before, after = map(float, re.search(r"accuracy before: ([\d.]+) \| after: ([\d.]+)", out).groups())
    assert after > before + 0.15
    assert "epoch 4/4 [##############################]" in out


def test_timm_image_classifier_example_learns():
    out = run("timm_image_classifier.py", "--model", "test_resnet", "--epochs", "4", "--images", "384")
    assert re.search(r"test_resnet: \d+ convolutions adapted, graph share 1\.00, graph roots: <model>", out)
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", out)
    before, after = map(float, re.search(r"accuracy before: ([\d.]+) \| after: ([\d.]+)", out).groups())
    assert after > max(before + 0.3, 0.75)


def test_new_transformers_architecture_example_learns():
    out = run("new_transformers_architecture.py", "--steps", "120", "--hidden", "32")
    assert "model_type 'qwen3': targets ['q_proj', 'v_proj'], 4 layers, graph share 1.00" in out
    before, after = map(float, re.search(r"loss before: ([\d.]+) \| after: ([\d.]+)", out).groups())
    assert after < before - 1.0
    assert re.search(r"sample before: '.+'", out) and re.search(r"sample after: 'The keeper .+'", out)


def _run_fsdp2_example(cmd: list) -> subprocess.CompletedProcess:
    """The torchrun run of the example; run again once where a worker aborted (SIGABRT,
    "terminate called without an active exception") before the first training step: a rare
    crash of a worker starting up on a loaded 2-core machine (seen once in several CI runs, never
    reproduced), not a result of the example. Any other failure, or a second one, fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if result.returncode != 0 and "step 1/" not in result.stdout and "SIGABRT" in result.stderr:
        warnings.warn(f"the FSDP2 example aborted while starting up; running it again:\n{result.stderr[-1500:]}")
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return result


def test_distributed_fsdp2_example_trains_on_two_processes_and_saves(tmp_path):
    out = tmp_path / "adapter"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "distributed_fsdp2.py"), "--steps", "30", "--out", str(out)]
    result = _run_fsdp2_example(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "2 processes, FSDP2 per decoder layer" in text
    losses = [float(x) for x in re.findall(r"step \d+/30 \[[#.]{30}\] loss ([\d.]+)", text)]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5
    assert "step 30/30 [##############################]" in text
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    import json

    from safetensors.torch import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 7 and all(t.abs().sum() > 0 for t in tensors.values())  # 2 layers x 7 linears x (A, B), trained
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_qlora_cpu_example_trains_on_an_int8_base_with_less_memory():
    out = run("qlora_cpu.py", "--steps", "3", "--hidden", "64", "--layers", "2")
    w32, w8 = map(float, re.search(r"base weights: fp32 ([\d.]+) MiB \| int8 ([\d.]+) MiB", out).groups())
    assert w8 < 0.5 * w32
    p32, p8 = map(float, re.search(r"peak of a training step: fp32 ([\d.]+) MiB \| int8 ([\d.]+) MiB", out).groups())
    assert p8 < p32
    before, after = map(float, re.search(r"int8: ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before
    assert "original int8 weights back bit for bit: True" in out
