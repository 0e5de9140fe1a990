"""Checks the NumPy trainer (train_gpt2_cpu.py) against the PyTorch reference, as llm.c's test_gpt2.c does.

The reference files come from
    python train_gpt2_torch.py --model d12 --device cpu --write_tensors 1
which writes the model ({prefix}.bin), one batch with its logits, loss and every gradient ({prefix}_debug_state.bin)
and the losses of 10 AdamW steps on that batch ({prefix}_debug_losses.json). This script runs the same forward,
backward and 10 steps in NumPy and compares: the logits, the loss, every gradient tensor by name, and each loss
of the 10 steps. It prints one line per comparison, then `overall okay: 1` (exit 0) or `overall okay: 0` (exit 1).

    python test_gpt2_cpu.py                     # gpt2_124M files in the current folder
    python test_gpt2_cpu.py --model tiny --dir /tmp/ref
"""

import argparse
import os
import sys

import numpy as np

from llmpy.configs.gpt2 import file_prefix, split_params
from llmpy.formats import FormatError
from llmpy.reference_files import read_reference_files
from train_gpt2_cpu import GPT2

# Tolerances: a tensor passes when max|ours - ref| <= ATOL + rtol * max|ref|.
# Both sides are fp32 and compute the same math; they differ only in the order of the sums (OpenBLAS's blocking
# against MKL's, our NumPy reductions against PyTorch's). A sum of K fp32 terms carries a rounding error of about
# sqrt(K) * 6e-8 of its scale, and K here is C = 768, 4C or N = B*T, through up to 12 layers. Measured
# max|diff| / max|ref| (B=4, T=64, PyTorch 2.13 CPU; tiny with init seeds 42, 1, 2, 3, d12 with seed 42), and
# the tolerance, ~8-12x above the worst:
#   logits:                       tiny 3e-7,   d12 1.2e-6             -> 1e-5
#   gradients, worst tensor:      tiny 8e-7,   d12 8e-7 (wpe)         -> 1e-5
#   loss:                         tiny 1.3e-7, d12 1e-7               -> 1e-6
#   losses of the 10 AdamW steps: tiny 1.4e-7, d12 4.1e-7 (step 4)   -> 5e-6
# The step losses drift more than the first one because AdamW's m / sqrt(v) turns tiny gradient differences into
# full-size updates for entries whose gradient is near 0 in the first steps.
# ATOL only keeps an all-zero reference tensor from demanding exact zeros.
ATOL = 1e-9
RTOL_LOGITS = 1e-5
RTOL_GRADS = 1e-5
RTOL_LOSS = 1e-6
RTOL_STEP_LOSSES = 5e-6
NUM_STEPS = 10


def compare(name, ours, ref, rtol):
    """Prints one line for a tensor (or scalar) and returns whether it is within tolerance."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    max_diff = float(np.max(np.abs(ours - ref)))
    tolerance = ATOL + rtol * float(np.max(np.abs(ref)))
    ok = max_diff <= tolerance  # also False for nan
    print(f"{name:12s} max|diff| {max_diff:.3e}  tol {tolerance:.3e}  {'OK' if ok else 'NOT OK'}")
    return ok


def load_reference(directory, prefix, command):
    config, params, state, reference = read_reference_files(directory, prefix, command)
    losses_file = os.path.join(directory, f"{prefix}_debug_losses.json")
    if len(reference["losses"]) != NUM_STEPS:
        raise FormatError(losses_file, f"has {len(reference['losses'])} losses, expected {NUM_STEPS}")
    if reference["grad_clip"]:
        raise FormatError(losses_file, f"grad_clip {reference['grad_clip']}: the NumPy trainer does not clip, "
                                       "so the reference must not either")
    adamw = {k: reference[k] for k in ("learning_rate", "beta1", "beta2", "eps", "weight_decay")}
    return config, params, state, reference["losses"], adamw


def run_checks(directory, prefix, command):
    config, params, state, ref_losses, adamw = load_reference(directory, prefix, command)
    B, T = state.x.shape
    V = config.vocab_size
    model = GPT2(config, params)
    print(f"{prefix}: {config.num_layers} layers, {config.channels} channels, B={B}, T={T}")
    ok = True

    loss = model.forward(state.x, state.y)
    ok &= compare("logits", model.acts.logits.reshape(B, T, -1)[:, :, :V], state.logits, RTOL_LOGITS)
    ok &= compare("loss", loss, state.loss, RTOL_LOSS)

    model.backward()
    ours, ref = split_params(config, model.grads), split_params(config, state.grads)
    for name in ours:
        ok &= compare(name, ours[name], ref[name], RTOL_GRADS)

    losses = [loss]
    for step in range(1, NUM_STEPS):
        model.update(adamw["learning_rate"], adamw["beta1"], adamw["beta2"], adamw["eps"], adamw["weight_decay"], step)
        losses.append(model.forward(state.x, state.y))
        model.backward()
    for step, (ours_loss, ref_loss) in enumerate(zip(losses, ref_losses)):
        ok &= compare(f"step {step} loss", ours_loss, ref_loss, RTOL_STEP_LOSSES)
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", default=None, help="name stem of the reference files (default gpt2_124M)")
    ap.add_argument("--model", default="d12",
                    help="descriptor whose file prefix to use (d12 -> gpt2_124M, tiny -> gpt2_tiny)")
    ap.add_argument("--dir", default=".", help="folder of the reference files")
    args = ap.parse_args(argv)
    command = f"python train_gpt2_torch.py --model {args.model} --device cpu --write_tensors 1 --write_dir {args.dir}"
    try:
        ok = run_checks(args.dir, args.prefix or file_prefix(args.model), command)
    except (FormatError, ValueError) as e:
        print(f"test_gpt2_cpu.py: error: {e}", file=sys.stderr)
        return 1
    print(f"overall okay: {int(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
