"""FP8 with per-tensor scales, for the FP8 matmuls (llmpy/precision.py): the amax of a tensor, the scale it gives, and
the scaled, saturating cast to e4m3 or e5m2 (optionally transposed), on the GPU and under Triton's interpreter alike.

The formats (OCP FP8, as Hopper's tensor cores take them):
    e4m3 (torch.float8_e4m3fn, tl.float8e4nv): 3 mantissa bits, largest 448, smallest normal 2^-6, steps of 2^-9
         below it; no infinities. For weights and activations: more precision.
    e5m2 (torch.float8_e5m2, tl.float8e5): 2 mantissa bits, largest 57344, smallest normal 2^-14, steps of 2^-16
         below it. For gradients: more range.

Per-tensor scaling. A tensor x enters a matmul as q = fp8(x * s); cuBLASLt multiplies the FP8 operands and undoes
the scales with 1/s (its scale pointers). s puts the tensor's largest magnitude, amax, near the format's largest
value: here s = 2^floor(log2(FP8_MAX / amax)), a power of two, so x * s is exact in fp32 and the cast is the only
rounding, and 1/s is exact too (amax * s lands in (FP8_MAX / 2, FP8_MAX]). Current scaling takes amax from the tensor
itself (`amax`, then `scale_from_amax`, then `cast`): two reads of x. Delayed scaling takes it from the amax of the
tensor's last few casts (`update_scales`), each cast writing its own as it goes (`cast`'s amax output): one read.
Both keep everything on the device: no host sync, CUDA-graph capturable.

Rounding: to nearest, ties to even, saturating: a value beyond the largest becomes +-FP8_MAX (a delayed scale that
undershoots the new amax clips instead of making NaN). NaN stays NaN. On the GPU that is `x.to(fp8)` alone: Triton
lowers fp32 -> e4m3 and e5m2 on sm_90 to PTX's cvt.rn.satfinite, which saturates and keeps NaN in one instruction for
two values (tests/kernels/test_fp8.py holds it to that on the GPU: values past the largest, infinities, NaN). A
clamp before it, as the kernels had, cost 4 more operations an element. Triton's interpreter (3.9) rounds
fp32 -> fp8 wrongly (e.g. -7.2 to -4 in e4m3) and NaN to a number, though it converts exactly representable values
exactly; so when interpreting, `_round_to_fp8` first rounds in fp32 by hand: normal numbers by adding half an ulp
plus the lowest kept bit to the fp32 bits and clearing the dropped ones (round to nearest even, as rounding.round_to
does for bf16), subnormals by adding and subtracting 2^23 steps (fp32's own rounding to nearest even at the subnormal
step), then clamps, and writes NaN's bits itself. On the GPU the branch is compiled out.

Layout: x is (R, C) with unit column stride (any row stride); out (R, C) or, transposed, (C, R) contiguous. Hopper's
FP8 matmuls take both operands K-major, so a weight gradient needs its operands (dY^T, X^T) and the input gradient
its weight (W^T) transposed: llmpy.precision turns the row-major FP8 copy it has already (`transpose`, a copy of
bytes) rather than casting x again. Tiles of (BLOCK_R, BLOCK_C); amax is one atomic max a program (max is order-free:
deterministic).
"""

import torch
import triton
import triton.language as tl

from . import INTERPRET

_ROUND_IN_SOFTWARE = tl.constexpr(INTERPRET)
# format -> (torch dtype, largest finite value, mantissa bits, exponent of the smallest normal)
FORMATS = {
    "e4m3": (torch.float8_e4m3fn, 448.0, 3, -6),
    "e5m2": (torch.float8_e5m2, 57344.0, 2, -14),
}
# A cast's tile: (32, 128), 4096 values, 16 a thread with 8 warps; 8 tiles a program, one under the other. The
# interpreter's cost is per tile, not per value: there (128, 128) tiles, 2 a program, a quarter of the tiles (the LM
# head's weight, (50304, C), is cast and turned at every step of the tests' models), and the tests' casts of a few
# hundred rows still span several programs and tiles.
_BLOCK_R, _BLOCK_C, _TILES = (128, 128, 2) if INTERPRET else (32, 128, 8)
_AMAX_BLOCK = 16384 if INTERPRET else 4096


@triton.jit
def _round_to_fp8(x, dtype: tl.constexpr, FP8_MAX: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr):
    """x (fp32) rounded to nearest even on dtype's grid, saturated to +-FP8_MAX, converted to dtype."""
    if _ROUND_IN_SOFTWARE:
        DROP: tl.constexpr = 23 - MANTISSA
        KEEP: tl.constexpr = 0xFFFFFFFF - ((1 << DROP) - 1)  # the sign, exponent and kept mantissa bits
        bits = x.to(tl.uint32, bitcast=True)
        bits += (1 << (DROP - 1)) - 1 + ((bits >> DROP) & 1)
        normal = (bits & KEEP).to(tl.float32, bitcast=True)
        # below the smallest normal the grid is 2^(MIN_EXP - MANTISSA): fp32 rounds |x| + MAGIC to it
        MAGIC: tl.constexpr = 2.0 ** (MIN_EXP - MANTISSA + 23)
        magnitude = tl.abs(x)
        subnormal = (magnitude + MAGIC) - MAGIC
        subnormal = tl.where(x < 0, -subnormal, subnormal)
        rounded = tl.where(magnitude < 2.0 ** MIN_EXP, subnormal, normal)
        rounded = tl.minimum(tl.maximum(rounded, -FP8_MAX), FP8_MAX)
        # the interpreter turns NaN into a number: 0x7F is NaN in both formats
        nan = tl.full(x.shape, 0x7F, tl.uint8).to(dtype, bitcast=True)
        return tl.where(x != x, nan, rounded.to(dtype))
    return x.to(dtype)  # cvt.rn.satfinite: saturates, keeps NaN


@triton.jit
def store_scaled(out8_ptr, offsets, y, mask, scale_ptr, FP8_MAX: tl.constexpr, MANTISSA: tl.constexpr,
                 MIN_EXP: tl.constexpr):
    """For a kernel that writes a matmul's FP8 operand itself (a fused cast): stores fp8(y * scale) (y fp32) at
    out8_ptr + offsets where mask, and returns |y| where mask (0 elsewhere), for the caller's amax. mask None (a
    literal: the compiler takes only those as constants): a tile with no element to leave out, so no select. A kernel
    that stores several tiles keeps their elementwise maximum and reduces it once, at its end (tl.max): a reduction
    crosses the warps through shared memory, behind a barrier, which once a tile would stall the loads of the next."""
    q = _round_to_fp8(y * tl.load(scale_ptr), out8_ptr.dtype.element_ty, FP8_MAX, MANTISSA, MIN_EXP)
    tl.store(out8_ptr + offsets, q, mask=mask)
    magnitudes = tl.abs(y)
    if mask is not None:
        magnitudes = tl.where(mask, magnitudes, 0.0)
    return magnitudes


@triton.jit
def _amax_kernel(amax_ptr, x_ptr, numel, C, stride_r, BLOCK: tl.constexpr):
    # one program a block of BLOCK elements of the (R, C) tensor, read row by row. numel = R * C comes from the host,
    # where it is a 64-bit integer (the LM head's gradient at d12 B=64 has 3.3e9 elements: R * C in the kernel's
    # 32-bit arguments wrapped to a negative number, masked every load, and made the amax 0)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows, columns = offsets // C, offsets % C
    x = tl.load(x_ptr + rows * stride_r + columns, mask=offsets < numel, other=0.0).to(tl.float32)
    tl.atomic_max(amax_ptr, tl.max(tl.abs(x), axis=0), sem="relaxed")


@triton.jit
def _cast_kernel(
    out_ptr,  # fp8 (R, C), or (C, R) if TRANSPOSE; contiguous
    x_ptr,  # bf16 or fp32 (R, C), unit column stride
    scale_ptr,  # fp32 (1,): s
    amax_ptr,  # fp32 (1,): max |x| is atomically maxed into it (if AMAX)
    R,
    C,
    stride_r,
    FP8_MAX: tl.constexpr,
    MANTISSA: tl.constexpr,
    MIN_EXP: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    AMAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TILES: tl.constexpr,
):
    # a program casts TILES tiles down its column block, then adds their amax with one atomic instead of one a tile
    # (expected to spare the largest casts waiting on the one address; measured on the H200: no change either way)
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    scale = tl.load(scale_ptr)
    largest = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for tile in range(TILES):
        rows = (tl.program_id(0) * TILES + tile) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows < R)[:, None] & (columns < C)[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_r + columns[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        largest = tl.maximum(largest, tl.abs(x))
        q = _round_to_fp8(x * scale, out_ptr.dtype.element_ty, FP8_MAX, MANTISSA, MIN_EXP)
        if TRANSPOSE:
            tl.store(out_ptr + columns.to(tl.int64)[None, :] * R + rows[:, None], q, mask=mask)
        else:
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + columns[None, :], q, mask=mask)
    if AMAX:
        tl.atomic_max(amax_ptr, tl.max(tl.max(largest, axis=1), axis=0), sem="relaxed")


@triton.jit
def _transpose_kernel(out_ptr, x_ptr, R, C, BLOCK: tl.constexpr):
    # one program a (BLOCK, BLOCK) tile of bytes: loaded along x's rows, turned, stored along out's rows, so both
    # sides move runs of BLOCK contiguous bytes (the turn goes through shared memory)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + columns[None, :],
                   mask=(rows < R)[:, None] & (columns < C)[None, :])
    tl.store(out_ptr + columns.to(tl.int64)[:, None] * R + rows[None, :], tl.trans(tile),
             mask=(columns < C)[:, None] & (rows < R)[None, :])


@triton.jit
def _scale_kernel(scale_ptr, inverse_ptr, amax_ptr, FP8_MAX: tl.constexpr):
    amax = tl.load(amax_ptr)
    # the largest power of two s with amax * s <= FP8_MAX; 1 for an all-zero (or non-finite) tensor
    usable = (amax > 0) & (amax < float("inf"))
    scale = tl.where(usable, tl.exp2(tl.floor(tl.log2(FP8_MAX / tl.where(usable, amax, 1.0)))), 1.0)
    tl.store(scale_ptr, scale)
    tl.store(inverse_ptr, 1.0 / scale)


@triton.jit
def _update_scales_kernel(history_ptr, amax_ptr, scale_ptr, inverse_ptr, n, stride, FP8_MAX: tl.constexpr,
                          HISTORY: tl.constexpr, BLOCK: tl.constexpr):
    # one program a block of BLOCK tensors; history (n, HISTORY) newest first; amax, scale, inverse: column 0 of
    # (n, stride) arrays. Every load comes before the stores that shift the history by one.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    columns = tl.arange(0, HISTORY)
    in_range = rows < n
    both = in_range[:, None] & (columns < HISTORY)[None, :]
    history = tl.load(history_ptr + rows[:, None] * HISTORY + columns[None, :], mask=both, other=0.0)
    older = tl.load(history_ptr + rows[:, None] * HISTORY + columns[None, :] - 1, mask=both & (columns >= 1)[None, :],
                    other=0.0)
    amax = tl.load(amax_ptr + rows * stride, mask=in_range, other=0.0)
    cast = amax > 0  # a tensor cast since the last update (an unused one, e.g. a gradient in validation, keeps its)
    shifted = tl.where((columns == 0)[None, :], amax[:, None], older)
    history = tl.where(cast[:, None], shifted, history)
    tl.store(history_ptr + rows[:, None] * HISTORY + columns[None, :], history, mask=both)
    tl.store(amax_ptr + rows * stride, tl.zeros_like(amax), mask=in_range)
    largest = tl.max(history, axis=1)
    usable = (largest > 0) & (largest < float("inf"))
    scale = tl.where(usable, tl.exp2(tl.floor(tl.log2(FP8_MAX / tl.where(usable, largest, 1.0)))), 1.0)
    tl.store(scale_ptr + rows * stride, scale, mask=in_range)
    tl.store(inverse_ptr + rows * stride, 1.0 / scale, mask=in_range)


def update_scales(history, amax_now, scale, inverse, fmt):
    """Delayed scaling of n tensors: each tensor's amax since the last update, amax_now[:, 0] (written by its casts'
    amax output), joins the front of its history (n, H) (H a power of two; the oldest drops off) and is zeroed, and
    its scale becomes the power of two scale_from_amax would give for the largest amax in the history; inverse
    = 1 / scale. amax_now, scale, inverse: fp32 (n, stride), column 0 used (the rows' stride lets each scale sit on
    an alignment cuBLASLt accepts). A tensor with amax_now 0 (not cast since the last update) keeps its history.
    One launch for all n."""
    n, H = history.shape
    assert H & (H - 1) == 0 and amax_now.stride() == scale.stride() == inverse.stride() and amax_now.stride(1) == 1
    block = 32
    _update_scales_kernel[(triton.cdiv(n, block),)](history, amax_now, scale, inverse, n, amax_now.stride(0),
                                                    FP8_MAX=FORMATS[fmt][1], HISTORY=H, BLOCK=block)


def _check_2d(name, x):
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: x must be (R, C) bfloat16 or float32 with unit column stride, got "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")


def amax(out, x):
    """out fp32 (1,) = max |x| over x (R, C), bf16 or fp32, unit column stride (overwritten)."""
    _check_2d("amax", x)
    R, C = x.shape
    out.zero_()
    if R * C:
        _amax_kernel[(triton.cdiv(R * C, _AMAX_BLOCK),)](out, x, R * C, C, x.stride(0), BLOCK=_AMAX_BLOCK,
                                                         num_warps=8)


def scale_from_amax(scale, inverse, amax_value, fmt):
    """scale fp32 (1,) = the largest power of two s with amax * s <= the format's largest value (1 when amax is 0),
    inverse = 1 / s: the scale a cast multiplies by and the one a matmul undoes it with. fmt "e4m3" or "e5m2"."""
    _scale_kernel[(1,)](scale, inverse, amax_value, FP8_MAX=FORMATS[fmt][1])


def cast(out, x, scale, amax_out=None, transpose=False):
    """out = fp8(x * scale), rounded to nearest even and saturated, in out's format (float8_e4m3fn or
    float8_e5m2); transposed, out = fp8(x * scale)^T. With amax_out, fp32 (1,): amax_out = max(amax_out, max |x|)
    (zero it first for this tensor's amax alone).

    x: (R, C) bf16 or fp32, unit column stride. out: contiguous, (R, C), or (C, R) with transpose. scale: fp32 (1,)
    on the device (scale_from_amax).
    """
    _check_2d("cast", x)
    R, C = x.shape
    fmt = next((name for name, spec in FORMATS.items() if spec[0] == out.dtype), None)
    if fmt is None or not out.is_contiguous() or tuple(out.shape) != ((C, R) if transpose else (R, C)):
        raise ValueError(f"cast: out must be contiguous float8_e4m3fn or float8_e5m2 of shape "
                         f"{(C, R) if transpose else (R, C)}, got {tuple(out.shape)} {out.dtype}")
    _, fp8_max, mantissa, min_exp = FORMATS[fmt]
    if R * C == 0:
        return
    grid = (triton.cdiv(R, _BLOCK_R * _TILES), triton.cdiv(C, _BLOCK_C))
    _cast_kernel[grid](out, x, scale, amax_out if amax_out is not None else scale, R, C, x.stride(0),
                       FP8_MAX=fp8_max, MANTISSA=mantissa, MIN_EXP=min_exp, TRANSPOSE=transpose,
                       AMAX=amax_out is not None, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, TILES=_TILES, num_warps=8)


# (128, 128) tiles of bytes with 16 warps: of the tiles and warps dev/kernels/fp8_cast.py times, the fastest on the
# H200 (BENCHMARKS.md); (256, 256) under the interpreter, a quarter of the tiles
_TRANSPOSE_BLOCK = 256 if INTERPRET else 128


def transpose(out, x):
    """out (C, R) = x (R, C)^T, both contiguous and of one FP8 dtype: an FP8 copy turned for a weight gradient
    (Hopper's FP8 matmuls take K-major operands), its values as they are, so its scale is x's. Moves 2 bytes an
    element where casting the bf16 tensor again, transposed, moves 3."""
    if x.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or x.dim() != 2 or not x.is_contiguous() or \
            out.dtype != x.dtype or not out.is_contiguous() or tuple(out.shape) != tuple(x.shape[::-1]):
        raise ValueError(f"transpose: x must be a contiguous (R, C) FP8 tensor and out its (C, R) contiguous "
                         f"transpose of the same dtype, got x {tuple(x.shape)} {x.dtype}, out {tuple(out.shape)} "
                         f"{out.dtype}")
    R, C = x.shape
    if R * C:
        grid = (triton.cdiv(R, _TRANSPOSE_BLOCK), triton.cdiv(C, _TRANSPOSE_BLOCK))
        # as bytes: a copy needs no FP8 arithmetic (nor the interpreter's FP8 support)
        _transpose_kernel[grid](out.view(torch.uint8), x.view(torch.uint8), R, C, BLOCK=_TRANSPOSE_BLOCK,
                                num_warps=16)


def fused_output(fp8_out, like):
    """What a kernel with a fused FP8 output (store_scaled) is launched with: the pointers (out8, scale, amax) and the
    constexprs FP8, FP8_MAX, MANTISSA, MIN_EXP. fp8_out: (out8 float8 contiguous, shaped as like, scale fp32 (1,),
    amax fp32 (1,)), or None: the kernel writes its usual output, the pointers are placeholders (like), never read."""
    if fp8_out is None:
        pointers, fmt = (like, like, like), "e4m3"
    else:
        pointers = fp8_out
        out8 = fp8_out[0]
        fmt = next((name for name, spec in FORMATS.items() if spec[0] == out8.dtype), None)
        if fmt is None or not out8.is_contiguous() or out8.shape != like.shape:
            raise ValueError(f"fp8_out: a contiguous float8 tensor of shape {tuple(like.shape)}, got "
                             f"{tuple(out8.shape)} {out8.dtype}")
    _, fp8_max, mantissa, min_exp = FORMATS[fmt]
    return pointers, dict(FP8=fp8_out is not None, FP8_MAX=fp8_max, MANTISSA=mantissa, MIN_EXP=min_exp)
