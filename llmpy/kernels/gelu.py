"""GELU with the tanh approximation (GPT-2's activation), forward and backward.

gelu(x) = 0.5 * x * (1 + tanh(u)),  u = sqrt(2 / pi) * (x + 0.044715 * x^3).

Because 0.5 * (1 + tanh(u)) = sigmoid(2u), the kernels compute gelu(x) = x * s with s = sigmoid(2u): one exponential,
no tanh (Triton's core language has none) and no cancellation in 1 + tanh(u) for very negative x.
The derivative, by the product rule, with sigmoid' = s * (1 - s) and u' = sqrt(2 / pi) * (1 + 3 * 0.044715 * x^2):
  gelu'(x) = s + x * s * (1 - s) * 2u'.

Kernel design: elementwise over the flat buffer. Each program handles BLOCK = 2048 contiguous elements; with 8 warps
every thread moves 8 contiguous values (16 bytes in bf16: one vector load or store). The forward reads and writes
each element once, the backward reads x and dout and writes dinp once: pure bandwidth, the arithmetic is hidden under
it. An MLP activation of d12 at B=64, T=1024 is 65,536 x 3072 = 2e8 elements, about 98,000 programs.
"""

import triton
import triton.language as tl

from .rounding import round_to

_BLOCK = 2048
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # a constexpr: jit functions may read only constexpr globals


@triton.jit
def _gelu_forward_kernel(out_ptr, inp_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    out = x * tl.sigmoid(2.0 * u)
    tl.store(out_ptr + offsets, round_to(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_backward_kernel(dinp_ptr, inp_ptr, dout_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
    s = tl.sigmoid(2.0 * u)
    dgelu_dx = s + x * s * (1.0 - s) * 2.0 * du_dx
    tl.store(dinp_ptr + offsets, round_to(dout * dgelu_dx, dinp_ptr.dtype.element_ty), mask=mask)


def gelu_forward(out, inp):
    """out = gelu(inp), elementwise; contiguous tensors of the same shape, any float dtype (math in fp32)."""
    assert out.is_contiguous() and inp.is_contiguous() and out.shape == inp.shape
    numel = inp.numel()
    _gelu_forward_kernel[(triton.cdiv(numel, _BLOCK),)](out, inp, numel, BLOCK=_BLOCK, num_warps=8)


def gelu_backward(dinp, inp, dout):
    """dinp = dout * gelu'(inp), elementwise. dinp may be dout itself (in place): each element is read, then written,
    by the same program. inp is the forward's input (the pre-activation)."""
    assert dinp.is_contiguous() and inp.is_contiguous() and dout.is_contiguous()
    assert dinp.shape == inp.shape == dout.shape
    numel = inp.numel()
    _gelu_backward_kernel[(triton.cdiv(numel, _BLOCK),)](dinp, inp, dout, numel, BLOCK=_BLOCK, num_warps=8)
