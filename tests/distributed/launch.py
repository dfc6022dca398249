"""Running a worker script under ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU)."""

import json
import os
import subprocess
import sys


def run_distributed(script: str, workdir, nproc: int = 2, timeout: float = 240) -> dict:
    """Run `script` with ``torchrun``; it writes its result as JSON to the path given as its
    first argument (rank 0). Returns that result; fails with the output tail otherwise."""
    out = os.path.join(str(workdir), "result.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(workdir))
    if not os.path.exists(out):
        raise AssertionError(f"{os.path.basename(script)} wrote no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    with open(out) as f:
        return json.load(f)
