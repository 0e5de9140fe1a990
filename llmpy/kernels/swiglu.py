"""SwiGLU (Llama 3's MLP activation), forward and backward.

Llama 3's MLP is c_proj(silu(gate) * up), with gate = x @ fc2w^T (Meta's w1, the one through SiLU) and up = x @ fcw^T
(Meta's w3), each (N, H) for N = B*T rows and H the SwiGLU width (train_llama3_torch.py's MLP). These kernels do
the part between the matmuls:
  forward:  out = silu(gate) * up,  silu(g) = g * sigmoid(g)
  backward: dup = dout * silu(gate),  dgate = dout * up * silu'(gate),  silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g)
(the derivative by the product rule: silu' = s + g * s * (1 - s)).

Sigmoid is computed from e = exp(-|g|), which is at most 1: s = 1 / (1 + e) for g >= 0 and e / (1 + e) for g < 0,
with 1 - s the other of the two. No exponential overflows for any finite g (far in the tails e underflows to 0 and
s, 1 - s become exactly 1 and 0), and 1 - s is never formed by a subtraction, so it keeps its relative accuracy
where s is close to 1. All math is fp32; each output is rounded once to its dtype (rounding.round_to).

Layouts: every tensor is (N, H) with unit column stride and its own row stride, so gate and up may be separate
contiguous tensors or the two halves of one (N, 2H) buffer (one matmul for both: buf[:, :H] and buf[:, H:]), and
likewise dgate and dup may be the halves of one (N, 2H) gradient buffer, which the backward's one dx matmul reads.

Bytes moved: the forward reads gate and up and writes out, 3 N H values; the backward reads gate, up and dout and
writes dgate and dup, 5 N H values. Each value crosses memory once (the unfused form would also write silu(gate) and
read it back). Llama 3.1 8B (H = 14,336) on an 8192-token micro-batch: N H = 1.17e8 elements, so in bf16 0.70 GB
forward and 1.17 GB backward per layer. The arithmetic (one exponential, one division) hides under that: both
kernels are memory-bound.

Design, as gelu.py's forward: each program handles one tile of 2048 elements with 8 warps, so every thread moves 8
contiguous values of each tensor (16 bytes in bf16: one vector load or store, when rows start on 16-byte boundaries).
The tile is (ROWS, BLOCK_H) with BLOCK_H = min(2048, next_power_of_2(H)) columns of ROWS = 2048 / BLOCK_H rows:
Llama's widths (8192, 14,336) are multiples of 2048, so a tile is one row segment with every lane busy; a narrow H
(the tiny test model's 224) stacks rows so a program still moves 2048 elements. Program (i, j) covers row block i
(grid axis 0, which allows 2^31 - 1 programs) and column block j. Offsets are int64: N * row stride can pass 2^31.
Llama has no biases, so unlike GELU's backward this one sums no columns: it is elementwise too, on the forward's tile.

Under --precision fp8 the backward can write dup and dgate, the output gradients of the up and gate projections, in
e5m2 for their FP8 matmuls itself (fp8_up, fp8_gate, as gelu.gelu_backward's fp8_out): 1 byte a value written instead
of 2, and the two casts' passes (3 bytes a value each) gone.
"""

import torch
import triton
import triton.language as tl

from .fp8 import fused_output, store_scaled
from .rounding import round_to

_TILE_ELEMENTS = 2048
_DTYPES = (torch.bfloat16, torch.float32)


def _tile(H):
    """(ROWS, BLOCK_H) of a program's tile: up to 2048 columns, rows to fill 2048 elements."""
    block_columns = min(_TILE_ELEMENTS, triton.next_power_of_2(H))
    return _TILE_ELEMENTS // block_columns, block_columns


@triton.jit
def sigmoid_and_complement(g):
    """sigmoid(g) and 1 - sigmoid(g) = sigmoid(-g) of fp32 g, elementwise, from exp(-|g|) <= 1 (never overflows)."""
    e = tl.exp(-tl.abs(g))
    large = 1.0 / (1.0 + e)  # the one of the two >= 1/2
    small = e * large
    positive = g >= 0.0
    return tl.where(positive, large, small), tl.where(positive, small, large)


@triton.jit
def _tile_rows_columns(N, H, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (i, j)'s tile: its rows (int64, a column) and columns (a row), and the mask of the elements in (N, H)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    columns = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < N)[:, None] & (columns < H)[None, :]
    return rows[:, None], columns[None, :], mask


@triton.jit
def _load_fp32(ptr, stride, rows, columns, mask):
    """The tile of an (N, H) tensor with this row stride, as fp32."""
    return tl.load(ptr + rows * stride + columns, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _swiglu_forward_kernel(
    out_ptr,  # (N, H): out, silu(gate) * up; may be gate or up itself
    gate_ptr,  # (N, H)
    up_ptr,  # (N, H)
    N,
    H,
    stride_out,  # row strides, in elements; the column stride is 1
    stride_gate,
    stride_up,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows, columns, mask = _tile_rows_columns(N, H, ROWS, BLOCK_H)
    gate = _load_fp32(gate_ptr, stride_gate, rows, columns, mask)
    up = _load_fp32(up_ptr, stride_up, rows, columns, mask)
    s, _ = sigmoid_and_complement(gate)
    out = round_to(gate * s * up, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows * stride_out + columns, out, mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    dgate_ptr,  # (N, H): out, dout * up * silu'(gate); may be gate itself
    dup_ptr,  # (N, H): out, dout * silu(gate); may be up itself
    dout_ptr,  # (N, H)
    gate_ptr,  # (N, H): the forward's inputs
    up_ptr,  # (N, H)
    N,
    H,
    stride_dgate,  # row strides, in elements; the column stride is 1
    stride_dup,
    stride_dout,
    stride_gate,
    stride_up,
    dgate8_ptr, dgate_scale_ptr, dgate_amax_ptr,  # with DGATE8: fp8 (N, H) contiguous, fp8(dgate * scale), in dgate's
    dup8_ptr, dup_scale_ptr, dup_amax_ptr,  # stead, its amax maxed into amax; likewise dup with DUP8
    DGATE8: tl.constexpr,
    DUP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MANTISSA: tl.constexpr,
    MIN_EXP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows, columns, mask = _tile_rows_columns(N, H, ROWS, BLOCK_H)
    # all three inputs of the tile are loaded before either output is stored: dgate, dup may overwrite gate, up
    gate = _load_fp32(gate_ptr, stride_gate, rows, columns, mask)
    up = _load_fp32(up_ptr, stride_up, rows, columns, mask)
    dout = _load_fp32(dout_ptr, stride_dout, rows, columns, mask)
    s, one_minus_s = sigmoid_and_complement(gate)
    dup = round_to(dout * (gate * s), dup_ptr.dtype.element_ty)
    dgate = round_to(dout * up * (s * (1.0 + gate * one_minus_s)), dgate_ptr.dtype.element_ty)
    # FP8: from the values rounded to the gradients' dtype, the bytes a cast of them would write
    if DGATE8:
        tl.atomic_max(dgate_amax_ptr, tl.max(store_scaled(dgate8_ptr, rows * H + columns, dgate.to(tl.float32), mask,
                                                          dgate_scale_ptr, FP8_MAX, MANTISSA, MIN_EXP)), sem="relaxed")
    else:
        tl.store(dgate_ptr + rows * stride_dgate + columns, dgate, mask=mask)
    if DUP8:
        tl.atomic_max(dup_amax_ptr, tl.max(store_scaled(dup8_ptr, rows * H + columns, dup.to(tl.float32), mask,
                                                        dup_scale_ptr, FP8_MAX, MANTISSA, MIN_EXP)), sem="relaxed")
    else:
        tl.store(dup_ptr + rows * stride_dup + columns, dup, mask=mask)


def _check_gate(function, gate):
    if gate.dim() != 2 or gate.dtype not in _DTYPES:
        raise ValueError(f"{function}: gate must be (N, H) bfloat16 or float32, got {tuple(gate.shape)} {gate.dtype}")
    return gate.shape


def _check(function, name, tensor, N, H, dtype):
    # (N, H) in gate's dtype, unit column stride, rows at least H elements apart (any row stride: halves of (N, 2H))
    if tensor.shape != (N, H) or tensor.dtype != dtype or tensor.stride(1) != 1 or (N > 1 and tensor.stride(0) < H):
        raise ValueError(f"{function}: {name} must be ({N}, {H}) {dtype} with unit column stride and row stride >= "
                         f"{H}, got {tuple(tensor.shape)} {tensor.dtype} strides {tensor.stride()}")


def swiglu_forward(out, gate, up):
    """out = silu(gate) * up, elementwise.

    gate, up, out: (N, H), all bf16 or all fp32 (math in fp32, one rounding), unit column stride, any row strides:
    gate and up may be the two halves of one (N, 2H) buffer. out may be gate or up itself (the same view: each
    element is read, then written, by the same program); no other overlap.
    """
    N, H = _check_gate("swiglu_forward", gate)
    for name, tensor in (("up", up), ("out", out)):
        _check("swiglu_forward", name, tensor, N, H, gate.dtype)
    if N == 0 or H == 0:
        return
    rows, block_columns = _tile(H)
    grid = (triton.cdiv(N, rows), triton.cdiv(H, block_columns))
    _swiglu_forward_kernel[grid](
        out, gate, up, N, H, out.stride(0), gate.stride(0), up.stride(0),
        ROWS=rows, BLOCK_H=block_columns, num_warps=8,
    )


def swiglu_backward(dgate, dup, dout, gate, up, fp8_gate=None, fp8_up=None):
    """dup = dout * silu(gate) and dgate = dout * up * silu'(gate), elementwise; gate, up the forward's inputs.

    All (N, H), all bf16 or all fp32 (math in fp32, one rounding each), unit column stride, any row strides: gate and
    up may be the halves of one (N, 2H) buffer, and so may dgate and dup. Aliasing allowed: dgate may be gate itself
    and dup may be up itself (the same views; either or both), so the forward's buffers can take their gradients.
    Every element's gate, up and dout are read before its dgate and dup are written, by the same program. dgate and
    dup must not overlap each other, nor partly overlap an input.
    fp8_gate, fp8_up (out8, scale, amax), from the gate and up matmuls' precision (llmpy.precision.FP8.fp8_grad): out8 =
    fp8(dgate * scale) is written instead of dgate, as fp8.cast of dgate would write it, and max |dgate| maxed into
    amax; likewise dup. Either, both (in one FP8 format) or neither.
    """
    N, H = _check_gate("swiglu_backward", gate)
    for name, tensor in (("up", up), ("dout", dout), ("dgate", dgate), ("dup", dup)):
        _check("swiglu_backward", name, tensor, N, H, gate.dtype)
    if N == 0 or H == 0:
        return
    if dgate.data_ptr() == dup.data_ptr():
        raise ValueError("swiglu_backward: dgate and dup must be different tensors")
    rows, block_columns = _tile(H)
    grid = (triton.cdiv(N, rows), triton.cdiv(H, block_columns))
    if fp8_gate is not None and fp8_up is not None and fp8_gate[0].dtype != fp8_up[0].dtype:
        raise ValueError("swiglu_backward: fp8_gate and fp8_up must be of one FP8 format")
    dgate8, dgate_constants = fused_output(fp8_gate, gate)
    dup8, dup_constants = fused_output(fp8_up, up)
    # one format's constants serve both outputs: the FP8 one's (FP8 itself becomes DGATE8 and DUP8)
    constants = dup_constants if fp8_up is not None else dgate_constants
    _swiglu_backward_kernel[grid](
        dgate, dup, dout, gate, up, N, H,
        dgate.stride(0), dup.stride(0), dout.stride(0), gate.stride(0), up.stride(0), *dgate8, *dup8,
        DGATE8=dgate_constants["FP8"], DUP8=dup_constants["FP8"], FP8_MAX=constants["FP8_MAX"],
        MANTISSA=constants["MANTISSA"], MIN_EXP=constants["MIN_EXP"], ROWS=rows, BLOCK_H=block_columns, num_warps=8,
    )
