"""Training on every rank of a torchrun (gloo, CPU), fxlora and PEFT side by side: DDP of the block
model (ddp_blocks.py), then transformers' Trainer with its default arguments (trainer_ddp.py), in
one process group (one start of the processes for both). Usage: ``training.py OUT_DIR``. Rank 0
reports every rank's results: ``{"world": 2, "ddp": [per rank], "trainer": [per rank]}``."""

import sys
import warnings

import ddp_blocks
import trainer_ddp
from common import gather, process_group, write_result


def main(out: str) -> None:
    warnings.simplefilter("ignore")
    with process_group() as (rank, world):  # the Trainer (accelerate) uses this group too
        ddp = gather(ddp_blocks.run(f"{out}/adapter"))
        trainer = gather(trainer_ddp.run(f"{out}/trainer"))
        write_result({"world": world, "ddp": ddp, "trainer": trainer})


if __name__ == "__main__":
    main(sys.argv[1])
