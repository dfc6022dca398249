"""Saving an adapter under real faults: SIGKILL at each step and at random moments, a reader
loading while another process saves, a failure injected at each step, a full disk.

The contract (`fxlora.io.adapter_dir`): after a kill the old or the new adapter loads, exactly;
a concurrent reader gets one whole version or a `CheckpointError`, never a mix; a failed save
leaves the previous adapter and no temporary entry; a killed save's leftovers go with the next
save; errors are OSErrors naming the path. Writers run in a subprocess (`adapter_writer.py`).
"""

import copy
import errno
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import fxlora
import fxlora.io.adapter_files as adapter_files
from fxlora import CheckpointError, LoraConfig
from fxlora.io.adapter_files import read_adapter_dir
from adapter_writer import FS_CALLS, Version, hook_fs_calls, which
from models import MLP

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer process forks its trials (POSIX)")

PAIR = ["adapter_config.json", "adapter_model.safetensors"]
WRITER = Path(__file__).with_name("adapter_writer.py")
A, B = Version(0), Version(1)
VERSIONS = {"A": A, "B": B}


def run_writer(*args: str, timeout: float = 60) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fxlora.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(WRITER), *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def loaded_version(directory: Path) -> str:
    found = which(read_adapter_dir(directory), VERSIONS)
    assert found is not None, f"{directory} holds a mix of A and B"
    return found


def assert_next_save_leaves_only_the_pair(directory: Path) -> None:
    C = Version(2, rank=4)
    C.save(directory)
    assert sorted(os.listdir(directory)) == PAIR
    assert C.is_in(read_adapter_dir(directory))


# ====================================================================== SIGKILL
def test_sigkill_before_each_file_system_call_leaves_old_or_new(tmp_path):
    calls = int(run_writer("steps", str(tmp_path)))
    assert calls >= 8  # mkdirs, fsyncs, renames, links of one save
    seen = [loaded_version(tmp_path / f"step-{k:03d}") for k in range(1, calls + 1)]
    # the previous adapter until the old config leaves the directory, the new one from then on
    switch = seen.index("B")
    assert seen == ["A"] * switch + ["B"] * (calls - switch), seen
    assert 0 < switch < calls
    for k in range(1, calls + 1):
        assert_next_save_leaves_only_the_pair(tmp_path / f"step-{k:03d}")


def test_sigkill_at_random_moments_leaves_old_or_new(tmp_path):
    trials = 6
    run_writer("kills", str(tmp_path), str(trials), "1234")
    seen = [loaded_version(tmp_path / f"kill-{i}") for i in range(trials)]
    assert set(seen) <= {"A", "B"}
    for i in range(trials):
        assert_next_save_leaves_only_the_pair(tmp_path / f"kill-{i}")


# ====================================================================== concurrent reader
def test_a_reader_gets_a_whole_version_while_another_process_saves(tmp_path):
    directory = tmp_path / "live"
    A.save(directory)
    env = {**os.environ, "PYTHONPATH": str(Path(fxlora.__file__).parents[1])}
    writer = subprocess.Popen([sys.executable, str(WRITER), "alternate", str(directory), "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    counts = {"A": 0, "B": 0, "error": 0, "mix": 0}
    try:
        while writer.poll() is None:
            try:
                counts[which(read_adapter_dir(directory), VERSIONS) or "mix"] += 1
            except CheckpointError as exc:
                assert str(directory) in str(exc)
                counts["error"] += 1
    finally:
        writer.kill() if writer.poll() is None else None
        out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err
    saves = int(out)
    print(f"{saves} saves, loads: {counts}")
    assert counts["mix"] == 0
    assert counts["A"] > 0 and counts["B"] > 0 and saves > 10


# ====================================================================== injected failures
def _fail_call(k: int, failure: BaseException):
    def maybe_fail(count: int, name: str) -> None:
        if count == k:
            raise failure

    return maybe_fail


def test_a_failure_at_each_step_leaves_the_previous_adapter_and_no_temp_files(tmp_path, monkeypatch):
    small_a, small_b = Version(0, rank=4), Version(1, rank=4)
    calls = []
    with monkeypatch.context() as patch:
        for name in FS_CALLS:
            patch.setattr(os, name, getattr(os, name))
        hook_fs_calls(lambda count, name: calls.append(name))
        small_b.save(tmp_path / "counted")
    assert {"rename", "replace", "link", "unlink", "fsync"} <= set(calls), calls
    outcomes = []
    for k in range(1, len(calls) + 1):
        directory = tmp_path / f"fail-{k:03d}"
        small_a.save(directory)
        with monkeypatch.context() as patch:
            for name in FS_CALLS:
                patch.setattr(os, name, getattr(os, name))  # undone after the save
            hook_fs_calls(_fail_call(k, OSError(errno.EIO, "injected")))
            try:
                small_b.save(directory)
                outcomes.append("saved")
            except OSError as exc:
                assert str(tmp_path) in str(exc) and exc.errno == errno.EIO
                outcomes.append("failed")
        assert sorted(os.listdir(directory)) == PAIR, (k, os.listdir(directory))
        expected = small_b if outcomes[-1] == "saved" else small_a
        assert expected.is_in(read_adapter_dir(directory)), (k, outcomes[-1])
    print(f"{len(calls)} calls, outcomes: {outcomes}")
    assert outcomes.count("failed") >= 6, outcomes


def test_a_full_disk_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    A.save(tmp_path)

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_files, "save_file", full)
    with pytest.raises(OSError, match=r"cannot write '.*adapter_model\.safetensors': No space left") as caught:
        B.save(tmp_path)
    assert caught.value.errno == errno.ENOSPC and str(tmp_path) in str(caught.value)

    def full_in_rust(tensors, filename, metadata=None):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(adapter_files, "save_file", full_in_rust)
    with pytest.raises(OSError, match=r"adapter_model\.safetensors") as caught:
        B.save(tmp_path)
    assert caught.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == PAIR and A.is_in(read_adapter_dir(tmp_path))


def test_permission_denied_is_a_permission_error_naming_the_directory(tmp_path, monkeypatch):
    A.save(tmp_path)

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(PermissionError, match=rf"cannot create '{tmp_path}.*\.fxlora-tmp-.*': Permission denied"):
        B.save(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == PAIR and A.is_in(read_adapter_dir(tmp_path))


# ====================================================================== pairs that do not belong together
def test_a_config_edited_after_saving_loads_with_a_note(tmp_path):
    A.save(tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(config.read_text().replace('"inference_mode": true', '"inference_mode": false'))
    files = read_adapter_dir(tmp_path)
    assert any("is not the config adapter_model.safetensors was saved with" in n for n in files.notes)
    assert not any("saved with" in n for n in read_adapter_dir(_saved(tmp_path / "fresh")).notes)


def _saved(directory: Path) -> Path:
    A.save(directory)
    return directory


def test_a_stale_mixed_pair_is_not_loaded_silently(tmp_path):
    """What an older save killed between its two renames left: B's config, A's weights."""
    A.save(tmp_path / "a"), B.save(tmp_path / "b")
    os.replace(tmp_path / "b" / "adapter_config.json", tmp_path / "a" / "adapter_config.json")
    files = read_adapter_dir(tmp_path / "a")
    assert which(files, VERSIONS) is None and any("was saved with" in n for n in files.notes)


def test_peft_loads_an_adapter_saved_over_another(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = MLP(16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for alpha in (4, 16):
            model = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["seq.0", "seq.2"], lora_alpha=alpha, init_lora_weights=False))
            model.save_pretrained(tmp_path)
        assert sorted(os.listdir(tmp_path)) == ["README.md", *PAIR]  # save_pretrained adds the model card
        from_fx = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    x = torch.randn(3, 20)
    torch.testing.assert_close(from_fx(x), model.eval()(x))
