"""The global gradient norm and the clipping scale, computed on the device without a host sync.

`global_norm_squared`: out[0] = sum of x^2 over the flat fp32 gradient buffer (P up to 1.6e9 for GPT-2 1.5B).
Deterministic, in two stages:
1. G programs (G <= 1024, from `global_norm_scratch`), each over a contiguous chunk of x: it streams the chunk in
   blocks of 4096 elements into a (4096,) fp32 accumulator (elementwise, so the loop carries no reduction), sums the
   accumulator once at the end and writes partials[g]. x is read once, in 16-byte vector loads; 1024 programs are
   several per SM, enough to saturate memory bandwidth. Offsets are int64: P * 4 bytes exceeds 2^31.
2. One program adds the G partials in a fixed order into out[0] (reduce.sum_into, after zeroing out).
Each lane's accumulator adds P / (G * 4096) values (~30 for GPT-2 124M), so the fp32 sum stays accurate.

`clip_scale`: scale = min(1, max_norm / (sqrt(norm_sq) + 1e-6)) in a one-program kernel, so the gradient scale stays
on the GPU: AdamW reads it from device memory, and a captured step never waits for the host.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .reduce import sum_into

_BLOCK = 16384 if INTERPRET else 4096  # the interpreter's cost is per block: a quarter of them there
_MAX_PROGRAMS = 1024


@triton.jit
def _sum_of_squares_partials_kernel(
    partials_ptr,  # fp32 (G,): out, partials[g] = sum of x^2 over chunk g
    x_ptr,  # fp32 (P,)
    P,
    blocks_per_program,  # chunk length in blocks of BLOCK elements
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    offsets = program.to(tl.int64) * blocks_per_program * BLOCK + tl.arange(0, BLOCK)
    accumulator = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(blocks_per_program):
        x = tl.load(x_ptr + offsets, mask=offsets < P, other=0.0)
        accumulator += x * x
        offsets += BLOCK
    tl.store(partials_ptr + program, tl.sum(accumulator, axis=0))


@triton.jit
def _clip_scale_kernel(scale_ptr, norm_sq_ptr, max_norm):
    norm = tl.sqrt(tl.load(norm_sq_ptr))
    scale = tl.minimum(max_norm / (norm + 1e-6), 1.0)
    tl.store(scale_ptr, tl.where(max_norm > 0.0, scale, 1.0))


def global_norm_scratch(P, device):
    """The fp32 (G,) partial-sum buffer for global_norm_squared over P elements; allocate once, reuse every step."""
    programs = max(1, min(_MAX_PROGRAMS, triton.cdiv(P, _BLOCK)))
    return torch.empty((programs,), dtype=torch.float32, device=device)


def global_norm_squared(out, x, scratch):
    """out fp32 (1,) = sum(x^2) over the contiguous fp32 buffer x (P,) (overwritten, not accumulated).

    scratch: fp32 (G,) from global_norm_scratch (any G >= 1 is correct; G sets the summation order).
    """
    assert x.dtype == torch.float32 and x.is_contiguous() and out.numel() == 1 and scratch.is_contiguous()
    P = x.numel()
    G = scratch.numel()
    blocks_per_program = triton.cdiv(triton.cdiv(P, _BLOCK), G)
    _sum_of_squares_partials_kernel[(G,)](scratch, x, P, blocks_per_program, BLOCK=_BLOCK, num_warps=8)
    out.zero_()
    sum_into(out, scratch)


def clip_scale(scale_out, norm_sq, max_norm):
    """scale_out fp32 (1,) = min(1, max_norm / (sqrt(norm_sq) + 1e-6)), on the device; max_norm <= 0 means no clipping
    (scale 1). norm_sq: fp32 (1,) from global_norm_squared. max_norm is fixed for a run: a captured graph keeps it."""
    _clip_scale_kernel[(1,)](scale_out, norm_sq, float(max_norm), num_warps=1)
