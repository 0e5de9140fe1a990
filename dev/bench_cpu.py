"""CPU benchmark: the NumPy reference trainer against the PyTorch reference (eager, fp32), side by side.

    python dev/bench_cpu.py                       # GPT-2 124M (d12), B=4, T=64, as llm.c's CPU trainer
    python dev/bench_cpu.py --model tiny --steps 20 --json bench_cpu.json

Both contenders train the same model from the same weights on the same batch: one training step is forward,
backward and an AdamW update (lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay, no clipping: the NumPy
trainer's defaults). Each runs in its own process, so neither's thread pool competes with the other's, and the
rounds alternate (numpy, torch, numpy, torch, ...) so that a drift in the machine's speed hits both. Reported:
the median ms/step over all timed steps after warm-up, and the ratio torch / numpy (> 1: NumPy is faster).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmpy.configs.gpt2 import config_from_descriptor, gpt2_init  # noqa: E402
from llmpy.formats import read_model, write_model  # noqa: E402

LR, BETAS, EPS = 1e-4, (0.9, 0.999), 1e-8


def time_numpy(model_path, x, y, warmup, steps):
    from train_gpt2_cpu import GPT2

    config, flat = read_model(model_path)
    model = GPT2(config, flat)
    times, losses = [], []
    for step in range(1, warmup + steps + 1):
        t0 = time.perf_counter()
        losses.append(float(model.forward(x, y)))
        model.backward()
        model.update(LR, BETAS[0], BETAS[1], EPS, 0.0, step)
        times.append(time.perf_counter() - t0)
    return times[warmup:], losses


def time_torch(model_path, x, y, warmup, steps):
    import torch

    from train_gpt2_torch import model_from_flat

    config, flat = read_model(model_path)
    model = model_from_flat(config, flat)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    x, y = torch.from_numpy(x).long(), torch.from_numpy(y).long()
    times, losses = [], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return times[warmup:], losses


def worker(args):
    """One contender's round, in its own process: prints its step times and losses as JSON."""
    batch = np.load(args.batch)
    timer = {"numpy": time_numpy, "torch": time_torch}[args.worker]
    times, losses = timer(args.model_file, batch["x"], batch["y"], args.warmup, args.steps)
    print(json.dumps({"times": times, "losses": losses}))


def prepare(args, tmp):
    """The model file both contenders load, and the batch both train on."""
    if os.path.exists(args.model):
        model_path = args.model
        config, _ = read_model(model_path)
    else:
        config = config_from_descriptor(args.model)
        model_path = os.path.join(tmp, "model.bin")
        write_model(model_path, config, gpt2_init(config, args.seed))
    if os.path.exists(args.input_bin):
        from llmpy.data import DataLoader

        x, y = DataLoader(args.input_bin, args.batch_size, args.sequence_length).next_batch()
    else:  # no data prepared: random tokens are as good for timing
        tokens = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch_size, args.sequence_length + 1))
        x, y = tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)
    batch_path = os.path.join(tmp, "batch.npz")
    np.savez(batch_path, x=x, y=y)
    return model_path, batch_path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2_124M.bin", help="model file, or a descriptor (d12, tiny) for a seeded random init")
    ap.add_argument("--input_bin", default=os.path.join(ROOT, "dev/data/tinyshakespeare/tiny_shakespeare_train.bin"))
    ap.add_argument("-b", "--batch_size", type=int, default=4)
    ap.add_argument("-t", "--sequence_length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per contender, alternating")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", choices=["numpy", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--model_file", help=argparse.SUPPRESS)
    ap.add_argument("--batch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if min(args.batch_size, args.sequence_length, args.steps, args.rounds) < 1 or args.warmup < 0:
        sys.exit("bench_cpu.py: -b, -t, --steps and --rounds must be positive, --warmup not negative")

    with tempfile.TemporaryDirectory() as tmp:
        model_path, batch_path = prepare(args, tmp)
        results = {"numpy": {"times": []}, "torch": {"times": []}}
        for round_index in range(args.rounds):
            for name in ("numpy", "torch"):
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model_file", model_path,
                       "--batch", batch_path, "--steps", str(args.steps), "--warmup", str(args.warmup)]
                # train_gpt2_cpu.py sets OPENBLAS_THREAD_TIMEOUT before it imports NumPy (see there); the worker
                # imports NumPy first, so the variable comes from its environment instead
                env = {**os.environ, "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "4")}
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
                if proc.returncode != 0:
                    sys.exit(f"bench_cpu.py: the {name} worker failed:\n{proc.stderr.strip()}")
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                results[name]["times"] += out["times"]
                results[name]["losses"] = out["losses"]
                print(f"round {round_index + 1} {name:5s}: " + " ".join(f"{1000 * t:.0f}" for t in out["times"]) + " ms")

    import torch

    info = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "model": args.model,
            "B": args.batch_size, "T": args.sequence_length}
    print(f"\nCPU benchmark, {info['model']} B={info['B']} T={info['T']}, {info['cores']} cores, numpy "
          f"{info['numpy']}, torch {info['torch']} ({info['torch_threads']} threads), {info['date']}")
    print(f"{'contender':28s} {'median ms/step':>15s} {'min':>8s} {'max':>8s}  first losses")
    for name, label in (("numpy", "train_gpt2_cpu.py (NumPy)"), ("torch", "PyTorch eager fp32")):
        t = results[name]["times"]
        results[name].update(median_ms=1000 * statistics.median(t), min_ms=1000 * min(t), max_ms=1000 * max(t))
        losses = " ".join(f"{v:.4f}" for v in results[name]["losses"][:3])
        print(f"{label:28s} {results[name]['median_ms']:15.0f} {results[name]['min_ms']:8.0f} "
              f"{results[name]['max_ms']:8.0f}  {losses}")
    ratio = results["torch"]["median_ms"] / results["numpy"]["median_ms"]
    print(f"speedup of NumPy over PyTorch eager: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "results": results, "speedup_numpy_over_torch": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
