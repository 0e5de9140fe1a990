"""FP8 matmuls on cuBLASLt (llmpy.vendor.matmul_fp8) against float64 products of the same FP8 values. GPU only.

The operands are cast to FP8 by our kernel (llmpy.kernels.fp8, tested bit-exact against torch) with power-of-two
scales, and the reference multiplies exactly those FP8 values in float64, times the inverse scales. So what is
measured is the matmul alone: its products of FP8 values are exact in fp32, its sums are fp32 (promoted from the
tensor cores' accumulator every few steps of K unless fast_accum), and its output rounds once. Tolerances, per
tensor, ||got - ref|| / ||ref||:
  bf16 outputs: one rounding to bf16 (at most 2^-9 relative, ~2^-10 in norm): 2^-8, as for the bf16 matmuls
        (tests/kernels/test_matmul.py); with fast_accum the tensor cores' own accumulator (about 14 mantissa bits
        kept, the products' sum over K = 768 terms): 2^-7. GELU's approximate tanh: within 2^-8 too.
  fp32 outputs (weight gradients): the sums are not fp32 throughout: Hopper's FP8 tensor cores add in an
        accumulator of about 14 mantissa bits between cuBLASLt's promotions to fp32, and the H200 measured 9.7e-5
        over K = 320 terms. Tolerance 2^-10 (1e-3): far below FP8's own rounding (2^-4 .. 2^-3 per operand), far
        above fp32's ~1e-7.
A wrong scale is off by a power of two (>= 50%), a wrong layout by ~100%.
Shapes are GPT-2 d12's C = 768 with N = 320 rows (FP8 needs K, the leading dimensions, a multiple of 16).
"""

import pytest
import torch

from llmpy import vendor
from llmpy.kernels import fp8

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt needs a GPU")

C, N = 768, 320
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def randn(*shape, dtype=torch.bfloat16, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to("cuda", dtype)


def to_fp8(x, fmt, transpose=False):
    """x cast by our kernel with its current scale: the FP8 tensor, the inverse scale (fp32 (1,), an allocation of
    its own: cuBLASLt refuses unaligned scale pointers), and the float64 values the FP8 tensor stands for
    (untransposed)."""
    amax, scale, inverse = (torch.zeros(1, device="cuda") for _ in range(3))
    fp8.amax(amax, x)
    fp8.scale_from_amax(scale, inverse, amax, "e4m3" if fmt is E4M3 else "e5m2")
    shape = tuple(reversed(x.shape)) if transpose else tuple(x.shape)
    q = torch.empty(shape, dtype=fmt, device="cuda")
    fp8.cast(q, x, scale, transpose=transpose)
    values = q.double() * inverse.double()
    return q, inverse, (values.t() if transpose else values)


def rel_error(got, ref):
    return (torch.linalg.vector_norm(got.double() - ref) / torch.linalg.vector_norm(ref)).item()


@pytest.mark.parametrize("a_fmt", [E4M3, E5M2])  # e4m3: the forward's input; e5m2: an output gradient
@pytest.mark.parametrize("fast_accum", [False, True])
def test_product_with_bias(a_fmt, fast_accum):
    a, a_inv, a64 = to_fp8(randn(N, C, scale=3.0, seed=1), a_fmt)
    b, b_inv, b64 = to_fp8(randn(3 * C, C, scale=0.02, seed=2), E4M3)
    bias = randn(3 * C, scale=0.1, seed=3)
    out = torch.full((N, 3 * C), float("nan"), dtype=torch.bfloat16, device="cuda")
    vendor.matmul_fp8(out, a, a_inv, b, b_inv, bias=bias, fast_accum=fast_accum)
    assert rel_error(out, a64 @ b64.t() + bias.double()) <= (2**-7 if fast_accum else 2**-8)


def test_product_adds_c():
    """A projection joining the residual stream: out = a @ b^T + bias + residual."""
    a, a_inv, a64 = to_fp8(randn(N, 4 * C, seed=4), E4M3)
    b, b_inv, b64 = to_fp8(randn(C, 4 * C, scale=0.02, seed=5), E4M3)
    bias, residual = randn(C, scale=0.1, seed=6), randn(N, C, seed=7)
    out = torch.empty(N, C, dtype=torch.bfloat16, device="cuda")
    vendor.matmul_fp8(out, a, a_inv, b, b_inv, bias=bias, c=residual)
    assert rel_error(out, a64 @ b64.t() + bias.double() + residual.double()) <= 2**-8


def test_input_gradient_accumulates():
    """dinp += dout @ W as dout (e5m2) @ (W^T, e4m3, cast transposed)^T: Llama's gate and up share an input."""
    dout, d_inv, d64 = to_fp8(randn(N, 3 * C, scale=1e-4, seed=8), E5M2)
    weight = randn(3 * C, C, scale=0.02, seed=9)
    wt, w_inv, w64 = to_fp8(weight, E4M3, transpose=True)  # wt (C, 3C); w64 (3C, C)
    dinp = randn(N, C, scale=1e-5, seed=10)
    ref = dinp.double() + d64 @ w64
    vendor.matmul_fp8(dinp, dout, d_inv, wt, w_inv, c=dinp)
    assert rel_error(dinp, ref) <= 2**-8


@pytest.mark.parametrize("accumulate", [False, True])
def test_weight_gradient_in_fp32(accumulate):
    """dW (fp32) (+)= dout^T @ inp as (dout^T, e5m2) @ (inp^T, e4m3)^T, both cast transposed."""
    dout_t, d_inv, d64 = to_fp8(randn(N, C, scale=1e-4, seed=11), E5M2, transpose=True)
    inp_t, i_inv, i64 = to_fp8(randn(N, 4 * C, seed=12), E4M3, transpose=True)
    dweight = torch.randn(C, 4 * C, device="cuda") * 1e-3
    ref = (dweight.double() if accumulate else 0) + d64.t() @ i64
    vendor.matmul_fp8(dweight, dout_t, d_inv, inp_t, i_inv, c=dweight if accumulate else None)
    assert rel_error(dweight, ref) <= 2**-10


def test_gelu_epilogue():
    """pre_gelu = a @ b^T + bias and out = gelu(pre_gelu) (tanh approximation) in one call."""
    a, a_inv, a64 = to_fp8(randn(N, C, seed=13), E4M3)
    b, b_inv, b64 = to_fp8(randn(4 * C, C, scale=0.05, seed=14), E4M3)
    bias = randn(4 * C, scale=0.1, seed=15)
    out, pre_gelu = (torch.empty(N, 4 * C, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    vendor.matmul_fp8(out, a, a_inv, b, b_inv, bias=bias, pre_gelu=pre_gelu)
    ref = a64 @ b64.t() + bias.double()
    assert rel_error(pre_gelu, ref) <= 2**-8
    assert rel_error(out, torch.nn.functional.gelu(ref, approximate="tanh")) <= 2**-8


def test_scales_are_read_on_the_device():
    """The same call after the scale tensor changes in place (as a CUDA graph replays it) uses the new scale."""
    a, a_inv, a64 = to_fp8(randn(N, C, seed=16), E4M3)
    b, b_inv, b64 = to_fp8(randn(C, C, scale=0.02, seed=17), E4M3)
    out = torch.empty(N, C, dtype=torch.bfloat16, device="cuda")
    vendor.matmul_fp8(out, a, a_inv, b, b_inv)
    a_inv *= 4
    vendor.matmul_fp8(out, a, a_inv, b, b_inv)
    assert rel_error(out, 4 * (a64 @ b64.t())) <= 2**-8
