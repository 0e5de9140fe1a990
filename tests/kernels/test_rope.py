"""RoPE kernels against a float64 rotation of the same inputs and table values, and against the reference trainer.

The reference turns pair (2i, 2i+1) of every query and key head at position t by (cos[t, i], sin[t, i]) in float64,
from the kernel's own inputs and the fp32 tables of llmpy.configs.llama3.rope_tables (with and without Llama 3.1's
scaling); the backward's reference turns by the opposite angle (sin negated). With r the pair's norm, the kernel's
fp32 result (even * cos - odd * sin: two products and a difference, or an FMA and a product) is off by at most
2^-23 r (two roundings of size <= r each, 2^-24 relative).
fp32: rtol 1e-6, atol 1e-6. Inputs are N(0, 1): the largest pair norm among the 3,600 to 57,600 pairs of a case is
under 5, so the error is under 2^-23 * 5 = 6e-7 < atol (observed: at most 2.7e-7, 0.98 of the bound); atol is needed
because cancellation can leave an output much smaller than its pair. A wrong sign, pair or table row is off by O(1).
bf16: inputs in bf16, the reference computed in float64 from those same inputs; the kernel rounds its fp32 result to
bf16 once, which is off by at most 2^-8 relative (half a bf16 ulp), so rtol 2^-8 * 1.01 (1% for the fp32 math before
the rounding) and the fp32 case's atol 1e-6 for outputs that cancel.
The value heads must come back bit for bit (they are neither read nor written), and so must position 0 (angle 0:
cos 1, sin 0 exactly).
Round trip: backward(forward(x)) is x up to the roundings and to cos^2 + sin^2 - 1 (~2^-23 in the tables): an
elementwise bound proportional to the pair's norm, derived at round_trip_bound.
Gradient: the backward is the transpose of the forward, <rope(x), dout> = <x, rope_backward(dout)> in float64,
checked in fp32 within the sum of the two sides' rounding bounds (2^-23 r per element, times |the other operand|).
Sizes: T = 150 is not a multiple of any token block (64, 16, 8 tokens at hs 16, 64, 128; 128 at hs 6,
which pads its 3 pairs to 4).
"""

import dataclasses

import pytest
import torch

import train_llama3_torch
from llmpy.kernels.rope import rope_backward, rope_forward
from llmpy.configs import llama3

FP32_TOLERANCE = dict(rtol=1e-6, atol=1e-6)
BF16_TOLERANCE = dict(rtol=2**-8 * 1.01, atol=1e-6)
U = 2**-24  # fp32's unit roundoff
B, T = 2, 150

TINY = llama3.DESCRIPTORS["tiny"]  # NH 4, KV 2, hs 16
CONFIGS = {
    "hs16": TINY,
    "hs16-unscaled": dataclasses.replace(TINY, use_scaled_rope=False),
    "hs64": dataclasses.replace(TINY, num_heads=2, num_kv_heads=1, channels=128),  # Llama 3.2 1B's head size
    "hs128": dataclasses.replace(TINY, num_heads=2, num_kv_heads=1, channels=256, use_scaled_rope=False),  # 8B's
    "hs6": dataclasses.replace(TINY, num_heads=2, num_kv_heads=2, channels=12),  # no grouping; 3 pairs
}


def tables(config, T_max, device, strided=False):
    """cos, sin fp32 (T_max, hs/2) on device; strided: the two halves of one (T_max, hs) tensor (row stride hs)."""
    cos, sin = (torch.from_numpy(table) for table in llama3.rope_tables(config, T_max))
    if strided:
        both = torch.cat((cos, sin), dim=1).to(device)
        return both[:, :cos.shape[1]], both[:, cos.shape[1]:]
    return cos.to(device), sin.to(device)


def random_qkv(config, B, T, device, dtype, seed, padding=0):
    """N(0, 1) qkv (B, T, (NH + 2 KV) hs); padding > 0: a view of a wider buffer, row stride width + padding."""
    generator = torch.Generator().manual_seed(seed)
    buffer = torch.randn(B, T, config.qkv_channels + padding, generator=generator).to(device=device, dtype=dtype)
    return buffer[..., :config.qkv_channels], buffer


def reference_rope(qkv, cos, sin, NH, KV, inverse=False):
    """qkv with its NH + KV query and key heads turned by positions' angles (opposite angles if inverse), float64."""
    T, half = qkv.shape[1], cos.shape[1]
    out = qkv.to(torch.float64, copy=True).contiguous()
    pairs = out[..., :(NH + KV) * 2 * half].unflatten(-1, (NH + KV, half, 2))  # a view of out
    even, odd = pairs[..., 0].clone(), pairs[..., 1].clone()
    c, s = cos[:T, None, :].double(), sin[:T, None, :].double()  # (T, 1, hs/2): the same angles for every head
    if inverse:
        s = -s
    pairs[..., 0] = even * c - odd * s
    pairs[..., 1] = even * s + odd * c
    return out


def pair_norms(x, heads, half):
    """Each element's pair's norm sqrt(even^2 + odd^2), float64, for the first `heads` heads of x."""
    pairs = x[..., :heads * 2 * half].double().unflatten(-1, (heads, half, 2))
    return pairs.norm(dim=-1, keepdim=True).expand(pairs.shape).flatten(-3)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, FP32_TOLERANCE), (torch.bfloat16, BF16_TOLERANCE)])
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_float64_rotation(device, name, dtype, tolerance, inverse):
    config = CONFIGS[name]
    NH, KV, hs = config.num_heads, config.num_kv_heads, config.head_size
    cos, sin = tables(config, T + 7, device)  # more rows than positions: only the first T are read
    qkv, _ = random_qkv(config, B, T, device, dtype, seed=len(name))
    x = qkv.clone()
    expected = reference_rope(x, cos, sin, NH, KV, inverse)

    (rope_backward if inverse else rope_forward)(qkv, cos, sin, NH, KV)

    turned = (NH + KV) * hs
    assert qkv.dtype == dtype
    torch.testing.assert_close(qkv[..., :turned].double(), expected[..., :turned], **tolerance)
    assert torch.equal(qkv[..., turned:], x[..., turned:])  # the value heads, bit for bit
    assert torch.equal(qkv[:, 0], x[:, 0])  # position 0 turns by angle 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_as_the_reference_trainers_rotate(device, dtype):
    """train_llama3_torch.rotate on the q and k views of the same qkv: it too computes in fp32 and rounds once, so
    the only difference is a contracted FMA on the GPU (one fp32 rounding, 2^-24 r): fp32 within FP32_TOLERANCE, bf16
    within one bf16 ulp (2^-7 relative) where that changes the rounding."""
    config = TINY
    NH, KV, hs = config.num_heads, config.num_kv_heads, config.head_size
    cos, sin = tables(config, T, device)
    qkv, _ = random_qkv(config, B, T, device, dtype, seed=7)
    q, k, _ = qkv.split((NH * hs, KV * hs, KV * hs), dim=-1)
    expected_q = train_llama3_torch.rotate(q.view(B, T, NH, hs), cos, sin).view(B, T, NH * hs)
    expected_k = train_llama3_torch.rotate(k.view(B, T, KV, hs), cos, sin).view(B, T, KV * hs)

    rope_forward(qkv, cos, sin, NH, KV)

    tolerance = FP32_TOLERANCE if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(q, expected_q, **tolerance)  # q, k: views of qkv, turned in place
    torch.testing.assert_close(k, expected_k, **tolerance)


def round_trip_bound(x, cos, sin, heads, half, dtype):
    """How far backward(forward(x)) may be from x, elementwise, with r the pair's norm.
    fp32: forward's error <= 2u r per element, a vector of norm <= 2 sqrt(2) u r that the backward's turn carries
    over (norm ~1); the backward adds its own 2u r; and the turn back of the table's exact values scales x by
    cos^2 + sin^2, off 1 by eps: (2 sqrt(2) + 2) u r + eps |x| <= (5u + eps) r.
    bf16: the forward's rounding, a vector of norm <= 2^-8 r carried over, plus the backward's, 2^-8 |x'| <= 2^-8 r
    (1 + 2^-8); the fp32 terms are 2^-16 of these: 2^-7 r with 1% to spare."""
    r = pair_norms(x, heads, half)
    if dtype == torch.bfloat16:
        return 2**-7 * 1.01 * r
    eps = (cos.double() ** 2 + sin.double() ** 2 - 1).abs().max().item()
    return (5 * U + eps) * 1.01 * r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["hs16", "hs128"])
def test_backward_undoes_forward(device, name, dtype):
    """B = 1, qkv a view with 5 columns of padding per token (a row stride wider than the row) and the tables two
    column halves of one tensor (row stride hs): the padding and the value heads stay as they were, bit for bit."""
    config = CONFIGS[name]
    NH, KV, hs = config.num_heads, config.num_kv_heads, config.head_size
    cos, sin = tables(config, T, device, strided=True)
    qkv, buffer = random_qkv(config, 1, T, device, dtype, seed=3, padding=5)
    x = buffer.clone()

    rope_forward(qkv, cos, sin, NH, KV)
    assert not torch.equal(buffer, x)
    rope_backward(qkv, cos, sin, NH, KV)

    turned = (NH + KV) * hs
    error = (buffer[..., :turned].double() - x[..., :turned].double()).abs()
    assert (error <= round_trip_bound(x, cos, sin, NH + KV, hs // 2, dtype)).all()
    assert torch.equal(buffer[..., turned:], x[..., turned:])


@pytest.mark.parametrize("name", ["hs16", "hs64"])
def test_backward_is_the_transpose_of_forward(device, name):
    """<rope(x), dout> = <x, rope_backward(dout)>: for the table's rotation R (whatever cos^2 + sin^2 is) the
    backward's R^T is exactly the transpose, so the two float64 sums differ only by the kernels' fp32 roundings,
    <= 2u r per output element times |the other operand| (products of fp32 values are exact in float64). The same
    sum with rope_forward in the backward's place misses by orders of magnitude more: the check can tell them apart."""
    config = CONFIGS[name]
    NH, KV, half = config.num_heads, config.num_kv_heads, config.head_size // 2
    cos, sin = tables(config, T, device)
    x, _ = random_qkv(config, B, T, device, torch.float32, seed=11)
    dout, _ = random_qkv(config, B, T, device, torch.float32, seed=12)
    out, dinp, wrong = x.clone(), dout.clone(), dout.clone()

    rope_forward(out, cos, sin, NH, KV)
    rope_backward(dinp, cos, sin, NH, KV)
    rope_forward(wrong, cos, sin, NH, KV)

    turned = (NH + KV) * 2 * half
    forward_side = (out.double() * dout.double()).sum().item()
    backward_side = (x.double() * dinp.double()).sum().item()
    bound = 2 * U * 1.01 * ((pair_norms(x, NH + KV, half) * dout[..., :turned].double().abs()).sum()
                            + (pair_norms(dout, NH + KV, half) * x[..., :turned].double().abs()).sum()).item()
    assert abs(forward_side - backward_side) <= bound
    assert abs(forward_side - (x.double() * wrong.double()).sum().item()) > 100 * bound


def test_empty_sequence_is_a_no_op(device):
    qkv = torch.empty(2, 0, TINY.qkv_channels, device=device)
    cos, sin = tables(TINY, 4, device)
    rope_forward(qkv, cos, sin, TINY.num_heads, TINY.num_kv_heads)


def test_bad_arguments_raise(device):
    NH, KV = TINY.num_heads, TINY.num_kv_heads
    cos, sin = tables(TINY, T, device)
    qkv, _ = random_qkv(TINY, 1, T, device, torch.float32, seed=0)
    with pytest.raises(ValueError, match="rope_forward: qkv must be"):
        rope_forward(qkv[0], cos, sin, NH, KV)  # 2-D
    with pytest.raises(ValueError, match="rope_backward: qkv must be"):
        rope_backward(qkv.half(), cos, sin, NH, KV)
    with pytest.raises(ValueError, match="qkv must be"):
        rope_forward(qkv.transpose(1, 2).contiguous().transpose(1, 2), cos, sin, NH, KV)  # channel stride T
    with pytest.raises(ValueError, match="cos must be float32"):
        rope_forward(qkv, cos.double(), sin, NH, KV)
    with pytest.raises(ValueError, match="sin must be float32"):
        rope_forward(qkv, cos, sin[:, :-1], NH, KV)
    with pytest.raises(ValueError, match="cos must be float32"):
        rope_forward(qkv, cos.t().contiguous().t(), sin, NH, KV)  # column stride T
    with pytest.raises(ValueError, match=f"the tables have {T - 1} rows"):
        rope_forward(qkv, cos[:-1], sin[:-1], NH, KV)
    with pytest.raises(ValueError, match="last dim 128 must be"):
        rope_forward(qkv, cos, sin, NH, KV + 1)
    with pytest.raises(ValueError, match="last dim 128 must be"):
        rope_forward(qkv, cos, sin, NH, 0)
