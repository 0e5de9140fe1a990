"""Data parallel on the GPUs of one machine: the same training on N GPUs as on one, and how close to N times faster.

    python dev/multi_gpu.py                              # every visible GPU, all checks, d12
    python dev/multi_gpu.py --gpus 2 --json multi.json
    python dev/multi_gpu.py --only scaling --steps 20

Each run is a subprocess: train_gpt2.py (or train_gpt2_torch.py) alone for one GPU, under torchrun for N.
1. equivalence: GPT-2 d12 from the same random init on the same batches, one GPU taking N micro-batches a step
   against N GPUs taking one each (the same total batch: rank r reads the micro-batch the single GPU reads r-th),
   for -z 0 and -z 1, in fp32 (our attention) and bf16 (cuDNN). Compared: every step's loss and the final weights
   (--write_model). The only differences are the order of the gradient's additions (an all-reduce of N partial sums
   against one accumulated sum), so fp32 agrees to ~1e-6 and bf16 to its rounding of the parameters.
2. scaling: d12, B=64, T=1024 a GPU: the median tok/s over the timed steps on 1 GPU and on N (one micro-batch per
   GPU, so N times the tokens a step), -z 0 and -z 1, and the ratio tok/s(N) / (N * tok/s(1)); the peak memory
   train_gpt2.py reports for rank 0 (ZeRO-1 shards the master weights and AdamW moments: 12 bytes a parameter / N).
3. the PyTorch reference (DDP, torch.compile, bf16 autocast, fused AdamW) the same way, side by side.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmpy.formats import read_model  # noqa: E402

STEP = re.compile(r"^step +(\d+)/\d+ \| loss (\S+) \|.* \| (\d+) tok/s$", re.M)
PEAK = re.compile(r"peak memory allocated: (\d+) MiB")


def launch(script, args, gpus):
    """Runs script with args on `gpus` GPUs (torchrun for more than one); returns its output, or raises."""
    if gpus == 1:
        cmd = [sys.executable, script] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", script] + args
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return proc.stdout


def steps_of(output):
    """[(loss, tok/s)] of the printed step lines."""
    return [(float(loss), int(tok_s)) for _, loss, tok_s in STEP.findall(output)]


def equivalence(gpus, zero, dtype, steps, workdir):
    """Losses and final weights of 1 GPU x N micro-batches against N GPUs x 1 micro-batch."""
    B, T = 4, 256
    common = ["-e", "d12", "-b", str(B), "-t", str(T), "-d", str(gpus * B * T), "-x", str(steps), "-v", "0", "-s", "0",
              "-l", "1e-4", "--dtype", dtype, "--attention", "triton" if dtype == "float32" else "cudnn",
              "-z", str(zero)]
    results = {}
    for n in (1, gpus):
        path = os.path.join(workdir, f"eq_{dtype}_z{zero}_{n}.bin")
        out = launch("train_gpt2.py", common + ["--write_model", path], n)
        results[n] = ([loss for loss, _ in steps_of(out)], read_model(path)[1])
    (losses_1, weights_1), (losses_n, weights_n) = results[1], results[gpus]
    return {"gpus": gpus, "zero": zero, "dtype": dtype, "steps": steps, "losses_1": losses_1, "losses_n": losses_n,
            "max_loss_diff": float(np.max(np.abs(np.array(losses_1) - np.array(losses_n)))),
            "weights_rel_diff": float(np.linalg.norm(weights_1 - weights_n) / np.linalg.norm(weights_1))}


def median_tok_s(output, warmup):
    timed = [tok_s for _, tok_s in steps_of(output)][warmup:]
    return statistics.median(timed)


def scaling(gpus, steps, warmup):
    """tok/s of the mainline (-z 0, -z 1) and the PyTorch reference on 1 GPU and on N."""
    B, T = 64, 1024
    rows = []
    for zero in (0, 1):
        args = ["-e", "d12", "-b", str(B), "-t", str(T), "-x", str(steps + warmup), "-v", "0", "-s", "0", "-z", str(zero)]
        for n in (1, gpus):
            out = launch("train_gpt2.py", args + ["-d", str(n * B * T)], n)
            peak = PEAK.search(out)
            rows.append({"contender": f"mainline -z {zero}", "gpus": n, "tok_s": median_tok_s(out, warmup),
                         "peak_mib_rank0": int(peak.group(1)) if peak else None})
    args = ["--model", "d12", "-b", str(B), "-t", str(T), "--num_iterations", str(steps + warmup), "--dtype", "bfloat16",
            "--compile", "1", "--flash", "1", "--tensorcores", "1", "--device", "cuda"]
    for n in (1, gpus):
        out = launch("train_gpt2_torch.py", args + ["--total_batch_size", str(n * B * T)], n)
        rows.append({"contender": "torch.compile DDP", "gpus": n, "tok_s": median_tok_s(out, warmup),
                     "peak_mib_rank0": None})
    for row in rows:
        one = next(r["tok_s"] for r in rows if r["contender"] == row["contender"] and r["gpus"] == 1)
        row["scaling"] = row["tok_s"] / (row["gpus"] * one)
    return rows


def main():
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count(), help="N, the GPUs to spread over")
    ap.add_argument("--only", choices=["equivalence", "scaling"], help="one of the checks (default both)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of the scaling runs")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, graph capture)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    if args.gpus < 2:
        sys.exit(f"multi_gpu.py: needs at least 2 GPUs, {args.gpus} visible (--gpus)")
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "gpus": args.gpus,
              "torch": torch.__version__}
    print(f"{args.gpus} x {report['device']}, torch {report['torch']}, {report['date']}")
    if args.only in (None, "equivalence"):
        report["equivalence"] = []
        with tempfile.TemporaryDirectory() as workdir:
            for dtype in ("float32", "bfloat16"):
                for zero in (0, 1):
                    r = equivalence(args.gpus, zero, dtype, 10, workdir)
                    report["equivalence"].append(r)
                    print(f"equivalence {dtype} -z {zero}: 1 GPU x {args.gpus} micro-batches vs {args.gpus} GPUs, "
                          f"10 steps: max |loss diff| {r['max_loss_diff']:.2e}, final weights rel diff "
                          f"{r['weights_rel_diff']:.2e}")
    if args.only in (None, "scaling"):
        report["scaling"] = scaling(args.gpus, args.steps, args.warmup)
        print(f"\nd12 B=64 T=1024 a GPU, median of {args.steps} steps after {args.warmup}")
        print(f"{'contender':20s} {'GPUs':>4s} {'tok/s':>10s} {'scaling':>8s} {'peak MiB (rank 0)':>18s}")
        for r in report["scaling"]:
            peak = "" if r["peak_mib_rank0"] is None else str(r["peak_mib_rank0"])
            print(f"{r['contender']:20s} {r['gpus']:4d} {r['tok_s']:10.0f} {r['scaling']:8.3f} {peak:>18s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
