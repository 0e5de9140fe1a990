"""Generation: sample.py, the KV-cache model (llmpy/inference.py) and its decode attention kernel
(llmpy/kernels/decode_attention.py), the sampling (llmpy/sampling.py). Without a GPU the mainline's kernels run on
CPU tensors under Triton's interpreter, in fp32.

The model is GPT-2 d2c64h4 (2 layers, 4 heads of 16 channels, GPT-2's vocabulary), written with formats.write_model:
gpt2_init's seeded random weights with the matmul weights scaled up 10x, and random biases and layernorm parameters.
At gpt2_init's own scale a random model's layers barely move the residual stream: greedy decoding repeats one token
whatever came before, which a broken attention or cache would pass. Scaled, each token depends on the context, and
every bias (the key and value biases, which land in the cache, among them) takes part.

Specifications:
(a) decode_attention equals attention written out in float64 over [cached keys, the new key], for cache lengths 0 to
    past several blocks (the interpreter's block is 16 keys: 15, 16, 17, 40 end in partial and full blocks), writes
    the new key and value at position t of the cache and leaves every other position as it was.
(b) KV-cache generation equals full-forward generation: the mainline's training forward (llmpy.models.gpt2.GPT2) over the
    generated sequence gives, at every step's position, the logits the cache gave at that step; and since a causal
    forward's logits at position t depend on the tokens up to t only, greedy and sampled (same seed) full-forward
    generation would choose the cache's tokens: checked by choosing from the full forward's logits. Greedy for 20
    tokens; 3 sampled rows (each its own continuation of the prompt, in its own rows of the cache) for 12.
(c) The mainline's path (KV cache, interpreter, fp32) and sample.py's CPU path (train_gpt2_cpu.py's NumPy forward,
    a full forward per token) give the same tokens from the same prompt and seed, greedy and sampled, with logits
    within the tolerance.
(d) Sampling: a seed reproduces its tokens; top_k = 1 is greedy; the temperature divides the logits; top-k keeps the
    k most probable; top-p keeps the smallest set of most probable tokens whose probability reaches p; draws follow
    the distribution; the blocked running sum of pick chooses as a plain one does.
(e) Bad input to sample.py (a missing or non-GPT-2 model file, sampling flags out of range, more tokens than the
    model's max_seq_len, no GPU for --device cuda): one line on stderr naming the problem, a nonzero exit, no
    traceback.

Tolerances: the paths compute the same fp32 sums in other orders (flash attention's key blocks against the cache's,
a matmul over 24 rows against 1, PyTorch's CPU matmul against NumPy's BLAS): measured at most 8e-7 apart on logits
of size at most 0.9 (decode attention alone: 2e-7 on outputs of size ~1); stated 1e-5 absolute for both. The
smallest gap between a step's two most probable tokens is 7.5e-4, so 1e-5 cannot change a greedy choice. bf16 decode
attention (the reference computed from the same bf16 inputs): the output's rounding to bf16, 2^-9 relative, and fp32
sums: rtol 2^-8, atol 1e-5. The sampler's probabilities are fp32 exponentials of logits up to ~10 in size (each
argument within 10 * 2^-24 of float64's): rtol 1e-5 against float64 (measured 2e-6).
"""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmpy import formats
from llmpy.configs.gpt2 import GPT2Config, config_from_descriptor, gpt2_init, split_params
from llmpy.inference import KVCacheGPT2, full_forward_logits
from llmpy.kernels.decode_attention import decode_attention
from llmpy.sampling import Sampler, distribution, generate, nucleus_size, pick
from sample import encode_prompt, numpy_decoder

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = config_from_descriptor("d2c64h4")
PROMPT = [464, 3290, 318, 257, 1332]  # "The dog is a test"
ATOL = 1e-5
PROBS_RTOL = 1e-5  # the sampler's exponentials are fp32 (module docstring)


def layered_random_weights(config, seed):
    """gpt2_init's weights with the layers made to matter (the module's docstring)."""
    weights = gpt2_init(config, seed)
    views = split_params(config, weights)
    rng = np.random.default_rng(seed)
    for name in ("qkvw", "attprojw", "fcw", "fcprojw"):
        views[name] *= 10
    for name in ("ln1b", "qkvb", "attprojb", "ln2b", "fcb", "fcprojb", "lnfb"):
        views[name][...] = rng.normal(0, 0.1, views[name].shape)
    for name in ("ln1w", "ln2w", "lnfw"):
        views[name][...] = 1 + rng.normal(0, 0.1, views[name].shape)
    return weights


@pytest.fixture(scope="module")
def weights():
    return layered_random_weights(CONFIG, seed=2)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, weights):
    path = tmp_path_factory.mktemp("sample") / "tiny.bin"
    formats.write_model(path, CONFIG, weights)
    return path


def run_generation(decoder, rows, new_tokens, sampler):
    """(tokens (B, N), logits (N, B, V)) of a generation after PROMPT."""
    result = generate(decoder, PROMPT, new_tokens, sampler, keep_logits=True)
    assert result.tokens.shape == (rows, new_tokens)
    return result.tokens, result.logits


def kv_cache(weights, rows, new_tokens):
    return KVCacheGPT2(CONFIG, weights, rows, len(PROMPT) + new_tokens, dtype=torch.float32, device=DEVICE)


GREEDY = dict(rows=1, new_tokens=20, sampler=lambda: Sampler(temperature=0))
SAMPLED = dict(rows=3, new_tokens=12, sampler=lambda: Sampler(temperature=1.0, seed=5))


@pytest.fixture(scope="module")
def greedy_run(weights):
    return run_generation(kv_cache(weights, GREEDY["rows"], GREEDY["new_tokens"]), GREEDY["rows"],
                          GREEDY["new_tokens"], GREEDY["sampler"]())


@pytest.fixture(scope="module")
def sampled_run(weights):
    return run_generation(kv_cache(weights, SAMPLED["rows"], SAMPLED["new_tokens"]), SAMPLED["rows"],
                          SAMPLED["new_tokens"], SAMPLED["sampler"]())


# ----------------------------------------------------------------------------------------------- (a) decode attention


def reference_decode_attention(qkv, k_cache, v_cache, t, NH):
    """float64: each row's new query against its t cached keys and its own key. qkv (B, 3C) -> (B, C)."""
    B, three_C = qkv.shape
    HS = three_C // 3 // NH
    q, k, v = qkv.double().view(B, 3, NH, HS).unbind(1)  # (B, NH, HS) each
    keys = torch.cat([k_cache[:, :, :t].double(), k[:, :, None]], dim=2)  # (B, NH, t + 1, HS)
    values = torch.cat([v_cache[:, :, :t].double(), v[:, :, None]], dim=2)
    probs = torch.softmax((keys @ q[..., None])[..., 0] / math.sqrt(HS), dim=-1)  # (B, NH, t + 1)
    return (probs[..., None] * values).sum(dim=2).reshape(B, NH * HS)


@pytest.mark.parametrize("dtype, t", [(torch.float32, t) for t in (0, 1, 15, 16, 17, 40)]
                         + [(torch.bfloat16, t) for t in (17, 40)])
def test_decode_attention_matches_float64_reference(dtype, t):
    B, NH, HS, max_t = 2, 3, 16, 48
    generator = torch.Generator().manual_seed(100 + t)
    qkv = torch.randn(B, 3 * NH * HS, generator=generator).to(DEVICE, dtype)
    k_cache = torch.randn(B, NH, max_t, HS, generator=generator).to(DEVICE, dtype)
    v_cache = torch.randn(B, NH, max_t, HS, generator=generator).to(DEVICE, dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = torch.full((B, NH * HS), float("nan"), dtype=dtype, device=DEVICE)

    decode_attention(out, qkv, k_cache, v_cache, torch.tensor([t], dtype=torch.int32, device=DEVICE), NH)

    expected = reference_decode_attention(qkv, k_before, v_before, t, NH)
    rtol = 0 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=ATOL)
    _, k_new, v_new = qkv.view(B, 3, NH, HS).unbind(1)
    assert torch.equal(k_cache[:, :, t], k_new) and torch.equal(v_cache[:, :, t], v_new)
    others = [i for i in range(max_t) if i != t]
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others])
    assert torch.equal(v_cache[:, :, others], v_before[:, :, others])


def test_decode_attention_rejects_a_cache_of_another_head_size():
    qkv = torch.zeros(1, 3 * 64, device=DEVICE)
    cache = torch.zeros(1, 4, 8, 32, device=DEVICE)  # 4 heads of 16 in qkv, of 32 in the cache
    with pytest.raises(ValueError, match="k_cache must be"):
        decode_attention(torch.zeros(1, 64, device=DEVICE), qkv, cache, cache.clone(),
                         torch.zeros(1, dtype=torch.int32, device=DEVICE), 4)


# ------------------------------------------------------------------------------- (b) KV cache against full forward


@pytest.mark.parametrize("run, settings", [("greedy_run", GREEDY), ("sampled_run", SAMPLED)], ids=["greedy", "sampled"])
def test_kv_cache_equals_full_forward(request, weights, run, settings):
    tokens, logits = request.getfixturevalue(run)
    full = full_forward_logits(CONFIG, weights, PROMPT, tokens, dtype=torch.float32, device=DEVICE)
    np.testing.assert_allclose(logits, full, rtol=0, atol=ATOL)
    sampler = settings["sampler"]()  # the same choices from the full forward's logits, coin for coin
    assert np.array_equal(np.stack([sampler(step) for step in full], axis=1), tokens)


def test_generation_depends_on_the_context(greedy_run, sampled_run):
    """What makes (b) and (c) mean something: the greedy tokens vary, and the sampled rows differ from each other."""
    greedy, sampled = greedy_run[0], sampled_run[0]
    assert len(set(greedy[0].tolist())) >= 10
    assert len({tuple(row) for row in sampled.tolist()}) == 3


# -------------------------------------------------------------------------------- (c) mainline against NumPy path


@pytest.mark.parametrize("run, settings", [("greedy_run", GREEDY), ("sampled_run", SAMPLED)], ids=["greedy", "sampled"])
def test_mainline_equals_numpy_path(request, weights, run, settings):
    tokens, logits = request.getfixturevalue(run)
    rows, new_tokens = settings["rows"], settings["new_tokens"]
    numpy_tokens, numpy_logits = run_generation(numpy_decoder(CONFIG, weights, rows, len(PROMPT) + new_tokens), rows,
                                                new_tokens, settings["sampler"]())
    assert np.array_equal(numpy_tokens, tokens)
    np.testing.assert_allclose(logits, numpy_logits, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------------------------------- (d) sampling


def random_logits(rows=4, V=1000, seed=0):
    return (np.random.default_rng(seed).standard_normal((rows, V)) * 3).astype(np.float32)


def test_a_seed_reproduces_its_tokens():
    logits = random_logits()

    def draws(seed, **filters):
        sampler = Sampler(seed=seed, **filters)
        return [sampler(logits).tolist() for _ in range(5)]

    for filters in ({}, dict(temperature=0.8, top_k=100, top_p=0.9)):
        assert draws(1, **filters) == draws(1, **filters)
        assert draws(1, **filters) != draws(2, **filters)


def test_top_k_1_is_greedy():
    logits = random_logits()
    for temperature in (0.5, 1.0, 2.0):
        sampler = Sampler(temperature, top_k=1, seed=3)
        for _ in range(3):
            assert np.array_equal(sampler(logits), logits.argmax(axis=1))
    assert np.array_equal(Sampler(temperature=0)(logits), logits.argmax(axis=1))


def test_temperature_divides_the_logits():
    logits = random_logits(rows=1)[0]
    for temperature in (0.5, 1.0, 2.0):
        ids, probs = distribution(logits, temperature)
        expected = np.exp(logits.astype(np.float64) / temperature)
        assert np.array_equal(ids, np.arange(len(logits)))  # unfiltered: every token, in id order
        np.testing.assert_allclose(probs, expected / expected.sum(), rtol=PROBS_RTOL)


def test_top_k_keeps_the_k_most_probable():
    logits = random_logits(rows=1)[0]
    ids, probs = distribution(logits, 1.0, top_k=10)
    assert set(ids.tolist()) == set(np.argsort(logits)[-10:].tolist())
    assert np.all(np.diff(probs) <= 0) and math.isclose(probs.sum(), 1.0)
    expected = np.exp(logits[ids].astype(np.float64))
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=PROBS_RTOL)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # exact binary fractions: "reaches" means the kept probabilities add up to p or more
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    assert [nucleus_size(probs, p) for p in (0.25, 0.5, 0.5001, 0.75, 0.875, 0.9, 1.0)] == [1, 1, 2, 2, 3, 4, 5]
    # through the logits of a hand-made distribution, in another order than the ids
    logits = np.log(np.array([0.15, 0.5, 0.05, 0.3], dtype=np.float32))
    for top_p, kept in ((0.4, [1]), (0.75, [1, 3]), (0.85, [1, 3, 0]), (1.0, [0, 1, 2, 3])):
        ids, probs = distribution(logits, 1.0, top_p=top_p)
        assert ids.tolist() == kept, top_p
        expected = np.array([0.15, 0.5, 0.05, 0.3])[kept]
        np.testing.assert_allclose(probs, expected / expected.sum(), rtol=PROBS_RTOL)


def test_draws_follow_the_distribution():
    """4000 draws from (0.5, 0.3, 0.15, 0.05): each frequency within 0.03 of its probability (over 5 standard
    deviations for 4000 draws)."""
    sampler = Sampler(seed=11)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    counts = np.bincount([sampler(logits)[0] for _ in range(4000)], minlength=4)
    np.testing.assert_allclose(counts / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_pick_chooses_as_a_plain_running_sum():
    rng = np.random.default_rng(4)
    probs = rng.random(50257) ** 8  # uneven, so some blocks of 1024 hold most of the mass
    probs /= probs.sum()
    ids = rng.permutation(50257)
    cdf = np.cumsum(probs)
    for coin in list(rng.random(500)) + [0.0, 1 - 2 ** -24]:
        plain = ids[min(int(np.searchsorted(cdf, coin * cdf[-1], side="right")), len(ids) - 1)]
        assert pick(ids, probs, coin) == plain


# ------------------------------------------------------------------------------------------------------ sample.py


def run_sample(*args):
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_prompt_encoding(tiktoken_file):
    from llmpy.tokenizer import gpt2_encoding

    encoding = gpt2_encoding(tiktoken_file)
    assert encode_prompt(encoding, "") == [50256]  # llm.c's start
    assert encode_prompt(encoding, "The dog is a test") == PROMPT
    assert encode_prompt(encoding, "<|endoftext|>Hi") == [50256, 17250]


def test_cpu_run_prints_the_samples(model_file, tiktoken_file, tmp_path):
    args = ["-e", model_file, "--device", "cpu", "--prompt", "The dog is a test", "--num_samples", 2,
            "--max_new_tokens", 6, "--seed", 3, "--top_k", 40]
    first, again = run_sample(*args), run_sample(*args)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    samples = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("--- sample ")]
    assert len(samples) == 2 and all(s.startswith("The dog is a test") for s in samples)
    assert samples[0] != samples[1]
    assert "tokens/s" in lines[-1]
    assert first.stdout.splitlines()[:-1] == again.stdout.splitlines()[:-1]  # all but the timing line
    bf16_file = tmp_path / "tiny_bf16.bin"  # a bf16 model file runs too
    formats.write_model(bf16_file, *formats.read_model(model_file), dtype="bfloat16")
    assert run_sample("-e", bf16_file, "--device", "cpu", "--max_new_tokens", 3).returncode == 0


def test_help():
    proc = run_sample("--help")
    assert proc.returncode == 0 and "--top_p" in proc.stdout and "--max_new_tokens" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--temperature", -1], "--temperature must be >= 0"),
    (["--top_k", -5], "--top_k must be >= 0"),
    (["--top_p", 0], "--top_p must be in (0, 1]"),
    (["--top_p", 1.5], "--top_p must be in (0, 1]"),
    (["--num_samples", 0], "--num_samples must be at least 1"),
    (["--max_new_tokens", 1100, "--prompt", "Hi"], "--max_new_tokens 1100: with the prompt's 1 tokens that is 1101, "
                                                   "more than the model's max_seq_len 1024"),
])
def test_bad_flags_are_one_line(model_file, tiktoken_file, args, message):
    proc = run_sample("-e", model_file, "--device", "cpu", *args)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_bad_model_files_are_one_line(tmp_path):
    missing = run_sample("-e", tmp_path / "missing.bin", "--device", "cpu")
    assert missing.returncode != 0
    assert missing.stderr == f"sample.py: error: {tmp_path / 'missing.bin'}: file not found\n"
    small = GPT2Config(max_seq_len=32, vocab_size=500, padded_vocab_size=512, num_layers=1, num_heads=4, channels=64)
    formats.write_model(tmp_path / "small.bin", small, gpt2_init(small, 0))
    other = run_sample("-e", tmp_path / "small.bin", "--device", "cpu")
    assert other.returncode != 0 and other.stderr.count("\n") == 1
    assert "a vocabulary of 500 tokens, not GPT-2's 50257" in other.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_no_gpu_is_one_line(model_file, tiktoken_file):
    proc = run_sample("-e", model_file, "--device", "cuda")
    assert proc.returncode != 0 and proc.stderr == ("sample.py: error: --device cuda: no CUDA GPU is available "
                                                    "(--device cpu runs the NumPy forward)\n")
