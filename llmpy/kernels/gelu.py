"""GELU with the tanh approximation (GPT-2's activation), forward and backward.

gelu(x) = 0.5 * x * (1 + tanh(u)),  u = sqrt(2 / pi) * (x + 0.044715 * x^3).

Because 0.5 * (1 + tanh(u)) = sigmoid(2u), the kernels compute gelu(x) = x * s with s = sigmoid(2u): one exponential,
no tanh (Triton's core language has none) and no cancellation in 1 + tanh(u) for very negative x.
The derivative, by the product rule, with sigmoid' = s * (1 - s) and u' = sqrt(2 / pi) * (1 + 3 * 0.044715 * x^2):
  gelu'(x) = s + x * s * (1 - s) * 2u'.

Under --precision fp8 the forward can write the next matmul's e4m3 input itself (fp8_out), as the layernorm does
(llmpy.kernels.layernorm); the fc projection then reads 1 byte a value, not 2, and no cast runs between. So can the
backward write the fc layer's output gradient in e5m2 for its FP8 input and weight gradients: 1 byte a value of the
(N, 4C) gradient written instead of 2, and the cast's pass over it (3 bytes a value) gone.

Forward kernel: elementwise over the flat buffer. Each program handles BLOCK = 2048 contiguous elements; with 8 warps
every thread moves 8 contiguous values (16 bytes in bf16: one vector load or store). It reads and writes each
element once: pure bandwidth, the arithmetic is hidden under it. An MLP activation of d12 at B=64, T=1024 is
65,536 x 3072 = 2e8 elements, about 98,000 programs.

Backward kernel: reads x and dout and writes dinp once, and can add up dinp's columns on the way: dinp is the
gradient of the fc matmul's output, whose column sums are the fc bias's gradient. Summing here saves the bias
gradient's own pass over dinp (N x 4C, the largest activation: 400 MB at d12, B=64). So the backward walks the
matrix as llmpy.kernels.bias does: program (g, j) covers the rows of group g in column block j, tile by tile, and
writes its column sums to partials[g]; bias.sum_partials adds the G partials up in a fixed order.
"""

import triton
import triton.language as tl

from .bias import bias_backward_groups, column_tile, row_group_column_block, row_tile, sum_partials
from .fp8 import fused_output, store_scaled
from .rounding import round_to

_BLOCK = 2048
_FP8_BLOCKS = 8  # blocks a program with an FP8 output: one atomic max (the amax) per 16,384 elements
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # a constexpr: jit functions may read only constexpr globals


@triton.jit
def gelu(x):
    """gelu(x) of fp32 x, elementwise."""
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * u)


@triton.jit
def gelu_derivative(x):
    """gelu'(x) of fp32 x, elementwise."""
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
    s = tl.sigmoid(2.0 * u)
    return s + x * s * (1.0 - s) * 2.0 * du_dx


@triton.jit
def _gelu_forward_kernel(out_ptr, inp_ptr, numel, out8_ptr, scale_ptr, amax_ptr, FP8: tl.constexpr,
                         FP8_MAX: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCKS: tl.constexpr):
    # BLOCKS consecutive blocks a program; with FP8 (out8 = fp8(gelu(inp) * scale) in out's stead) their amax goes
    # out in one atomic max a program
    largest = tl.zeros((BLOCK,), dtype=tl.float32)  # elementwise over the blocks, reduced at the end
    for block in range(BLOCKS):
        offsets = (tl.program_id(0).to(tl.int64) * BLOCKS + block) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        x = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = round_to(gelu(x), out_ptr.dtype.element_ty)
        if FP8:  # rounded to the activation dtype first: the values a cast of out would give
            largest = tl.maximum(largest, store_scaled(out8_ptr, offsets, y.to(tl.float32), mask, scale_ptr,
                                                       FP8_MAX, MANTISSA, MIN_EXP))
        else:
            tl.store(out_ptr + offsets, y, mask=mask)
    if FP8:
        tl.atomic_max(amax_ptr, tl.max(largest, axis=0), sem="relaxed")


@triton.jit
def _gelu_backward_kernel(
    dinp_ptr,  # (N, OC): out, dout * gelu'(inp); may be dout itself
    partials_ptr,  # fp32 (G, OC): out, partials[g, c] = sum of dinp[n, c] over the rows n of group g (if SUM_COLUMNS)
    inp_ptr,  # (N, OC): the forward's input, the pre-activation
    dout_ptr,  # (N, OC)
    N,
    OC,
    rows_per_group,  # ceil(N / G)
    out8_ptr,  # fp8 (N, OC): with FP8, out, fp8(dinp * scale) in dinp's stead
    scale_ptr,  # fp32 (1,)
    amax_ptr,  # fp32 (1,): max |dinp| is atomically maxed into it
    SUM_COLUMNS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_OC: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MANTISSA: tl.constexpr,
    MIN_EXP: tl.constexpr,
):
    columns, column_mask, first_row, end_row = row_group_column_block(N, OC, rows_per_group, BLOCK_OC)
    column_sums = tl.zeros((ROWS, BLOCK_OC), dtype=tl.float32)
    largest = tl.zeros((ROWS, BLOCK_OC), dtype=tl.float32)  # |dinp|, elementwise over the tiles (FP8)
    for tile_start in range(first_row, end_row, ROWS):
        _, mask, offsets = row_tile(tile_start, end_row, columns, column_mask, OC, ROWS)
        x = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dinp = round_to(dout * gelu_derivative(x), dinp_ptr.dtype.element_ty)
        if FP8:  # from the values rounded to dinp's dtype: the bytes a cast of dinp would write
            largest = tl.maximum(largest, store_scaled(out8_ptr, offsets, dinp.to(tl.float32), mask, scale_ptr,
                                                       FP8_MAX, MANTISSA, MIN_EXP))
        else:
            tl.store(dinp_ptr + offsets, dinp, mask=mask)
        if SUM_COLUMNS:  # the stored (rounded) values, as a separate pass over dinp would read them
            column_sums += dinp.to(tl.float32)
    if SUM_COLUMNS:
        tl.store(partials_ptr + tl.program_id(0) * OC + columns, tl.sum(column_sums, axis=0), mask=column_mask)
    if FP8:
        tl.atomic_max(amax_ptr, tl.max(tl.max(largest, axis=1), axis=0), sem="relaxed")


def gelu_forward(out, inp, fp8_out=None):
    """out = gelu(inp), elementwise; contiguous tensors of the same shape, any float dtype (math in fp32).
    fp8_out (out8, scale, amax), from the next matmul's precision (llmpy.precision.FP8.fp8_input): out8 =
    fp8(out * scale) is written instead of out, as fp8.cast of out would write it, and max |out| maxed into amax."""
    assert out.is_contiguous() and inp.is_contiguous() and out.shape == inp.shape
    numel = inp.numel()
    fp8_pointers, fp8_constants = fused_output(fp8_out, out)
    blocks = _FP8_BLOCKS if fp8_out is not None else 1
    _gelu_forward_kernel[(triton.cdiv(numel, _BLOCK * blocks),)](out, inp, numel, *fp8_pointers, BLOCK=_BLOCK,
                                                                 BLOCKS=blocks, num_warps=8, **fp8_constants)


def gelu_backward(dinp, inp, dout, dbias=None, scratch=None, fp8_out=None):
    """dinp = dout * gelu'(inp), and with dbias, dbias (OC,) fp32 += dinp.sum(0) (deterministic).

    inp, dout, dinp: contiguous (N, OC), inp the forward's input (the pre-activation). dinp may be dout itself (in
    place): each element is read, then written, by the same program. scratch: fp32 (G, OC) partial sums from
    bias.bias_backward_scratch, needed with dbias. scratch without dbias: the partial sums are left in scratch for a
    later stage 2 (bias.PartialSums).
    fp8_out (out8, scale, amax), from the fc matmul's precision (llmpy.precision.FP8.fp8_grad): out8 = fp8(dinp *
    scale) is written instead of dinp, as fp8.cast of dinp would write it, and max |dinp| maxed into amax; the column
    sums are dinp's all the same.
    """
    assert dinp.is_contiguous() and inp.is_contiguous() and dout.is_contiguous()
    assert dinp.shape == inp.shape == dout.shape and inp.dim() == 2
    N, OC = inp.shape
    sum_columns = scratch is not None
    if sum_columns:
        assert scratch.shape[1] == OC and scratch.is_contiguous() and (dbias is None or dbias.shape == (OC,))
    G = scratch.shape[0] if sum_columns else bias_backward_groups(N, OC)
    rows, block_columns = column_tile(OC)
    grid = (G, triton.cdiv(OC, block_columns))
    fp8_pointers, fp8_constants = fused_output(fp8_out, dinp)
    _gelu_backward_kernel[grid](
        dinp, scratch if sum_columns else dinp, inp, dout, N, OC, triton.cdiv(N, G), *fp8_pointers,
        SUM_COLUMNS=sum_columns, ROWS=rows, BLOCK_OC=block_columns, num_warps=8, **fp8_constants,
    )
    if dbias is not None:
        sum_partials(dbias, scratch)
