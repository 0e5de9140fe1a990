"""Generation: the decode attention kernel (llmpy/kernels/decode_attention.py) and the sampling (llmpy/sampling.py).
Without a GPU the kernel runs on CPU tensors under Triton's interpreter.

Specifications:
(a) decode_attention equals attention written out in float64 over [cached keys, the new key], for cache lengths 0 to
    past several blocks (the interpreter's block is 16 keys: 15, 16, 17, 40 end in partial and full blocks), writes
    the new key and value at position t of the cache and leaves every other position as it was.
(d) Sampling: a seed reproduces its tokens; top_k = 1 is greedy; the temperature divides the logits; top-k keeps the
    k most probable; top-p keeps the smallest set of most probable tokens whose probability reaches p; draws follow
    the distribution; the blocked running sum of pick chooses as a plain one does.

Tolerances: fp32, sums in another order than float64's: measured 2e-7 on outputs of size ~1; stated 1e-5 absolute.
bf16 (the reference computed from the same bf16 inputs): the output's rounding to bf16, 2^-9 relative, and fp32
sums: rtol 2^-8, atol 1e-5. The sampler's probabilities are fp32 exponentials of logits up to ~10 in size (each
argument within 10 * 2^-24 of float64's): rtol 1e-5 against float64 (measured 2e-6).
"""

import math

import numpy as np
import pytest
import torch

from llmpy.kernels.decode_attention import decode_attention
from llmpy.sampling import Sampler, distribution, nucleus_size, pick

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 1e-5
PROBS_RTOL = 1e-5  # the sampler's exponentials are fp32 (module docstring)


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
