"""Adapter versions, and a writer process that gets killed, for test_adapter_files_faults.py.

Run as a script (one interpreter start for many trials; each trial's writer is a forked child,
so a SIGKILL ends it exactly as it would end a training run):

    adapter_writer.py steps ROOT       a child saves B over A in ROOT/step-<k>, SIGKILLed just
                                       before its k-th file-system call, for k = 1, 2, ... until
                                       a save finishes; prints the number of calls of a save
    adapter_writer.py kills ROOT N S   in ROOT/kill-<i> (i < N) a child saves B, A, B, ... over A
                                       in a loop and is SIGKILLed at a random moment (seed S)
    adapter_writer.py alternate DIR T  saves A, B, A, ... into DIR for T seconds; prints the count
    adapter_writer.py card-steps ROOT  as ``steps``, each save with its model card, over a card
                                       the user wrote (`USER_CARD`)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from fxlora import LoraConfig
from fxlora.io.adapter_files import AdapterFiles, config_text, write_adapter_dir
from fxlora.io.model_card import CardAdapter, CardFacts
from fxlora.io.peft_format import PEFT_PREFIX, config_to_json

HIDDEN = 1000
#: operations a save performs on the file system (a kill or a failure is injected before one)
FS_CALLS = ("mkdir", "rename", "replace", "link", "unlink", "rmdir", "fsync")


class Version:
    """One adapter: its file tensors (PEFT keys), config JSON text and config."""

    def __init__(self, seed: int, rank: int = 256) -> None:
        g = torch.Generator().manual_seed(seed)
        shapes = {
            "seq.0.lora_A.weight": (rank, 20),
            "seq.0.lora_B.weight": (HIDDEN, rank),
            "seq.2.lora_A.weight": (rank, HIDDEN),
            "seq.2.lora_B.weight": (HIDDEN, rank),
        }
        self.tensors = {PEFT_PREFIX + k: torch.randn(s, generator=g) for k, s in shapes.items()}
        # another lora_alpha per version: a config paired with other weights scales them wrongly
        self.config = LoraConfig(target_modules=["seq.0", "seq.2"], r=rank, lora_alpha=rank * (seed + 1))
        self.text = config_text(config_to_json(self.config, None))

    def save(self, directory: Path, card: bool = False) -> None:
        write_adapter_dir(Path(directory), self.tensors, self.text, self.card if card else None)

    @property
    def card(self) -> CardFacts:
        """The model card facts of this version (its config differs per version)."""
        adapter = CardAdapter("default", ".", json.loads(self.text), ("seq.0", "seq.2"))
        return CardFacts("models.MLP", None, (), (adapter,))

    def is_in(self, files: AdapterFiles) -> bool:
        """`files` is exactly this version (config and every tensor)."""
        expected = {k.removeprefix(PEFT_PREFIX): v for k, v in self.tensors.items()}
        return (
            files.config == self.config
            and files.tensors.keys() == expected.keys()
            and all(torch.equal(files.tensors[k], v) for k, v in expected.items())
        )


def which(files: AdapterFiles, versions: dict[str, Version]) -> Optional[str]:
    """The name of the version `files` holds exactly, or None (a mix)."""
    return next((name for name, v in versions.items() if v.is_in(files)), None)


def hook_fs_calls(before_call: Callable[[int, str], None]) -> None:
    """Call `before_call(count, name)` before every file-system call of `FS_CALLS` (this process)."""
    counter = [0]
    for name in FS_CALLS:
        original = getattr(os, name)

        def hooked(*args, _original=original, _name=name, **kwargs):
            counter[0] += 1
            before_call(counter[0], _name)
            return _original(*args, **kwargs)

        setattr(os, name, hooked)


def _run_child(work: Callable[[], None]) -> int:
    """Fork; the child does `work` and exits 0; returns the child's wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


USER_CARD = "# My adapter\n\nWords of the user's own.\n"


def kill_at_each_step(root: Path, card: bool = False) -> int:
    a, b = Version(0), Version(1)

    def kill_at(k: int) -> Callable[[int, str], None]:
        def maybe_kill(count: int, name: str) -> None:
            if count == k:
                os.kill(os.getpid(), signal.SIGKILL)

        return maybe_kill

    for k in range(1, 200):
        directory = root / f"step-{k:03d}"
        if card:
            directory.mkdir(parents=True)
            (directory / "README.md").write_text(USER_CARD)
        a.save(directory, card)
        status = _run_child(lambda: (hook_fs_calls(kill_at(k)), b.save(directory, card)))
        if not os.WIFSIGNALED(status):  # the save needed fewer than k calls
            shutil.rmtree(directory)
            return k - 1
    raise RuntimeError("a save made more than 200 file-system calls")


def kill_at_random(root: Path, trials: int, seed: int) -> None:
    a, b = Version(0), Version(1)
    rng = random.Random(seed)
    for trial in range(trials):
        directory = root / f"kill-{trial}"
        a.save(directory)
        pid = os.fork()
        if pid == 0:
            for i in range(10_000):
                (b if i % 2 == 0 else a).save(directory)
            os._exit(0)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def alternate(directory: Path, seconds: float) -> int:
    versions, count, end = (Version(0), Version(1)), 0, time.monotonic() + seconds
    while time.monotonic() < end:
        versions[count % 2].save(directory)
        count += 1
    return count


if __name__ == "__main__":
    mode, where = sys.argv[1], Path(sys.argv[2])
    if mode == "steps":
        print(kill_at_each_step(where))
    elif mode == "kills":
        kill_at_random(where, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "card-steps":
        print(kill_at_each_step(where, card=True))
    elif mode == "alternate":
        print(alternate(where, float(sys.argv[3])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
