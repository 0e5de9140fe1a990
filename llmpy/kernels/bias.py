"""Bias gradient: dbias += column sums of dout, deterministically.

A bias of OC channels is added to every one of the N = B*T rows, so its gradient is the sum of dout over the rows:
dbias[c] += sum_n dout[n, c]. The sum runs over up to 65,536 rows; float atomics would make the result depend on the
order the GPU happens to schedule programs in, so the reduction runs in two fixed-order stages instead:

1. `_column_partial_sums_kernel`: the rows are split into G contiguous groups. Program (g, j) sums the rows of group g
   over column block j, tile by tile (a (ROWS, BLOCK_OC) tile of dout per iteration, added into an fp32 accumulator
   of the same shape, reduced over rows once at the end) and writes the group's sums to partials[g, columns j].
   dout is read exactly once, in wide coalesced tiles, and G * (OC / BLOCK_OC) programs keep every SM busy.
2. `_sum_partials_kernel`: one program per block of 32 columns adds partials[0..G-1] in order to the output (+=).
   The partials are G x OC fp32, a few MB at most: small next to dout (N x OC), but with only a few wide column
   blocks the stage was latency-bound (3 programs for OC = 768; BENCHMARKS.md, "Optimisation log", first row),
   so it takes narrow blocks: OC / 32 programs, each reading (64, 32) tiles down the groups.

The result depends only on G, which `bias_backward_scratch` derives from the shapes alone, so it is the same bits
every step. Layernorm's and GELU's backward reuse stage 2 (`sum_partials`) for the column sums they fuse in. The
model runs every layer's stage 2 together, at the end of its backward (`PartialSums`).

The value bias's gradient under cuDNN's attention needs no pass over an activation at all (`value_bias_backward`,
the reason in llmpy.models.gpt2.Attention): it is the attention projection's bias gradient times the projection's weight, a
(C,) x (C, C) product per layer.
"""

import torch
import triton
import triton.language as tl

# Stage 1 aims for this many programs: several per SM on a 132-SM H100, so the load of dout is spread evenly.
_TARGET_PROGRAMS = 1024
_TILE_ELEMENTS = 4096  # elements of dout per tile: 16 fp32 accumulators per thread with 8 warps


def column_tile(num_columns):
    """(ROWS, BLOCK_OC) of stage 1's tile: up to 256 columns (512 contiguous bytes of a bf16 row), rows to fill it."""
    block_columns = min(256, triton.next_power_of_2(num_columns))
    return _TILE_ELEMENTS // block_columns, block_columns


@triton.jit
def row_group_column_block(N, OC, rows_per_group, BLOCK_OC: tl.constexpr):
    """Program (g, j)'s share of an (N, OC) matrix: column block j (and its mask) of the rows [first_row, end_row)."""
    columns = tl.program_id(1) * BLOCK_OC + tl.arange(0, BLOCK_OC)
    first_row = tl.program_id(0) * rows_per_group
    return columns, columns < OC, first_row, tl.minimum(first_row + rows_per_group, N)


@triton.jit
def row_tile(tile_start, end_row, columns, column_mask, stride_row, ROWS: tl.constexpr):
    """The (ROWS, BLOCK_OC) tile of rows [tile_start, tile_start + ROWS) of a program's share: its rows, its mask (the
    rows before end_row, the columns in the matrix) and the element offsets of a matrix whose rows are stride_row
    apart (int64: N * OC can pass 2^31)."""
    rows = tile_start + tl.arange(0, ROWS)
    mask = (rows < end_row)[:, None] & column_mask[None, :]
    return rows, mask, rows.to(tl.int64)[:, None] * stride_row + columns[None, :]


@triton.jit
def _column_partial_sums_kernel(
    partials_ptr,  # fp32 (G, OC): out, partials[g, c] = sum of dout[n, c] over the rows n of group g; rows
    #                partials_stride_row apart
    dout_ptr,  # (N, OC), the activation dtype, rows stride_row apart
    N,
    OC,
    stride_row,
    partials_stride_row,
    rows_per_group,  # ceil(N / G)
    ROWS: tl.constexpr,
    BLOCK_OC: tl.constexpr,
):
    columns, column_mask, first_row, end_row = row_group_column_block(N, OC, rows_per_group, BLOCK_OC)
    accumulator = tl.zeros((ROWS, BLOCK_OC), dtype=tl.float32)
    for tile_start in range(first_row, end_row, ROWS):
        _, mask, offsets = row_tile(tile_start, end_row, columns, column_mask, stride_row, ROWS)
        accumulator += tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    partials_ptr += tl.program_id(0) * partials_stride_row
    tl.store(partials_ptr + columns, tl.sum(accumulator, axis=0), mask=column_mask)


@triton.jit
def _group_sums(partials_ptr, G, row_stride, columns, column_mask, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """partials[0..G-1, columns] (rows row_stride apart) added over the G rows in a fixed order: (BLOCK_C,) fp32."""
    accumulator = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
    for g_start in range(0, G, BLOCK_G):
        groups = g_start + tl.arange(0, BLOCK_G)
        mask = (groups < G)[:, None] & column_mask[None, :]
        accumulator += tl.load(partials_ptr + groups[:, None] * row_stride + columns[None, :], mask=mask, other=0.0)
    return tl.sum(accumulator, axis=0)


@triton.jit
def _sum_partials_kernel(
    out0_ptr,  # fp32 (C,): out_k[c] += sum_g partials[k, g, c], for k = program_id(1) < K
    out1_ptr,  # (K >= 2)
    out2_ptr,  # (K = 3)
    partials_ptr,  # fp32 (K, G, C), rows partials_row_stride apart, blocks partials_block_stride apart
    G,
    C,
    partials_row_stride,
    partials_block_stride,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    k = tl.program_id(1)
    columns = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    column_mask = columns < C
    total = _group_sums(partials_ptr + k * partials_block_stride, G, partials_row_stride, columns, column_mask,
                        BLOCK_G, BLOCK_C)
    out_ptr = out0_ptr
    if k == 1:
        out_ptr = out1_ptr
    if k == 2:
        out_ptr = out2_ptr
    previous = tl.load(out_ptr + columns, mask=column_mask)
    tl.store(out_ptr + columns, previous + total, mask=column_mask)


@triton.jit
def _sum_partials_by_table_kernel(
    out_ptr,  # fp32: a flat buffer, out[out_offset + c] += sum_g partials[partials_offset + g * C + c]
    partials_ptr,  # fp32: the slots' partials, each (G, C) contiguous
    table_ptr,  # int64 (tasks, 2): [out_offset, partials_offset] of task program_id(1)
    G,
    C,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    task = tl.program_id(1)
    out_ptr += tl.load(table_ptr + 2 * task)
    partials_ptr += tl.load(table_ptr + 2 * task + 1)
    columns = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    column_mask = columns < C
    total = _group_sums(partials_ptr, G, C, columns, column_mask, BLOCK_G, BLOCK_C)
    previous = tl.load(out_ptr + columns, mask=column_mask)
    tl.store(out_ptr + columns, previous + total, mask=column_mask)


def _stage2_blocks(G, C):
    """(BLOCK_G, BLOCK_C) of stage 2: narrow column blocks, so that even a few columns make many programs."""
    return min(64, triton.next_power_of_2(G)), min(32, triton.next_power_of_2(C))


def sum_partials(out, partials):
    """out (C,) fp32 += partials (G, C) fp32 summed over G, in a fixed order. partials' rows may be strided.

    Or up to three sums in one launch (layernorm's backward has three): out a list of K fp32 (C,) tensors and
    partials (K, G, C), out[k] += partials[k] summed over G.
    """
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    partials = partials if partials.dim() == 3 else partials[None]
    K, G, C = partials.shape
    assert K == len(outs) <= 3 and partials.stride(2) == 1
    assert all(o.is_contiguous() and o.shape == (C,) and o.dtype == torch.float32 for o in outs)
    outs += [outs[0]] * (3 - K)  # unused pointers
    block_groups, block_columns = _stage2_blocks(G, C)
    grid = (triton.cdiv(C, block_columns), K)
    _sum_partials_kernel[grid](
        *outs, partials, G, C, partials.stride(1), partials.stride(0),
        BLOCK_G=block_groups, BLOCK_C=block_columns, num_warps=4
    )


def bias_backward_scratch(N, OC, device):
    """The fp32 (G, OC) partial-sum buffer for bias_backward on (N, OC) gradients; allocate once, reuse every step."""
    return torch.empty((bias_backward_groups(N, OC), OC), dtype=torch.float32, device=device)


def bias_backward_groups(N, OC):
    """G, the number of row groups for (N, OC): stage 1 runs about _TARGET_PROGRAMS programs, G <= the row tiles."""
    rows, block_columns = column_tile(OC)
    column_blocks = triton.cdiv(OC, block_columns)
    return max(1, min(triton.cdiv(_TARGET_PROGRAMS, column_blocks), triton.cdiv(N, rows)))


def bias_backward(dbias, dout, scratch):
    """dbias (OC,) fp32 += dout (N, OC).sum(0), deterministic.

    dout: (N, OC) in the activation dtype with unit column stride; rows may be strided (a column slice of a wider
    matrix, e.g. the q part of dqkv).
    scratch: fp32 (G, OC) from bias_backward_scratch; any G >= 1 gives the right sums (G sets the summation order).
    dbias None: stage 1 only, the partial sums are left in scratch for a later stage 2 (PartialSums).
    """
    N, OC = dout.shape
    G = scratch.shape[0]
    assert dout.stride(1) == 1 and scratch.shape == (G, OC) and scratch.is_contiguous()
    rows, block_columns = column_tile(OC)
    _column_partial_sums_kernel[(G, triton.cdiv(OC, block_columns))](
        scratch, dout, N, OC, dout.stride(0), scratch.stride(0), triton.cdiv(N, G),
        ROWS=rows, BLOCK_OC=block_columns, num_warps=8
    )
    if dbias is not None:
        sum_partials(dbias, scratch)


class PartialSums:
    """Many column sums' stage 1 partials, whose stage 2 runs later, all in one launch.

    Slot i, partials[i] (G, C) fp32, holds a stage 1's G partial sums (bias_backward's scratch, a GELU or layernorm
    backward's); add_to_targets() adds each slot's sum over G into targets[i], a (C,) slice of the fp32 buffer out
    (None: a slot without a target, never read). The model gives every bias and layernorm of every layer a slot of
    its own and sums them all at the end of its backward: one launch for what took one per layernorm, GELU and
    query bias (146 a step at d36), each a tiny launch on a nearly idle GPU (BENCHMARKS.md, seventh session).
    """

    def __init__(self, out, targets, G, C):
        for t in targets:
            assert t is None or (t.shape == (C,) and t.is_contiguous() and t.dtype == torch.float32 and
                                 0 <= t.data_ptr() - out.data_ptr() < out.numel() * 4)
        self.partials = torch.empty((len(targets), G, C), dtype=torch.float32, device=out.device)
        tasks = [[(t.data_ptr() - out.data_ptr()) // 4, i * G * C] for i, t in enumerate(targets) if t is not None]
        self.out, self.table = out, torch.tensor(tasks, dtype=torch.int64, device=out.device)

    def add_to_targets(self):
        _, G, C = self.partials.shape
        block_groups, block_columns = _stage2_blocks(G, C)
        _sum_partials_by_table_kernel[(triton.cdiv(C, block_columns), self.table.shape[0])](
            self.out, self.partials, self.table, G, C, BLOCK_G=block_groups, BLOCK_C=block_columns, num_warps=4
        )


@triton.jit
def _value_bias_backward_kernel(
    dvalue_bias_ptr,  # fp32 (L, C), rows dvalue_bias_stride apart: out, row l = dproj_bias[l] @ proj_weight[l]
    dproj_bias_ptr,  # fp32 (L, C)
    proj_weight_ptr,  # (L, C, C), (out channel, in channel) per layer
    C,
    dvalue_bias_stride,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    layer = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # j: input channels of the projection
    column_mask = columns < C
    proj_weight_ptr += layer.to(tl.int64) * C * C
    accumulator = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for start in range(0, C, BLOCK_I):  # i: output channels, in a fixed order
        rows = start + tl.arange(0, BLOCK_I)
        row_mask = rows < C
        dproj_bias = tl.load(dproj_bias_ptr + layer * C + rows, mask=row_mask, other=0.0)
        weight = tl.load(proj_weight_ptr + rows[:, None] * C + columns[None, :],
                         mask=row_mask[:, None] & column_mask[None, :], other=0.0).to(tl.float32)
        accumulator += dproj_bias[:, None] * weight
    tl.store(dvalue_bias_ptr + layer * dvalue_bias_stride + columns, tl.sum(accumulator, axis=0), mask=column_mask)


def value_bias_backward(dvalue_bias, dproj_bias, proj_weight):
    """dvalue_bias[l] = dproj_bias[l] @ proj_weight[l] for every layer l (overwritten, deterministic).

    The attention's output atty feeds the projection out = atty @ W^T + b, so datty = dout @ W and datty's column
    sums are dout's column sums, the projection's bias gradient db, times W: colsum(datty) = db @ W. Under attention,
    colsum(datty) is also the value bias's gradient (llmpy.models.gpt2.Attention says why), which makes that gradient db @ W:
    (C,) x (C, C) per layer instead of a pass over the (N, C) datty. And as W does not change between the micro-batches
    of a step, the running total of db over them, times W, is the running total of the value bias's gradient.

    dvalue_bias: fp32 (L, C), unit column stride (the v part of the (L, 3C) qkv bias gradient); dproj_bias: fp32
    (L, C) contiguous; proj_weight: (L, C, C) contiguous, the projection's weight (out channel, in channel).
    """
    L, C = dproj_bias.shape
    assert dvalue_bias.shape == (L, C) and dvalue_bias.stride(1) == 1 and dproj_bias.is_contiguous()
    assert proj_weight.shape == (L, C, C) and proj_weight.is_contiguous()
    block_j = min(128, triton.next_power_of_2(C))
    _value_bias_backward_kernel[(L, triton.cdiv(C, block_j))](
        dvalue_bias, dproj_bias, proj_weight, C, dvalue_bias.stride(0), BLOCK_I=32, BLOCK_J=block_j, num_warps=4,
    )
