"""from_pretrained / load_adapter by Hub repository id, offline, from a Hugging Face cache built in
tmp_path in huggingface_hub's layout (``models--user--name/snapshots/<sha>/``, ``refs/main``),
holding an adapter peft saved. Run in a fresh process so that HF_HUB_CACHE / HF_HUB_OFFLINE are
read as huggingface_hub reads them at import."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import MLP

peft = pytest.importorskip("peft")
pytest.importorskip("huggingface_hub")

ROOT = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"

SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import fxlora
from models import MLP
torch.manual_seed(0)
lm = fxlora.LoraModel.from_pretrained(MLP(8), "user/tiny-adapter")
x = torch.ones(2, 20)
torch.save(lm(x), {out!r})
lm.load_adapter("user/tiny-adapter", "other", subfolder="other")
assert lm.peft_config["other"].r == 2, lm.peft_config["other"]
try:
    fxlora.LoraModel.from_pretrained(MLP(8), "user/missing-adapter")
except FileNotFoundError as exc:
    print("MISSING:", exc)
"""


def fake_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hub"
    repo = cache / "models--user--tiny-adapter"
    snapshot = repo / "snapshots" / SHA
    torch.manual_seed(0)
    pm = peft.get_peft_model(MLP(8), peft.LoraConfig(target_modules=["seq.0"], init_lora_weights=False))
    pm.add_adapter("other", peft.LoraConfig(target_modules=["seq.2"], r=2, init_lora_weights=False))
    pm.save_pretrained(str(snapshot))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    return cache


def test_an_adapter_by_repo_id_loads_offline_from_the_cache(tmp_path):
    cache = fake_cache(tmp_path)
    out = tmp_path / "out.pt"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=str(ROOT / "tests"), out=str(out))],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    torch.manual_seed(0)
    expected = peft.PeftModel.from_pretrained(MLP(8), str(cache / "models--user--tiny-adapter" / "snapshots" / SHA))(torch.ones(2, 20))
    torch.testing.assert_close(torch.load(out), expected, rtol=0, atol=0)
    message = run.stdout.split("MISSING:", 1)[1]
    assert "user/missing-adapter" in message and "HF_HUB_OFFLINE=1" in message and "cache" in message


def test_a_local_directory_wins_over_a_repo_id(tmp_path, monkeypatch):
    import fxlora

    torch.manual_seed(0)
    pm = peft.get_peft_model(MLP(8), peft.LoraConfig(target_modules=["seq.0"], init_lora_weights=False))
    (tmp_path / "user").mkdir()
    pm.save_pretrained(str(tmp_path / "user" / "name"))
    monkeypatch.chdir(tmp_path)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("fetched from the Hub"))
    torch.manual_seed(0)
    lm = fxlora.LoraModel.from_pretrained(MLP(8), "user/name")
    assert lm.targeted_module_names == ["seq.0"]
    with pytest.raises(FileNotFoundError):
        fxlora.LoraModel.from_pretrained(MLP(8), str(tmp_path / "no" / "such" / "dir"))
