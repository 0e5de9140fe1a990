"""The encoder: token embedding plus position embedding, forward and backward.

Forward: out[b, t] = wte[tokens[b, t]] + wpe[t], rows of C channels.
Backward: dwpe[t] += sum_b dout[b, t], and dwte[v] += the sum of dout[b, t] over every (b, t) with tokens[b, t] = v.

Forward kernel: each program gathers ROWS rows (ROWS x BLOCK_C tile, BLOCK_C = next power of two >= C, masked): it
loads the ROWS token ids, then the wte row of each token and the wpe row of each position, adds them in fp32 and
writes the sum rounded once to the activation dtype. Two reads and one write per element; the gathers read whole
contiguous rows, so they are as coalesced as a plain copy.

Backward kernel: one program per (position t, block of BLOCK_C channels) loops over the batch b = 0..B-1 in order.
Each iteration reads the row chunk dout[b, t] once and uses it twice:
- dwpe: added to an fp32 register accumulator; after the loop the program adds it to dwpe[t] (it alone owns that
  chunk of dwpe), so dwpe is deterministic.
- dwte: added to dwte[tokens[b, t]] with fp32 atomics. Many rows share a token (the EOT, common words), and which
  rows they are changes every step, so any deterministic order would need the tokens sorted and grouped first
  (an extra sort and index pass each step, as llm.c does on the host). Atomics are used instead, deliberately:
  every add is one fp32 rounding whatever the order, so the order changes only the last bits of dwte (~1e-7
  relative per add), far below bf16 training noise; each dout row is read once; and nothing extra runs on the host,
  so the step can be captured in a CUDA graph. The cost: dwte, hence the weights, are not bitwise reproducible run
  to run. The atomics are relaxed (no memory fences: nothing reads dwte until the kernel ends) and their results
  unused, so they compile to fire-and-forget vector reductions in L2 (red.global.add.v4.f32 on sm_90).
Grid: T x ceil(C / BLOCK_C) programs, e.g. 1024 x 3 for d12, each streaming B rows.
"""

import torch
import triton
import triton.language as tl

from .rounding import round_to

_FORWARD_TILE_ELEMENTS = 4096  # per (ROWS, BLOCK_C) tile: 16 per thread with 8 warps
_BACKWARD_BLOCK_C = 256  # channels per backward program: 3 blocks for C = 768, enough programs at T = 1024


@triton.jit
def _encoder_forward_kernel(
    out_ptr,  # (N, C) activation dtype, N = B*T
    tokens_ptr,  # int32 (N,)
    wte_ptr,  # (Vp, C)
    wpe_ptr,  # (maxT, C)
    N,
    T,
    C,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    columns = tl.arange(0, BLOCK_C)
    row_mask = rows < N
    mask = row_mask[:, None] & (columns < C)[None, :]
    tokens = tl.load(tokens_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    positions = (rows % T).to(tl.int64)
    token_embedding = tl.load(wte_ptr + tokens[:, None] * C + columns[None, :], mask=mask).to(tl.float32)
    position_embedding = tl.load(wpe_ptr + positions[:, None] * C + columns[None, :], mask=mask).to(tl.float32)
    out = token_embedding + position_embedding
    out_offsets = rows.to(tl.int64)[:, None] * C + columns[None, :]
    tl.store(out_ptr + out_offsets, round_to(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _encoder_backward_kernel(
    dwte_ptr,  # fp32 (Vp, C): += (atomically)
    dwpe_ptr,  # fp32 (maxT, C): +=
    dout_ptr,  # (N, C) activation dtype
    tokens_ptr,  # int32 (N,)
    B,
    T,
    C,
    BLOCK_C: tl.constexpr,
):
    position = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    column_mask = columns < C
    dwpe_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b in range(B):
        row = b * T + position
        token = tl.load(tokens_ptr + row).to(tl.int64)
        dout = tl.load(dout_ptr + row.to(tl.int64) * C + columns, mask=column_mask, other=0.0).to(tl.float32)
        dwpe_sum += dout
        tl.atomic_add(dwte_ptr + token * C + columns, dout, mask=column_mask, sem="relaxed")
    dwpe_offsets = position * C + columns
    previous = tl.load(dwpe_ptr + dwpe_offsets, mask=column_mask)
    tl.store(dwpe_ptr + dwpe_offsets, previous + dwpe_sum, mask=column_mask)


def encoder_forward(out, tokens, wte, wpe):
    """out (B, T, C) = wte[tokens] + wpe[:T]; tokens int32 (B, T), values < Vp; wte (Vp, C), wpe (maxT, C), T <= maxT.

    out in the activation dtype; the sum is done in fp32 and rounded once.
    """
    B, T = tokens.shape
    C = wte.shape[1]
    assert tokens.dtype == torch.int32 and tokens.is_contiguous() and out.is_contiguous() and out.shape == (B, T, C)
    assert wte.is_contiguous() and wpe.is_contiguous() and T <= wpe.shape[0]
    N = B * T
    block_c = triton.next_power_of_2(C)
    rows = max(1, _FORWARD_TILE_ELEMENTS // block_c)
    grid = (triton.cdiv(N, rows),)
    _encoder_forward_kernel[grid](out, tokens, wte, wpe, N, T, C, ROWS=rows, BLOCK_C=block_c, num_warps=8)


def encoder_backward(dwte, dwpe, dout, tokens):
    """dwte fp32 (Vp, C) += dout summed per token (fp32 atomics, see the module docstring); dwpe fp32 (maxT, C):
    dwpe[:T] += dout summed over the batch (deterministic). dout (B, T, C) contiguous, tokens int32 (B, T).

    Needs no scratch: dwpe's sum over the batch stays in one program's registers.
    """
    B, T = tokens.shape
    C = dwte.shape[1]
    assert dwte.dtype == dwpe.dtype == torch.float32 and dwte.is_contiguous() and dwpe.is_contiguous()
    assert dout.is_contiguous() and dout.shape == (B, T, C) and tokens.is_contiguous()
    block_c = min(_BACKWARD_BLOCK_C, triton.next_power_of_2(C))
    grid = (T, triton.cdiv(C, block_c))
    _encoder_backward_kernel[grid](dwte, dwpe, dout, tokens, B, T, C, BLOCK_C=block_c, num_warps=2)
