"""train_gpt2_torch.py, the PyTorch reference: its model, its llm.c layout, its optimizer, its files and its CLI.

The module is checked against a second, functional GPT-2 written here from llm.c's description and run in float64
on the flat parameters; the files `--write_tensors 1` writes are read back with llmpy.formats and recomputed.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt2_torch as ref
from llmpy import formats
from llmpy.configs.gpt2 import (GPT2Config, config_from_descriptor, decayed_param_names, num_parameters, param_shapes,
                                split_params)
from llmpy.logger import read_main_log

REPO = Path(__file__).resolve().parents[1]
RANKS_FILE = os.environ.get("LLMPY_TIKTOKEN_FILE") or str(REPO.parent / "shared" / "tokenizer" / "gpt2.tiktoken")
# small enough to run in milliseconds, with a vocab that is not a multiple of 128 so wte has padding rows
SMALL = GPT2Config(max_seq_len=16, vocab_size=300, padded_vocab_size=384, num_layers=2, num_heads=4, channels=32)


def random_flat(config, seed):
    """Flat parameters with every tensor random (biases too, layernorm weights around 1), wte's padding rows zero."""
    rng = np.random.default_rng(seed)
    flat = rng.normal(0.0, 0.05, num_parameters(config)).astype(np.float32)
    views = split_params(config, flat)
    for name in ("ln1w", "ln2w", "lnfw"):
        views[name] += 1.0
    views["wte"][config.vocab_size:] = 0.0
    return flat


def random_tokens(config, shape, seed):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, config.vocab_size, shape))


def functional_gpt2(config, params, x, y):
    """GPT-2's forward from llm.c's description, on flat parameters (any float dtype): logits (B, T, V), loss."""
    p = split_params(config, params)
    B, T = x.shape
    C, NH, V = config.channels, config.num_heads, config.vocab_size
    HS = C // NH

    def heads(t):  # (B, T, C) -> (B, NH, T, HS)
        return t.view(B, T, NH, HS).transpose(1, 2)

    h = p["wte"][x] + p["wpe"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(config.num_layers):
        a = F.layer_norm(h, (C,), p["ln1w"][l], p["ln1b"][l], 1e-5)
        q, k, v = (a @ p["qkvw"][l].T + p["qkvb"][l]).split(C, dim=-1)
        att = (heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(HS)).masked_fill(~causal, -math.inf).softmax(-1)
        h = h + (att @ heads(v)).transpose(1, 2).reshape(B, T, C) @ p["attprojw"][l].T + p["attprojb"][l]
        m = F.layer_norm(h, (C,), p["ln2w"][l], p["ln2b"][l], 1e-5)
        u = m @ p["fcw"][l].T + p["fcb"][l]
        u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        h = h + u @ p["fcprojw"][l].T + p["fcprojb"][l]
    h = F.layer_norm(h, (C,), p["lnfw"], p["lnfb"], 1e-5)
    logits = (h @ p["wte"].T)[..., :V]  # the tied LM head; wte's padding rows are not vocabulary
    return logits, F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def assert_close_per_tensor(config, actual_flat, expected_flat, rtol, what):
    """Every llm.c tensor: max|actual - expected| <= rtol * max|expected| (+1e-30 for all-zero tensors)."""
    actual, expected = split_params(config, actual_flat), split_params(config, expected_flat)
    for name in param_shapes(config):
        err = np.abs(actual[name] - expected[name]).max()
        scale = np.abs(expected[name]).max()
        assert err <= rtol * scale + 1e-30, f"{what} {name}: max abs diff {err:.3g} > {rtol} * max {scale:.3g}"


def test_flat_layout_puts_each_tensor_where_llmc_reads_it():
    model = ref.model_from_flat(SMALL, random_flat(SMALL, seed=1))
    flat = ref.model_to_flat(model)
    assert flat.dtype == np.float32 and flat.shape == (num_parameters(SMALL),)
    v, t, V = split_params(SMALL, flat), model.transformer, SMALL.vocab_size
    same = lambda a, b: np.array_equal(a, b.detach().numpy())
    assert same(v["wte"][:V], t.wte.weight) and not v["wte"][V:].any()
    assert same(v["wpe"], t.wpe.weight) and same(v["lnfw"], t.ln_f.weight) and same(v["lnfb"], t.ln_f.bias)
    assert model.lm_head.weight is t.wte.weight
    for l, block in enumerate(t.h):
        assert same(v["ln1w"][l], block.ln_1.weight) and same(v["ln1b"][l], block.ln_1.bias)
        assert same(v["qkvw"][l], block.attn.c_attn.weight) and same(v["qkvb"][l], block.attn.c_attn.bias)
        assert same(v["attprojw"][l], block.attn.c_proj.weight) and same(v["attprojb"][l], block.attn.c_proj.bias)
        assert same(v["ln2w"][l], block.ln_2.weight) and same(v["ln2b"][l], block.ln_2.bias)
        assert same(v["fcw"][l], block.mlp.c_fc.weight) and same(v["fcb"][l], block.mlp.c_fc.bias)
        assert same(v["fcprojw"][l], block.mlp.c_proj.weight) and same(v["fcprojb"][l], block.mlp.c_proj.bias)


def test_flat_round_trip_is_exact():
    flat = random_flat(SMALL, seed=2)
    model = ref.GPT(SMALL)
    ref.init_weights(model, seed=7)  # overwritten below: every tensor must come from flat
    ref.load_flat(model, flat)
    np.testing.assert_array_equal(ref.model_to_flat(model), flat)


@pytest.mark.parametrize("descriptor", ["tiny", "d12", "d24", "d36", "d48"])
def test_parameter_count_is_num_parameters_less_the_padding(descriptor):
    config = config_from_descriptor(descriptor)
    with torch.device("meta"):  # shapes only, no memory
        model = ref.GPT(config)
    padding = (config.padded_vocab_size - config.vocab_size) * config.channels
    assert sum(p.numel() for p in model.parameters()) + padding == num_parameters(config)


def test_forward_and_backward_match_functional_gpt2_in_float64():
    """The module in fp32 against the functional GPT-2 in fp64 with autograd, per tensor.

    fp32 rounding through 2 layers at these sizes: logits differ by ~1e-6, gradients by ~1e-6 of each tensor's
    largest entry; the bounds (1e-5 abs for logits and loss, 1e-4 relative per gradient tensor) leave ~10x margin.
    """
    flat = random_flat(SMALL, seed=3)
    x, y = random_tokens(SMALL, (3, 11), seed=4), random_tokens(SMALL, (3, 11), seed=5)
    params64 = torch.from_numpy(flat).double().requires_grad_()
    logits64, loss64 = functional_gpt2(SMALL, params64, x, y)
    loss64.backward()
    for flash in (True, False):
        model = ref.model_from_flat(SMALL, flat, flash=flash)
        logits, loss = model(x, y)
        loss.backward()
        torch.testing.assert_close(logits.double(), logits64.detach(), rtol=0, atol=1e-5)
        assert abs(loss.item() - loss64.item()) < 1e-5
        assert_close_per_tensor(SMALL, ref.grads_to_flat(model), params64.grad.numpy(), 1e-4, f"flash={flash} grad")


@pytest.mark.parametrize("flash", [True, False])
def test_attention_is_causal(flash):
    """Changing the last token must not change any earlier position's logits."""
    model = ref.model_from_flat(SMALL, random_flat(SMALL, seed=6), flash=flash)
    x = random_tokens(SMALL, (2, 9), seed=7)
    x_changed = x.clone()
    x_changed[:, -1] = (x[:, -1] + 1) % SMALL.vocab_size
    logits, _ = model(x, x)
    logits_changed, _ = model(x_changed, x)
    assert torch.equal(logits[:, :-1], logits_changed[:, :-1])
    assert not torch.allclose(logits[:, -1], logits_changed[:, -1])


def test_init_is_gpt2s_and_reproducible():
    config = config_from_descriptor("tiny")
    model = ref.GPT(config)
    ref.init_weights(model, seed=42)
    residual_std = 0.02 / math.sqrt(2 * config.num_layers)
    for name, p in model.named_parameters():
        if p.dim() >= 2:  # >= 8192 samples each: the sample std is within ~1% of the true one; allow 5%
            expected = residual_std if name.endswith("c_proj.weight") else 0.02
            assert abs(p.std().item() / expected - 1) < 0.05, name
            assert abs(p.mean().item()) < 0.1 * expected, name
        else:
            expected = 1.0 if ".ln_" in name and name.endswith(".weight") else 0.0
            assert torch.all(p == expected), name
    again, other = ref.GPT(config), ref.GPT(config)
    ref.init_weights(again, seed=42)
    ref.init_weights(other, seed=43)
    flat = ref.model_to_flat(model)
    np.testing.assert_array_equal(ref.model_to_flat(again), flat)
    assert not np.array_equal(ref.model_to_flat(other), flat)


def test_weight_decay_goes_to_exactly_llmcs_decayed_tensors():
    model = ref.GPT(SMALL)
    optimizer = ref.configure_optimizer(model, 1e-4, 0.1)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    by_name = ref.llmc_parameters(model)
    expected = {id(p) for name in decayed_param_names() for p in by_name[name]}
    assert decayed == expected
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in optimizer.param_groups)


def test_gradient_accumulation_equals_one_large_batch():
    """Two micro-batches of (B, T) step like one (2B, T) batch (equal sizes: the mean of the means is the mean).

    Only summation order differs: loss, norm and each gradient tensor to 1e-5 relative. The updated weights to
    1e-2 * lr: AdamW's first step moves a weight by lr * g / (|g| + eps), and for the few gradients that cancel to
    ~eps = 1e-8, summation noise of ~1e-9 shifts that by a visible fraction of lr (measured: 2e-3 * lr).
    """
    lr = 1e-3
    flat = random_flat(SMALL, seed=8)
    x, y = random_tokens(SMALL, (2, 3, 10), seed=9), random_tokens(SMALL, (2, 3, 10), seed=10)
    results = []
    for xs, ys in ((x, y), (x.reshape(6, 10), y.reshape(6, 10))):
        model = ref.model_from_flat(SMALL, flat)
        optimizer = ref.configure_optimizer(model, lr, 0.1)
        loss, norm = ref.train_step(model, optimizer, xs, ys, learning_rate=lr, grad_clip=0.0)
        results.append((loss, norm, ref.grads_to_flat(model), ref.model_to_flat(model)))
    (loss_a, norm_a, grads_a, flat_a), (loss_b, norm_b, grads_b, flat_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-5)
    assert_close_per_tensor(SMALL, grads_a, grads_b, 1e-5, "accumulated grad")
    np.testing.assert_allclose(flat_a, flat_b, rtol=0, atol=1e-2 * lr)
    assert np.median(np.abs(flat_a - flat)) > 0.5 * lr  # the step did move the weights


def test_train_step_reports_the_norm_and_clips_the_gradients():
    flat = random_flat(SMALL, seed=11)
    x, y = random_tokens(SMALL, (3, 10), seed=12), random_tokens(SMALL, (3, 10), seed=13)
    model = ref.model_from_flat(SMALL, flat)
    model(x, y)[1].backward()
    true_norm = float(np.linalg.norm(ref.grads_to_flat(model).astype(np.float64)))
    for grad_clip, norm_after in ((0.0, true_norm), (0.1 * true_norm, 0.1 * true_norm)):
        model = ref.model_from_flat(SMALL, flat)
        optimizer = ref.configure_optimizer(model, 1e-4, 0.0)
        loss, norm = ref.train_step(model, optimizer, x, y, learning_rate=1e-4, grad_clip=grad_clip)
        assert norm == pytest.approx(true_norm, rel=1e-5)
        # the step leaves the (clipped) gradients in place
        assert np.linalg.norm(ref.grads_to_flat(model).astype(np.float64)) == pytest.approx(norm_after, rel=1e-5)


def test_bfloat16_autocast_step_is_close_to_float32():
    """bf16 matmuls (8 bits of mantissa) at C=32: the loss within 1% of the float32 loss."""
    flat = random_flat(SMALL, seed=14)
    x, y = random_tokens(SMALL, (3, 10), seed=15), random_tokens(SMALL, (3, 10), seed=16)
    losses = []
    for amp_dtype in (None, torch.bfloat16):
        model = ref.model_from_flat(SMALL, flat)
        optimizer = ref.configure_optimizer(model, 1e-4, 0.0)
        losses.append(ref.train_step(model, optimizer, x, y, 1e-4, amp_dtype=amp_dtype)[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)


def test_learning_rate_schedule():
    """The reference's schedule is llmpy.schedule's cosine: linear warmup, then down to lr * final_lr_frac."""
    lr = lambda step: ref.lr_at(step, 20, 1e-3, warmup=4, final_frac=0.1, kind="cosine")
    assert [lr(s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    decay = [lr(s) for s in range(4, 20)]
    assert decay[0] == pytest.approx(1e-3) and decay[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr(12) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 8 / 15)) * 9e-4)
    assert all(ref.lr_at(s, 20, 1e-3, 0, 1.0, "cosine") == 1e-3 for s in range(20))


def run_trainer(*args, cwd=REPO):
    env = {**os.environ, "LLMPY_TIKTOKEN_FILE": RANKS_FILE}
    return subprocess.run([sys.executable, str(REPO / "train_gpt2_torch.py"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.bin"
    formats.write_shard(path, np.random.default_rng(17).integers(0, 50257, 5000), dtype=np.uint16)
    return path


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory, shard):
    """`--write_tensors 1` for the tiny model on a random-token shard, B=4, T=64."""
    if not os.path.isfile(RANKS_FILE):
        pytest.skip("no GPT-2 ranks file: set LLMPY_TIKTOKEN_FILE")
    out = tmp_path_factory.mktemp("reference")
    result = run_trainer("--model", "tiny", "--device", "cpu", "--input_bin", shard, "--write_tensors", 1,
                         "--write_dir", out)
    assert result.returncode == 0, result.stderr
    return out


def test_written_model_files_hold_the_seeded_init(reference_files):
    config = config_from_descriptor("tiny")
    expected_model = ref.GPT(config)
    ref.init_weights(expected_model, seed=42)
    expected = ref.model_to_flat(expected_model)
    file_config, flat = formats.read_model(reference_files / "gpt2_tiny.bin")
    assert file_config == config
    np.testing.assert_array_equal(flat, expected)
    bf16_config, flat_bf16 = formats.read_model(reference_files / "gpt2_tiny_bf16.bin")
    assert bf16_config == config
    # the bf16 file is the fp32 weights rounded to nearest-even, exactly as torch rounds them
    np.testing.assert_array_equal(flat_bf16, torch.from_numpy(expected).bfloat16().float().numpy())


def test_debug_state_matches_a_recomputation_from_the_written_model(reference_files, shard):
    """The same fp32 code on the same machine: logits/loss to 1e-5 abs, each gradient tensor to 1e-5 of its max."""
    config, flat = formats.read_model(reference_files / "gpt2_tiny.bin")
    state = formats.read_debug_state(reference_files / "gpt2_tiny_debug_state.bin", config)
    tokens = formats.read_shard(shard).astype(np.int32)
    B, T = 4, 64
    np.testing.assert_array_equal(state.x, tokens[:B * T].reshape(B, T))  # the first batch of the shard
    np.testing.assert_array_equal(state.y, tokens[1:B * T + 1].reshape(B, T))
    model = ref.model_from_flat(config, flat)
    logits, loss = model(torch.from_numpy(state.x).long(), torch.from_numpy(state.y).long())
    loss.backward()
    assert state.logits.shape == (B, T, config.vocab_size)
    np.testing.assert_allclose(state.logits, logits.detach().numpy(), rtol=0, atol=1e-5)
    assert state.loss == pytest.approx(loss.item(), abs=1e-5)
    assert not split_params(config, state.grads)["wte"][config.vocab_size:].any()
    assert_close_per_tensor(config, state.grads, ref.grads_to_flat(model), 1e-5, "debug state grad")


def test_tokenizer_file_is_gpt2s(reference_files):
    token_bytes, eot = formats.read_tokenizer(reference_files / "gpt2_tokenizer.bin")
    assert len(token_bytes) == 50257 and eot == 50256
    assert token_bytes[15496] == b"Hello" and token_bytes[995] == b" world" and token_bytes[50256] == b"<|endoftext|>"


def llmc_adamw_losses(config, flat, x, y, hp, steps):
    """The losses of `steps` AdamW updates written from llm.c's formula over flat buffers, decay on its 2-D tensors."""
    params, m, v = flat.astype(np.float64), np.zeros(len(flat)), np.zeros(len(flat))
    decay = np.zeros(len(flat))
    for name in decayed_param_names():
        split_params(config, decay)[name][...] = hp["weight_decay"]
    model, losses = ref.GPT(config), []
    for t in range(1, steps + 1):
        ref.load_flat(model, params.astype(np.float32))
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        g = ref.grads_to_flat(model).astype(np.float64)
        m = hp["beta1"] * m + (1 - hp["beta1"]) * g
        v = hp["beta2"] * v + (1 - hp["beta2"]) * g * g
        m_hat, v_hat = m / (1 - hp["beta1"] ** t), v / (1 - hp["beta2"] ** t)
        params -= hp["learning_rate"] * (m_hat / (np.sqrt(v_hat) + hp["eps"]) + decay * params)
    return losses


def test_debug_losses_json_is_reproducible_from_its_hyperparameters(reference_files):
    """The 10 losses again, with a hand-written AdamW: equal to 1e-5 relative (fp32 forward, fp64 optimizer)."""
    with open(reference_files / "gpt2_tiny_debug_losses.json") as f:
        hp = json.load(f)
    assert {k: hp[k] for k in hp if k != "losses"} == {
        "model": "tiny", "B": 4, "T": 64, "learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
        "weight_decay": 0.1, "grad_clip": 0.0}
    losses = hp["losses"]
    assert len(losses) == 10 and all(a > b for a, b in zip(losses, losses[1:]))
    config, flat = formats.read_model(reference_files / "gpt2_tiny.bin")
    state = formats.read_debug_state(reference_files / "gpt2_tiny_debug_state.bin", config)
    assert losses[0] == pytest.approx(state.loss, rel=1e-6)
    x, y = torch.from_numpy(state.x).long(), torch.from_numpy(state.y).long()
    assert llmc_adamw_losses(config, flat, x, y, hp, steps=10) == pytest.approx(losses, rel=1e-5)


def test_training_run_from_the_written_model_logs_train_and_val_losses(reference_files, shard, tmp_path):
    """A bf16 run with gradient accumulation, warmup, decay, validation and samples; main.log is train_gpt2.py's
    (llmpy.logger): s:N tel lines, and s:N trl lines with the learning rate, grad norm, ms and tok/s."""
    result = run_trainer("--init_from", reference_files / "gpt2_tiny.bin", "--device", "cpu", "--input_bin", shard,
                         "--input_val_bin", shard, "--num_iterations", 3, "--val_loss_every", 2, "--val_max_steps", 2,
                         "--sample_every", 2, "--sample_length", 8, "--total_batch_size", 512, "--warmup_iters", 1,
                         "--final_lr_frac", 0.1, "--dtype", "bfloat16", "--output_dir", tmp_path / "log")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("sample:") == 2 and result.stdout.count("tok/s") == 3
    log = (tmp_path / "log" / "main.log").read_text().splitlines()
    assert [" ".join(line.split()[:2]).rsplit(":", 1)[0] for line in log] == [
        "s:0 tel", "s:0 trl", "s:1 trl", "s:2 tel", "s:2 trl", "s:3 tel"]
    fields = read_main_log(tmp_path / "log" / "main.log")
    assert list(fields["trl"]) == list(fields["lr"]) == list(fields["norm"]) == list(fields["tok/s"]) == [0, 1, 2]
    assert list(fields["lr"].values()) == [1e-4, 1e-4, 1e-5]  # 1 warmup step, then the cosine to a tenth
    assert all(9.5 < loss < 12 for loss in [*fields["trl"].values(), *fields["tel"].values()])  # ~ln(50257) = 10.8


def test_first_training_step_from_the_written_model_has_the_debug_states_loss(reference_files, shard):
    """The trainer's first batch in file order (--shuffle 0) is the debug batch: the float32 loss printed (6 decimals)
    is the debug state's."""
    state_loss = json.loads((reference_files / "gpt2_tiny_debug_losses.json").read_text())["losses"][0]
    result = run_trainer("--init_from", reference_files / "gpt2_tiny.bin", "--device", "cpu", "--input_bin", shard,
                         "--input_val_bin", "", "--num_iterations", 1, "--shuffle", 0)
    assert result.returncode == 0, result.stderr
    loss = float(re.search(r"loss (\S+)", result.stdout).group(1))
    assert loss == pytest.approx(state_loss, abs=1e-5)


@pytest.fixture
def bad_files(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a model")
    tiny = tmp_path / "tiny.bin"
    config = config_from_descriptor("tiny")
    formats.write_model(tiny, config, random_flat(config, seed=18))
    return {"missing": tmp_path / "missing.bin", "garbage": garbage, "tiny": tiny}


BAD_FLAGS = [
    (["-t", "2000"], "--sequence_length 2000 exceeds the model's max_seq_len 1024"),
    (["-b", "0"], "--batch_size must be positive"),
    (["--total_batch_size", "100"], "--total_batch_size 100 is not a multiple of B*T"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf"),
    (["--weight_decay", "inf"], "--weight_decay must be a finite number, got inf"),
    (["--grad_clip", "nan"], "--grad_clip must be a finite number, got nan"),
    (["--model", "d2c65h4"], "--model: model descriptor 'd2c65h4': 65 channels are not divisible by 4 heads"),
    (["--output_dir", "{tiny}"], "--output_dir {tiny}: cannot write there ({tiny} is a file, not a folder)"),
    (["--output_dir", "{tiny}/log"], "--output_dir {tiny}/log: cannot write there ({tiny} is a file, not a folder)"),
    (["-x", "-1"], "--num_iterations must be >= 0, got -1"),  # the mainline's spelling of the flag
    (["--flash", "2"], "--flash: invalid choice"),
    (["--device", "tpu:x"], "--device 'tpu:x' is not a device"),
    (["--input_bin", "{missing}"], "python dev/data/tinyshakespeare.py"),
    (["--input_val_bin", "{missing}", "--val_loss_every", "1"], "--input_val_bin"),
    (["--init_from", "{garbage}"], "garbage.bin: truncated"),
    (["--init_from", "{tiny}", "--model", "d12"], "holds a d2c64h4 model, but --model says d12"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_input_is_one_line_and_a_nonzero_exit(flags, message, bad_files, shard):
    flags, message = [f.format(**bad_files) for f in flags], message.format(**bad_files)
    model = [] if "--init_from" in flags or "--model" in flags else ["--model", "tiny"]
    data = [] if "--input_bin" in flags else ["--input_bin", shard]
    result = run_trainer(*model, *data, "--device", "cpu", *flags)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def test_unknown_model_descriptor_is_one_line(shard):
    result = run_trainer("--model", "d7x", "--input_bin", shard)
    assert result.returncode != 0 and result.stderr.startswith("train_gpt2_torch.py: error: --model: unknown model")
    assert result.stderr.count("\n") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_read_only_output_dir_is_refused_at_the_start(shard, tmp_path):
    (tmp_path / "log").mkdir(mode=0o500)
    result = run_trainer("--model", "tiny", "--input_bin", shard, "--device", "cpu", "--output_dir", tmp_path / "log")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"train_gpt2_torch.py: error: --output_dir {tmp_path / 'log'}: cannot write there")


def test_zero_iterations_evaluates_and_samples_without_training(reference_files, shard, tmp_path):
    result = run_trainer("--init_from", reference_files / "gpt2_tiny.bin", "--device", "cpu", "--input_bin", shard,
                         "--input_val_bin", shard, "--num_iterations", 0, "--val_loss_every", 5, "--val_max_steps", 2,
                         "--sample_every", 5, "--sample_length", 4, "--output_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("step 0: val loss ") == 1 and result.stdout.count("sample:") == 1, result.stdout
    assert "tok/s" not in result.stdout
    assert re.fullmatch(r"s:0 tel:[\d.]+\n", (tmp_path / "main.log").read_text())


def test_the_losses_file_replaces_the_old_one_whole(tmp_path):
    """Written to a temporary file and renamed over the old one (llmpy.formats.write_file_atomic), never rewritten
    in place: a reader of the old file, here a second hard link to it, still sees it whole."""
    if not os.path.isfile(RANKS_FILE):
        pytest.skip("no GPT-2 ranks file: set LLMPY_TIKTOKEN_FILE")
    old = tmp_path / "old.json"
    old.write_text('{"losses": "of an earlier run"}')
    os.link(old, tmp_path / "small_debug_losses.json")
    model = ref.model_from_flat(SMALL, random_flat(SMALL, seed=19))
    x, y = random_tokens(SMALL, (2, 8), seed=20), random_tokens(SMALL, (2, 8), seed=21)
    ref.write_reference_files(model, x, y, tmp_path, "small", "small", ref.gpt2_encoding(RANKS_FILE))
    assert old.read_text() == '{"losses": "of an earlier run"}'
    written = json.loads((tmp_path / "small_debug_losses.json").read_text())
    assert (written["B"], written["T"], len(written["losses"])) == (2, 8, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # and no temporary file left
        "gpt2_tokenizer.bin", "old.json", "small.bin", "small_bf16.bin", "small_debug_losses.json",
        "small_debug_state.bin"]
