"""train_gpt2.py, the mainline's training program, run as a subprocess on the CPU under Triton's interpreter.

- A 3-step run with validation, sampling, a log and --write_model: the printed step losses and grad norms, the
  validation loss and the final weights are compared with the PyTorch reference (train_gpt2_torch.py's model,
  train_step and AdamW) run here on the same weights and batches.
- Overfitting one batch (-a 1) lowers the loss markedly.
- Bad input (missing, truncated or wrong files, out-of-range tokens, nonsense flags): one line on stderr naming
  the flag or file and the problem, a nonzero exit, no traceback.

The model is a small llm.c model file (-e FILE) with a 500-token vocab padded to 512: the same code path as GPT-2's
50,257 (V < Vp, padding rows), but the interpreter updates 135k parameters a step instead of 3.4M (-e tiny), which
keeps the file fast on a 2-core machine.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt2_torch as ref
from llmpy import formats
from llmpy.configs.gpt2 import GPT2Config, num_parameters, split_params
from llmpy.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
CONFIG = GPT2Config(max_seq_len=32, vocab_size=500, padded_vocab_size=512, num_layers=2, num_heads=4, channels=64)
B, T = 2, 16
STEP_LINE = re.compile(r"^step +(\d+)/(\d+) \| loss (\S+) \| norm (\S+) \| lr (\S+) \| (\S+) ms \| MFU (\S+) \| "
                       r"(\d+) tok/s$", re.M)


def gpt2_init(config, seed):
    """GPT-2's random initialisation as flat fp32 parameters, wte's padding rows zero."""
    rng = np.random.default_rng(seed)
    flat = np.zeros(num_parameters(config), dtype=np.float32)
    views = split_params(config, flat)
    for name, view in views.items():
        if name in ("ln1w", "ln2w", "lnfw"):
            view[...] = 1.0
        elif name in ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"):
            view[...] = rng.normal(0.0, 0.02, view.shape)
    views["wte"][config.vocab_size:] = 0.0
    return flat


def write_files(folder):
    """Train and val shards of random tokens, a model file and a tokenizer file, in folder: {name: path}."""
    rng = np.random.default_rng(0)
    paths = {name: folder / f"{name}.bin" for name in ("train", "val", "model", "tokenizer")}
    formats.write_shard(paths["train"], rng.integers(0, CONFIG.vocab_size, 40 * B * T + 1))
    formats.write_shard(paths["val"], rng.integers(0, CONFIG.vocab_size, 4 * B * T + 1))
    formats.write_model(paths["model"], CONFIG, gpt2_init(CONFIG, seed=1))
    formats.write_tokenizer(paths["tokenizer"], [f"<{i}>".encode() for i in range(CONFIG.vocab_size)],
                            CONFIG.vocab_size - 1)
    return paths


@pytest.fixture
def files(tmp_path):
    return write_files(tmp_path)


def run_trainer(*args, interpret=True, cwd=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def base_args(files):
    return ["--device", "cpu", "--dtype", "float32", "-e", files["model"], "-b", B, "-t", T,
            "-i", files["train"], "-j", files["val"], "--tokenizer", files["tokenizer"]]


def shuffled_batches(path):
    """The training batches in the order train_gpt2.py reads them by default: llm.c's shuffled order (rank 0's,
    seeded 42), int64 (B, T) tensors. tests/test_data.py checks that order against llm.c's algorithm."""
    loader = DataLoader(str(path), B, T, shuffle=True)
    while True:
        yield tuple(torch.from_numpy(a.astype(np.int64)) for a in loader.next_batch())


def shard_batch(path, index):
    """Batch `index` of a shard in file order: tokens [index*B*T, (index+1)*B*T + 1), int64 (B, T)."""
    tokens = np.array(formats.read_shard(path)[index * B * T: (index + 1) * B * T + 1], dtype=np.int64)
    return torch.from_numpy(tokens[:-1].reshape(B, T)), torch.from_numpy(tokens[1:].reshape(B, T))


def reference_run(files, num_steps, micro_batches):
    """The PyTorch reference on the same weights and batches as train_gpt2.py's defaults: AdamW at lr 3e-4 (the
    cosine schedule with final_lr_frac 1.0 is constant), gradient clipping at 1.0, no weight decay, fp32.
    Step s trains on the next micro_batches batches of the shuffled order (shuffled_batches). Returns (initial flat weights, the trained
    model, [(loss, grad norm) per step], the loss of the first 2 val batches before training)."""
    _, flat = formats.read_model(files["model"])
    model = ref.model_from_flat(CONFIG, flat, flash=False)
    with torch.no_grad():
        val_loss = sum(model(*shard_batch(files["val"], i))[1].item() for i in range(2)) / 2
    optimizer = ref.configure_optimizer(model, 3e-4, weight_decay=0.0)
    steps = []
    train_batches = shuffled_batches(files["train"])
    for step in range(num_steps):
        batches = [next(train_batches) for _ in range(micro_batches)]
        x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])  # (S, B, T)
        steps.append(ref.train_step(model, optimizer, x, y, 3e-4, grad_clip=1.0))
    return flat, model, steps, val_loss


@pytest.mark.parametrize("deterministic", [0, 1])
def test_three_steps_match_the_pytorch_reference(files, tmp_path, deterministic):
    """--deterministic 1 changes only the order of the embedding gradient's sums (and, on a GPU, vendor choices):
    the same tolerances hold."""
    log_dir, out_model = tmp_path / "log", tmp_path / "final.bin"
    result = run_trainer(*base_args(files), "-x", 3, "-v", 2, "-m", 2, "-s", 2, "-g", 4, "-o", log_dir,
                         "--write_model", out_model, "--deterministic", deterministic, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    steps = STEP_LINE.findall(result.stdout)
    assert [(int(s[0]), int(s[1])) for s in steps] == [(1, 3), (2, 3), (3, 3)]
    losses, norms = [float(s[2]) for s in steps], [float(s[3]) for s in steps]
    assert all(math.isfinite(x) for x in losses + norms)
    assert [s[6] for s in steps] == ["n/a"] * 3  # no peak FLOP/s known for the CPU
    val_losses = [float(v) for v in re.findall(r"^val loss (\S+)$", result.stdout, re.M)]
    assert len(val_losses) == 3  # before steps 0 and 2 (every -v 2), and after the last
    samples = re.findall(r"^generating:\n---\n(.*)\n---$", result.stdout, re.M)
    assert len(samples) == 2 and all(re.fullmatch(r"(<\d+>){3}", s) for s in samples)  # -g 4: 3 tokens after EOT

    flat, model, ref_steps, ref_val = reference_run(files, num_steps=3, micro_batches=1)
    # fp32 throughout. Step 1 is the same function of the same inputs, and our kernels round differently from torch's
    # at ~1e-6 relative. Steps 2 and 3 follow AdamW updates, where m / sqrt(v) can turn a rounding-level difference
    # in a near-zero gradient into a weight difference of up to lr; measured: the losses agree to the 6 printed
    # decimals. Allowed: 1e-5 relative on the losses; the norms are printed to 4 decimals: 1e-5 relative + 1e-4.
    assert val_losses[0] == pytest.approx(ref_val, rel=1e-5)
    for step, ((loss, norm), got_loss, got_norm) in enumerate(zip(ref_steps, losses, norms)):
        assert got_loss == pytest.approx(loss, rel=1e-5), f"step {step}"
        assert got_norm == pytest.approx(norm, rel=1e-5, abs=1e-4), f"step {step}"
    assert abs(losses[0] - math.log(CONFIG.vocab_size)) < 0.1  # a fresh GPT-2 init predicts about uniformly

    # the final weights, elementwise: our fp32 AdamW against torch's after 3 steps of lr 3e-4. Measured max
    # difference 1.5e-6 (a handful of weights whose gradients are near zero, see above); allowed 1e-5, 3% of one
    # step's lr, far below the weights' movement (checked > 1e-4)
    final_config, final = formats.read_model(out_model)
    assert final_config == CONFIG
    ref_final = ref.model_to_flat(model)
    assert np.abs(final - flat).max() > 1e-4  # training moved the weights
    np.testing.assert_allclose(final, ref_final, rtol=0, atol=1e-5)

    log = (log_dir / "main.log").read_text().splitlines()
    assert [line.split()[0] + " " + line.split()[1][:4] for line in log] == \
        ["s:0 tel:", "s:0 trl:", "s:1 trl:", "s:2 tel:", "s:2 trl:", "s:3 tel:"]
    train_lines = [dict(kv.split(":", 1) for kv in line.split()) for line in log if "trl:" in line]
    for fields, loss, norm in zip(train_lines, losses, norms):
        assert float(fields["trl"]) == pytest.approx(loss, abs=1e-4)
        assert float(fields["norm"]) == pytest.approx(norm, abs=1e-4)
        assert float(fields["lr"]) == pytest.approx(3e-4)
        assert float(fields["ms"]) > 0 and float(fields["tok/s"]) > 0
    assert float(log[0].split("tel:")[1]) == pytest.approx(val_losses[0], abs=1e-4)


def test_bf16_with_gradient_accumulation_and_recompute_matches_the_reference(files, tmp_path):
    out_model = tmp_path / "final.bin"
    result = run_trainer(*base_args(files), "--dtype", "bfloat16", "-d", 2 * B * T, "-r", 2, "-x", 2, "-v", 0,
                         "-s", 0, "--write_model", out_model)
    assert result.returncode == 0, result.stderr
    assert "2 micro-batch(es) = 64 tokens a step" in result.stdout
    steps = STEP_LINE.findall(result.stdout)
    flat, model, ref_steps, _ = reference_run(files, num_steps=2, micro_batches=2)
    # bf16 weights and activations against the fp32 reference. A loss is a mean over 64 tokens of near-uniform
    # predictions, where the bf16 roundings (2^-9 relative each) largely cancel: measured 2e-6 relative, allowed
    # 1e-3. The gradient norm sums squares of bf16-rounded gradients: measured 2e-3 relative, allowed 1e-2.
    assert len(steps) == 2
    for step, ((loss, norm), got) in enumerate(zip(ref_steps, steps)):
        assert float(got[2]) == pytest.approx(loss, rel=1e-3), f"step {step}"
        assert float(got[3]) == pytest.approx(norm, rel=1e-2), f"step {step}"
    # the fp32 master weights' total update against the reference's: AdamW divides each gradient element by its
    # own magnitude, so bf16 rounding of small gradients changes their updates by up to lr. Measured 6% of the
    # update's norm; allowed 15% (reading one batch for both micro-batches instead of two: 88%)
    _, final = formats.read_model(out_model)
    ref_update = ref.model_to_flat(model) - flat
    assert np.linalg.norm((final - flat) - ref_update) <= 0.15 * np.linalg.norm(ref_update)


def test_overfitting_a_single_batch_lowers_the_loss(files):
    result = run_trainer(*base_args(files), "-a", 1, "-l", 1e-3, "-x", 10, "-v", 0, "-s", 0)
    assert result.returncode == 0, result.stderr
    losses = [float(s[2]) for s in STEP_LINE.findall(result.stdout)]
    assert len(losses) == 10
    # 32 random tokens, starting from ~ln(500) = 6.2 (uniform). Memorising them, the loss falls every step, by
    # 1.5 nats in 10 AdamW steps at lr 1e-3 (measured); a new batch each step would stay near 6.2 (random tokens).
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 1.0, losses


def _write_truncated_shard(path):
    formats.write_shard(path, np.arange(1000))
    path.write_bytes(path.read_bytes()[:-10])


def _write_out_of_range_shard(path):
    formats.write_shard(path, np.full(1000, CONFIG.vocab_size))  # one past the last id


# (name, extra args, a function writing bad.bin or None, what stderr must say)
BAD_INPUTS = [
    ("missing shard", ["-i", "{tmp}/nope_*.bin"], None, r"-i/--input_bin: .*nope_\*\.bin: no files match"),
    ("truncated shard", ["-i", "{tmp}/bad.bin"], _write_truncated_shard, r"-i/--input_bin: .*bad\.bin: truncated"),
    ("token ids out of range", ["-i", "{tmp}/bad.bin"], _write_out_of_range_shard,
     r"bad\.bin: token id 500 out of range for a vocab of 500"),
    ("batch larger than the data", ["-b", 100], None, r"-i/--input_bin: .*train\.bin has 1281 tokens, a batch needs 1601"),
    ("T > max_seq_len", ["-t", 64], None, r"-t/--sequence_length 64 is longer than the model's max_seq_len 32"),
    ("model file with a wrong magic", ["-e", "{tmp}/bad.bin"], lambda p: p.write_bytes(b"\0" * 2048),
     r"bad\.bin: bad magic 0"),
    ("unknown descriptor", ["-e", "d7x"], None, r"-e/--init d7x: no such model file, and unknown model descriptor"),
    ("a head size our attention lacks", ["-e", "gpt3:c1536", "-s", 0], None,  # refused before any allocation
     r"our attention .* takes head sizes 16, 32, 64, 128; this model's is 96: run it in bf16 on the GPU"),
    ("broken tokenizer", ["--tokenizer", "{tmp}/val.bin"], None, r"val\.bin: bad magic 20240520"),
    ("total batch not a multiple of B*T", ["-d", 100], None, r"-d/--total_batch_size 100 is not a multiple of B\*T"),
    ("negative learning rate", ["-l", -1], None, r"-l/--learning_rate must be positive"),
    ("unknown flag", ["--nonsense", 1], None, r"unrecognized arguments: --nonsense"),
    ("bad schedule", ["-k", "step"], None, r"argument -k/--lr_schedule: invalid choice: 'step'"),
    ("an FP8 option without FP8", ["--fp8_lm_head", "0"], None,
     r"--fp8_lm_head 0 applies to --precision fp8 only, this run's is bf16"),
]


@pytest.mark.parametrize("name, extra, write_bad, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_one_line_and_a_nonzero_exit(files, tmp_path, name, extra, write_bad, message):
    if write_bad:
        write_bad(tmp_path / "bad.bin")
    extra = [str(a).format(tmp=tmp_path) for a in extra]
    result = run_trainer(*base_args(files), "-x", 1, *extra)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_gpt2.py: error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_cpu_without_the_interpreter_is_refused(files):
    result = run_trainer(*base_args(files), "-x", 1, interpret=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "train_gpt2.py: error: --device cpu runs the Triton kernels in Triton's " \
                                    "interpreter: set TRITON_INTERPRET=1"
