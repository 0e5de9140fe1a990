"""Compare the loss curves of two training logs (main.log of train_gpt2.py, train_gpt2_torch.py or llm.c).

    python dev/compare_logs.py run_a/main.log run_b/main.log

Reads the `s:STEP trl:LOSS` (train) and `s:STEP tel:LOSS` (val) lines and prints, over the steps both logs have:
the largest train-loss gap, the largest gap of the 10-step running means (the curves with the batch-to-batch noise
averaged out), and every val loss side by side with its gap.
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for llmpy when run as a script
from llmpy.logger import read_main_log  # noqa: E402


def read_log(path):
    try:
        log = read_main_log(path)
    except OSError as e:
        sys.exit(f"compare_logs.py: {path}: {e.strerror}")
    return log.get("trl", {}), log.get("tel", {})


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    (train_a, val_a), (train_b, val_b) = (read_log(p) for p in sys.argv[1:])
    steps = sorted(set(train_a) & set(train_b))
    if not steps:
        sys.exit("compare_logs.py: the logs have no train step in common")
    gaps = [abs(train_a[s] - train_b[s]) for s in steps]
    worst = max(range(len(steps)), key=gaps.__getitem__)
    print(f"{len(steps)} common train steps {steps[0]}..{steps[-1]}: max gap {gaps[worst]:.4f} at step "
          f"{steps[worst]} ({train_a[steps[worst]]:.4f} vs {train_b[steps[worst]]:.4f}), mean gap {statistics.mean(gaps):.4f}")
    if len(steps) >= 10:
        means = [abs(statistics.mean(train_a[s] for s in steps[i:i + 10]) - statistics.mean(train_b[s] for s in steps[i:i + 10]))
                 for i in range(len(steps) - 9)]
        print(f"10-step running means: max gap {max(means):.4f}")
    for s in sorted(set(val_a) & set(val_b)):
        print(f"val step {s:5d}: {val_a[s]:.4f} vs {val_b[s]:.4f}  gap {abs(val_a[s] - val_b[s]):.4f}")


if __name__ == "__main__":
    main()
