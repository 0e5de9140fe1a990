"""The encoder: token embedding plus position embedding, forward and backward.

Forward: out[b, t] = wte[tokens[b, t]] + wpe[t], rows of C channels; or wte[tokens[b, t]] + wpe[first + t] with the
first position read from device memory (inference's decode step: one token a row at the position the KV cache has
reached, which a replayed CUDA graph must read from memory rather than take as an argument).
Backward: dwpe[t] += sum_b dout[b, t], and dwte[v] += the sum of dout[b, t] over every (b, t) with tokens[b, t] = v.
Without a position embedding (wpe None: Llama 3, whose positions enter through RoPE) the same kernels compile
without the wpe terms (the POSITIONS constexpr): out = wte[tokens], and the backward is dwte's part alone.

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
  (an extra sort and index pass each step, as llm.c does on the host: DeterministicEncoderBackward, below). Atomics
  are the default, deliberately: every add is one fp32 rounding whatever the order, so the order changes only the
  last bits of dwte (~1e-7 relative per add), far below bf16 training noise; each dout row is read once; and nothing
  runs on the host, so the step needs only the tokens on the device. The cost: dwte, hence the weights, are not
  bitwise reproducible run to run. The atomics are relaxed (no memory fences: nothing reads dwte until the kernel ends) and their results
  unused, so they compile to fire-and-forget vector reductions in L2 (red.global.add.v4.f32 on sm_90).
Grid: T x ceil(C / BLOCK_C) programs, e.g. 1024 x 3 for d12, each streaming B rows.

Deterministic backward (`DeterministicEncoderBackward`, for bit-identical runs): dwte's sums are done in an order that
depends only on the tokens, as llm.c does, with the grouping by token done on the host, once per micro-batch:
- `prepare(tokens)` (host, numpy): a stable argsort of the B*T token ids lists the rows token by token, each token's
  rows in increasing order; each run of L equal tokens is cut into ceil(L / R) segments of near-equal length (at
  most R rows, R = 64 by default), so that a common token (the EOT, " the": several % of the rows, ~9% for the
  commonest of Zipf-distributed tokens) is summed by many programs rather than one. The rows, a table of segments
  (start, length, token, scratch slot or -1) sorted longest first, and a table of the split runs (token, first slot,
  number of slots) go to fixed-size device buffers, with their counts, in one host-to-device copy.
- Stage 1 (`_segment_sums_kernel`): a fixed grid of programs, each walking segments s = program, program + grid, ...
  up to the count read from device memory (longest first, so the long ones are spread over the programs). A program
  takes whole rows (BLOCK_C = next power of two >= C, up to 2048) and adds the segment's rows one by one, in
  increasing row order, into an fp32 accumulator: a fixed order. A segment that is its token's whole run adds its
  sum to dwte[token] (a plain load and store: it is that row's only writer); one of a split run writes it to its
  scratch slot. (Gathering the rows as (ROWS, BLOCK_C) tiles reduced with tl.sum was no faster, and far slower for
  some tile shapes: most segments are one or two rows long. BENCHMARKS.md, "Design measurements quoted from the
  code".)
- Stage 2 (`_split_run_sums_kernel`): per split run (also a fixed grid over a count in device memory), its slots,
  consecutive in run order, are added as (SLOTS, BLOCK_C) tiles reduced once at the end (a fixed order) and the
  total is added to dwte[token]. Narrow column blocks: there are few split runs (~90 at d12), some of ~100 slots.
- dwpe: the kernel above with its dwte atomics compiled out (DWTE=False): the same fixed per-position sum.
A run of L > R rows takes ceil(L / R) <= 2L / (R + 1) slots, so the scratch needs at most 2N / (R + 1) rows of C
fp32 (2016 x 768 at d12, 6 MB). Against the atomics, dout is read twice (by position for dwpe, by token for dwte) and
there are two more launches, but no row of dwte is hit by concurrent atomics; the host's work, once a micro-batch
on one core, overlaps the GPU's work on the batch before (its time: BENCHMARKS.md, "Design measurements quoted
from the code").
Every launch has a grid fixed by the shapes and reads what varies from device memory, so __call__ can be captured in
a CUDA graph and replayed for any batch that prepare() has loaded.
"""

import numpy as np
import torch
import triton
import triton.language as tl

from .rounding import round_to

_FORWARD_TILE_ELEMENTS = 4096  # per (ROWS, BLOCK_C) tile: 16 per thread with 8 warps
_BACKWARD_BLOCK_C = 256  # channels per backward program: 3 blocks for C = 768, enough programs at T = 1024
# The deterministic backward (DeterministicEncoderBackward)
_SEGMENT_ROWS = 64  # R: the most rows of one token one stage-1 program sums; longer runs are split
_SEGMENT_BLOCK_C = 2048  # stage 1 takes whole rows up to this width (C = 768: one block of 1024, 8 warps)
_SEGMENT_PROGRAMS = 4096  # stage 1's programs per block of channels, each looping over segments
_SLOT_TILE_ROWS = 32  # scratch slots per stage-2 tile (SLOTS x BLOCK_C), reduced once at the end
_SPLIT_RUN_BLOCK_C = 128  # channels per stage-2 program (6 blocks at C = 768: the few split runs spread wider)
_SPLIT_RUN_PROGRAMS = 256  # stage 2's programs per block of channels, each looping over split runs
_HEADER = 4  # int32s in front of the device tables: [number of segments, number of split runs, 0, 0]


@triton.jit
def _encoder_forward_kernel(
    out_ptr,  # (N, C) activation dtype, N = B*T
    tokens_ptr,  # int32 (N,)
    wte_ptr,  # (Vp, C)
    wpe_ptr,  # (maxT, C) (if POSITIONS; else unused)
    first_position_ptr,  # int32 (1,): position of each row's first token (if OFFSET; else unused)
    N,
    T,
    C,
    POSITIONS: tl.constexpr,  # False: no position embedding, out = wte[tokens]
    OFFSET: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    columns = tl.arange(0, BLOCK_C)
    row_mask = rows < N
    mask = row_mask[:, None] & (columns < C)[None, :]
    tokens = tl.load(tokens_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    out = tl.load(wte_ptr + tokens[:, None] * C + columns[None, :], mask=mask).to(tl.float32)
    if POSITIONS:
        positions = (rows % T).to(tl.int64)
        if OFFSET:
            positions += tl.load(first_position_ptr).to(tl.int64)
        out += tl.load(wpe_ptr + positions[:, None] * C + columns[None, :], mask=mask).to(tl.float32)
    out_offsets = rows.to(tl.int64)[:, None] * C + columns[None, :]
    tl.store(out_ptr + out_offsets, round_to(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _encoder_backward_kernel(
    dwte_ptr,  # fp32 (Vp, C): += (atomically)
    dwpe_ptr,  # fp32 (maxT, C): += (if DWPE; else unused)
    dout_ptr,  # (N, C) activation dtype
    tokens_ptr,  # int32 (N,)
    B,
    T,
    C,
    BLOCK_C: tl.constexpr,
    DWTE: tl.constexpr,  # False: dwpe only (the deterministic backward sums dwte by itself); dwte, tokens unused
    DWPE: tl.constexpr,  # False: no position embedding, dwte only
):
    position = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    column_mask = columns < C
    dwpe_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b in range(B):
        row = b * T + position
        dout = tl.load(dout_ptr + row.to(tl.int64) * C + columns, mask=column_mask, other=0.0).to(tl.float32)
        dwpe_sum += dout
        if DWTE:
            token = tl.load(tokens_ptr + row).to(tl.int64)
            tl.atomic_add(dwte_ptr + token * C + columns, dout, mask=column_mask, sem="relaxed")
    if DWPE:
        dwpe_offsets = position * C + columns
        previous = tl.load(dwpe_ptr + dwpe_offsets, mask=column_mask)
        tl.store(dwpe_ptr + dwpe_offsets, previous + dwpe_sum, mask=column_mask)


@triton.jit
def _segment_sums_kernel(
    dwte_ptr,  # fp32 (Vp, C): += for the tokens whose run is one segment
    scratch_ptr,  # fp32 (slots, C): out, one row per segment of a split run
    dout_ptr,  # (N, C) activation dtype
    header_ptr,  # int32 [number of segments, ...]
    rows_ptr,  # int32 (N,): the rows sorted by token, stably
    segments_ptr,  # int32 (segments, 4): start in rows, length (1..R), token, scratch slot (-1: add to dwte)
    C,
    BLOCK_C: tl.constexpr,
):
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    column_mask = columns < C
    num_segments = tl.load(header_ptr)
    for segment in range(tl.program_id(0), num_segments, tl.num_programs(0)):
        start = tl.load(segments_ptr + segment * 4)
        length = tl.load(segments_ptr + segment * 4 + 1)
        token = tl.load(segments_ptr + segment * 4 + 2).to(tl.int64)
        slot = tl.load(segments_ptr + segment * 4 + 3)
        total = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for index in range(start, start + length):  # the segment's rows in increasing order: a fixed order
            row = tl.load(rows_ptr + index).to(tl.int64)
            total += tl.load(dout_ptr + row * C + columns, mask=column_mask, other=0.0).to(tl.float32)
        if slot < 0:  # the token's whole run: this program is dwte[token]'s only writer
            dwte_offsets = token * C + columns
            previous = tl.load(dwte_ptr + dwte_offsets, mask=column_mask)
            tl.store(dwte_ptr + dwte_offsets, previous + total, mask=column_mask)
        else:
            tl.store(scratch_ptr + slot.to(tl.int64) * C + columns, total, mask=column_mask)


@triton.jit
def _split_run_sums_kernel(
    dwte_ptr,  # fp32 (Vp, C): += for the tokens whose run was split
    scratch_ptr,  # fp32 (slots, C): the segments' sums from stage 1
    header_ptr,  # int32 [number of segments, number of split runs, ...]
    split_runs_ptr,  # int32 (split runs, 4): token, first slot, number of slots, 0
    C,
    SLOTS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    column_mask = columns < C
    num_split_runs = tl.load(header_ptr + 1)
    for run in range(tl.program_id(0), num_split_runs, tl.num_programs(0)):
        token = tl.load(split_runs_ptr + run * 4).to(tl.int64)
        first_slot = tl.load(split_runs_ptr + run * 4 + 1)
        num_slots = tl.load(split_runs_ptr + run * 4 + 2)
        accumulator = tl.zeros((SLOTS, BLOCK_C), dtype=tl.float32)
        for tile_start in range(0, num_slots, SLOTS):
            index = tile_start + tl.arange(0, SLOTS)
            slot_mask = index < num_slots
            slots = (first_slot + index).to(tl.int64)
            mask = slot_mask[:, None] & column_mask[None, :]
            accumulator += tl.load(scratch_ptr + slots[:, None] * C + columns[None, :], mask=mask, other=0.0)
        dwte_offsets = token * C + columns
        previous = tl.load(dwte_ptr + dwte_offsets, mask=column_mask)
        tl.store(dwte_ptr + dwte_offsets, previous + tl.sum(accumulator, axis=0), mask=column_mask)


def encoder_forward(out, tokens, wte, wpe, first_position=None):
    """out (B, T, C) = wte[tokens] + wpe[:T]; tokens int32 (B, T), values < Vp; wte (Vp, C), wpe (maxT, C), T <= maxT.
    With first_position, an int32 (1,) tensor on the device holding p: out = wte[tokens] + wpe[p : p + T] (the caller
    keeps p + T <= maxT: the kernel cannot check a value it reads from memory). wpe None: out = wte[tokens].

    out in the activation dtype; the sum is done in fp32 and rounded once.
    """
    B, T = tokens.shape
    C = wte.shape[1]
    assert tokens.dtype == torch.int32 and tokens.is_contiguous() and out.is_contiguous() and out.shape == (B, T, C)
    positions = wpe is not None
    assert wte.is_contiguous() and (not positions or (wpe.is_contiguous() and T <= wpe.shape[0]))
    offset = first_position is not None
    assert not offset or (first_position.dtype == torch.int32 and first_position.numel() == 1)
    N = B * T
    block_c = triton.next_power_of_2(C)
    rows = max(1, _FORWARD_TILE_ELEMENTS // block_c)
    grid = (triton.cdiv(N, rows),)
    _encoder_forward_kernel[grid](out, tokens, wte, wpe if positions else wte, first_position if offset else tokens,
                                  N, T, C, POSITIONS=positions, OFFSET=offset, ROWS=rows, BLOCK_C=block_c,
                                  num_warps=8)


def encoder_backward(dwte, dwpe, dout, tokens):
    """dwte fp32 (Vp, C) += dout summed per token (fp32 atomics, see the module docstring); dwpe fp32 (maxT, C):
    dwpe[:T] += dout summed over the batch (deterministic), or None for a model without positions. dout (B, T, C)
    contiguous, tokens int32 (B, T).

    Needs no scratch: dwpe's sum over the batch stays in one program's registers.
    """
    B, T = tokens.shape
    C = dwte.shape[1]
    positions = dwpe is not None
    assert dwte.dtype == torch.float32 and dwte.is_contiguous()
    assert not positions or (dwpe.dtype == torch.float32 and dwpe.is_contiguous())
    assert dout.is_contiguous() and dout.shape == (B, T, C) and tokens.is_contiguous()
    block_c = min(_BACKWARD_BLOCK_C, triton.next_power_of_2(C))
    grid = (T, triton.cdiv(C, block_c))
    _encoder_backward_kernel[grid](dwte, dwpe if positions else dwte, dout, tokens, B, T, C, BLOCK_C=block_c,
                                   DWTE=True, DWPE=positions, num_warps=2)


def token_segments(tokens, max_rows):
    """The host's grouping for the deterministic backward: (rows, segments, split_runs), int32 numpy arrays.

    tokens: integer ids >= 0, any shape (flattened). rows (N,): a stable argsort of the tokens (the rows token by
    token, each token's rows in increasing order). segments (S, 4): each run of L equal tokens in rows cut into
    p = ceil(L / max_rows) pieces of near-equal length (piece k: rows[start + k L // p, start + (k + 1) L // p), at
    most ceil(L / p) <= max_rows rows), as (start in rows, length, token, scratch slot or -1 when the run is one
    piece), longest first (stable: ties keep the order of rows), so the programs that walk them in turn get similar
    work. split_runs (K, 4): for each run cut into several pieces (token, first slot, number of slots, 0); a run's
    slots are consecutive, in row order.
    """
    tokens = np.asarray(tokens).reshape(-1)
    N = tokens.size
    # numpy's stable sort is a radix sort for 16-bit keys: GPT-2's ids (< 65,536) sort several times faster
    keys = tokens.astype(np.uint16) if tokens.max() < 1 << 16 else tokens
    rows = np.argsort(keys, kind="stable")
    sorted_tokens = tokens[rows]
    run_starts = np.flatnonzero(np.concatenate(([True], sorted_tokens[1:] != sorted_tokens[:-1])))
    run_lengths = np.diff(np.append(run_starts, N))
    run_pieces = -(-run_lengths // max_rows)
    split = run_pieces > 1
    run_slots = np.where(split, run_pieces, 0)
    run_first_slot = np.cumsum(run_slots) - run_slots

    run = np.repeat(np.arange(run_starts.size), run_pieces)  # each segment's run, in rows order
    k = np.arange(run.size) - (np.cumsum(run_pieces) - run_pieces)[run]  # each segment's index in its run
    length, pieces = run_lengths[run], run_pieces[run]
    start = run_starts[run] + k * length // pieces
    end = run_starts[run] + (k + 1) * length // pieces
    slot = np.where(split[run], run_first_slot[run] + k, -1)
    segments = np.stack([start, end - start, sorted_tokens[start], slot], axis=1)
    segments = segments[np.argsort(start - end, kind="stable")]  # longest first
    split_runs = np.stack([sorted_tokens[run_starts[split]], run_first_slot[split], run_pieces[split],
                           np.zeros(split.sum(), dtype=np.int64)], axis=1)
    return rows.astype(np.int32), segments.astype(np.int32), split_runs.astype(np.int32)


class DeterministicEncoderBackward:
    """encoder_backward with a summation order that depends only on the tokens: bit-identical runs (module docstring).

        backward = DeterministicEncoderBackward(B, T, C, device)   # allocates its device buffers once
        backward.prepare(tokens)            # per micro-batch, before its backward, outside any CUDA graph capture
        backward(dwte, dwpe, dout)          # encoder_backward's contract, for the prepared tokens; capturable

    prepare(tokens) takes the micro-batch's host int32 (B, T) tokens (numpy array or CPU tensor), groups them on the
    host and copies the tables into the device buffers, on the current stream: the copy is ordered after the work
    already queued there (an earlier batch's backward, which reads the buffers) and before what follows (this batch's
    backward, eager or a graph replay). The host writes the tables into one of two pinned staging buffers, waiting
    first for that buffer's previous copy (two batches back) to have run, so it never blocks on the batch just
    queued. __call__ launches three kernels (dwpe; the segments' sums; the split runs' sums) whose grids depend only
    on B, T, C and max_segment_rows, with no host sync and no allocation.
    """

    def __init__(self, B, T, C, device, max_segment_rows=_SEGMENT_ROWS):
        self.B, self.T, self.C, self.max_segment_rows = B, T, C, max_segment_rows
        self.device = torch.device(device)
        N = self.N = B * T
        assert max_segment_rows >= 1 and N < 2**31
        self.max_split_runs = N // (max_segment_rows + 1)  # runs of more than R rows
        max_slots = 2 * N // (max_segment_rows + 1)  # a run of L > R rows takes ceil(L / R) <= 2L / (R + 1) slots
        self._split_runs_at = _HEADER + N
        self._segments_at = self._split_runs_at + 4 * self.max_split_runs
        size = self._segments_at + 4 * N  # at most N segments
        self.tables = torch.zeros(size, dtype=torch.int32, device=self.device)
        self.header = self.tables[:_HEADER]
        self.rows = self.tables[_HEADER:self._split_runs_at]
        self.split_runs = self.tables[self._split_runs_at:self._segments_at].view(-1, 4)
        self.segments = self.tables[self._segments_at:].view(N, 4)
        self.scratch = torch.zeros(max(1, max_slots), C, dtype=torch.float32, device=self.device)
        on_gpu = self.device.type == "cuda"
        self._staging = [torch.zeros(size, dtype=torch.int32, pin_memory=on_gpu) for _ in range(2 if on_gpu else 1)]
        self._copied = [torch.cuda.Event() if on_gpu else None for _ in self._staging]
        self._next_staging = 0
        self._max_token = None  # of the prepared batch; None: nothing prepared yet
        self.dwpe_block_c = min(_BACKWARD_BLOCK_C, triton.next_power_of_2(C))
        self.segment_block_c = min(_SEGMENT_BLOCK_C, triton.next_power_of_2(C))
        self.segment_grid = (min(N, _SEGMENT_PROGRAMS), triton.cdiv(C, self.segment_block_c))
        self.split_run_block_c = min(_SPLIT_RUN_BLOCK_C, triton.next_power_of_2(C))
        self.split_run_grid = (max(1, min(self.max_split_runs, _SPLIT_RUN_PROGRAMS)),
                               triton.cdiv(C, self.split_run_block_c))

    def prepare(self, tokens):
        """Groups this micro-batch's tokens (host int32 (B, T): numpy array or CPU tensor) by token and loads the
        tables into the device buffers for the next __call__ (or graph replay)."""
        if isinstance(tokens, torch.Tensor):
            if tokens.device.type != "cpu":
                raise ValueError(f"prepare() takes the host's tokens, not a tensor on {tokens.device}")
            tokens = tokens.numpy()
        tokens = np.asarray(tokens)
        if tokens.shape != (self.B, self.T) or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens: integer ({self.B}, {self.T}) expected, got {tokens.dtype} {tokens.shape}")
        if tokens.min() < 0:
            raise ValueError("tokens: negative token id")
        rows, segments, split_runs = token_segments(tokens, self.max_segment_rows)
        staging = self._staging[self._next_staging]
        if self._copied[self._next_staging] is not None:
            self._copied[self._next_staging].synchronize()  # its previous copy (two batches back) has run
        host = staging.numpy()
        host[:_HEADER] = (len(segments), len(split_runs), 0, 0)
        host[_HEADER:self._split_runs_at] = rows
        host[self._split_runs_at:self._split_runs_at + split_runs.size] = split_runs.reshape(-1)
        used = self._segments_at + segments.size
        host[self._segments_at:used] = segments.reshape(-1)
        self.tables[:used].copy_(staging[:used], non_blocking=True)
        if self._copied[self._next_staging] is not None:
            self._copied[self._next_staging].record()
        self._next_staging = (self._next_staging + 1) % len(self._staging)
        self._max_token = int(tokens.max())

    def __call__(self, dwte, dwpe, dout):
        """dwte fp32 (Vp, C) += dout summed per token of the prepared batch, in a fixed order; dwpe fp32 (maxT, C):
        dwpe[:T] += dout summed over the batch, or None (no positions). dout (B, T, C) contiguous, bf16 or fp32. No
        atomics."""
        B, T, C = self.B, self.T, self.C
        assert self._max_token is not None, "prepare(tokens) first"
        assert dwte.dtype == torch.float32 and dwte.is_contiguous() and dwte.shape[1] == C
        assert self._max_token < dwte.shape[0]
        assert dout.is_contiguous() and dout.shape == (B, T, C) and dwte.device == dout.device == self.tables.device
        if dwpe is not None:
            assert dwpe.dtype == torch.float32 and dwpe.is_contiguous() and dwpe.shape[1] == C and T <= dwpe.shape[0]
            _encoder_backward_kernel[(T, triton.cdiv(C, self.dwpe_block_c))](
                dwte, dwpe, dout, self.rows, B, T, C, BLOCK_C=self.dwpe_block_c, DWTE=False, DWPE=True, num_warps=2)
        _segment_sums_kernel[self.segment_grid](
            dwte, self.scratch, dout, self.header, self.rows, self.segments, C,
            BLOCK_C=self.segment_block_c, num_warps=max(1, min(8, self.segment_block_c // 128)))
        _split_run_sums_kernel[self.split_run_grid](
            dwte, self.scratch, self.header, self.split_runs, C,
            SLOTS=_SLOT_TILE_ROWS, BLOCK_C=self.split_run_block_c, num_warps=max(1, self.split_run_block_c // 64))
