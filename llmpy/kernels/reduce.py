"""Sum of a vector into a scalar on the device, deterministically: the training loop's loss.

The trainer needs the mean of the per-token losses (N,) of every micro-step, and reads it once at the end of the
step. `sum_into` adds scale * sum(x) to a one-element fp32 buffer, so the micro-steps (and validation batches)
accumulate on the device with no host sync: with scale = 1 / (N * micro-steps) the buffer ends as the mean.

The kernel is one program that walks x in BLOCK-wide tiles, adding each tile into a BLOCK-lane fp32 accumulator,
then sums the lanes (a fixed tree) and adds the total to out. One program is enough: x is at most 65,536 fp32
values (256 KB) once per micro-step, about 16 tile loads at BLOCK = 4096, negligible next to a training step
(BENCHMARKS.md, "Design measurements quoted from the code"); spreading it over many programs would need a second
pass or float atomics (the latter makes the sum depend on scheduling order). The order of additions depends only
on n and BLOCK, so the result is the same bits every run.
"""

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 4096  # 16 fp32 lanes per thread at 8 warps


@triton.jit
def _sum_into_kernel(
    out_ptr,  # fp32 (1,): out[0] += scale * sum(x)
    x_ptr,  # (n,) any float dtype, summed in fp32
    n,
    scale,
    BLOCK: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    accumulator = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offsets = start + lanes
        accumulator += tl.load(x_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)
    total = tl.sum(accumulator, axis=0)
    tl.store(out_ptr, tl.load(out_ptr) + scale * total)


def sum_into(out, x, scale=1.0):
    """out (1,) fp32 += scale * x.sum(), deterministic. x: contiguous 1-D, fp32 (or bf16/fp16, summed in fp32)."""
    assert out.shape == (1,) and out.dtype == torch.float32 and x.dim() == 1 and x.is_contiguous()
    block = min(_MAX_BLOCK, triton.next_power_of_2(max(1, x.numel())))
    _sum_into_kernel[(1,)](out, x, x.numel(), float(scale), BLOCK=block, num_warps=8 if block >= 2048 else 4)
