"""The mainline's match test on the CPU: test_gpt2.py under Triton's interpreter against the PyTorch reference.

The reference (train_gpt2_torch.py --write_tensors 1) writes a tiny GPT-2 (2 layers, 64 channels) and one batch's
logits, loss and gradients; test_gpt2.py runs our kernels and hand-written backward on the same batch and must
print `overall okay: 1` in fp32 and in bf16 with full recompute, using test_gpt2.py's own per-tensor tolerances, and
with --precision fp8 (its FP8 tolerances; the products emulated exactly on the CPU).
A copy of the debug state with one gradient perturbed must make it print `overall okay: 0` and exit nonzero.
On the GPU the same script runs at d12 (dev/gpu_check.sh).
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TRITON_INTERPRET": "1"}


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=900)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, tiktoken_file):
    out = tmp_path_factory.mktemp("reference")
    shard = out / "train.bin"
    from llmpy.formats import write_shard

    write_shard(shard, np.random.default_rng(0).integers(0, 50257, 4096).astype(np.uint16))
    proc = run("train_gpt2_torch.py", "--model", "tiny", "--write_tensors", "1", "--device", "cpu", "-b", "2",
               "-t", "16", "--input_bin", str(shard), "--write_dir", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


# fp32 over all 10 of the reference's steps; bf16 with recompute 2 over 3 (its first step's tensors are what differs
# from fp32's path; the interpreter's time is per step); FP8 over 3
@pytest.mark.parametrize("dtype, recompute, steps, precision", [("float32", "0", 10, "bf16"),
                                                                 ("bfloat16", "2", 3, "bf16"),
                                                                 ("float32", "0", 3, "fp8")])
def test_mainline_matches_reference(reference_dir, dtype, recompute, steps, precision):
    proc = run("test_gpt2.py", "--model", "tiny", "--dir", str(reference_dir), "--device", "cpu", "--dtype", dtype,
               "-r", recompute, "--steps", str(steps), "--precision", precision)
    assert proc.returncode == 0 and "overall okay: 1" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count(" OK\n") == 1 + 1 + 16 + steps  # logits, loss, 16 gradient tensors, the steps' losses
    if precision == "fp8":  # FP8 really ran: its logits are off by its rounding, far above fp32's 1e-6
        assert float(proc.stdout.split("logits     rel err ")[1].split()[0]) > 1e-3


def test_a_wrong_gradient_fails(reference_dir, tmp_path):
    for name in os.listdir(reference_dir):
        shutil.copy(reference_dir / name, tmp_path / name)
    state = tmp_path / "gpt2_tiny_debug_state.bin"
    data = bytearray(state.read_bytes())
    grads = np.frombuffer(data, dtype="<f4", offset=len(data) - 4 * 64 * 2)  # lnfw and lnfb, the last 128 floats
    grads[:64] *= 1.5  # lnfw's gradient 50% off: far outside any tolerance
    state.write_bytes(data)
    proc = run("test_gpt2.py", "--model", "tiny", "--dir", str(tmp_path), "--device", "cpu", "--dtype", "float32",
               "--steps", "1")  # the gradients are compared before any step: one step is enough to fail on them
    assert proc.returncode == 1 and "overall okay: 0" in proc.stdout
    assert [line.split()[0] for line in proc.stdout.splitlines() if line.endswith("NOT OK")] == ["lnfw"]
