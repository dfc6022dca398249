"""`launcher.run_torchrun`: the result of rank 0, a failing rank's exit and output, a hanging run
killed at its timeout with every worker."""

import os
import time
from pathlib import Path

import pytest

from launcher import SCRIPTS, run_torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(not hasattr(os, "fork"), reason="torchrun on POSIX")]
PROBE = SCRIPTS / "launcher_probe.py"


def _alive(pid: int) -> bool:
    """A running (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_returns_what_rank_0_wrote(tmp_path):
    assert run_torchrun(PROBE, "ok", str(tmp_path)) == {"world": 2, "args": ["ok", str(tmp_path)]}
    assert sorted(os.listdir(tmp_path)) == ["0.pid", "1.pid"]


def test_a_failing_rank_fails_the_run_with_its_output(tmp_path):
    with pytest.raises(AssertionError, match="exited with") as info:
        run_torchrun(PROBE, "fail", str(tmp_path))
    assert "rank 1 gives up" in str(info.value)


def test_a_hanging_run_is_killed_at_its_timeout_with_its_workers(tmp_path):
    started = time.monotonic()
    with pytest.raises(AssertionError, match="ran past 6 s"):
        run_torchrun(PROBE, "hang", str(tmp_path), timeout=6)
    assert time.monotonic() - started < 30
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2  # both workers had started ...
    deadline = time.monotonic() + 5
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, pids))  # ... and none is left
