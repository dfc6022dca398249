"""A torchrun worker for tests/distributed/test_launcher.py (no torch import: quick). Usage:
``launcher_probe.py MODE PID_DIR``; MODE ``ok``: rank 0 writes its result; ``fail``: rank 1
exits with 3; ``hang``: every rank sleeps. Each rank first writes its pid into PID_DIR."""

import json
import os
import sys
import time
from pathlib import Path

mode, pids = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])
(pids / f"{rank}.pid").write_text(str(os.getpid()))
if mode == "ok" and rank == 0:
    Path(os.environ["FXLORA_TEST_RESULT"]).write_text(json.dumps({"world": int(os.environ["WORLD_SIZE"]), "args": sys.argv[1:]}))
elif mode == "fail" and rank == 1:
    print("rank 1 gives up", flush=True)
    sys.exit(3)
elif mode == "hang":
    time.sleep(600)
