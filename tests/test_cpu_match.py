"""train_gpt2_cpu.py, the NumPy reference trainer: its layers, its whole model, its AdamW and its CLI.

- Each layer's forward and backward against PyTorch autograd in float64, at small sizes with seeded random inputs:
  the same math in a different order, so they agree to ~1e-12; the tolerance is 1e-10 relative to the tensor's
  largest value. Gradients that must be written are pre-filled with NaN (a gradient left unwritten fails);
  gradients that must accumulate are pre-filled with random values.
- The whole model (forward, every gradient) against a functional GPT-2 in PyTorch float64, and AdamW against
  torch.optim.AdamW in float64, at the same tolerance.
- The match flow in float32, as the user runs it: train_gpt2_torch.py --write_tensors 1, then test_gpt2_cpu.py
  must print `overall okay: 1` (tiny and d12); with one gradient of the reference perturbed it must print
  `overall okay: 0` and exit nonzero.
- The CLI: a short training run with validation and sampling; bad input gives one line and exit 1, no traceback.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt2_cpu as cpu
from llmpy import formats
from llmpy.configs.gpt2 import (GPT2Config, config_from_descriptor, decayed_param_names, file_prefix, gpt2_init,
                                split_params)

REPO = Path(__file__).resolve().parents[1]
# float64 against float64: only the summation order differs
RTOL64 = 1e-10
# small enough for milliseconds, with a vocab that is not a multiple of 128 so wte has padding rows
SMALL = GPT2Config(max_seq_len=16, vocab_size=300, padded_vocab_size=384, num_layers=2, num_heads=4, channels=32)


def assert_close(ours, ref, rtol=RTOL64, name=""):
    """max|ours - ref| <= rtol * max|ref| (fails on NaN)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    max_diff = float(np.max(np.abs(ours - ref)))
    max_ref = float(np.max(np.abs(ref)))
    assert max_diff <= rtol * max_ref, f"{name}: max|diff| {max_diff:.3e}, max|ref| {max_ref:.3e}"


def nans(*shape):
    return np.full(shape, np.nan)


def autograd(fn, inputs, dout):
    """fn's output and the gradients of sum(output * dout) with respect to each input, by PyTorch in float64."""
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in inputs]
    out = fn(*tensors)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


def test_encoder_matches_autograd_and_accumulates_into_dwte():
    rng = np.random.default_rng(0)
    B, T, C, Vp, maxT = 2, 5, 8, 20, 7
    wte, wpe = rng.standard_normal((Vp, C)), rng.standard_normal((maxT, C))
    tokens = rng.integers(0, Vp, (B, T))
    tokens[1, 3] = tokens[0, 0]  # a repeated token: its two rows of gradient must add up
    dout = rng.standard_normal((B, T, C))
    ref_out, (ref_dwte, ref_dwpe) = autograd(lambda e, p: e[torch.from_numpy(tokens)] + p[:T], [wte, wpe], dout)

    out = nans(B, T, C)
    cpu.encoder_forward(out, tokens, wte, wpe)
    assert_close(out, ref_out, name="out")
    lm_head_dwte = rng.standard_normal((Vp, C))  # what the LM head already wrote into dwte
    dwte, dwpe = lm_head_dwte.copy(), nans(maxT, C)
    cpu.encoder_backward(dwte, dwpe, dout, tokens)
    assert_close(dwte, lm_head_dwte + ref_dwte, name="dwte")
    assert_close(dwpe, ref_dwpe, name="dwpe")  # rows >= T zero


def test_layernorm_matches_autograd_and_accumulates_into_dinp():
    rng = np.random.default_rng(1)
    N, C = 6, 16
    inp = rng.standard_normal((N, C)) * 3 + 1  # a mean and scale far from 0 and 1
    weight, bias, dout = rng.standard_normal(C), rng.standard_normal(C), rng.standard_normal((N, C))
    ref_out, (ref_dinp, ref_dweight, ref_dbias) = autograd(
        lambda x, w, b: F.layer_norm(x, (C,), w, b, eps=cpu.LAYERNORM_EPS), [inp, weight, bias], dout)

    out, mean, rstd = nans(N, C), nans(N), nans(N)
    cpu.layernorm_forward(out, mean, rstd, inp, weight, bias)
    assert_close(out, ref_out, name="out")
    assert_close(mean, inp.mean(axis=1), name="mean")
    assert_close(rstd, 1 / np.sqrt(inp.var(axis=1) + cpu.LAYERNORM_EPS), name="rstd")
    skip_path_grad = rng.standard_normal((N, C))  # the residual stream's gradient from the skip connection
    dinp, dweight, dbias = skip_path_grad.copy(), nans(C), nans(C)
    cpu.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, nans(N, C), nans(N, C))
    assert_close(dinp, skip_path_grad + ref_dinp, name="dinp")
    assert_close(dweight, ref_dweight, name="dweight")
    assert_close(dbias, ref_dbias, name="dbias")


@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_matches_autograd(with_bias):
    rng = np.random.default_rng(2)
    N, IC, OC = 6, 8, 12
    inp, weight, bias, dout = (rng.standard_normal(s) for s in ((N, IC), (OC, IC), (OC,), (N, OC)))
    if with_bias:
        ref_out, (ref_dinp, ref_dweight, ref_dbias) = autograd(F.linear, [inp, weight, bias], dout)
    else:
        ref_out, (ref_dinp, ref_dweight) = autograd(F.linear, [inp, weight], dout)

    out = nans(N, OC)
    cpu.matmul_forward(out, inp, weight, bias if with_bias else None)
    assert_close(out, ref_out, name="out")
    dinp, dweight, dbias = nans(N, IC), nans(OC, IC), nans(OC)
    cpu.matmul_backward(dinp, dweight, dbias if with_bias else None, dout, inp, weight)
    assert_close(dinp, ref_dinp, name="dinp")
    assert_close(dweight, ref_dweight, name="dweight")
    if with_bias:
        assert_close(dbias, ref_dbias, name="dbias")


def torch_attention(qkv, NH):
    """Causal multi-head attention, (B, T, 3C) -> (B, T, C), and the attention probabilities."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.reshape(B, T, NH, C // NH).transpose(1, 2) for t in qkv.split(C, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // NH)
    att = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(dim=-1)
    return (att @ v).transpose(1, 2).reshape(B, T, C), att


def test_attention_matches_autograd():
    rng = np.random.default_rng(3)
    B, T, NH, C = 2, 5, 2, 8
    qkv, dout = rng.standard_normal((B, T, 3 * C)), rng.standard_normal((B, T, C))
    ref_out, (ref_dqkv,) = autograd(lambda x: torch_attention(x, NH)[0], [qkv], dout)
    ref_att = torch_attention(torch.from_numpy(qkv), NH)[1].numpy()

    out, att = nans(B, T, C), nans(B, NH, T, T)
    cpu.attention_forward(out, att, qkv, NH)
    assert_close(out, ref_out, name="out")
    assert_close(att, ref_att, name="att")  # zero above the diagonal
    dqkv = nans(B, T, 3 * C)
    cpu.attention_backward(dqkv, nans(B, NH, T, T), dout, qkv, att, NH)
    assert_close(dqkv, ref_dqkv, name="dqkv")


def test_gelu_matches_autograd():
    rng = np.random.default_rng(4)
    inp = rng.uniform(-5, 5, (6, 32))  # both tails and the curve in between
    dout = rng.standard_normal(inp.shape)
    ref_out, (ref_dinp,) = autograd(lambda x: F.gelu(x, approximate="tanh"), [inp], dout)

    out = nans(*inp.shape)
    cpu.gelu_forward(out, inp)
    assert_close(out, ref_out, name="out")
    grad = dout.copy()  # in place, as gpt2_backward calls it: dinp is dout
    cpu.gelu_backward(grad, inp, grad, nans(*inp.shape), nans(*inp.shape))
    assert_close(grad, ref_dinp, name="dinp")


def test_softmax_crossentropy_matches_autograd_and_ignores_padding():
    rng = np.random.default_rng(5)
    N, V, Vp = 6, 10, 16
    logits = rng.standard_normal((N, Vp)) * 3
    logits[:, V:] = 50.0  # padded columns: would dominate the softmax if they were not left out
    targets = rng.integers(0, V, N)
    targets[1] = targets[0]
    ref_loss, (ref_dlogits,) = autograd(
        lambda x: F.cross_entropy(x[:, :V], torch.from_numpy(targets)), [logits], np.array(1.0))

    probs, losses = np.zeros((N, Vp)), nans(N)  # probs as Activations allocates it
    cpu.softmax_crossentropy_forward(probs, losses, logits, targets, V)
    ref_losses = F.cross_entropy(torch.from_numpy(logits[:, :V]), torch.from_numpy(targets), reduction="none")
    assert_close(losses, ref_losses.numpy(), name="losses")
    assert abs(losses.mean() - float(ref_loss)) <= RTOL64 * abs(float(ref_loss))
    assert_close(probs[:, :V], torch.from_numpy(logits[:, :V]).softmax(dim=-1).numpy(), name="probs")
    cpu.softmax_crossentropy_backward(probs, targets)
    assert_close(probs, ref_dlogits, name="dlogits")
    assert np.all(probs[:, V:] == 0)


def random_params(config, seed, dtype=np.float64):
    """Every tensor random (biases too, layernorm weights around 1), wte's padding rows zero."""
    rng = np.random.default_rng(seed)
    flat = rng.normal(0.0, 0.1, cpu.num_parameters(config)).astype(dtype)
    views = split_params(config, flat)
    for name in ("ln1w", "ln2w", "lnfw"):
        views[name] += 1.0
    views["wte"][config.vocab_size:] = 0.0
    return flat


def torch_gpt2_loss(config, flat, x, y):
    """GPT-2 written functionally in PyTorch on the flat llm.c buffer: (logits (B, T, V), mean loss)."""
    p = split_params(config, flat)
    B, T = x.shape
    C, NH, V = config.channels, config.num_heads, config.vocab_size
    h = p["wte"][x] + p["wpe"][:T]
    for l in range(config.num_layers):
        a = F.layer_norm(h, (C,), p["ln1w"][l], p["ln1b"][l], cpu.LAYERNORM_EPS)
        y_att, _ = torch_attention(F.linear(a, p["qkvw"][l], p["qkvb"][l]), NH)
        h = h + F.linear(y_att, p["attprojw"][l], p["attprojb"][l])
        m = F.layer_norm(h, (C,), p["ln2w"][l], p["ln2b"][l], cpu.LAYERNORM_EPS)
        m = F.gelu(F.linear(m, p["fcw"][l], p["fcb"][l]), approximate="tanh")
        h = h + F.linear(m, p["fcprojw"][l], p["fcprojb"][l])
    logits = (F.layer_norm(h, (C,), p["lnfw"], p["lnfb"], cpu.LAYERNORM_EPS) @ p["wte"].T)[:, :, :V]
    return logits, F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def test_model_forward_and_every_gradient_match_torch_float64():
    rng = np.random.default_rng(6)
    B, T = 3, 11
    x, y = rng.integers(0, SMALL.vocab_size, (2, B, T))
    flat = random_params(SMALL, seed=7)
    flat_t = torch.tensor(flat, requires_grad=True)
    ref_logits, ref_loss = torch_gpt2_loss(SMALL, flat_t, torch.from_numpy(x), torch.from_numpy(y))
    ref_loss.backward()

    model = cpu.GPT2(SMALL, flat.copy())
    loss = model.forward(x, y)
    assert abs(loss - ref_loss.item()) <= RTOL64 * ref_loss.item()
    logits = model.acts.logits.reshape(B, T, -1)[:, :, :SMALL.vocab_size]
    assert_close(logits, ref_logits.detach().numpy(), name="logits")
    model.grads[:] = np.nan  # every gradient must be written by the backward
    model.backward()
    ours, ref = split_params(SMALL, model.grads), split_params(SMALL, flat_t.grad.numpy())
    for name in ours:
        assert_close(ours[name], ref[name], name=name)


def test_repeated_steps_reuse_buffers_without_stale_values():
    """A second forward and backward on the same buffers gives bit-identical results: nothing accumulates
    across steps (the gradient buffer is never zeroed)."""
    rng = np.random.default_rng(8)
    x, y = rng.integers(0, SMALL.vocab_size, (2, 2, 8))
    model = cpu.GPT2(SMALL, random_params(SMALL, seed=9, dtype=np.float32))
    first_loss = model.forward(x, y)
    model.backward()
    first_grads = model.grads.copy()
    model.forward(*rng.integers(0, SMALL.vocab_size, (2, 2, 8)))  # another batch in between
    model.backward()
    assert model.forward(x, y) == first_loss
    model.backward()
    np.testing.assert_array_equal(model.grads, first_grads)


def test_adamw_matches_torch_adamw_float64():
    """Three steps with weight decay on the 2-D tensors only, in chunks smaller than the tensors so that chunks
    cross tensor boundaries inside each decay group."""
    rng = np.random.default_rng(10)
    hyper = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    params = random_params(SMALL, seed=11)
    grads = [rng.standard_normal(params.shape) for _ in range(3)]
    chunks = cpu.adamw_chunks(SMALL, chunk=1000)

    ref_params = {name: torch.tensor(view) for name, view in split_params(SMALL, params.copy()).items()}
    decayed = set(decayed_param_names())
    optimizer = torch.optim.AdamW(
        [{"params": [t for n, t in ref_params.items() if n in decayed], "weight_decay": hyper["weight_decay"]},
         {"params": [t for n, t in ref_params.items() if n not in decayed], "weight_decay": 0.0}],
        lr=hyper["learning_rate"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"])
    m, v = np.zeros_like(params), np.zeros_like(params)
    for step, g in enumerate(grads, start=1):
        for name, view in split_params(SMALL, g).items():
            ref_params[name].grad = torch.tensor(view)
        optimizer.step()
        cpu.adamw_update(params, g, m, v, chunks, **hyper, step=step)
    for name, view in split_params(SMALL, params).items():
        assert_close(view, ref_params[name].numpy(), name=name)


def test_adamw_chunks_cover_the_buffer_once_with_the_right_decay():
    config = config_from_descriptor("tiny")
    decay = np.full(cpu.num_parameters(config), -1)
    for lo, hi, decayed in cpu.adamw_chunks(config):
        assert hi - lo <= cpu.ADAMW_CHUNK and np.all(decay[lo:hi] == -1)
        decay[lo:hi] = decayed
    for name, view in split_params(config, decay).items():
        assert np.all(view == (name in decayed_param_names())), name


def test_model_descriptor_gives_gpt2s_random_init():
    config, flat = cpu.load_model("d2c128h4", seed=0)
    assert config == config_from_descriptor("d2c128h4")
    params = split_params(config, flat)
    V = config.vocab_size
    for name, std in (("wte", 0.02), ("wpe", 0.02), ("qkvw", 0.02), ("fcw", 0.02),
                      ("attprojw", 0.02 / math.sqrt(4)), ("fcprojw", 0.02 / math.sqrt(4))):
        values = params[name][:V] if name == "wte" else params[name]
        assert abs(values.std() / std - 1) < 0.02 and abs(values.mean()) < 0.03 * std, name
    assert np.all(params["wte"][V:] == 0)
    for name in ("ln1w", "ln2w", "lnfw"):
        assert np.all(params[name] == 1), name
    for name in ("ln1b", "ln2b", "lnfb", "qkvb", "attprojb", "fcb", "fcprojb"):
        assert np.all(params[name] == 0), name
    np.testing.assert_array_equal(cpu.load_model("d2c128h4", seed=0)[1], flat)  # seeded


def test_a_descriptor_with_impossible_numbers_says_what_is_wrong():
    for descriptor, problem in (("d2c65h4", "65 channels are not divisible by 4 heads"),
                                ("d0c64h4", "layers, channels and heads must be positive"),
                                ("d7x", "unknown model descriptor 'd7x': use d12")):
        with pytest.raises(ValueError, match=problem):
            config_from_descriptor(descriptor)


def test_trainer_does_not_import_torch():
    code = "import sys, train_gpt2_cpu; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def run(script, *args, cwd=REPO):
    command = [sys.executable, str(REPO / script), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


def write_random_shard(path, num_tokens, seed):
    formats.write_shard(path, np.random.default_rng(seed).integers(0, 50257, num_tokens).astype(np.uint16))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_random_shard(folder / "train.bin", 20_000, seed=0)
    write_random_shard(folder / "val.bin", 5_000, seed=1)
    return folder


def write_reference(folder, descriptor, shards):
    result = run("train_gpt2_torch.py", "--model", descriptor, "--device", "cpu", "--write_tensors", "1",
                 "--write_dir", folder, "--input_bin", shards / "train.bin")
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory, shards, tiktoken_file):
    return write_reference(tmp_path_factory.mktemp("tiny_reference"), "tiny", shards)


def assert_match(folder, descriptor):
    result = run("test_gpt2_cpu.py", "--model", descriptor, "--dir", folder)
    assert result.returncode == 0 and result.stdout.endswith("overall okay: 1\n"), result.stdout + result.stderr
    assert "NOT OK" not in result.stdout
    lines = result.stdout.splitlines()
    # one line each: logits, loss, the 16 gradient tensors, 10 step losses
    assert sum(line.endswith(" OK") for line in lines) == 2 + 16 + 10


def test_match_tiny(tiny_reference):
    assert_match(tiny_reference, "tiny")


def test_match_d12(tmp_path, shards, tiktoken_file):
    assert_match(write_reference(tmp_path, "d12", shards), "d12")
    for path in tmp_path.iterdir():  # 1.3 GB of reference files: pytest would keep them around
        path.unlink()


def test_match_fails_on_a_perturbed_gradient(tiny_reference, tmp_path):
    prefix = file_prefix("tiny")
    for suffix in (".bin", "_debug_losses.json"):
        shutil.copy(tiny_reference / f"{prefix}{suffix}", tmp_path)
    config, _ = formats.read_model(tiny_reference / f"{prefix}.bin")
    state = formats.read_debug_state(tiny_reference / f"{prefix}_debug_state.bin", config)
    qkvw_grad = split_params(config, state.grads)["qkvw"]
    qkvw_grad[1, 5, 7] += 1e-4 * np.abs(qkvw_grad).max()  # 10x the tolerance, in one element of one tensor
    formats.write_debug_state(tmp_path / f"{prefix}_debug_state.bin", config, state.x, state.y, state.logits,
                              state.loss, state.grads)

    result = run("test_gpt2_cpu.py", "--model", "tiny", "--dir", tmp_path)
    assert result.returncode != 0 and result.stdout.endswith("overall okay: 0\n"), result.stdout
    not_ok = [line.split()[0] for line in result.stdout.splitlines() if line.endswith("NOT OK")]
    assert not_ok == ["qkvw"]


def test_match_without_reference_files_says_how_to_make_them(tmp_path):
    result = run("test_gpt2_cpu.py", "--dir", tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "python train_gpt2_torch.py --model d12 --device cpu --write_tensors 1" in result.stderr


def write_stale_losses(tiny_reference, folder, change):
    """A copy of the tiny reference files whose losses file is changed as if written by another run."""
    prefix = file_prefix("tiny")
    for suffix in (".bin", "_debug_state.bin"):
        shutil.copy(tiny_reference / f"{prefix}{suffix}", folder)
    losses = json.loads((tiny_reference / f"{prefix}_debug_losses.json").read_text())
    change(losses)
    (folder / f"{prefix}_debug_losses.json").write_text(json.dumps(losses))
    return folder / f"{prefix}_debug_losses.json"


STALE_LOSSES = {  # what another run would have written -> what the one line says
    "other B and T": (lambda losses: losses.update(B=2, T=32), "is for model tiny, B=2, T=32, but "),
    "other model": (lambda losses: losses.update(model="d2c128h4"), "gpt2_tiny.bin holds another model"),
    "other batch": (lambda losses: losses.update(losses=[9.5] + losses["losses"][1:]),
                    "its first loss 9.500000 is not the debug state's"),
}


@pytest.mark.parametrize("script", ["test_gpt2_cpu.py", "test_gpt2.py"])
@pytest.mark.parametrize("case", STALE_LOSSES)
def test_match_with_a_losses_file_of_another_run_says_to_rerun_the_reference(tiny_reference, tmp_path, script, case):
    """The losses file is written last, after 10 steps: a reference run stopped before then leaves an older one
    beside its debug state. Compared with each other they would report mismatches: the files must be refused."""
    change, mention = STALE_LOSSES[case]
    losses_file = write_stale_losses(tiny_reference, tmp_path, change)
    result = run(script, "--model", "tiny", "--dir", tmp_path)  # test_gpt2.py reads the files before the GPU
    assert result.returncode == 1 and result.stdout == "", result.stdout  # no tensor compared
    assert result.stderr.startswith(f"{script}: error: {losses_file}: ") and result.stderr.count("\n") == 1
    assert mention in result.stderr and "rerun `python train_gpt2_torch.py --model tiny " in result.stderr
    assert f"--write_tensors 1 --write_dir {tmp_path}`" in result.stderr, result.stderr


def test_short_training_run_validates_samples_and_decodes(shards, tiny_reference):
    result = run("train_gpt2_cpu.py", "--model", "tiny", "-i", shards / "train.bin", "-j", shards / "val.bin",
                 "--tokenizer", tiny_reference / "gpt2_tokenizer.bin", "-b", 2, "-t", 16, "-x", 4, "-v", 2, "-m", 2,
                 "-s", 2, "-g", 8)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    steps = [line.split(":")[0] for line in out.splitlines() if line.startswith("step ")]
    assert steps == [f"step {i}/4" for i in range(1, 5)]
    assert out.count("val loss ") == 3 and out.count("generating:") == 2  # val at 0, 2, 4; samples at 2, 4
    losses = [float(line.split("train loss ")[1].split()[0]) for line in out.splitlines() if "train loss" in line]
    assert all(math.isfinite(loss) and 0 < loss < 20 for loss in losses)


def test_missing_tokenizer_prints_token_ids(shards, tmp_path):
    result = run("train_gpt2_cpu.py", "--model", "tiny", "-i", shards / "train.bin", "-j", shards / "val.bin",
                 "--tokenizer", tmp_path / "none.bin", "-b", 1, "-t", 8, "-x", 1, "-v", 0, "-s", 1, "-g", 4)
    assert result.returncode == 0, result.stderr
    assert "note: no tokenizer" in result.stdout
    sample = result.stdout.split("---\n")[1].split()
    assert len(sample) == 3 and all(0 <= int(t) < 50257 for t in sample)


def test_zero_steps_evaluates_and_samples_without_training(shards, tiny_reference):
    result = run("train_gpt2_cpu.py", "--model", "tiny", "-i", shards / "train.bin", "-j", shards / "val.bin",
                 "--tokenizer", tiny_reference / "gpt2_tokenizer.bin", "-b", 2, "-t", 16, "-x", 0, "-v", 5, "-m", 2,
                 "-s", 5, "-g", 8)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("val loss ") == 1 and result.stdout.count("generating:") == 1, result.stdout
    assert "train loss" not in result.stdout


def test_a_batch_too_large_for_the_memory_says_to_use_a_smaller_one(tmp_path):
    """-b 100000 -t 64 needs 1.2 TiB for the logits alone: NumPy's MemoryError becomes one line."""
    formats.write_shard(tmp_path / "train.bin", np.zeros(100_000 * 64 + 1, dtype=np.uint16))
    result = run("train_gpt2_cpu.py", "--model", "tiny", "-i", tmp_path / "train.bin", "-b", 100_000, "-t", 64,
                 "-x", 1, "-v", 0, "-s", 0)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("train_gpt2_cpu.py: error: out of memory (Unable to allocate "), result.stderr
    assert result.stderr.endswith("use a smaller -b/--batch_size than 100000\n")


def bad_input_cases(tmp_path, shards):
    """(flags, what the one error line must mention)."""
    good = ["-i", shards / "train.bin", "-j", shards / "val.bin", "-x", 1, "-v", 0, "-s", 0]
    model = tmp_path / "model.bin"
    config = config_from_descriptor("tiny")
    formats.write_model(model, config, gpt2_init(config, seed=0))
    truncated, wrong_magic = tmp_path / "truncated.bin", tmp_path / "wrong_magic.bin"
    truncated.write_bytes(model.read_bytes()[:-4])
    wrong_magic.write_bytes(b"\0" * 4 + model.read_bytes()[4:])
    write_random_shard(tmp_path / "small.bin", 100, seed=2)
    return {
        "missing model": (["--model", tmp_path / "nope.bin", *good], "nope.bin: file not found"),
        "truncated model": (["--model", truncated, *good], "truncated"),
        "wrong magic": (["--model", wrong_magic, *good], "bad magic"),
        "T > max_seq_len": (["--model", model, *good, "-t", 2048], "max_seq_len"),
        "batch larger than the data": (["--model", model, *good, "-i", tmp_path / "small.bin"], "small.bin"),
        "missing val shards": (["--model", model, *good, "-v", 1, "-j", tmp_path / "nope_val.bin"], "nope_val.bin"),
        "impossible descriptor": (["--model", "d2c65h4", *good],
                                  "-e/--model: model descriptor 'd2c65h4': 65 channels are not divisible by 4 heads"),
    }


@pytest.mark.parametrize("case", ["missing model", "truncated model", "wrong magic", "T > max_seq_len",
                                  "batch larger than the data", "missing val shards", "impossible descriptor"])
def test_bad_input_gives_one_line_and_exit_1(case, tmp_path, shards):
    flags, mention = bad_input_cases(tmp_path, shards)[case]
    result = run("train_gpt2_cpu.py", *flags)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("train_gpt2_cpu.py: error: "), result.stderr
    assert mention in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("flags, mention", [(["-b", "0"], "--batch_size must be at least 1"),
                                            (["-t", "x"], "invalid int value: 'x'"),
                                            (["-l", "-1"], "--learning_rate > 0"),
                                            (["-l", "inf"], "--learning_rate must be a finite number, got inf"),
                                            (["-l", "nan"], "--learning_rate must be a finite number, got nan"),
                                            (["-c", "inf"], "--weight_decay must be a finite number, got inf"),
                                            (["--eps", "inf"], "--eps must be a finite number, got inf"),
                                            (["--beta1", "nan"], "--beta1 must be a finite number, got nan"),
                                            (["--beta2=-inf"], "--beta2 must be a finite number, got -inf")])
def test_bad_flag_gives_one_line_and_exit_2(flags, mention):
    result = run("train_gpt2_cpu.py", *flags)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and mention in result.stderr, result.stderr
