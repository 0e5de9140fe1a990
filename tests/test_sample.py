"""Generation: the decode attention kernel (llmpy/kernels/decode_attention.py). Without a GPU it runs on CPU tensors
under Triton's interpreter.

Specifications:
(a) decode_attention equals attention written out in float64 over [cached keys, the new key], for cache lengths 0 to
    past several blocks (the interpreter's block is 16 keys: 15, 16, 17, 40 end in partial and full blocks), writes
    the new key and value at position t of the cache and leaves every other position as it was.

Tolerances: fp32, sums in another order than float64's: measured 2e-7 on outputs of size ~1; stated 1e-5 absolute.
bf16 (the reference computed from the same bf16 inputs): the output's rounding to bf16, 2^-9 relative, and fp32
sums: rtol 2^-8, atol 1e-5.
"""

import math

import pytest
import torch

from llmpy.kernels.decode_attention import decode_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 1e-5


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
