"""Kill a training run at random steps, resume it each time, and compare it with the run that was never stopped.

    python dev/resume_check.py -o /tmp/resume --deterministic 1       # d12 on the GPU: bit-identical, or not okay
    python dev/resume_check.py -o /tmp/resume --deterministic 0       # within the noise of two uninterrupted runs
    python dev/resume_check.py -o /tmp/resume -- -e d24 -b 16 -x 60   # after --: train_gpt2.py's flags, replacing ours

The runs are train_gpt2.py with -n (a checkpoint every few steps) and -y 1, the same command every time, as a Slurm
requeue loop would run it. The interrupted run is SIGKILLed --kills times, each time after a random step (and a
random part of the next), then resumed. Compared: every loss in main.log (train and val, as written, 6 decimals) and
the final model file's weights. With --deterministic 1 they must be equal, to the bit. Without it, the GPU's float
atomics make even two uninterrupted runs differ: a second uninterrupted run measures that noise, and the resumed
run must stay within twice it. Prints one line per comparison, then `overall okay: 1` (exit 0) or `0` (exit 1).
"""

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmpy import formats  # noqa: E402

DEFAULT_RUN = ["-e", "d12", "-b", "8", "-t", "1024", "-d", "16384", "-x", "40", "-n", "5", "-nk", "2", "-v", "10",
               "-m", "2", "-s", "20", "-g", "16"]
STEP_LINE = re.compile(r"^step +(\d+)/(\d+) \|")


def run_to_end(args, folder):
    """Runs train_gpt2.py to its end (resuming whatever is in folder); returns its stdout."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *args, "-o", folder, "-y", "1"],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"resume_check.py: train_gpt2.py failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr}")
    return proc.stdout


def kill_after(args, folder, step, delay_s):
    """Starts (or resumes) the run and SIGKILLs it delay_s seconds after its line of step `step`."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *args, "-o", folder, "-y", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    for line in proc.stdout:
        match = STEP_LINE.match(line)
        if match and int(match[1]) >= step:
            break
    time.sleep(delay_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def losses(folder):
    lines = open(os.path.join(folder, "main.log")).read().splitlines()
    return [(int(m[1]), m[2], m[3]) for m in (re.match(r"s:(\d+) (trl|tel):(\S+)", line) for line in lines)]


def final_model(folder):
    steps = sorted(int(m[1]) for m in map(re.compile(r"^DONE_(\d{8})$").match, os.listdir(folder)) if m)
    return formats.read_model(os.path.join(folder, f"model_{steps[-1]:08d}.bin"))[1]


def differences(a, b):
    """(max |loss a - loss b| over the log lines, max |weight a - weight b|), after checking the logs line up."""
    la, lb = losses(a), losses(b)
    if [x[:2] for x in la] != [x[:2] for x in lb]:
        sys.exit(f"resume_check.py: the logs of {a} and {b} have different lines")
    loss_diff = max(abs(float(x[2]) - float(y[2])) for x, y in zip(la, lb))
    return loss_diff, float(np.abs(final_model(a) - final_model(b)).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output_dir", required=True, help="a folder for the runs' folders")
    ap.add_argument("--deterministic", type=int, default=1, choices=(0, 1), help="train_gpt2.py's --deterministic")
    ap.add_argument("--kills", type=int, default=3, help="how many times the run is killed")
    ap.add_argument("--seed", type=int, default=0, help="of the moments the run is killed")
    ap.add_argument("train_args", nargs="*", help="after --: train_gpt2.py's flags instead of DEFAULT_RUN")
    args = ap.parse_args()
    train_args = (args.train_args or DEFAULT_RUN) + ["--deterministic", str(args.deterministic)]
    max_steps = int(train_args[train_args.index("-x") + 1])
    rng = random.Random(args.seed)
    kill_steps = sorted(rng.sample(range(1, max_steps), args.kills))
    os.makedirs(args.output_dir, exist_ok=True)
    folders = {name: os.path.join(args.output_dir, name) for name in ("reference", "reference2", "resumed")}
    for folder in folders.values():
        if os.path.exists(folder):
            sys.exit(f"resume_check.py: {folder} exists: give an empty -o")

    start = time.time()
    run_to_end(train_args, folders["reference"])
    print(f"reference: {max_steps} steps in {time.time() - start:.0f} s")
    for step in kill_steps:
        kill_after(train_args, folders["resumed"], step, rng.uniform(0, 0.5))
        done = sorted(int(m[1]) for m in map(re.compile(r"^DONE_(\d{8})$").match, os.listdir(folders["resumed"])) if m)
        print(f"killed after step {step}: the newest complete checkpoint is {done[-1] if done else 'none'}")
    run_to_end(train_args, folders["resumed"])
    loss_diff, weight_diff = differences(folders["reference"], folders["resumed"])
    print(f"resumed against uninterrupted: max |loss diff| {loss_diff:.3e}, max |weight diff| {weight_diff:.3e}")
    if args.deterministic:
        ok = loss_diff == 0 and weight_diff == 0
    else:
        run_to_end(train_args, folders["reference2"])
        noise = differences(folders["reference"], folders["reference2"])
        print(f"two uninterrupted runs:     max |loss diff| {noise[0]:.3e}, max |weight diff| {noise[1]:.3e}")
        ok = loss_diff <= 2 * noise[0] + 1e-6 and weight_diff <= 2 * noise[1] + 1e-6
    print(f"overall okay: {int(ok)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
