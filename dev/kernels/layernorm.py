"""LayerNorm, forward (alone and fused with the residual add) and backward: from three kernels to the mainline's.

The op, per row x of C channels (N = B*T rows, C = 768 for GPT-2 d12):
    mean = sum(x) / C,   rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),   xhat = (x - mean) * rstd
    out  = xhat * weight + bias                                 (mean and rstd are kept, fp32, for the backward)
Backward, with dnorm = dout * weight (the gradient reaching xhat), per row:
    dinp += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat))
    dweight += sum over rows of dout * xhat,   dbias += sum over rows of dout
(dinp accumulates: the layernorm's input is the residual stream, whose gradient also arrives straight through the
residual connection.) The residual variant computes residual = inp1 + inp2 and then the layernorm of it, writing both.
In the model the backward also sums the columns of the updated dinp: the residual stream's gradient there is the
output gradient of the projection (attention or MLP) added into the stream just before, so its column sums are that
projection's bias gradient, dinp_column_sums (C,) fp32 += dinp.sum(0).

Bytes the op must move (bf16 activations, es = 2 bytes): the forward reads x and writes out (2 * N*C*es) plus 8 bytes
of statistics per row; the fused residual forward reads two inputs and writes two outputs (4 * N*C*es); the backward
reads dout, x and dinp and writes dinp (4 * N*C*es) plus the statistics, with or without the column sums. Weight,
bias and the fp32 gradients are C values each, nothing next to N*C. The work per byte is a few flops: all of it is
memory-bound, and the best a kernel can do is touch each byte once, in wide vector accesses, with enough programs in
flight to fill the GPU.

The path, each step a function below (timed by `benchmark`, explained in dev/kernels/README.md):
forward   v1  three kernels, one program per row each: mean, then variance, then normalize. Reads x three times.
          v2  one program per row, the whole row in registers, both statistics from registers: reads x once.
          v3  the mainline (llmpy.kernels.layernorm): like v2 with several rows per program, so fewer, fuller programs
              share the weight and bias loads.
residual  v1  an add kernel, then the mainline's layernorm: the sum is written, then read back.
          v2  one fused kernel: the sum is normalized while it is still in registers. (The mainline now adds the
              residual in the projection matmul's epilogue and runs the plain layernorm on the sum.)
backward  v1  one program per row, dweight and dbias summed with float atomics: N-way contention on C addresses, and
              the order of the additions (hence the bits) changes from run to run.
          v2  G programs, each over a contiguous group of rows, one row per iteration, summing dweight and dbias in
              registers and writing one partial sum per group; a second small kernel adds the G partials in order.
              No atomics: deterministic.
          v3  the mainline: like v2, with tiles of several rows per iteration (more loads in flight per program).
          v4  the mainline as the model calls it: v3 also sums the columns of the dinp it has just written, a third
              partial sum per group, added up by the same second launch. Without it the projection's bias gradient
              reads the (N, C) dinp back in a pass of its own: 5 row transfers instead of 4.
fp8       the forward under --precision fp8, whose output only the next matmul reads, in e4m3 at a delayed scale
              with its amax (llmpy.precision):
          v3  the mainline's layernorm, then fp8.cast of its output: out written (2 bytes a value), read back (2),
              cast (1): 2*N*C*es + N*C bytes after the read of x.
          v5  the mainline under FP8: the layernorm writes fp8(out * s) in out's stead, and maxes max |out| into the
              amax (fp8_out): x read, one byte a value written. Expected at the memory's pace: ~3/5 of v3's bytes.
The bound: the fastest of torch's fused eager kernels (native_layer_norm and its backward; for v4 followed by a
column sum of dinp) and torch.compile of the torch code (`reference_*` in fp32, with the same in-place accumulation as
ours; for v4 with the column sum compiled in).
"""

from common import Result, assert_close, compiled, device, mark_bound, timed

import torch
import triton
import triton.language as tl

from llmpy.kernels import fp8
from llmpy.kernels import layernorm as mainline
from llmpy.kernels.bias import bias_backward, bias_backward_scratch, sum_partials
from llmpy.kernels.rounding import round_to

EPS = 1e-5


def reference_forward(inp, weight, bias, eps=EPS):
    """(out, mean, rstd) in the dtype of the inputs: plain torch, used in float64 as the reference."""
    mean = inp.mean(-1)
    centered = inp - mean[:, None]
    rstd = torch.rsqrt((centered * centered).mean(-1) + eps)
    return centered * rstd[:, None] * weight + bias, mean, rstd


def reference_backward(dout, inp, weight, mean, rstd):
    """(dinp, dweight, dbias), the gradients of the forward above (without accumulation), in the inputs' dtype."""
    xhat = (inp - mean[:, None]) * rstd[:, None]
    dnorm = dout * weight
    dinp = (dnorm - dnorm.mean(-1, keepdim=True) - xhat * (dnorm * xhat).mean(-1, keepdim=True)) * rstd[:, None]
    return dinp, (dout * xhat).sum(0), dout.sum(0)


# Forward v1: three kernels. Each program walks one row in chunks of BLOCK channels, so any C works with one BLOCK.


@triton.jit
def _row_mean_kernel(mean_ptr, inp_ptr, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_start = inp_ptr + row.to(tl.int64) * C
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, C, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        total += tl.load(row_start + columns, mask=columns < C, other=0.0).to(tl.float32)
    tl.store(mean_ptr + row, tl.sum(total, axis=0) / C)


@triton.jit
def _row_rstd_kernel(rstd_ptr, inp_ptr, mean_ptr, C, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_start = inp_ptr + row.to(tl.int64) * C
    mean = tl.load(mean_ptr + row)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, C, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        x = tl.load(row_start + columns, mask=columns < C, other=0.0).to(tl.float32)
        centered = tl.where(columns < C, x - mean, 0.0)  # the masked lanes loaded 0, which is not the mean
        total += centered * centered
    tl.store(rstd_ptr + row, tl.rsqrt(tl.sum(total, axis=0) / C + eps))


@triton.jit
def _normalize_kernel(out_ptr, inp_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offset = row.to(tl.int64) * C
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    for start in range(0, C, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        mask = columns < C
        x = tl.load(inp_ptr + offset + columns, mask=mask).to(tl.float32)
        weight = tl.load(weight_ptr + columns, mask=mask).to(tl.float32)
        bias = tl.load(bias_ptr + columns, mask=mask).to(tl.float32)
        out = (x - mean) * rstd * weight + bias
        tl.store(out_ptr + offset + columns, round_to(out, out_ptr.dtype.element_ty), mask=mask)


def forward_v1(out, mean, rstd, inp, weight, bias):
    """Three kernels, each one program per row: mean, variance (needs the mean), normalize (needs both).

    The textbook two-pass algorithm, one pass per kernel. Correct and numerically sound (the variance is summed over
    centred values, no E[x^2] - E[x]^2 cancellation), but x crosses the memory bus three times and there are three
    launches: about 4 row-sized transfers (3 reads, 1 write) where 2 would do.
    """
    N, C = inp.shape
    _row_mean_kernel[(N,)](mean, inp, C, BLOCK=256)
    _row_rstd_kernel[(N,)](rstd, inp, mean, C, EPS, BLOCK=256)
    _normalize_kernel[(N,)](out, inp, mean, rstd, weight, bias, C, BLOCK=256)


# Forward v2: one program per row, the row in registers.


@triton.jit
def _forward_row_kernel(out_ptr, mean_ptr, rstd_ptr, inp_ptr, weight_ptr, bias_ptr, C, eps, residual_ptr, branch_ptr,
                        BLOCK_C: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    # with ADD_RESIDUAL: residual = inp + branch is written, and normalized (residual_v2)
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK_C)
    mask = columns < C
    offsets = row.to(tl.int64) * C + columns
    x = tl.load(inp_ptr + offsets, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        # rounded to the activation dtype before it is normalized: the stored residual is what the next residual add
        # and this layernorm's backward read, so forward and backward see the same x
        x = round_to(x.to(tl.float32) + tl.load(branch_ptr + offsets, mask=mask, other=0.0).to(tl.float32),
                     residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + offsets, x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    centered = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / C + eps)
    weight = tl.load(weight_ptr + columns, mask=mask).to(tl.float32)
    bias = tl.load(bias_ptr + columns, mask=mask).to(tl.float32)
    tl.store(out_ptr + offsets, round_to(centered * rstd * weight + bias, out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


def forward_v2(out, mean, rstd, inp, weight, bias):
    """One program per row holding the whole row (BLOCK_C = next power of two >= C, the tail masked) in registers.

    The row is loaded once; the mean and the centred sum of squares are two reductions over registers, not two more
    trips to memory, and the normalized row is written from the same registers: the 2 row-sized transfers of the
    floor, in one launch. What is left: a C = 768 row is only 1.5 KB of bf16, so each program does little work
    (65,536 short programs), and each reloads weight and bias.
    """
    N, C = inp.shape
    _forward_row_kernel[(N,)](out, mean, rstd, inp, weight, bias, C, EPS, inp, inp, BLOCK_C=triton.next_power_of_2(C),
                              ADD_RESIDUAL=False, num_warps=4)


def forward_v3(out, mean, rstd, inp, weight, bias):
    """The mainline, llmpy.kernels.layernorm.layernorm_forward: (ROWS, BLOCK_C) tiles of ~4096 elements.

    Same math as v2, but each program takes ROWS whole rows (4 at C = 768): a quarter as many programs, each with
    more independent loads in flight, and weight and bias are loaded once per tile instead of once per row.
    """
    mainline.layernorm_forward(out, mean, rstd, inp, weight, bias, EPS)


def forward_then_cast_v3(out8, amax, out, mean, rstd, inp, weight, bias, scale):
    """v3, then the mainline's delayed cast of its output (fp8.cast with the amax): a pass of its own."""
    forward_v3(out, mean, rstd, inp, weight, bias)
    fp8.cast(out8, out, scale, amax_out=amax)


def forward_fp8_v5(out8, amax, out, mean, rstd, inp, weight, bias, scale):
    """The mainline under --precision fp8: layernorm_forward with fp8_out; out is not written."""
    mainline.layernorm_forward(out, mean, rstd, inp, weight, bias, EPS, fp8_out=(out8, scale, amax))


def torch_forward_fp8(out8, amax, out, mean, rstd, inp, weight, bias, scale):
    """The layernorm and the cast in torch code, for torch.compile to fuse: out rounded to bf16, then to e4m3."""
    y = torch.nn.functional.layer_norm(inp.float(), inp.shape[-1:], weight.float(), bias.float(), EPS).to(inp.dtype)
    out8.copy_((y.float() * scale).clamp(-448.0, 448.0).to(out8.dtype))
    amax.copy_(torch.maximum(amax, y.float().abs().amax()))


# The fused residual forward.


@triton.jit
def _add_kernel(out_ptr, a_ptr, b_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    total = tl.load(a_ptr + offsets, mask=mask).to(tl.float32) + tl.load(b_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(out_ptr + offsets, round_to(total, out_ptr.dtype.element_ty), mask=mask)


def residual_v1(residual, out, mean, rstd, inp1, inp2, weight, bias):
    """residual = inp1 + inp2 by an elementwise add kernel, then the mainline's layernorm of residual.

    Each kernel is at the floor of its own traffic, but together they move 5 row-sized transfers (add: 2 reads and
    a write; layernorm: a read and a write) where 4 would do: the sum is written and then read straight back.
    """
    numel = inp1.numel()
    _add_kernel[(triton.cdiv(numel, 2048),)](residual, inp1, inp2, numel, BLOCK=2048, num_warps=8)
    mainline.layernorm_forward(out, mean, rstd, residual, weight, bias, EPS)


def residual_v2(residual, out, mean, rstd, inp1, inp2, weight, bias):
    """One kernel (v2's, one row per program): the sum is normalized while it is in registers (it is still written:
    the residual stream is needed later). 4 transfers, 1 launch. (The mainline's own kernel until the add moved into
    the projection matmul's epilogue, which writes the sum where it would have written the projection: 3 transfers
    here, the fourth a read of the matmul's.)"""
    N, C = inp1.shape
    _forward_row_kernel[(N,)](out, mean, rstd, inp1, weight, bias, C, EPS, residual, inp2,
                              BLOCK_C=triton.next_power_of_2(C), ADD_RESIDUAL=True, num_warps=4)


# Backward.


@triton.jit
def _row_dinp(dout, x, mean, rstd, weight, mask, C):
    """For (ROWS, BLOCK_C) or (BLOCK_C,) tiles: (dx, xhat), masked lanes of xhat zero. Reduces over the last axis."""
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    dnorm = dout * weight
    dnorm_mean = tl.sum(dnorm, axis=-1, keep_dims=True) / C
    dnorm_xhat_mean = tl.sum(dnorm * xhat, axis=-1, keep_dims=True) / C
    return (dnorm - dnorm_mean - xhat * dnorm_xhat_mean) * rstd, xhat


@triton.jit
def _backward_atomic_kernel(dinp_ptr, dweight_ptr, dbias_ptr, dout_ptr, inp_ptr, weight_ptr, mean_ptr, rstd_ptr, C,
                            BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK_C)
    mask = columns < C
    offsets = row.to(tl.int64) * C + columns
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + columns, mask=mask, other=0.0).to(tl.float32)
    dx, xhat = _row_dinp(dout, x, tl.load(mean_ptr + row), tl.load(rstd_ptr + row), weight, mask, C)
    dinp = tl.load(dinp_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(dinp_ptr + offsets, round_to(dinp + dx, dinp_ptr.dtype.element_ty), mask=mask)
    tl.atomic_add(dweight_ptr + columns, dout * xhat, mask=mask, sem="relaxed")
    tl.atomic_add(dbias_ptr + columns, dout, mask=mask, sem="relaxed")


def backward_v1(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """One program per row: its dinp (the row's two reductions are row-local), and its contribution to dweight and
    dbias added with float atomics.

    The row traffic is at the floor, but every one of the N programs adds into the same 2*C addresses: the atomic
    units of L2 serialize N adds per address. And float addition is not associative, so the gradients' last bits
    depend on the order the programs happen to run: not reproducible run to run.
    """
    N, C = inp.shape
    _backward_atomic_kernel[(N,)](dinp, dweight, dbias, dout, inp, weight, mean, rstd, C,
                                  BLOCK_C=triton.next_power_of_2(C), num_warps=4)


@triton.jit
def _backward_group_kernel(dinp_ptr, partials_ptr, dout_ptr, inp_ptr, weight_ptr, mean_ptr, rstd_ptr, N, C, G,
                           rows_per_group, BLOCK_C: tl.constexpr):
    group = tl.program_id(0)
    columns = tl.arange(0, BLOCK_C)
    mask = columns < C
    weight = tl.load(weight_ptr + columns, mask=mask, other=0.0).to(tl.float32)
    dweight_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dbias_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first_row = group * rows_per_group
    for row in range(first_row, tl.minimum(first_row + rows_per_group, N)):
        offsets = tl.cast(row, tl.int64) * C + columns  # int64: N * C may pass 2^31 elements
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dx, xhat = _row_dinp(dout, x, tl.load(mean_ptr + row), tl.load(rstd_ptr + row), weight, mask, C)
        dinp = tl.load(dinp_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(dinp_ptr + offsets, round_to(dinp + dx, dinp_ptr.dtype.element_ty), mask=mask)
        dweight_sum += dout * xhat
        dbias_sum += dout
    tl.store(partials_ptr + group * C + columns, dweight_sum, mask=mask)
    tl.store(partials_ptr + (G + group) * C + columns, dbias_sum, mask=mask)


def backward_v2(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch):
    """Two stages, no atomics. Stage 1: G programs (G = scratch.shape[1], up to 512: a few per SM), program g walks a
    contiguous group of rows one row at a time, writing each row's dinp and summing dout * xhat and dout in fp32
    registers; at the end it writes its two partial sums to scratch[0, g] and scratch[1, g] (scratch is the
    mainline's (3, G, C) buffer; v4 uses the third). Stage 2: llmpy.kernels.bias's sum_partials adds the G partials
    in a fixed order into dweight and dbias, both in one launch.

    The order of every addition depends on N, C and G only: the same bits every run. The partials are 2*G*C fp32
    (3 MB at C = 768), small next to the 4 * N*C*es bytes of the rows. Each iteration handles one row: its two
    reductions across the program's lanes come one after another, with one row's loads in flight at a time.
    """
    N, C = inp.shape
    G = scratch.shape[1]
    _backward_group_kernel[(G,)](dinp, scratch, dout, inp, weight, mean, rstd, N, C, G, triton.cdiv(N, G),
                                 BLOCK_C=triton.next_power_of_2(C), num_warps=4)
    sum_partials([dweight, dbias], scratch[:2])


def backward_v3(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch):
    """The mainline, llmpy.kernels.layernorm.layernorm_backward: v2 with (ROWS, BLOCK_C) tiles of ~4096 elements
    (4 rows at C = 768) per iteration, so 4 rows' loads are in flight together and their reductions overlap, and the
    partial sums are accumulated as a tile and reduced over rows once at the end."""
    mainline.layernorm_backward(dinp=dinp, dweight=dweight, dbias=dbias, dout=dout, inp=inp, weight=weight,
                                mean=mean, rstd=rstd, scratch=scratch)


def backward_v3_then_bias(dinp, dweight, dbias, dinp_column_sums, dout, inp, weight, mean, rstd, scratch,
                          bias_scratch):
    """v3, then the preceding projection's bias gradient by the mainline's bias_backward, which reads the updated
    dinp back: two passes, 5 row-sized transfers (dout, x, dinp read, dinp written, dinp read again)."""
    backward_v3(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch)
    bias_backward(dinp_column_sums, dinp, bias_scratch)


def backward_v4(dinp, dweight, dbias, dinp_column_sums, dout, inp, weight, mean, rstd, scratch):
    """The mainline as the model calls it, layernorm_backward(..., dinp_column_sums=...): v3's tile loop also adds
    each tile of the updated dinp, as rounded and stored, into a third fp32 accumulator, written as partial sums to
    scratch[2]; the one sum_partials launch adds all three (3, G, C) partials. 4 row transfers for both gradients:
    dinp is in registers when it is summed, never read back."""
    mainline.layernorm_backward(dinp=dinp, dweight=dweight, dbias=dbias, dout=dout, inp=inp, weight=weight,
                                mean=mean, rstd=rstd, scratch=scratch, dinp_column_sums=dinp_column_sums)


# The bound: torch's own kernels.


def eager_forward(inp, weight, bias):
    """(out, mean, rstd) of torch.native_layer_norm, the fused kernel F.layer_norm runs (it allocates its outputs)."""
    return torch.native_layer_norm(inp, inp.shape[-1:], weight, bias, EPS)


def eager_residual(residual, inp1, inp2, weight, bias):
    """What torch code runs: the add into the residual stream, then native_layer_norm of it."""
    torch.add(inp1, inp2, out=residual)
    return torch.native_layer_norm(residual, residual.shape[-1:], weight, bias, EPS)


def eager_backward(dinp, dweight, dbias, dout, inp, weight, bias, eager_mean, eager_rstd):
    """torch's fused layer_norm backward kernels, then the accumulations our kernels fuse (dinp +=, and the fp32
    dweight +=, dbias += of bf16 gradients). eager_mean/rstd come from native_layer_norm (its own layout)."""
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(dout, inp, inp.shape[-1:], eager_mean, eager_rstd, weight,
                                                           bias, [True, True, True])
    dinp += dx
    dweight += dw
    dbias += db


def eager_backward_column_sums(dinp, dweight, dbias, dinp_column_sums, dout, inp, weight, bias, eager_mean,
                               eager_rstd):
    """eager_backward, then the column sums of the updated dinp, as torch code computes a bias gradient."""
    eager_backward(dinp, dweight, dbias, dout, inp, weight, bias, eager_mean, eager_rstd)
    dinp_column_sums += dinp.sum(0, dtype=torch.float32)


def torch_forward(out, mean, rstd, inp, weight, bias):
    """reference_forward in fp32 writing into our outputs: what torch.compile fuses into its own kernel."""
    o, m, r = reference_forward(inp.float(), weight.float(), bias.float())
    out.copy_(o)
    mean.copy_(m)
    rstd.copy_(r)


def torch_residual(residual, out, mean, rstd, inp1, inp2, weight, bias):
    residual.copy_(inp1.float() + inp2.float())
    torch_forward(out, mean, rstd, residual, weight, bias)


def torch_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """reference_backward in fp32 with our in-place accumulation: the same work as backward_v3, for torch.compile."""
    dx, dw, db = reference_backward(dout.float(), inp.float(), weight.float(), mean, rstd)
    dinp.copy_(dinp.float() + dx)
    dweight += dw
    dbias += db


def torch_backward_column_sums(dinp, dweight, dbias, dinp_column_sums, dout, inp, weight, mean, rstd):
    """torch_backward and the column sums of the updated dinp, for torch.compile to fuse as it can."""
    torch_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd)
    dinp_column_sums += dinp.float().sum(0)


# Checks. Tolerances (relative: error norm / reference norm, against float64 on the same rounded inputs):
# - fp32 outputs and fp32 statistics: 1e-5. The kernels compute in fp32 (2^-24 = 6e-8 per operation) over rows of
#   C <= 768 values; a few 1e-7 typical. A wrong term (a missing mean, a wrong scale) is O(1e-2) or more.
# - fp32 dweight, dbias: 3e-5. Sums over N rows: fp32 rounding grows like 2^-24 * sqrt(N / 2), 4e-6 at N = 8192
#   summed in the worst (sequential, atomic) order; the deterministic versions' sums in groups are far tighter.
# - bf16 activations (out, residual, dinp): 4e-3. Rounding an fp32 result to bf16 (8 significant bits) errs by up to
#   half a step of 2^-7 relative, uniformly: in norm about 2^-7 / sqrt(12) / 1.4 = 1.6e-3 (1.7e-3 measured), which
#   does not grow with the size. 4e-3 leaves margin for the eager bound, which rounds intermediates to bf16 too.
# - torch's eager backward in bf16 returns bf16 dweight, dbias, and on the CPU sums them from bf16-rounded terms
#   (7e-3 measured): 1.5e-2 for those two only.
# - dinp's column sums: SUM_TOL in fp32; BF16_TOL in bf16, where the columns summed are the rounded dinp (as a
#   separate bias pass would read them) and the reference sums the unrounded float64 dinp: the rounding errors are
#   independent across rows, so the sums err relatively about as much as the elements (1.6e-3). A dropped or doubled
#   row tile moves a column sum by ~sqrt(ROWS / N), 8e-3 even at N = 65,536.
FP32_TOL, SUM_TOL, BF16_TOL, EAGER_BF16_SUM_TOL = 1e-5, 3e-5, 4e-3, 1.5e-2


def _layer(N, C, dtype, dev, seed):
    """Seeded inputs: rows with a non-zero mean (so centring matters), weight ~ 1 + 0.5 randn, bias ~ randn, dout,
    and a random starting dinp (the backward accumulates into it)."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(N, C, generator=g) + 3
    x2 = torch.randn(N, C, generator=g)
    weight = 1 + 0.5 * torch.randn(C, generator=g)
    bias = torch.randn(C, generator=g)
    dout = torch.randn(N, C, generator=g)
    dinp = torch.randn(N, C, generator=g)
    return [t.to(dev, dtype) for t in (x, x2, weight, bias, dout, dinp)]


def _nan(shape, dtype, dev):
    return torch.full(shape, float("nan"), dtype=dtype, device=dev)


def check(small: bool) -> list[str]:
    dev = device()
    N, C = (37, 96) if small else (64 * 1024, 768)  # the large size is the benchmark's: torch.compile compiles once
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        act_tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
        tag = "fp32" if dtype == torch.float32 else "bf16"
        x, x2, weight, bias, dout, dinp0 = _layer(N, C, dtype, dev, seed=N + C)
        out_ref, mean_ref, rstd_ref = reference_forward(x.double(), weight.double(), bias.double())
        residual_ref = x.double() + x2.double()
        out2_ref, mean2_ref, rstd2_ref = reference_forward(residual_ref.to(dtype).double(), weight.double(),
                                                           bias.double())
        dinp_ref, dweight_ref, dbias_ref = reference_backward(dout.double(), x.double(), weight.double(),
                                                              mean_ref, rstd_ref)
        dinp_ref += dinp0.double()
        dweight0 = torch.randn(C, device=dev)
        dbias0 = torch.randn(C, device=dev)
        dweight_ref += dweight0.double()
        dbias_ref += dbias0.double()
        scratch = mainline.layernorm_backward_scratch(N, C, dev)
        bias_scratch = bias_backward_scratch(N, C, dev)

        forwards = {"v1": forward_v1, "v2": forward_v2, "v3 mainline": forward_v3}
        if dev == "cuda" and dtype == torch.bfloat16:
            forwards["torch.compile"] = compiled(torch_forward)
        for name, fn in forwards.items():
            out, mean, rstd = _nan((N, C), dtype, dev), _nan((N,), torch.float32, dev), _nan((N,), torch.float32, dev)
            fn(out, mean, rstd, x, weight, bias)
            err = assert_close(f"layernorm forward {name} {tag} out", out, out_ref, act_tol)
            assert_close(f"layernorm forward {name} {tag} mean", mean, mean_ref, FP32_TOL)
            assert_close(f"layernorm forward {name} {tag} rstd", rstd, rstd_ref, FP32_TOL)
            lines.append(f"forward {name} {tag}: out rel error {err:.1e}")
        out, _, _ = eager_forward(x, weight, bias)
        err = assert_close(f"layernorm forward eager {tag} out", out, out_ref, act_tol)
        lines.append(f"forward torch eager {tag}: out rel error {err:.1e}")

        if dtype == torch.bfloat16:  # FP8 (bf16 runs only): the e4m3 bytes and amax of each version against v3's
            scale = torch.tensor([2.0**5], device=dev)  # as a delayed scale may be: some values saturate at 448
            fp8_versions = {"v3 then cast": forward_then_cast_v3, "v5 mainline, fp8_out": forward_fp8_v5}
            if dev == "cuda":
                fp8_versions["torch.compile"] = compiled(torch_forward_fp8)
            results = {}
            for name, fn in fp8_versions.items():
                out8 = torch.full((N, C), 0x55, dtype=torch.uint8, device=dev).view(torch.float8_e4m3fn)
                amax = torch.zeros(1, device=dev)
                fn(out8, amax, _nan((N, C), dtype, dev), _nan((N,), torch.float32, dev),
                   _nan((N,), torch.float32, dev), x, weight, bias, scale)
                results[name] = (out8.view(torch.uint8), amax)
            # ours must agree bit for bit (the same bf16 out, the same cast); torch's layer_norm sums in another
            # order, so its bf16 out may round the other way now and then (a 1e-7 relative difference against bf16's
            # 4e-3 steps): up to 0.1% of the bytes, the amax within a bf16 step
            base8, base_amax = results["v3 then cast"]
            for name, (out8, amax) in results.items():
                differ = (out8 != base8).float().mean().item()
                amax_error = abs(amax.item() - base_amax.item()) / base_amax.item()
                exact = name != "torch.compile"
                if differ > (0 if exact else 1e-3) or amax_error > (0 if exact else 2**-8):
                    raise AssertionError(f"layernorm forward fp8 {name}: {100 * differ:.3f}% of the bytes differ from "
                                         f"v3's, the amax by {amax_error:.1e}")
                lines.append(f"forward fp8 {name}: e4m3 bytes differing from v3 then cast {100 * differ:.3f}%, "
                             f"amax {amax_error:.1e}")

        residuals = {
            "v1": residual_v1,
            "v2 fused": residual_v2,
            "torch eager": lambda residual, out, mean, rstd, *inputs: out.copy_(eager_residual(residual, *inputs)[0]),
        }
        if dev == "cuda" and dtype == torch.bfloat16:
            residuals["torch.compile"] = compiled(torch_residual)
        for name, fn in residuals.items():
            residual, out = _nan((N, C), dtype, dev), _nan((N, C), dtype, dev)
            mean, rstd = _nan((N,), torch.float32, dev), _nan((N,), torch.float32, dev)
            fn(residual, out, mean, rstd, x, x2, weight, bias)
            res_err = assert_close(f"layernorm residual {name} {tag} residual", residual, residual_ref, act_tol)
            err = assert_close(f"layernorm residual {name} {tag} out", out, out2_ref, act_tol)
            lines.append(f"residual forward {name} {tag}: residual rel error {res_err:.1e}, out {err:.1e}")

        mean, rstd = mean_ref.float(), rstd_ref.float()
        backwards = {
            "v1": backward_v1,
            "v2": lambda *a: backward_v2(*a, scratch),
            "v3 mainline": lambda *a: backward_v3(*a, scratch),
        }
        if dev == "cuda" and dtype == torch.bfloat16:
            backwards["torch.compile"] = compiled(torch_backward)
        for name, fn in backwards.items():
            dinp, dweight, dbias = dinp0.clone(), dweight0.clone(), dbias0.clone()
            fn(dinp, dweight, dbias, dout, x, weight, mean, rstd)
            err = assert_close(f"layernorm backward {name} {tag} dinp", dinp, dinp_ref, act_tol)
            dw_err = assert_close(f"layernorm backward {name} {tag} dweight", dweight, dweight_ref, SUM_TOL)
            db_err = assert_close(f"layernorm backward {name} {tag} dbias", dbias, dbias_ref, SUM_TOL)
            lines.append(f"backward {name} {tag}: dinp rel error {err:.1e}, dweight {dw_err:.1e}, dbias {db_err:.1e}")

        # with the column sums of the updated dinp (the preceding projection's bias gradient), from a random start
        columns_tol = SUM_TOL if dtype == torch.float32 else BF16_TOL
        dcolumns0 = torch.randn(C, device=dev)
        dcolumns_ref = dcolumns0.double() + dinp_ref.sum(0)
        _, eager_mean, eager_rstd = torch.native_layer_norm(x, (C,), weight, bias, EPS)
        with_column_sums = {
            "v3 then bias_backward": lambda *a: backward_v3_then_bias(*a, scratch, bias_scratch),
            "v4 mainline": lambda *a: backward_v4(*a, scratch),
            # the arguments up to weight, then bias and torch's own statistics (native_layer_norm's) for mean, rstd
            "torch eager": lambda *a: eager_backward_column_sums(*a[:7], bias, eager_mean, eager_rstd),
        }
        if dev == "cuda" and dtype == torch.bfloat16:
            with_column_sums["torch.compile"] = compiled(torch_backward_column_sums)
        for name, fn in with_column_sums.items():
            dinp, dweight, dbias, dcolumns = dinp0.clone(), dweight0.clone(), dbias0.clone(), dcolumns0.clone()
            fn(dinp, dweight, dbias, dcolumns, dout, x, weight, mean, rstd)
            # torch's eager backward in bf16 sums dweight and dbias in bf16 (see EAGER_BF16_SUM_TOL)
            sum_tol = EAGER_BF16_SUM_TOL if name == "torch eager" and dtype == torch.bfloat16 else SUM_TOL
            what = f"layernorm backward + dinp column sums {name} {tag}"
            err = assert_close(f"{what} dinp", dinp, dinp_ref, act_tol)
            dw_err = assert_close(f"{what} dweight", dweight, dweight_ref, sum_tol)
            db_err = assert_close(f"{what} dbias", dbias, dbias_ref, sum_tol)
            dc_err = assert_close(f"{what} dinp column sums", dcolumns, dcolumns_ref, columns_tol)
            lines.append(f"backward + dinp column sums {name} {tag}: dinp rel error {err:.1e}, dweight {dw_err:.1e}, "
                         f"dbias {db_err:.1e}, column sums {dc_err:.1e}")
    return lines


def benchmark() -> list[Result]:
    N, C = 64 * 1024, 768
    dev = "cuda"
    x, x2, weight, bias, dout, dinp = _layer(N, C, torch.bfloat16, dev, seed=0)
    out, residual = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = torch.empty(N, device=dev), torch.empty(N, device=dev)
    dweight, dbias, dcolumns = torch.zeros(C, device=dev), torch.zeros(C, device=dev), torch.zeros(C, device=dev)
    scratch = mainline.layernorm_backward_scratch(N, C, dev)
    bias_scratch = bias_backward_scratch(N, C, dev)
    row_bytes = N * C * x.element_size()
    stats_bytes = 2 * N * 4
    forward_args = (out, mean, rstd, x, weight, bias)
    residual_args = (residual, out, mean, rstd, x, x2, weight, bias)
    mainline.layernorm_forward(out, mean, rstd, x, weight, bias, EPS)
    _, eager_mean, eager_rstd = torch.native_layer_norm(x, (C,), weight, bias, EPS)
    backward_args = (dinp, dweight, dbias, dout, x, weight, mean, rstd)

    forward_bytes = 2 * row_bytes + stats_bytes
    results = [
        timed("layernorm_forward", "v1 three kernels", forward_v1, forward_args, forward_bytes),
        timed("layernorm_forward", "v2 row per program", forward_v2, forward_args, forward_bytes),
        timed("layernorm_forward", "v3 rows per program", forward_v3, forward_args, forward_bytes, mainline=True),
    ]
    results += mark_bound([
        timed("layernorm_forward", "torch eager", eager_forward, (x, weight, bias), forward_bytes),
        timed("layernorm_forward", "torch.compile", compiled(torch_forward), forward_args, forward_bytes),
    ])
    op = "layernorm_forward + e4m3 cast"  # bytes: x read, one byte a value written, the statistics
    fp8_bytes = row_bytes + N * C + stats_bytes
    out8, amax, scale = torch.empty(N, C, device=dev, dtype=torch.float8_e4m3fn), torch.zeros(1, device=dev), \
        torch.tensor([16.0], device=dev)
    fp8_args = (out8, amax, out, mean, rstd, x, weight, bias, scale)
    results += [timed(op, "v3 then fp8.cast", forward_then_cast_v3, fp8_args, fp8_bytes),
                timed(op, "v5 fp8_out", forward_fp8_v5, fp8_args, fp8_bytes, mainline=True)]
    results += mark_bound([timed(op, "torch.compile", compiled(torch_forward_fp8), fp8_args, fp8_bytes)])
    residual_bytes = 4 * row_bytes + stats_bytes
    results += [
        timed("residual_layernorm_forward", "v1 add + layernorm", residual_v1, residual_args, residual_bytes),
        timed("residual_layernorm_forward", "v2 fused", residual_v2, residual_args, residual_bytes),
    ]
    results += mark_bound([
        timed("residual_layernorm_forward", "torch eager", eager_residual, (residual, x, x2, weight, bias),
            residual_bytes),
        timed("residual_layernorm_forward", "torch.compile", compiled(torch_residual), residual_args, residual_bytes),
    ])
    backward_bytes = 4 * row_bytes + stats_bytes
    results += [
        timed("layernorm_backward", "v1 atomics", backward_v1, backward_args, backward_bytes),
        timed("layernorm_backward", "v2 row per iteration", backward_v2, backward_args + (scratch,), backward_bytes),
        timed("layernorm_backward", "v3 row tiles", backward_v3, backward_args + (scratch,), backward_bytes,
            mainline=True),
    ]
    results += mark_bound([
        timed("layernorm_backward", "torch eager", eager_backward,
            (dinp, dweight, dbias, dout, x, weight, bias, eager_mean, eager_rstd), backward_bytes),
        timed("layernorm_backward", "torch.compile", compiled(torch_backward), backward_args, backward_bytes),
    ])
    op = "layernorm_backward + dinp column sums"  # the same bytes: the sums are C values
    columns_args = (dinp, dweight, dbias, dcolumns, dout, x, weight, mean, rstd)
    results += [
        timed(op, "v3 then bias_backward", backward_v3_then_bias, columns_args + (scratch, bias_scratch),
            backward_bytes),
        timed(op, "v4 fused column sums", backward_v4, columns_args + (scratch,), backward_bytes, mainline=True),
    ]
    results += mark_bound([
        timed(op, "torch eager", eager_backward_column_sums,
            (dinp, dweight, dbias, dcolumns, dout, x, weight, bias, eager_mean, eager_rstd), backward_bytes),
        timed(op, "torch.compile", compiled(torch_backward_column_sums), columns_args, backward_bytes),
    ])
    return results


if __name__ == "__main__":
    import sys

    import run

    sys.exit(run.main(["layernorm"]))
