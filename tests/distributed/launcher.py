"""Run a script on several processes with torchrun (gloo, CPU) and read what its rank 0 reports.

``run_torchrun(script, *args)`` runs ``python -m torch.distributed.run --standalone
--nproc_per_node=2 script args`` (``--standalone``: a rendezvous on a free local port, so runs never
collide or wait for each other) in its own process group, with one thread per process, and the
environment variable `RESULT_ENV` naming a JSON file. Rank 0 writes its result there
(`write_result` in scripts/common.py); the function returns the parsed JSON. A nonzero exit, a
missing result or a run past `timeout` (torchrun and all its workers are then killed: nothing
hangs) fails with the run's output.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import fxlora

__all__ = ["RESULT_ENV", "SCRIPTS", "run_torchrun"]

RESULT_ENV = "FXLORA_TEST_RESULT"
_RUN_ID_ENV = "FXLORA_TORCHRUN_ID"  # every process of one run inherits it: how a timeout finds them
SCRIPTS = Path(__file__).with_name("scripts")
_TESTS = Path(__file__).parents[1]


def run_torchrun(
    script: Union[str, os.PathLike],
    *args: str,
    nproc: int = 2,
    timeout: float = 120,
    env: Optional[dict[str, str]] = None,
    result: Optional[Union[str, os.PathLike]] = None,
) -> Any:
    """Run `script` under torchrun on `nproc` local processes and return the JSON its rank 0 wrote
    to ``$FXLORA_TEST_RESULT`` (`result`, default a temporary file; a script may also take it as
    an argument). fxlora's checkout, tests/ and tests/distributed/ are on the processes'
    PYTHONPATH; `env` adds variables."""
    root = Path(fxlora.__file__).parents[1]
    with tempfile.TemporaryDirectory(prefix="fxlora-torchrun-") as scratch:
        result = Path(result) if result is not None else Path(scratch) / "result.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--max-restarts=0", "--monitor-interval=0.1", str(script), *args,
        ]
        run_env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
        path = [str(root), str(_TESTS), str(_TESTS / "distributed"), run_env.get("PYTHONPATH", "")]
        run_env.update(
            PYTHONPATH=os.pathsep.join(p for p in path if p), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
            **{RESULT_ENV: str(result)}, **(env or {}),
        )
        output = _run(command, run_env, timeout, cwd=scratch)
        if not result.is_file():
            raise AssertionError(f"{Path(script).name}: rank 0 wrote no result to ${RESULT_ENV}\n{output}")
        return json.loads(result.read_text())


def _run(command: list[str], env: dict[str, str], timeout: float, cwd: str) -> str:
    """Run `command`; its output; an AssertionError on failure or timeout (after which the run and
    every process it started are killed)."""
    run_id = f"{os.getpid()}-{uuid.uuid4().hex}"
    env = {**env, _RUN_ID_ENV: run_id}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_run(process, run_id)
        output, _ = process.communicate(timeout=30)
        raise AssertionError(f"{' '.join(command[3:])} ran past {timeout:g} s and was killed\n{_tail(output)}") from None
    if process.returncode != 0:
        raise AssertionError(f"{' '.join(command[3:])} exited with {process.returncode}\n{_tail(output)}")
    return output


def _kill_run(process: subprocess.Popen, run_id: str) -> None:
    """SIGKILL torchrun's process group and every process whose environment carries `run_id`:
    torchrun starts each worker in a session of its own, so the group does not reach them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    marker = f"{_RUN_ID_ENV}={run_id}".encode()
    for entry in Path("/proc").glob("[0-9]*"):  # Linux; elsewhere only the group is killed
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)


def _tail(output: str, chars: int = 6000) -> str:
    return output if len(output) <= chars else "...\n" + output[-chars:]
