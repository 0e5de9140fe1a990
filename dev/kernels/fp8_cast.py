"""The FP8 cast of --precision fp8 (issue 19), out = fp8(x * s): from one element a thread to the mainline's tiles,
and two candidates for the transposed copies the weight gradients need.

The op (llmpy/kernels/fp8.py has the formats, the scales and the rounding): x (R, C) bf16 with unit column stride,
s a power-of-two fp32 scale on the device, so x * s is exact and the conversion is the only rounding:
    out = fp8(x * s)    rounded to nearest even, saturated at the format's largest value (448 for e4m3, 57344 e5m2)
out float8_e4m3fn (activations, weights) or float8_e5m2 (gradients), row-major (R, C) or transposed (C, R). Each of
the blocks' linear layers casts its input in the forward and its output gradient in the backward: R = B*T rows,
C = 768, 2304 or 3072 at GPT-2 d12. s comes from an amax, the largest |x|. Current scaling reads x for it first
(fp8.amax, then fp8.scale_from_amax, then the cast: two reads); delayed scaling takes s from earlier casts' amax and
has the cast max this tensor's |x| into an amax scalar as it goes (one read). Hopper's FP8 matmuls take K-major
operands, so the weight gradient dW = dout^T @ inp wants dout and inp cast transposed, (C, R), as well: with FP8
weight gradients the mainline casts them a second time, transposed (llmpy/precision.py, FP8.backward_weight).

Bytes it must move: x read, R*C*2 (bf16); out written, R*C*1: 3*R*C in all, with the amax or without (one fp32), and
4*R*C for both layouts (x read once, two copies written). At d12 with B = 64 (R = 65,536) the cast at C = 3072
moves 604 MB for a multiply, a clamp and a conversion an element: memory-bound, like GELU (gelu.py).

The path, each step a function below (timed by `benchmark`):
v1  the textbook kernel: x as a flat contiguous buffer in blocks of 128 elements, one a thread, row-major only; with
    the amax, the amax is a pass of its own before the cast (fp8.amax), as current scaling runs it: x read twice.
v2  the mainline's cast (llmpy.kernels.fp8.cast): (32, 128) tiles, 16 values a thread, 8 tiles a program down its
    column block; the amax maxed in registers, one atomic a program: x read once. Row-major, and transposed (the
    mainline's transposed copies until v5).
v3  a candidate for the transposed cast (not in the mainline; H200: 10% faster than v2's at C = 3072): taller (128, 64) tiles turned with tl.trans
    and stored with the output's contiguous index varying fastest.
v4  a candidate for a gradient's two copies (not in the mainline; H200: no faster than v2's two casts): v3's kernel also storing the
    row-major tile, so one read of x writes both layouts and the amax.
v5  the mainline's transposed copies since: no second cast at all. The row-major copy exists already (the forward
    cast the input, the input gradient cast dout), and fp8.transpose turns its bytes: 2*R*C bytes where a transposed
    cast moves 3*R*C, and a gradient's two copies 5*R*C as v2's two casts, but in one read of bf16.
Tried and dropped (commit 963df99; H200, 2026-12-05): v7, the turns in 32-bit words, four rows' bytes of a column
    packed into one word before the tile is turned, because Triton's turned byte tile crosses shared memory a byte at
    a time (its PTX for sm_90: 64 one-byte shared loads a thread for a (128, 128) tile at 8 warps). No gain: the
    byte transpose of d12's (65,536, 50,304) LM head gradient 1.705 ms, in words 1.694 at best (92% of the copy
    either way); a gradient's both layouts from one read at C = 3072 0.222 ms in words, 0.215 for v6 in bytes.
The bound: the faster of torch eager, (x * s).to(float8) (with x.abs().amax() where an amax is made, and
.t().contiguous() for the transposed copy), and torch.compile of the reference formula writing into our outputs.
"""

from common import Result, compare, compiled, device, mark_bound, timed

import math

import torch
import triton
import triton.language as tl

from llmpy.kernels import fp8 as mainline
from llmpy.kernels.fp8 import _round_to_fp8


def reference(x, scale, dtype):
    """fp8(x * s) by torch's conversion (round to nearest even), saturated by the clamp before it."""
    fp8_max = mainline.FORMATS[_format(dtype)][1]
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)


def _format(dtype):
    """The name fp8.FORMATS gives an FP8 dtype: "e4m3" or "e5m2"."""
    return next(name for name, spec in mainline.FORMATS.items() if spec[0] == dtype)


def current_scale(x, dtype):
    """The current scale of x, fp32 (1,) on its device: the largest power of two s with max |x| * s <= the format's
    largest value, as fp8.scale_from_amax computes it (in float64 here: log2 of a power of two is exact)."""
    fp8_max = mainline.FORMATS[_format(dtype)][1]
    exponent = math.floor(math.log2(fp8_max / x.abs().max().item()))
    return torch.tensor([2.0**exponent], device=x.device)


_V1_BLOCK = 128  # elements a program: one a thread with 4 warps


@triton.jit
def _cast_flat_kernel(out_ptr, x_ptr, scale_ptr, numel, FP8_MAX: tl.constexpr, MANTISSA: tl.constexpr,
                      MIN_EXP: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    # the clamp and the conversion: .to(tl.float8e4nv) on the GPU, rounded by hand under the interpreter
    q = _round_to_fp8(x * tl.load(scale_ptr), out_ptr.dtype.element_ty, FP8_MAX, MANTISSA, MIN_EXP)
    tl.store(out_ptr + offsets, q, mask=mask)


_V3_BLOCK_R, _V3_BLOCK_C, _V3_TILES = 128, 64, 4  # (128, 64) tiles, 32 values a thread with 8 warps; 512 rows a program


@triton.jit
def _cast_turned_kernel(
    out_t_ptr,  # fp8 (C, R) contiguous
    out_ptr,  # fp8 (R, C) contiguous, written if ROW_MAJOR
    x_ptr,  # bf16 (R, C), unit column stride
    scale_ptr,  # fp32 (1,): s
    amax_ptr,  # fp32 (1,): max |x| is atomically maxed into it if AMAX
    R,
    C,
    stride_r,
    FP8_MAX: tl.constexpr,
    MANTISSA: tl.constexpr,
    MIN_EXP: tl.constexpr,
    ROW_MAJOR: tl.constexpr,
    AMAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TILES: tl.constexpr,
):
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    scale = tl.load(scale_ptr)
    largest = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for tile in range(TILES):  # down the column block: one atomic a program, not one a tile, on the amax's address
        rows = (tl.program_id(0) * TILES + tile) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_x = (rows < R)[:, None] & (columns < C)[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_r + columns[None, :], mask=in_x, other=0.0)
        x = x.to(tl.float32)
        if AMAX:
            largest = tl.maximum(largest, tl.abs(x))
        q = _round_to_fp8(x * scale, out_t_ptr.dtype.element_ty, FP8_MAX, MANTISSA, MIN_EXP)  # (BLOCK_R, BLOCK_C)
        if ROW_MAJOR:
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + columns[None, :], q, mask=in_x)
        # (BLOCK_C, BLOCK_R): row c of the tile is BLOCK_R contiguous bytes of out's row c, x's rows varying fastest
        in_out = (columns < C)[:, None] & (rows < R)[None, :]
        tl.store(out_t_ptr + columns.to(tl.int64)[:, None] * R + rows[None, :], tl.trans(q), mask=in_out)
    if AMAX:
        tl.atomic_max(amax_ptr, tl.max(tl.max(largest, axis=1), axis=0), sem="relaxed")


def cast_v1(out, x, scale):
    """x (R, C) as a flat contiguous buffer in blocks of 128 elements with 4 warps: one element a thread, which
    loads its 2 bytes, multiplies by s, clamps to +-FP8_MAX and converts (fp8._round_to_fp8: .to(tl.float8e4nv) on the
    GPU; by hand under the interpreter, whose own conversion is wrong), and stores 1 byte. Row-major only.

    Coalesced, but narrow: a warp loads 64 contiguous bytes and stores 32, each thread one 2-byte load and one 1-byte
    store instruction, and the grid is R*C / 128 programs (1.5 million at R = 65,536, C = 3072), each paying its
    launch, index math and mask for 384 bytes. Contiguous x only.
    """
    assert x.is_contiguous() and out.is_contiguous() and out.shape == x.shape
    _, fp8_max, mantissa, min_exp = mainline.FORMATS[_format(out.dtype)]
    _cast_flat_kernel[(triton.cdiv(x.numel(), _V1_BLOCK),)](out, x, scale, x.numel(), FP8_MAX=fp8_max,
                                                            MANTISSA=mantissa, MIN_EXP=min_exp, BLOCK=_V1_BLOCK,
                                                            num_warps=4)


def cast_amax_v1(out, amax, x, scale):
    """The amax as current scaling makes it: a pass of its own over x first (fp8.amax: flat blocks of 4096, one
    atomic max a block), then cast_v1. Two reads of x, 5*R*C bytes where 3*R*C will do. (Current scaling also runs
    fp8.scale_from_amax between them, a one-thread launch turning the amax into s; here s is given, so that every
    version is checked and timed at the same scale.) amax is overwritten."""
    mainline.amax(amax, x)
    cast_v1(out, x, scale)


def cast_v2(out, x, scale):
    """The mainline, llmpy.kernels.fp8.cast without an amax (current scaling's cast, after fp8.amax): program (i, j)
    casts 8 tiles of (32, 128) one under the other in column block j, with 8 warps: each thread moves 16 values, in
    vectors of 8 contiguous bf16 (16 bytes) where v1 moves one value: a sixteenth of v1's instructions, and 1/256th of
    its programs. Any row stride of x (a column slice of a wider matrix)."""
    mainline.cast(out, x, scale)


def cast_amax_v2(out, amax, x, scale):
    """The mainline's delayed scaling, llmpy.kernels.fp8.cast with amax_out: v2's tiles also keep the running max of
    |x| in a (32, 128) fp32 register tile, reduced once a program into one atomic max (max is order-free: the amax is
    deterministic). x is read once: 3*R*C bytes against v1's 5*R*C. amax is maxed into, not overwritten."""
    mainline.cast(out, x, scale, amax_out=amax)


def cast_transposed_v2(out_t, x, scale):
    """The mainline's transposed cast, llmpy.kernels.fp8.cast(transpose=True), as FP8.backward_weight calls it (at the
    scale of the row-major cast before it, no amax): v2's tiles, each stored as it was loaded, element (r, c) to
    out_t[c, r]. Across a warp's threads x's columns vary fastest, and in out_t (C, R) neighbouring columns are R bytes
    apart: stored in that layout, each byte would land in a different row of out_t (unless the compiler reshuffles
    it: see v3). Out of one tile each row of out_t gets 32 contiguous bytes (the tile's 32 rows), one 32-byte
    sector."""
    mainline.cast(out_t, x, scale, transpose=True)


def cast_transposed_v3(out_t, x, scale):
    """A candidate, not in the mainline (measured on the H200: 0.172 ms against v2's 0.190 at C = 3072).

    v2's transposed store relies on the compiler to gather the bytes of a row of out_t: Triton's coalescing pass can
    see that the store's pointers run contiguously along the tile's rows (in runs of 32) and pick a layout for it
    with those varying fastest, reshuffling the tile through shared memory. v3 asks for that layout itself: it turns
    the rounded tile with tl.trans (in fp8, so the reshuffle moves a quarter of the bytes it would in fp32) and stores
    a (BLOCK_C, BLOCK_R) tile whose fastest index is x's row, out_t's contiguous one. And its tiles are (128, 64),
    taller than v2's (32, 128): each row of out_t gets 128 contiguous bytes a tile, a whole cache line, which 16-byte
    vector stores can write, while the loads still read 128 bytes (64 bf16) of each row of x.

    Expected: the transposed cast at the row-major cast's speed (v2 row-major), where v2's transposed store writes
    short runs or, if the compiler does not reshuffle it, single bytes. If the compiler already coalesces v2's store,
    only the longer runs remain, and the gain may be nothing.
    """
    _cast_turned(out_t, None, None, x, scale)


def cast_both_v2(out, out_t, amax, x, scale):
    """What the mainline did for an output gradient with FP8 weight gradients before v5: the row-major cast with its
    amax for the input gradient (FP8.backward_input), then the transposed cast for the weight gradient
    (backward_weight), two passes over x: 5*R*C bytes."""
    cast_amax_v2(out, amax, x, scale)
    cast_transposed_v2(out_t, x, scale)


def cast_both_v4(out, out_t, amax, x, scale):
    """A candidate, not in the mainline (measured on the H200: 0.348 ms against v2's two casts' 0.339 at C = 3072).

    One read of x for both copies a gradient needs and its amax: v3's kernel stores each rounded tile as it is
    (row-major, for the input gradient) and turned (for the weight gradient), and keeps v2's running max of |x|.
    4*R*C bytes against the two casts' 5*R*C: expected some 20% less time than cast_both_v2, if the two stores keep
    the pace of one. For dout both casts come one after the other in the backward (backward_input, then
    backward_weight), so nothing would have to be kept longer; the forward's input, cast row-major in the forward and
    transposed in the backward, would have to keep its transposed copy from one to the other.
    """
    _cast_turned(out_t, out, amax, x, scale)


def cast_transposed_v5(out_t, x, scale):
    """The mainline (llmpy/precision.py): the row-major FP8 copy turned, byte for byte, by fp8.transpose ((128, 128)
    tiles of bytes, turned with tl.trans). Here the copy is made first; the mainline has it already, so the benchmark
    times the turn alone (fp8.transpose)."""
    _turn(mainline.transpose, out_t, x, scale)


def _turn(transpose, out_t, x, scale):
    """x cast row-major, then turned by transpose(out_t, copy): v5 with the mainline's or another transpose kernel."""
    q = torch.empty(x.shape, dtype=out_t.dtype, device=x.device)
    mainline.cast(q, x, scale)
    transpose(out_t, q)


def cast_both_v5(out, out_t, amax, x, scale):
    """The mainline's two copies of a gradient: the row-major cast with its amax (backward_input), then that copy
    turned (backward_weight): 3*R*C + 2*R*C bytes, x read once."""
    cast_amax_v2(out, amax, x, scale)
    mainline.transpose(out_t, out)


def _cast_turned(out_t, out, amax, x, scale, tile=(_V3_BLOCK_R, _V3_BLOCK_C, _V3_TILES, 8)):
    """_cast_turned_kernel: out_t (C, R) = fp8(x * s)^T, and out (R, C) = fp8(x * s) if given, amax maxed into if
    given. x (R, C) bf16, unit column stride. tile: (BLOCK_R, BLOCK_C, TILES, warps), v3's by default."""
    R, C = x.shape
    assert x.stride(1) == 1 and out_t.is_contiguous() and out_t.shape == (C, R)
    assert out is None or (out.is_contiguous() and out.shape == x.shape and out.dtype == out_t.dtype)
    _, fp8_max, mantissa, min_exp = mainline.FORMATS[_format(out_t.dtype)]
    block_r, block_c, tiles, warps = tile
    grid = (triton.cdiv(R, block_r * tiles), triton.cdiv(C, block_c))
    # the pointers not used (ROW_MAJOR, AMAX off) are given out_t's and the scale's, never touched
    _cast_turned_kernel[grid](out_t, out_t if out is None else out, x, scale, scale if amax is None else amax, R, C,
                              x.stride(0), FP8_MAX=fp8_max, MANTISSA=mantissa, MIN_EXP=min_exp,
                              ROW_MAJOR=out is not None, AMAX=amax is not None, BLOCK_R=block_r,
                              BLOCK_C=block_c, TILES=tiles, num_warps=warps)


# v6: v4's kernel at other tiles (BLOCK_R, BLOCK_C, TILES, warps), to find whether one read writing both layouts can
# keep a copy's pace (v4's (128, 64) tiles did not: 0.348 ms at C = 3072 where 4 bytes a value at 3.7 TB/s is 0.22)
V6_TILES = [(128, 128, 1, 8), (128, 128, 2, 8), (64, 128, 2, 8), (128, 128, 1, 4), (64, 64, 4, 4), (256, 64, 1, 8),
            (64, 256, 1, 8)]


def cast_both_v6(tile):
    def version(out, out_t, amax, x, scale):
        _cast_turned(out_t, out, amax, x, scale, tile)
    return version


# the byte transpose (fp8.transpose) at other (BLOCK, warps): its tiles are square
TRANSPOSE_TILES = [(64, 4), (64, 8), (128, 4), (128, 16), (256, 8), (256, 16)]


def transpose_tiled(block, warps):
    def version(out_t, x8):
        R, C = x8.shape
        grid = (triton.cdiv(R, block), triton.cdiv(C, block))
        mainline._transpose_kernel[grid](out_t.view(torch.uint8), x8.view(torch.uint8), R, C, BLOCK=block,
                                         num_warps=warps)
    return version


def eager_cast(x, scale, dtype=torch.float8_e4m3fn):
    """torch code's cast: x * s (an fp32 tensor: s is one), then the conversion, two kernels. No clamp: at the current
    scale nothing exceeds the format's largest value."""
    return (x * scale).to(dtype)


def eager_cast_amax(x, scale, dtype=torch.float8_e4m3fn):
    """eager_cast and, for delayed scaling, the amax: a reduction kernel of its own."""
    return eager_cast(x, scale, dtype), x.abs().amax()


def eager_cast_transposed(x, scale, dtype=torch.float8_e4m3fn):
    """eager_cast, then the transposed copy (K-major, as the FP8 matmul takes it)."""
    return eager_cast(x, scale, dtype).t().contiguous()


def eager_cast_both(x, scale, dtype=torch.float8_e4m3fn):
    """A gradient's two copies and its amax in torch code: the cast once, its transpose copied out of it."""
    q = eager_cast(x, scale, dtype)
    return q, q.t().contiguous(), x.abs().amax()


def torch_cast(out, x, scale):
    """reference into our output, what torch.compile fuses into one kernel (and the clamp into it, for free)."""
    out.copy_(reference(x, scale, out.dtype))


def torch_cast_amax(out, amax, x, scale):
    torch_cast(out, x, scale)
    amax.copy_(torch.maximum(amax, x.abs().amax().float()))


def torch_cast_transposed(out_t, x, scale):
    out_t.copy_(reference(x, scale, out_t.dtype).t())


def torch_cast_both(out, out_t, amax, x, scale):
    """Both copies from one rounded tensor, so that torch.compile may store both from one read of x."""
    q = reference(x, scale, out.dtype)
    out.copy_(q)
    out_t.copy_(q.t())
    amax.copy_(torch.maximum(amax, x.abs().amax().float()))


# Tolerance: 0. Every version rounds the same exact fp32 product x * s (s a power of two) to the same grid, to nearest
# even, saturating: so each value must equal the reference's, and each amax the largest |x| (a max of bf16 values is
# one of them, exact in fp32). Compared as float values, a rel error of 0 is every value equal (the inputs hold no
# NaN; a signed zero compares equal to the other, the one way equal values can differ in their bits). The check has
# teeth: under the interpreter, a kernel like v1's converting with Triton's own .to() instead of _round_to_fp8 errs
# by 8e-2 (e4m3) and 1e-1 (e5m2) on the small check's input.


def _input(R, C, dev, seed):
    """Seeded x (R, C) bf16: randn times 2^k, k uniform in [-12, 4], so x spans some 20 binades: at the current
    scale the largest values land near the format's largest, the smallest in its subnormals or at zero. bf16's 8
    significant bits against e4m3's 4 and e5m2's 3 make many products fall exactly halfway: the ties are tested."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C, generator=g) * torch.exp2(torch.randint(-12, 5, (R, C), generator=g).float())
    return x.to(dev, torch.bfloat16)


# The layouts: the outputs a version writes, in the order of its arguments (then x and s).
LAYOUTS = {"row-major": ("out",), "row-major + amax": ("out", "amax"), "transposed": ("out_t",),
           "both layouts + amax": ("out", "out_t", "amax")}


def _into(eager):
    """An eager function, which returns its outputs, as a version writing them into the check's buffers."""
    def version(*args):
        *outputs, x, scale = args
        values = eager(x, scale, outputs[0].dtype)
        for into, value in zip(outputs, values if isinstance(values, tuple) else (values,)):
            into.copy_(value)
    return version


def check(small: bool) -> list[str]:
    """Every version against the reference, exactly, in both formats: at the current scale, where nothing saturates,
    with the torch bounds, and at 4 times it, where the largest values saturate (ours only: the bounds are timed at
    the current scale); the tiled candidates and the mainline's delayed cast also on x as a column slice of a wider
    matrix. small: R = 520 rows of C = 72: not a multiple of any tile, and over a v3 program's 512 x 64, so that the
    new kernel's programs meet at both edges (a v2 program covers 256 x 128; the mainline has tests of its own, in
    tests/kernels); else R = 65,536 rows of C = 3072, the benchmark's largest cast."""
    dev = device()
    R, C = (520, 72) if small else (64 * 1024, 3072)
    wide = _input(R, C + 24, dev, seed=R + C)
    x, x_slice = wide[:, :C].contiguous(), wide[:, :C]
    ours = {
        "row-major": {"v1": cast_v1, "v2 mainline": cast_v2},
        "row-major + amax": {"v1 amax pass then cast": cast_amax_v1, "v2 mainline": cast_amax_v2,
                             "v2 mainline, row-strided x": lambda out, amax, _, s: cast_amax_v2(out, amax, x_slice, s)},
        "transposed": {"v2 tiles": cast_transposed_v2, "v3 turned tiles": cast_transposed_v3,
                       "v5 mainline, the copy turned": cast_transposed_v5,
                       **{f"v5 turned, {b}x{b} tiles, {w} warps":
                          lambda out_t, x, s, b=b, w=w: _turn(transpose_tiled(b, w), out_t, x, s)
                          for b, w in TRANSPOSE_TILES},
                       "v3 turned tiles, row-strided x": lambda out_t, _, s: cast_transposed_v3(out_t, x_slice, s)},
        "both layouts + amax": {
            "v2 two casts": cast_both_v2, "v4 one read": cast_both_v4, "v5 mainline, cast then turned": cast_both_v5,
            "v4 one read, row-strided x": lambda out, out_t, amax, _, s: cast_both_v4(out, out_t, amax, x_slice, s),
            **{"v6 one read, ({}, {}) tiles x{}, {} warps".format(*t): cast_both_v6(t) for t in V6_TILES}},
    }
    bounds = {"row-major": (eager_cast, torch_cast), "row-major + amax": (eager_cast_amax, torch_cast_amax),
              "transposed": (eager_cast_transposed, torch_cast_transposed),
              "both layouts + amax": (eager_cast_both, torch_cast_both)}
    lines = []
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        for factor, scaled in ((1, "current scale"), (4, "4 x current scale, saturating")):
            scale = factor * current_scale(x, dtype)
            expected = {"out": reference(x, scale, dtype).float(), "amax": x.abs().amax().float().reshape(1)}
            expected["out_t"] = expected["out"].t()
            for layout, outputs in LAYOUTS.items():
                versions = dict(ours[layout])
                if factor == 1:
                    eager, compilable = bounds[layout]
                    versions["torch eager"] = _into(eager)
                    if dev == "cuda":
                        versions["torch.compile"] = compiled(compilable)
                for name, fn in versions.items():
                    # NaN where a version writes nothing: rel_error counts it as an infinite error
                    buffers = {"out": torch.full((R, C), float("nan"), device=dev).to(dtype),
                               "out_t": torch.full((C, R), float("nan"), device=dev).to(dtype),
                               "amax": torch.zeros(1, device=dev)}
                    fn(*(buffers[o] for o in outputs), x, scale)
                    lines.append(compare(f"{layout} {name} {_format(dtype)} {scaled}",
                                         **{o: (buffers[o].float(), expected[o], 0.0) for o in outputs}))
    return lines


def benchmark() -> list[Result]:
    """Each cast at two of d12's widths, R = 65,536 rows (B = 64, T = 1024): C = 3072 (the fc layer's output gradient,
    the fc projection's input: the largest casts) and C = 768 (the other layers' inputs, the projections' output
    gradients). e4m3 throughout: e5m2 moves the same bytes."""
    R = 64 * 1024
    results = []
    for C in (3072, 768):
        x = _input(R, C, "cuda", seed=C)
        scale = current_scale(x, torch.float8_e4m3fn)
        out = torch.empty(R, C, device="cuda", dtype=torch.float8_e4m3fn)
        out_t = torch.empty(C, R, device="cuda", dtype=torch.float8_e4m3fn)
        amax = torch.zeros(1, device="cuda")
        one_copy = 3 * R * C  # x read (2 bytes a value), one copy written (1 byte)
        two_copies = 4 * R * C
        op = f"fp8_cast C={C}"
        results += [timed(op, "v1 one element a thread", cast_v1, (out, x, scale), one_copy),
                    timed(op, "v2 tiles", cast_v2, (out, x, scale), one_copy, mainline=True)]
        results += mark_bound([timed(op, "torch eager", eager_cast, (x, scale), one_copy),
                               timed(op, "torch.compile", compiled(torch_cast), (out, x, scale), one_copy)])
        op = f"fp8_cast + amax C={C}"
        results += [timed(op, "v1 amax pass, then cast", cast_amax_v1, (out, amax, x, scale), one_copy),
                    timed(op, "v2 amax fused", cast_amax_v2, (out, amax, x, scale), one_copy, mainline=True)]
        results += mark_bound([
            timed(op, "torch eager", eager_cast_amax, (x, scale), one_copy),
            timed(op, "torch.compile", compiled(torch_cast_amax), (out, amax, x, scale), one_copy),
        ])
        op = f"fp8_cast transposed C={C}"
        mainline.cast(out, x, scale)  # v5's row-major copy, made before it as in the mainline
        results += [timed(op, "v2 tiles", cast_transposed_v2, (out_t, x, scale), one_copy),
                    timed(op, "v3 turned tiles", cast_transposed_v3, (out_t, x, scale), one_copy),
                    timed(op, "v5 the FP8 copy turned", mainline.transpose, (out_t, out), 2 * R * C,
                          mainline=True)]
        results += [timed(op, f"v5 turned, {b}x{b} tiles, {w} warps", transpose_tiled(b, w), (out_t, out), 2 * R * C)
                    for b, w in TRANSPOSE_TILES]
        results += mark_bound([
            timed(op, "torch eager", eager_cast_transposed, (x, scale), one_copy),
            timed(op, "torch.compile", compiled(torch_cast_transposed), (out_t, x, scale), one_copy),
        ])
        op = f"fp8_cast both layouts + amax C={C}"
        both_args = (out, out_t, amax, x, scale)
        results += [timed(op, "v2 two casts", cast_both_v2, both_args, two_copies),
                    timed(op, "v4 one read", cast_both_v4, both_args, two_copies),
                    *(timed(op, "v6 one read, ({}, {}) tiles x{}, {} warps".format(*t), cast_both_v6(t), both_args,
                            two_copies) for t in V6_TILES),
                    timed(op, "v5 cast, then turned", cast_both_v5, both_args, two_copies, mainline=True)]
        results += mark_bound([timed(op, "torch eager", eager_cast_both, (x, scale), two_copies),
                               timed(op, "torch.compile", compiled(torch_cast_both), both_args, two_copies)])
    return results


if __name__ == "__main__":
    import sys

    import run

    sys.exit(run.main(["fp8_cast"]))
