"""LayerNorm and RMSNorm over the channels of each row, forward and backward.

Forward, per row x of C channels:  mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),
out = (x - mean) * rstd * weight + bias. mean and rstd are kept (fp32) for the backward.

Every layernorm after the first normalizes the residual stream just after a projection was added into it. That add
happens in the projection matmul's epilogue (llmpy.vendor.matmul_forward with residual=), so the layernorm reads the
new residual stream once and nothing else; dev/kernels/layernorm.py has the add fused into the layernorm instead,
which moves one more row per row.

Backward, with xhat = (x - mean) * rstd and dnorm = dout * weight (all per row):
  dinp  += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat))
  dweight += sum over rows of dout * xhat,   dbias += sum over rows of dout
dinp accumulates (+=) because the layernorm input is the residual stream, whose gradient also arrives straight
through the residual connection, as in llm.c.

RMSNorm is Llama 3's norm (llmpy.configs.llama3), LayerNorm without the centring and without the bias:
  rstd = 1 / sqrt(sum(x^2) / C + eps),  out = x * rstd * weight,  only rstd (fp32) kept for the backward;
  with xhat = x * rstd and dnorm = dout * weight:  dinp += rstd * (dnorm - xhat * mean(dnorm * xhat)),
  dweight += sum over rows of dout * xhat.
inp, out, dout, dinp (N, C) in the activation dtype (N = B*T, C = 2048 for Llama 3.2 1B, 4096 for Llama 3.1 8B),
weight (C,) in the parameter dtype, rstd fp32 (N,), the backward's scratch fp32 (G, C): dweight's partials only.
dinp accumulates as LayerNorm's does: the input is the residual stream here too. The forward computes
x * rstd * weight in fp32 and rounds once; train_llama3_torch.py's RMSNorm (Meta's, llm.c's) rounds x * rstd to
the activation dtype before the weight multiplies it, so in bf16 the two may differ by a rounding.
Under --precision fp8 the forward can write the next matmul's e4m3 input itself (fp8_out): fp8(out * scale) in
out's stead, with out's amax, the values a separate cast of out would give (llmpy.precision, FP8.fp8_input). So can
the backward write the residual stream's gradient it updates in e5m2 too (fp8_out, beside dinp, which the residual
stream still needs): that gradient is the output gradient of the projection below (FP8.fp8_grad), whose cast it
spares a read of the (N, C) bf16 tensor.
The two norms are one forward and one backward kernel with a constexpr switch, RMS, that compiles the mean, the
bias and their gradients away: RMSNorm shares LayerNorm's tiling, pipelining and deterministic two-stage sums
below, and LayerNorm's compiled kernels are what they were without the switch (the same PTX for sm_90, debug line
numbers aside).

Kernel design. A row (C <= 1600 in GPT-2, 2048 to 4096 in Llama 3) fits in registers, so each program works on a
(ROWS, BLOCK_C) tile: ROWS whole rows, BLOCK_C = next power of two >= C with the tail masked. Statistics are
two-pass over registers (mean, then the centred sum of squares), so the input is read from memory once; weight and
bias are loaded once per program and shared by its rows. ROWS is chosen so the tile holds ~4096 elements: C = 768
gives 4 rows, 65,536 rows give 16,384 programs. The forward reads each row once and writes it once plus 8 bytes of
statistics (RMSNorm: 4): memory-bound, each byte touched once, in 16-byte vector accesses (Triton specializes C as a
multiple of 16, as every GPT-2 width is).

The backward runs G programs (G <= 512, from `layernorm_backward_scratch`), each over a contiguous group of rows in
tiles of ROWS rows, with 4 warps and the tile loop software-pipelined 3 deep: the loads of the next tiles are issued
before this tile's reductions finish. Without it each tile was a full round trip to memory, well short of a copy's
bandwidth (BENCHMARKS.md, third session's last run, and "Design measurements quoted from the code"; 8 warps pipelined
were slightly slower). Each tile's dinp is complete within the tile (a row's reductions are row-local), so it is read,
added to and written back at once. The weight and bias gradients are summed over the group in fp32 registers and
written as per-group partial sums to the scratch buffer; `bias.sum_partials` then adds the G partials in a fixed
order. No atomics: the same inputs give the same bits. With the e5m2 output (fp8_out) the tiles are one row each:
the amax's (ROWS, BLOCK_C) accumulator, a fourth beside dweight's, dbias's and dinp's sums, crowds the registers at
_row_tile's rows; one row a tile is the fastest of the tiles dev/fp8_fused_kernels.py --sweep times (BENCHMARKS.md).

The backward can also sum the columns of the dinp it writes: dinp is the residual stream's gradient, and the
residual stream's gradient at that point is also the output gradient of the projection (attention or MLP) whose
output was added into the stream just before, so its column sums are that projection's bias gradient. Summing here
saves the bias gradient a pass over an (N, C) matrix.
"""

import torch
import triton
import triton.language as tl

from .bias import sum_partials
from .fp8 import fused_output, store_scaled
from .rounding import round_to


_TILE_ELEMENTS = 4096  # elements per (ROWS, BLOCK_C) tile: 16 per thread with 8 warps
_MAX_BACKWARD_GROUPS = 512  # ~4 programs per SM on H100; the same on every GPU, so results do not depend on it


def _row_tile(C):
    """(ROWS, BLOCK_C, num_warps) for rows of C channels."""
    block_c = triton.next_power_of_2(C)
    rows = max(1, _TILE_ELEMENTS // block_c)
    num_warps = 8 if rows * block_c >= 4096 else 4
    return rows, block_c, num_warps


@triton.jit
def _layernorm_forward_kernel(
    out_ptr,  # (N, C) activation dtype: the normalized rows
    mean_ptr,  # fp32 (N,) (not touched when RMS)
    rstd_ptr,  # fp32 (N,)
    inp_ptr,  # (N, C): the rows to normalize
    weight_ptr,  # (C,)
    bias_ptr,  # (C,) (not touched when RMS)
    N,
    C,
    eps,
    out8_ptr,  # (N, C) float8 (if FP8): written in out's stead
    scale_ptr,  # fp32 (1,): out8's scale (if FP8)
    amax_ptr,  # fp32 (1,): max |out| is atomically maxed into it (if FP8)
    RMS: tl.constexpr,  # RMSNorm: no mean subtracted, no bias
    FP8: tl.constexpr,  # out8 = fp8(out * scale) instead of out: the next matmul's FP8 input (llmpy.precision)
    FP8_MAX: tl.constexpr,
    MANTISSA: tl.constexpr,
    MIN_EXP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    columns = tl.arange(0, BLOCK_C)
    row_mask = rows < N
    column_mask = columns < C
    mask = row_mask[:, None] & column_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * C + columns[None, :]

    x = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    if RMS:
        centered = x  # not centred; masked elements are already 0
    else:
        mean = tl.sum(x, axis=1) / C  # (ROWS,)
        centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / C + eps)  # (ROWS,)
    weight = tl.load(weight_ptr + columns, mask=column_mask).to(tl.float32)
    if RMS:
        out = centered * rstd[:, None] * weight[None, :]
    else:
        bias = tl.load(bias_ptr + columns, mask=column_mask).to(tl.float32)
        out = centered * rstd[:, None] * weight[None, :] + bias[None, :]
    out = round_to(out, out_ptr.dtype.element_ty)
    if FP8:  # out rounded to the activation dtype first: the FP8 values a cast of the stored out would give
        magnitudes = store_scaled(out8_ptr, offsets, out.to(tl.float32), mask, scale_ptr, FP8_MAX, MANTISSA, MIN_EXP)
        tl.atomic_max(amax_ptr, tl.max(magnitudes), sem="relaxed")
    else:
        tl.store(out_ptr + offsets, out, mask=mask)
    if not RMS:
        tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


def _forward(out, mean, rstd, inp, weight, bias, eps, fp8_out):
    """layernorm_forward's and, with mean and bias None, rmsnorm_forward's launch."""
    C = inp.shape[-1]
    N = inp.numel() // C
    rms = mean is None
    assert inp.is_contiguous() and out.is_contiguous() and rstd.numel() == N and (rms or mean.numel() == N)
    fp8_pointers, fp8_constants = fused_output(fp8_out, out)
    rows, block_c, num_warps = _row_tile(C)
    _layernorm_forward_kernel[(triton.cdiv(N, rows),)](
        # RMSNorm never touches mean_ptr or bias_ptr: rstd and weight are placeholders
        out, rstd if rms else mean, rstd, inp, weight, weight if rms else bias, N, C, eps, *fp8_pointers,
        RMS=rms, ROWS=rows, BLOCK_C=block_c, num_warps=num_warps, **fp8_constants,
    )


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps=1e-5, fp8_out=None):
    """out (N, C) = layernorm(inp (N, C)) * weight (C,) + bias (C,); mean, rstd fp32 (N,) written for the backward.

    All row tensors contiguous; inp and out in the activation dtype (bf16 or fp32), weight and bias in the
    parameter dtype. fp8_out (out8 (N, C) float8, scale fp32 (1,), amax fp32 (1,)), from the next matmul's
    precision (llmpy.precision.FP8.fp8_input): out8 = fp8(out * scale) is written instead of out, as fp8.cast of
    out would write it, and max |out| maxed into amax; the cast fused into the norm saves it a pass.
    """
    _forward(out, mean, rstd, inp, weight, bias, eps, fp8_out)


def rmsnorm_forward(out, rstd, inp, weight, eps=1e-5, fp8_out=None):
    """out (N, C) = inp (N, C) * rstd * weight (C,), rstd = 1 / sqrt(mean(inp^2) + eps) per row; rstd fp32 (N,)
    written for the backward. Tensors and fp8_out as layernorm_forward's."""
    _forward(out, None, rstd, inp, weight, None, eps, fp8_out)


@triton.jit
def _layernorm_backward_kernel(
    dinp_ptr,  # (N, C) activation dtype: dinp += the layernorm's input gradient
    partials_ptr,  # fp32 (3, G, C): out, [0, g] = group g's sum of dout * xhat, [1, g] = its sum of dout
    #                (not written when RMS: the partials are then (G, C)), [2, g] = its sum of the updated dinp
    #                (written only when SUM_DINP)
    dout_ptr,  # (N, C)
    inp_ptr,  # (N, C): the forward's input
    weight_ptr,  # (C,)
    mean_ptr,  # fp32 (N,) (not touched when RMS)
    rstd_ptr,  # fp32 (N,)
    N,
    C,
    G,
    rows_per_group,  # ceil(N / G)
    out8_ptr,  # fp8 (N, C): with FP8, out, fp8(updated dinp * scale), beside dinp
    scale_ptr,  # fp32 (1,)
    amax_ptr,  # fp32 (1,): max |updated dinp| is atomically maxed into it
    SUM_DINP: tl.constexpr,
    RMS: tl.constexpr,  # RMSNorm: no mean subtracted, no bias gradient
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MANTISSA: tl.constexpr,
    MIN_EXP: tl.constexpr,
):
    group = tl.program_id(0)
    columns = tl.arange(0, BLOCK_C)
    column_mask = columns < C
    weight = tl.load(weight_ptr + columns, mask=column_mask, other=0.0).to(tl.float32)
    first_row = group * rows_per_group
    end_row = tl.minimum(first_row + rows_per_group, N)

    dweight_sum = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    dbias_sum = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    dinp_sum = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    largest = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)  # |updated dinp|, elementwise over the tiles (FP8)
    # num_stages=3: the loads of the next two tiles are in flight while this one is reduced (the tiles are
    # independent but for the accumulators), so the group's rows stream without a round trip to memory per tile
    for tile_start in tl.range(first_row, end_row, ROWS, num_stages=3):
        rows = tile_start + tl.arange(0, ROWS)
        row_mask = rows < end_row
        mask = row_mask[:, None] & column_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * C + columns[None, :]
        # masked elements load as 0, so they add nothing to the sums below
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if RMS:  # not centred
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)

        dnorm = dout * weight[None, :]
        if RMS:
            dnorm_xhat_mean = tl.sum(dnorm * xhat, axis=1) / C  # (ROWS,)
            dx = (dnorm - xhat * dnorm_xhat_mean[:, None]) * rstd[:, None]
        else:
            dnorm_mean = tl.sum(dnorm, axis=1) / C  # (ROWS,)
            dnorm_xhat_mean = tl.sum(dnorm * xhat, axis=1) / C  # (ROWS,)
            dx = (dnorm - dnorm_mean[:, None] - xhat * dnorm_xhat_mean[:, None]) * rstd[:, None]
        dinp = tl.load(dinp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dinp = round_to(dinp + dx, dinp_ptr.dtype.element_ty)
        tl.store(dinp_ptr + offsets, dinp, mask=mask)
        if FP8:  # from the stored (rounded) values: the bytes a cast of dinp would write
            largest = tl.maximum(largest, store_scaled(out8_ptr, offsets, dinp.to(tl.float32), mask, scale_ptr,
                                                       FP8_MAX, MANTISSA, MIN_EXP))

        dweight_sum += dout * xhat
        if not RMS:
            dbias_sum += dout
        if SUM_DINP:  # the stored (rounded) values, as a separate pass over dinp would read them
            dinp_sum += dinp.to(tl.float32)
    tl.store(partials_ptr + group * C + columns, tl.sum(dweight_sum, axis=0), mask=column_mask)
    if not RMS:
        tl.store(partials_ptr + (G + group) * C + columns, tl.sum(dbias_sum, axis=0), mask=column_mask)
    if SUM_DINP:
        tl.store(partials_ptr + (2 * G + group) * C + columns, tl.sum(dinp_sum, axis=0), mask=column_mask)
    if FP8:
        tl.atomic_max(amax_ptr, tl.max(tl.max(largest, axis=1), axis=0), sem="relaxed")


def layernorm_backward_groups(N, C):
    """G, the number of row groups (programs) of the backward on (N, C) rows."""
    rows, _, _ = _row_tile(C)
    return max(1, min(_MAX_BACKWARD_GROUPS, triton.cdiv(N, rows)))


def rmsnorm_backward_groups(N, C):
    """G of rmsnorm_backward on (N, C) rows: LayerNorm's, as the two backwards are one kernel."""
    return layernorm_backward_groups(N, C)


def layernorm_backward_scratch(N, C, device):
    """The fp32 (3, G, C) partial-sum buffer for layernorm_backward on (N, C) rows; allocate once, reuse every step."""
    return torch.empty((3, layernorm_backward_groups(N, C), C), dtype=torch.float32, device=device)


def rmsnorm_backward_scratch(N, C, device):
    """The fp32 (G, C) partial-sum buffer for rmsnorm_backward on (N, C) rows; allocate once, reuse every step."""
    return torch.empty((rmsnorm_backward_groups(N, C), C), dtype=torch.float32, device=device)


def _backward(dinp, partials, dout, inp, weight, mean, rstd, sum_dinp, fp8_out):
    """Stage 1 of layernorm_backward and, with mean None, of rmsnorm_backward: the kernel, G = partials.shape[-2]."""
    C = inp.shape[-1]
    N = inp.numel() // C
    G = partials.shape[-2]
    assert dinp.is_contiguous() and dout.is_contiguous() and inp.is_contiguous() and partials.is_contiguous()
    rms = mean is None
    rows, block_c, _ = _row_tile(C)
    if fp8_out is not None:  # one row a tile: the amax's accumulator crowds the registers at _row_tile's (docstring)
        rows = 1
    fp8_pointers, fp8_constants = fused_output(fp8_out, dinp)
    _layernorm_backward_kernel[(G,)](
        # RMSNorm never reads mean_ptr: rstd is a placeholder
        dinp, partials, dout, inp, weight, rstd if rms else mean, rstd, N, C, G, triton.cdiv(N, G), *fp8_pointers,
        SUM_DINP=sum_dinp, RMS=rms, ROWS=rows, BLOCK_C=block_c,
        num_warps=4,  # 4 warps pipeline better than 8 (docstring)
        **fp8_constants,
    )


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, dinp_column_sums=None,
                       fp8_out=None):
    """dinp (N, C) += d loss / d inp;  dweight, dbias fp32 (C,) += their gradients (deterministic).
    With dinp_column_sums, fp32 (C,): dinp_column_sums += the updated dinp summed over its rows (deterministic).
    fp8_out (out8, scale, amax), from the precision of the projection whose output gradient the updated dinp is
    (llmpy.precision.FP8.fp8_grad): out8 = fp8(dinp * scale) is written too, as fp8.cast of the updated dinp would
    write it, and max |dinp| maxed into amax.

    dout, inp, dinp: contiguous (N, C) in the activation dtype; mean, rstd: fp32 (N,) from the forward;
    scratch: fp32 (3, G, C) from layernorm_backward_scratch (any G >= 1 is correct; G sets the summation order).
    dweight and dbias None: stage 1 only, the partial sums of dweight, dbias (and the updated dinp, if scratch has 3
    blocks) are left in scratch for a later stage 2 (bias.PartialSums).
    """
    C = inp.shape[-1]
    K, G = scratch.shape[:2]
    assert scratch.shape == (K, G, C) and K in (2, 3)
    sum_dinp = K == 3 if dweight is None else dinp_column_sums is not None
    _backward(dinp, scratch, dout, inp, weight, mean, rstd, sum_dinp, fp8_out)
    if dweight is None:
        return
    assert dweight.shape == (C,) and dbias.shape == (C,)
    if sum_dinp:
        sum_partials([dweight, dbias, dinp_column_sums], scratch)
    else:
        sum_partials([dweight, dbias], scratch[:2])


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, scratch, fp8_out=None):
    """dinp (N, C) += d loss / d inp;  dweight fp32 (C,) += its gradient (deterministic). fp8_out: layernorm_backward's.

    dout, inp, dinp: contiguous (N, C) in the activation dtype; rstd: fp32 (N,) from rmsnorm_forward;
    scratch: fp32 (G, C) from rmsnorm_backward_scratch (any G >= 1 is correct; G sets the summation order).
    dweight None: stage 1 only, the partial sums of dweight are left in scratch for a later stage 2
    (bias.PartialSums: scratch is then one of its slots).
    """
    C = inp.shape[-1]
    assert scratch.dim() == 2 and scratch.shape[1] == C
    _backward(dinp, scratch, dout, inp, weight, None, rstd, sum_dinp=False, fp8_out=fp8_out)
    if dweight is not None:
        assert dweight.shape == (C,)
        sum_partials(dweight, scratch)
