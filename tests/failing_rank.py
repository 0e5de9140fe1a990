"""train_gpt2.py in which rank 1 fails at the start of its second step, for tests/test_distributed.py:

    python tests/failing_rank.py die|hang TRAIN_GPT2_FLAGS...

die: rank 1 exits at once (as a crash or an out-of-memory kill would); hang: rank 1 sleeps (a stuck process). The
other ranks must then exit with one line instead of waiting forever.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt2  # noqa: E402

failure = sys.argv.pop(1)
real_train_step = train_gpt2.train_step


def failing_train_step(model, micro_batches, lr, step, *rest):
    if model.runtime.dist.rank == 1 and step == 1:
        if failure == "die":
            os._exit(3)
        time.sleep(3600)
    return real_train_step(model, micro_batches, lr, step, *rest)


train_gpt2.train_step = failing_train_step
train_gpt2.main()
