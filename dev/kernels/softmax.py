"""Softmax over the vocabulary: rows of 50,257 real logits, too long to keep in registers.

The op. The LM head's logits (N, Vp) bf16 have Vp = 50,304 columns, of which the first V = 50,257 are real tokens
(the rest pad the matrix to a multiple of 128 for the matmul). For each row x:
    probs[j] = exp(x_j - m) / sum_{i < V} exp(x_i - m)   for j < V,   m = max_{i < V} x_i,   probs[j] = 0 for j >= V
Subtracting the row max m changes nothing mathematically and keeps every exponent <= 0, so nothing overflows.
The mainline has no separate softmax: it lives inside the fused classifier (llmpy/kernels/classifier.py, see
classifier.py here), which turns the logits straight into the loss and dlogits. This file is the softmax alone, the
row-reduction pattern that the classifier builds on.

Bytes it must move: read the logits once and write the probabilities once, 2 * N * Vp * 2 bytes in bf16 (201 KB a
row). A row is 100 KB of bf16: too big for one program's registers, so a kernel walks it in blocks of BLOCK_V
columns, and every extra pass over the row is another 100 KB read (from L2 if the row is still there: a wave of a
few hundred rows in flight is 20-40 MB, about the H100's 50 MB L2, so a second pass right after the first mostly
hits L2, a pass in a separate kernel launch never does).

v1, three kernels, three reads: one program per row computes the row max m and stores it, a second kernel reads the
row again for sum exp(x - m), a third reads it a third time to write exp(x - m) / sum. Each launch streams all N rows
through HBM, so the logits come from HBM three times: 4 passes of traffic for the work of 2.
v2, one kernel, two reads: one program per row. The first sweep computes max and sum together, online: when a
block raises the max from m to m', the sum so far is rescaled by exp(m - m') before the block's exp(x - m') are added
(per lane, one reduction at the end). The second sweep normalises and writes. The row's second read follows the
first within the same program, so it mostly hits L2.
The bound: torch.softmax (eager) and torch.compile of the reference formula, whichever is faster.
Where they stand on the H100 (8,192 rows; dev/kernels/README.md has the table), in GB/s of one read and one write:
v1 1,466, v2 1,904 (63% of a device-to-device copy's 3,000: its second read is not free), torch.compile 1,172 and
torch.softmax 918. v2 is 1.6x the bound.
"""

# common first: without a GPU it sets TRITON_INTERPRET=1, which must precede importing triton
from common import Result, assert_close, compiled, device, mark_bound, time_ms

import torch
import triton
import triton.language as tl

from llmpy.kernels.classifier import block_columns, load_real_columns  # the mainline's walk over a vocab row
from llmpy.kernels.rounding import round_to

NUM_WARPS = 8

V, VP = 50257, 50304  # GPT-2's vocabulary and its padded width
@triton.jit
def _row_max_kernel(max_ptr, x_ptr, stride_row, V, Vp, BLOCK_V: tl.constexpr):
    row_ptr = x_ptr + tl.program_id(0).to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    lane_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        lane_max = tl.maximum(lane_max, load_real_columns(row_ptr, start + cols, V, Vp, True))
    tl.store(max_ptr + tl.program_id(0), tl.max(lane_max, axis=0))


@triton.jit
def _row_sum_kernel(sum_ptr, max_ptr, x_ptr, stride_row, V, Vp, BLOCK_V: tl.constexpr):
    row_ptr = x_ptr + tl.program_id(0).to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    row_max = tl.load(max_ptr + tl.program_id(0))
    lane_sums = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        lane_sums += tl.exp(load_real_columns(row_ptr, start + cols, V, Vp, True) - row_max)
    tl.store(sum_ptr + tl.program_id(0), tl.sum(lane_sums, axis=0))


@triton.jit
def _normalize_kernel(probs_ptr, x_ptr, max_ptr, sum_ptr, stride_row, stride_probs_row, V, Vp,
                      BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = x_ptr + row.to(tl.int64) * stride_row
    probs_row_ptr = probs_ptr + row.to(tl.int64) * stride_probs_row
    cols = tl.arange(0, BLOCK_V)
    row_max = tl.load(max_ptr + row)
    inv_sum = 1.0 / tl.load(sum_ptr + row)
    for start in range(0, Vp, BLOCK_V):
        probs = tl.exp(load_real_columns(row_ptr, start + cols, V, Vp, True) - row_max) * inv_sum
        tl.store(probs_row_ptr + start + cols, round_to(probs, probs_ptr.dtype.element_ty), mask=start + cols < Vp)


@triton.jit
def online_max_and_sum(row_ptr, V, Vp, BLOCK_V: tl.constexpr):
    # One sweep over the row's real columns: its max m and sum exp(x - m), both fp32 scalars. Each lane keeps a sum
    # relative to the running max m; when a block raises m to m_new the lane sums are rescaled by exp(m - m_new).
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    lane_sums = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        x = load_real_columns(row_ptr, start + cols, V, Vp, True)
        # every block holds a real column, so m_new is finite and exp(m - m_new) is never NaN
        m_new = tl.maximum(m, tl.max(x, axis=0))
        lane_sums = lane_sums * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    return m, tl.sum(lane_sums, axis=0)


@triton.jit
def _online_softmax_kernel(probs_ptr, x_ptr, stride_row, stride_probs_row, V, Vp, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * stride_row
    probs_row_ptr = probs_ptr + row * stride_probs_row
    cols = tl.arange(0, BLOCK_V)
    m, total = online_max_and_sum(row_ptr, V, Vp, BLOCK_V)
    inv_total = 1.0 / total
    for start in range(0, Vp, BLOCK_V):
        probs = tl.exp(load_real_columns(row_ptr, start + cols, V, Vp, True) - m) * inv_total
        tl.store(probs_row_ptr + start + cols, round_to(probs, probs_ptr.dtype.element_ty), mask=start + cols < Vp)


def _check_shapes(probs, x, V):
    N, Vp = x.shape
    if probs.shape != (N, Vp) or x.stride(1) != 1 or probs.stride(1) != 1 or not 0 < V <= Vp:
        raise ValueError(f"softmax: x and probs must be (N, Vp >= V={V}) with unit column stride, "
                         f"got {tuple(x.shape)} and {tuple(probs.shape)}")
    return N, Vp


def v1(probs, x, V):
    """Three kernels, one program per row in each: row max, then sum of exp(x - max), then normalise. The logits are
    read from HBM three times (each launch sweeps all N rows, far more than L2 holds) and probs written once.

    probs (N, Vp) written, in its own dtype (bf16 or fp32), 0 in the padding; x (N, Vp) bf16 or fp32 logits."""
    N, Vp = _check_shapes(probs, x, V)
    row_max = torch.empty(N, dtype=torch.float32, device=x.device)
    row_sum = torch.empty(N, dtype=torch.float32, device=x.device)
    block = block_columns(Vp)
    _row_max_kernel[(N,)](row_max, x, x.stride(0), V, Vp, BLOCK_V=block, num_warps=NUM_WARPS)
    _row_sum_kernel[(N,)](row_sum, row_max, x, x.stride(0), V, Vp, BLOCK_V=block, num_warps=NUM_WARPS)
    _normalize_kernel[(N,)](probs, x, row_max, row_sum, x.stride(0), probs.stride(0), V, Vp,
                            BLOCK_V=block, num_warps=NUM_WARPS)


def v2(probs, x, V):
    """One kernel, one program per row: online max and sum in one sweep, then a second sweep (mostly from L2, the
    row was just read) writes the probabilities. Two reads and one write instead of three reads and one write."""
    N, Vp = _check_shapes(probs, x, V)
    _online_softmax_kernel[(N,)](probs, x, x.stride(0), probs.stride(0), V, Vp,
                                 BLOCK_V=block_columns(Vp), num_warps=NUM_WARPS)


def reference(x, V):
    """float64 softmax of the real columns, zeros in the padding: (N, Vp)."""
    probs = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    probs[:, :V] = torch.softmax(x[:, :V].double(), dim=-1)
    return probs


def torch_eager(x, V):
    """torch's softmax kernel on the real columns (bf16 in and out, fp32 inside): (N, V)."""
    return torch.softmax(x[:, :V], dim=-1)


def torch_eager_into(probs, x, V):
    """torch_eager's result copied into our output, for the check."""
    probs[:, :V] = torch_eager(x, V)
    probs[:, V:] = 0


def torch_formula(probs, x, V):
    """The reference formula in fp32 into our output, padding included: what torch.compile fuses."""
    probs[:, :V] = torch.softmax(x[:, :V].float(), dim=-1)
    probs[:, V:] = 0


def make_logits(N, V, Vp, dev, seed):
    """Seeded logits of GPT-2's scale (std 2), bf16, with the padded columns set to a large value that must be
    ignored."""
    generator = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(N, Vp, generator=generator)
    x[:, V:] = 1e4
    return x.to(dev, torch.bfloat16)


# Tolerances, ||got - ref|| / ||ref|| against float64 on the same bf16 logits: the kernels compute in fp32 (exp and
# the sum over 50,257 terms: ~1e-7 relative each, measured below 1e-7 in the norm), so fp32 outputs get 1e-5; bf16
# outputs are rounded once more (2^-9 relative at most, ~1.1e-3 in the norm), so 4e-3. Both fail a wrong max, a
# missing column or padding that leaks in (errors of order 1).
FP32_TOL, BF16_TOL = 1e-5, 4e-3


def check(small: bool) -> list[str]:
    """v1, v2 (into bf16, and fp32 for v2) and the torch bounds against float64. small: 6 rows of V=300 real columns
    padded to 384, and 2 rows of GPT-2's 50,257 / 50,304; else 8,192 rows of GPT-2's."""
    dev = device()
    shapes = [(6, 300, 384), (2, V, VP)] if small else [(8 * 1024, V, VP)]
    lines = []
    for N, v, vp in shapes:
        x = make_logits(N, v, vp, dev, seed=N)
        ref = reference(x, v)
        contenders = {"v1": v1, "v2": v2, "torch eager": torch_eager_into}
        if dev == "cuda":
            contenders["torch.compile"] = compiled(torch_formula)
        for name, fn in contenders.items():
            # bf16 output for all; fp32 for v2 too, which the classifier's v1 uses that way
            for dtype in (torch.bfloat16, torch.float32) if name == "v2" else (torch.bfloat16,):
                probs = torch.full((N, vp), float("nan"), dtype=dtype, device=dev)
                fn(probs, x, v)
                tag = "bf16" if dtype == torch.bfloat16 else "fp32"
                tol = BF16_TOL if dtype == torch.bfloat16 else FP32_TOL
                err = assert_close(f"softmax {name} {tag} (N={N}, V={v})", probs, ref, tol)
                lines.append(f"{name} into {tag} (N={N}, V={v}, Vp={vp}): rel error {err:.1e}")
    return lines


def benchmark() -> list[Result]:
    """8,192 rows of GPT-2's logits (0.8 GB of bf16; the check's shape, so torch.compile compiles once); bytes = read
    the logits once + write the probabilities once."""
    N = 8 * 1024
    x = make_logits(N, V, VP, "cuda", seed=0)
    probs = torch.empty_like(x)
    moved = 2 * N * VP * x.element_size()
    op = f"softmax {N}x{VP}"
    results = [Result(op, "v1 three kernels", time_ms(lambda: v1(probs, x, V)), bytes=moved),
               Result(op, "v2 online, one kernel", time_ms(lambda: v2(probs, x, V)), bytes=moved)]
    formula = compiled(torch_formula)
    return results + mark_bound([Result(op, "torch.softmax", time_ms(lambda: torch_eager(x, V)), bytes=moved),
                                 Result(op, "torch.compile", time_ms(lambda: formula(probs, x, V)), bytes=moved)])


if __name__ == "__main__":
    import run

    raise SystemExit(run.main(["softmax"]))
