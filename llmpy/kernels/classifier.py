"""The fused classifier: cross-entropy loss and its gradient from the logits, in place (llm.c's fused_classifier).

The op. For each row n of the LM head's output, logits (N, Vp) with only the first V columns real:
    lse_n      = log sum_{j < V} exp(logits[n, j])
    losses[n]  = lse_n - logits[n, targets[n]]
    dlogits[n] = (softmax(logits[n, :V]) - onehot(targets[n])) * dloss,   0 in the padded columns [V, Vp)
where dloss is the gradient of the step's loss with respect to each row's loss (1 / (N * grad_accum_steps) for a
mean). dlogits overwrites logits in place, so the (N, Vp) logits buffer is the only one of its size: no fp32 copy of
the logits, no separate probabilities, no separate gradient. With write_dlogits=False (evaluation) the kernel only
computes the losses and leaves the logits untouched.

Kernel design: one program per row (N = B*T = 65,536 rows fill the GPU many times over), vectorised along the row in
column blocks of BLOCK_V. Two sweeps over the row:
1. max and sum of exponentials, online: for each block, the running max m is raised to the block's max and the
   per-lane running sums are rescaled by exp(m_old - m_new) before adding the block's exp(x - m_new); one scalar
   max reduction per block, one sum reduction per row at the end. Padded columns read as -inf, i.e. exp = 0.
   Then loss = (m - logits[target]) + log(sum), the target's logit read with one scalar load.
2. dlogits: reread the row and write (exp(x - m) / sum - [j == target]) * dloss in the logits' dtype. Padded columns
   read as -inf again, so their gradient comes out as exactly 0 without a separate fill.
Bytes moved per row: Vp elements read twice and written once. The second read comes from HBM, not L2: up to 32
programs of 2 warps an SM keep thousands of rows (100 KB each) in flight against L2's 50 MB, and the second sweep
takes the time of its bytes at about HBM's bandwidth (BENCHMARKS.md). A row does fit in the registers of one program
of 16 or 32 warps (100 KB of bf16 in three power-of-two chunks), to be read once; tried, such programs ran at half
this kernel's pace: one row at a time an SM, the reductions' barriers between its loads and its stores. All math is
fp32; exponentials per element: two (one per sweep).

Under --precision fp8 with the LM head's gradients in FP8 (llmpy.precision), sweep 2 can write dlogits in e5m2
instead (fp8_out, as the GELU backward writes the fc layer's gradient: llmpy.kernels.fp8.store_scaled): 1 byte a
value where bf16 takes 2, and no cast after it; the LM head's input and weight gradients then read those bytes.

Targets outside [0, V) are not checked on the host (that would need a device sync); the kernel makes their loss NaN
instead of reading out of bounds, so a bad target shows up in the loss.
"""

import torch
import triton
import triton.language as tl

from llmpy.kernels import INTERPRET
from llmpy.kernels.fp8 import fused_output, store_scaled
from llmpy.kernels.rounding import round_to

# 1024 columns per block: 16 per thread at 2 warps, read as two 16-byte vectors of bf16; 50 blocks per GPT-2 row.
# Small programs: of the blocks and warps dev/fp8_fused_kernels.py --sweep times on the H200 (1024 to 4096 columns,
# 2 to 8 warps), the fastest with bf16 and e5m2 dlogits, at GPT-2's vocabulary and Llama 3's (BENCHMARKS.md)
BLOCK_V = 1024
NUM_WARPS = 2


def block_columns(Vp):
    """Columns per block. The interpreter's cost is per block, not per column, so there a row takes about 8 blocks:
    8192 for GPT-2's 50,304 columns, and 128 for the tests' rows of a few hundred, which still span several blocks."""
    return max(128, triton.next_power_of_2(Vp) // 8) if INTERPRET else BLOCK_V


@triton.jit
def load_real_columns(row_ptr, cols, V, Vp, PADDED: tl.constexpr):
    # The row's columns cols as fp32. PADDED: the block may reach past V, so its columns in [V, Vp) read as -inf
    # whatever they hold: masking the load at Vp (a multiple of 16) rather than V (odd: 50257) lets the compiler issue
    # 16-byte vector loads; the padding is replaced after the load. A block wholly below V (49 of GPT-2's 50) is
    # loaded without either, two operations an element fewer.
    if PADDED:
        x = tl.load(row_ptr + cols, mask=cols < Vp, other=float("-inf")).to(tl.float32)
        return tl.where(cols < V, x, float("-inf"))
    return tl.load(row_ptr + cols).to(tl.float32)


@triton.jit
def _row_max_and_sum(row_ptr, start, cols, V, Vp, m, lane_sums, PADDED: tl.constexpr):
    # one block of sweep 1: the running max m raised to the block's, the lanes' sums rescaled to the new max and the
    # block's exponentials added
    x = load_real_columns(row_ptr, start + cols, V, Vp, PADDED)
    # every block holds at least one real column, so m_new is finite and exp(m - m_new) is never NaN
    m_new = tl.maximum(m, tl.max(x, axis=0))
    return m_new, lane_sums * tl.exp(m - m_new) + tl.exp(x - m_new)


@triton.jit
def row_statistics(row_ptr, cols, V, Vp, BLOCK_V: tl.constexpr):
    # sweep 1 over the row: its max m and sum_exp = sum of exp(x - m) over the real columns [0, V)
    V_full = V // BLOCK_V * BLOCK_V  # the blocks below V_full hold no padded column
    m = tl.full([], float("-inf"), dtype=tl.float32)
    lane_sums = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V_full, BLOCK_V):
        m, lane_sums = _row_max_and_sum(row_ptr, start, cols, V, Vp, m, lane_sums, PADDED=False)
    if V_full < V:
        m, lane_sums = _row_max_and_sum(row_ptr, V_full, cols, V, Vp, m, lane_sums, PADDED=True)
    return m, tl.sum(lane_sums, axis=0)


@triton.jit
def _write_dlogits(row_ptr, out8_row_ptr, start, cols, V, Vp, m, inv_sum_exp, target, dloss, scale_ptr, largest,
                   PADDED: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr, MANTISSA: tl.constexpr,
                   MIN_EXP: tl.constexpr):
    # one block of sweep 2: dloss * (softmax - onehot(target)) over columns start + cols, written in place (or in
    # e5m2 to out8_row_ptr, returning largest maxed with their magnitudes); padded columns come out 0 (exp(-inf))
    p = tl.exp(load_real_columns(row_ptr, start + cols, V, Vp, PADDED) - m) * inv_sum_exp
    grad = tl.where(cols == target - start, p - 1.0, p)
    dlogits = round_to(grad * dloss, row_ptr.dtype.element_ty)
    if FP8:  # from the values rounded to the logits' dtype: the bytes a cast of dlogits would write
        if PADDED:
            magnitudes = store_scaled(out8_row_ptr, start + cols, dlogits.to(tl.float32), start + cols < Vp,
                                      scale_ptr, FP8_MAX, MANTISSA, MIN_EXP)
        else:
            magnitudes = store_scaled(out8_row_ptr, start + cols, dlogits.to(tl.float32), None, scale_ptr, FP8_MAX,
                                      MANTISSA, MIN_EXP)
        largest = tl.maximum(largest, magnitudes)
    elif PADDED:
        tl.store(row_ptr + start + cols, dlogits, mask=start + cols < Vp)
    else:
        tl.store(row_ptr + start + cols, dlogits)
    return largest


@triton.jit
def _fused_classifier_kernel(logits_ptr, losses_ptr, targets_ptr,
                             stride_row, V, Vp, dloss,
                             out8_ptr, scale_ptr, amax_ptr,  # with FP8: dlogits in e5m2, (N, Vp) contiguous
                             BLOCK_V: tl.constexpr, WRITE_DLOGITS: tl.constexpr, FP8: tl.constexpr,
                             FP8_MAX: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row  # (N, Vp) is over 2^31 elements for GPT-2 at B*T=65536
    cols = tl.arange(0, BLOCK_V)
    V_full = V // BLOCK_V * BLOCK_V  # the blocks below V_full hold no padded column

    # sweep 1. The row's softmax is exp(x - m) / sum_exp; m is kept apart from log(sum_exp) rather than folded into
    # one lse = m + log(sum_exp), whose fp32 rounding would be large for large logits (ulp(1000) = 6e-5)
    m, sum_exp = row_statistics(row_ptr, cols, V, Vp, BLOCK_V)
    inv_sum_exp = 1.0 / sum_exp

    target = tl.load(targets_ptr + row)
    target_is_valid = (target >= 0) & (target < V)
    target_logit = tl.load(row_ptr + target, mask=target_is_valid, other=float("nan")).to(tl.float32)
    tl.store(losses_ptr + row, (m - target_logit) + tl.log(sum_exp))

    # sweep 2: overwrite the row, padding included, with dloss * (softmax - onehot(target))
    if WRITE_DLOGITS:
        out8_row_ptr = out8_ptr + row.to(tl.int64) * Vp
        largest = tl.zeros([BLOCK_V], dtype=tl.float32)  # |dlogits|, elementwise over the blocks (FP8)
        for start in range(0, V_full, BLOCK_V):
            largest = _write_dlogits(row_ptr, out8_row_ptr, start, cols, V, Vp, m, inv_sum_exp, target, dloss,
                                     scale_ptr, largest, False, FP8, FP8_MAX, MANTISSA, MIN_EXP)
        for start in range(V_full, Vp, BLOCK_V):
            largest = _write_dlogits(row_ptr, out8_row_ptr, start, cols, V, Vp, m, inv_sum_exp, target, dloss,
                                     scale_ptr, largest, True, FP8, FP8_MAX, MANTISSA, MIN_EXP)
        if FP8:
            tl.atomic_max(amax_ptr, tl.max(largest, axis=0), sem="relaxed")


def fused_classifier(logits, losses, targets, V, dloss, write_dlogits=True, fp8_out=None):
    """Per-row cross-entropy losses and, in place, the gradient with respect to the logits.

    logits: (N, Vp) bf16 or fp32, unit column stride, Vp >= V; columns [V, Vp) are ignored. With write_dlogits,
        overwritten by dlogits = (softmax(logits[:, :V]) - onehot(targets)) * dloss, zero in columns [V, Vp).
    losses: (N,) fp32, written: logsumexp(logits[n, :V]) - logits[n, targets[n]] (NaN where a target is not in [0, V)).
    targets: (N,) int32 (or int64) token ids in [0, V).
    V: the real vocabulary size. dloss: float, d(loss)/d(losses[n]) for every row, e.g. 1 / (N * grad_accum_steps).
    fp8_out (out8, scale, amax), from the LM head's precision (llmpy.precision.FP8.fp8_grad), with write_dlogits:
        out8 (N, Vp) = fp8(dlogits * scale) is written instead of dlogits, as fp8.cast of dlogits would write it, and
        max |dlogits| maxed into amax; logits are then left as they were. On the GPU, up to the order of the fp32 sum
        of a row's exponentials, which the kernel compiled with the FP8 store may change: at 8,192 rows of GPT-2's
        vocabulary on the H200, 92 of 412M bytes (one row's) one e5m2 step apart, and that row's loss by 2e-6.
    """
    N, Vp = logits.shape
    if logits.stride(1) != 1 or not 0 < V <= Vp:
        raise ValueError(f"fused_classifier: logits must be (N, Vp >= V={V}) with unit column stride, "
                         f"got {tuple(logits.shape)} strides {logits.stride()}")
    if losses.shape != (N,) or losses.dtype != torch.float32:
        raise ValueError(f"fused_classifier: losses must be ({N},) float32, got {tuple(losses.shape)} {losses.dtype}")
    if targets.shape != (N,) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_classifier: targets must be ({N},) int32, got {tuple(targets.shape)} {targets.dtype}")
    fp8_pointers, fp8_constants = fused_output(fp8_out if write_dlogits else None, logits)
    _fused_classifier_kernel[(N,)](logits, losses, targets, logits.stride(0), V, Vp, float(dloss), *fp8_pointers,
                                   BLOCK_V=block_columns(Vp), WRITE_DLOGITS=write_dlogits, num_warps=NUM_WARPS,
                                   **fp8_constants)
