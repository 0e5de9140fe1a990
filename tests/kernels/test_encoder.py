"""Encoder kernels (token + position embedding) against plain torch indexing.

Forward: out = wte[tokens] + wpe[:T] must equal torch's result bit for bit, in fp32 and bf16: both add the two values
in fp32 and round once to the activation dtype (to nearest), so there is nothing to tolerate. The same from a first
position held in device memory (inference's decode step), out = wte[tokens] + wpe[p : p + T].
Backward: dwte and dwpe start from random values and must end at start + gradient, the gradient computed in float64
by index_add_ (dwte) and a sum over the batch (dwpe). dwte is accumulated with float atomics in an arbitrary order,
so the comparison has a tolerance that allows any order: each dwte row sums at most B*T = 40 rows of O(1) values
in fp32 (error < 40 * 2^-24 * sum|dout| ~ 1e-5 worst case), hence rtol 1e-5, atol 1e-5. Tokens come from a small
vocabulary (V = 7, so rows repeat a token ~6 times each and the atomics collide); wte has padding rows (Vp = 9) that
no token selects, and their gradient must stay exactly as it was, like dwpe's rows past T.
Without positions (wpe None, Llama 3): out = wte[tokens] bit for bit, and the backwards change dwte alone, by the same
sums.
DeterministicEncoderBackward: the same against float64, with token patterns that take each of its paths (every
token once; one token in every row, its run cut into several segments; a mix), the same bits on a second call and
from an instance reused for other batches as from a fresh one, and (on a GPU) from a CUDA graph replayed for other
batches; and the host's grouping (token_segments) on its own.
"""

import numpy as np
import pytest
import torch

from llmpy.kernels.encoder import DeterministicEncoderBackward, encoder_backward, encoder_forward, token_segments

V, VP, MAX_T = 7, 9, 12  # vocabulary, padded vocabulary (rows of wte), position table rows (> T)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
SHAPES = [(4, 10, 64), (3, 7, 80), (2, 5, 768)]  # (B, T, C): C a power of two, not one, GPT-2's


def random_tokens(B, T, device, generator):
    return torch.randint(0, V, (B, T), generator=generator, dtype=torch.int32).to(device)


@pytest.mark.parametrize("B, T, C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_torch_embedding_sum(device, B, T, C, dtype):
    generator = torch.Generator().manual_seed(C)
    tokens = random_tokens(B, T, device, generator)
    wte = torch.randn(VP, C, generator=generator).to(device=device, dtype=dtype)
    wpe = torch.randn(MAX_T, C, generator=generator).to(device=device, dtype=dtype)
    out = torch.full((B, T, C), float("nan"), device=device, dtype=dtype)

    encoder_forward(out, tokens, wte, wpe)

    assert torch.equal(out, wte[tokens.long()] + wpe[:T])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_from_a_position_in_device_memory(device, dtype):
    """With first_position p (an int32 on the device, as inference's decode step keeps it), row t of each sequence
    takes position p + t: out = wte[tokens] + wpe[p : p + T], bit for bit. T = 1 is the decode step, T = 3 any T."""
    generator = torch.Generator().manual_seed(5)
    wte = torch.randn(VP, 64, generator=generator).to(device=device, dtype=dtype)
    wpe = torch.randn(MAX_T, 64, generator=generator).to(device=device, dtype=dtype)
    for B, T, p in [(3, 1, 0), (3, 1, MAX_T - 1), (2, 3, 4)]:
        tokens = random_tokens(B, T, device, generator)
        out = torch.full((B, T, 64), float("nan"), device=device, dtype=dtype)
        encoder_forward(out, tokens, wte, wpe, first_position=torch.tensor([p], dtype=torch.int32, device=device))
        assert torch.equal(out, wte[tokens.long()] + wpe[p:p + T]), (B, T, p)


@pytest.mark.parametrize("B, T, C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_accumulates_embedding_gradients(device, B, T, C, dtype):
    generator = torch.Generator().manual_seed(C + 1)
    tokens = random_tokens(B, T, device, generator)
    dout = torch.randn(B, T, C, generator=generator).to(device=device, dtype=dtype)
    dwte = torch.randn(VP, C, generator=generator).to(device)
    dwpe = torch.randn(MAX_T, C, generator=generator).to(device)
    expected_dwte = dwte.double().index_add_(0, tokens.flatten().long(), dout.reshape(-1, C).double())
    expected_dwpe = dwpe.double()
    expected_dwpe[:T] += dout.double().sum(0)

    encoder_backward(dwte, dwpe, dout, tokens)

    torch.testing.assert_close(dwte.double(), expected_dwte, **TOLERANCE)
    torch.testing.assert_close(dwpe.double(), expected_dwpe, **TOLERANCE)
    assert torch.equal(dwte[V:].double(), expected_dwte[V:])  # padding rows untouched
    assert torch.equal(dwpe[T:].double(), expected_dwpe[T:])  # positions past T untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_positions_forward_gathers_and_backward_scatters(device, dtype):
    """wpe None (Llama 3): out = wte[tokens] exactly (one fp32 value rounded to its own dtype is itself); dwte gets
    the same per-token sums as with positions, atomics and the deterministic backward alike."""
    B, T, C = 3, 8, 80
    generator = torch.Generator().manual_seed(11)
    tokens = random_tokens(B, T, device, generator)
    wte = torch.randn(VP, C, generator=generator).to(device=device, dtype=dtype)
    out = torch.full((B, T, C), float("nan"), device=device, dtype=dtype)
    encoder_forward(out, tokens, wte, None)
    assert torch.equal(out, wte[tokens.long()])

    dout = torch.randn(B, T, C, generator=generator).to(device=device, dtype=dtype)
    dwte0 = torch.randn(VP, C, generator=generator).to(device)
    expected = dwte0.double().index_add_(0, tokens.flatten().long(), dout.reshape(-1, C).double())
    dwte = dwte0.clone()
    encoder_backward(dwte, None, dout, tokens)
    torch.testing.assert_close(dwte.double(), expected, **TOLERANCE)
    ordered = DeterministicEncoderBackward(B, T, C, device, max_segment_rows=2)
    ordered.prepare(tokens.cpu())
    dwte = dwte0.clone()
    ordered(dwte, None, dout)
    torch.testing.assert_close(dwte.double(), expected, **TOLERANCE)
    assert torch.equal(dwte[V:], dwte0[V:])  # padding rows untouched


# The deterministic backward (DeterministicEncoderBackward). Segments of at most R = 4 rows, so that a batch of 24
# rows has runs cut into several segments. Each dwte value is its start value plus at most N = 24 values of O(1)
# (sum|x| <~ 25), added in a fixed order at most ~10 roundings deep (up to 4 rows one after the other, up to 6 slots
# in a tile reduced as a tree of depth 5, then the start value): an error of 10 * 2^-24 * 25 ~ 1.5e-5 at the very
# worst, ~1e-7 in fact, so the same rtol 1e-5, atol 1e-5 as above (the 24-row sums are ~5, allowing 6e-5); a row
# dropped, added twice or sent to the wrong token is off by ~1.
R = 4
DB, DT, DC = 3, 8, 80  # N = 24 rows; C = 80: one partial block of channels
DV, DVP, DMAX_T = 30, 32, 10  # tokens 0..29 (all distinct fit), 2 padding rows, positions past T


def pattern_tokens(pattern, generator):
    """int32 (DB, DT) tokens < DV, rows in random order:
    distinct: 24 different tokens (every run one segment, nothing split);
    repeated: one token in every row (a run of 24 = 6 segments of 4);
    mix: runs of 9 (3 segments of 3), R + 1 = 5 (segments of 3 and 2), R = 4 (one segment: the longest not split),
         2, 2, 1 and 1 (5 segments whole, 2 runs split)."""
    N = DB * DT
    chosen = torch.randperm(DV, generator=generator)
    if pattern == "distinct":
        tokens = chosen[:N]
    elif pattern == "repeated":
        tokens = chosen[:1].repeat(N)
    else:
        tokens = chosen[:7].repeat_interleave(torch.tensor([9, 5, 4, 2, 2, 1, 1]))
    return tokens[torch.randperm(N, generator=generator)].reshape(DB, DT).to(torch.int32)


def deterministic_inputs(pattern, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = pattern_tokens(pattern, generator)
    dout = torch.randn(DB, DT, DC, generator=generator).to(device=device, dtype=dtype)
    dwte = torch.randn(DVP, DC, generator=generator).to(device)  # the LM head's gradient, accumulated onto
    dwpe = torch.randn(DMAX_T, DC, generator=generator).to(device)
    return tokens, dout, dwte, dwpe


def run_deterministic(backward, tokens, dout, dwte, dwpe):
    """prepare, then __call__ on copies of dwte and dwpe: (dwte, dwpe) after."""
    dwte, dwpe = dwte.clone(), dwpe.clone()
    backward.prepare(tokens)
    backward(dwte, dwpe, dout)
    return dwte, dwpe


def expected_gradients(tokens, dout, dwte, dwpe):
    """float64: dwte + dout summed per token, dwpe + dout summed over the batch at positions < T."""
    C, T = dout.shape[-1], dout.shape[1]
    expected_dwte = dwte.double().index_add_(0, tokens.flatten().long().to(dwte.device), dout.reshape(-1, C).double())
    expected_dwpe = dwpe.double()
    expected_dwpe[:T] += dout.double().sum(0)
    return expected_dwte, expected_dwpe


@pytest.mark.parametrize("pattern", ["distinct", "repeated", "mix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_backward_accumulates_embedding_gradients(device, pattern, dtype):
    tokens, dout, dwte0, dwpe0 = deterministic_inputs(pattern, dtype, device, seed=len(pattern))
    expected_dwte, expected_dwpe = expected_gradients(tokens, dout, dwte0, dwpe0)
    backward = DeterministicEncoderBackward(DB, DT, DC, device, max_segment_rows=R)
    backward.scratch.fill_(float("nan"))  # stage 2 must read only slots stage 1 wrote

    dwte, dwpe = run_deterministic(backward, tokens, dout, dwte0, dwpe0)

    torch.testing.assert_close(dwte.double(), expected_dwte, **TOLERANCE)
    torch.testing.assert_close(dwpe.double(), expected_dwpe, **TOLERANCE)
    assert torch.equal(dwte[DV:], dwte0[DV:])  # padding rows untouched
    unused = torch.ones(DVP, dtype=torch.bool)
    unused[tokens.flatten().long()] = False
    assert torch.equal(dwte[unused], dwte0[unused])  # as is every row of a token not in the batch
    assert torch.equal(dwpe[DT:], dwpe0[DT:])  # positions past T untouched
    again = run_deterministic(backward, tokens, dout, dwte0, dwpe0)
    assert torch.equal(again[0], dwte) and torch.equal(again[1], dwpe)  # bit for bit


def test_deterministic_backward_reuses_its_buffers_for_other_batches(device):
    """One instance prepared for batch after batch gives, for each, the same bits as a fresh instance: nothing left
    from an earlier batch leaks in. The order goes from the mix (2 split runs) to the distinct tokens (24 segments,
    the most, but no split runs) to one repeated token (6 segments, the fewest, 1 split run), so stale segments and
    stale split runs would both be read if the kernels did not stop at the prepared counts. Over C = 300 channels
    (two blocks, the second partial)."""
    C = 300
    backward = DeterministicEncoderBackward(DB, DT, C, device, max_segment_rows=R)
    generator = torch.Generator().manual_seed(3)
    for pattern in ["mix", "distinct", "repeated"]:
        tokens = pattern_tokens(pattern, generator)
        dout = torch.randn(DB, DT, C, generator=generator).to(device=device, dtype=torch.bfloat16)
        dwte0 = torch.randn(DVP, C, generator=generator).to(device)
        dwpe0 = torch.randn(DMAX_T, C, generator=generator).to(device)

        dwte, dwpe = run_deterministic(backward, tokens, dout, dwte0, dwpe0)

        fresh = run_deterministic(DeterministicEncoderBackward(DB, DT, C, device, max_segment_rows=R), tokens, dout,
                                  dwte0, dwpe0)
        assert torch.equal(dwte, fresh[0]) and torch.equal(dwpe, fresh[1]), pattern
        expected_dwte, expected_dwpe = expected_gradients(tokens, dout, dwte0, dwpe0)
        torch.testing.assert_close(dwte.double(), expected_dwte, **TOLERANCE)
        torch.testing.assert_close(dwpe.double(), expected_dwpe, **TOLERANCE)


@pytest.mark.parametrize("max_rows", [1, 3, 5])
def test_token_segments_cover_every_row_once(max_rows):
    """The host's grouping: every row in exactly one segment of one token, in increasing row order, at most max_rows
    rows, longest first; a run's slots consecutive and in row order, and within the scratch's bound 2N / (R + 1),
    which runs of R + 1 rows reach."""
    generator = torch.Generator().manual_seed(max_rows)
    runs = torch.tensor([max_rows + 1] * 4 + [2 * max_rows + 3, 1, 2])  # R + 1 rows: the most slots per row
    tokens = torch.randperm(40, generator=generator)[:runs.numel()].repeat_interleave(runs)
    tokens = tokens[torch.randperm(tokens.numel(), generator=generator)].numpy().astype(np.int32)
    N = tokens.size

    rows, segments, split_runs = token_segments(tokens, max_rows)

    assert sorted(rows.tolist()) == list(range(N))
    covered = np.zeros(N, dtype=int)
    slot_rows = {}
    for start, length, token, slot in segments.tolist():
        segment_rows = rows[start:start + length]
        assert 1 <= length <= max_rows and (tokens[segment_rows] == token).all() and (np.diff(segment_rows) > 0).all()
        covered[segment_rows] += 1
        if slot >= 0:
            slot_rows[slot] = (token, segment_rows)
    assert (covered == 1).all()
    assert (np.diff(segments[:, 1]) <= 0).all()  # longest first
    for token, first_slot, num_slots, _ in split_runs.tolist():
        assert num_slots == -(-(tokens == token).sum() // max_rows) > 1
        pieces = [slot_rows.pop(slot) for slot in range(first_slot, first_slot + num_slots)]
        assert all(piece_token == token for piece_token, _ in pieces)
        assert (np.diff(np.concatenate([piece_rows for _, piece_rows in pieces])) > 0).all()  # in row order
    assert not slot_rows  # every slot belongs to a split run
    assert segments[:, 3].max() < 2 * N // (max_rows + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_deterministic_backward_replays_from_a_cuda_graph():
    """Captured once, the three launches replay for any prepared batch: each replay gives the eager call's bits."""
    device = "cuda"
    backward = DeterministicEncoderBackward(DB, DT, DC, device, max_segment_rows=R)
    generator = torch.Generator().manual_seed(5)
    dwte = torch.zeros(DVP, DC, device=device)
    dwpe = torch.zeros(DMAX_T, DC, device=device)
    dout = torch.zeros(DB, DT, DC, device=device, dtype=torch.bfloat16)
    backward.prepare(pattern_tokens("mix", generator))
    backward(dwte, dwpe, dout)  # compiles the kernels before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backward(dwte, dwpe, dout)
    for pattern in ["distinct", "repeated", "mix"]:
        tokens, new_dout, dwte0, dwpe0 = deterministic_inputs(pattern, torch.bfloat16, device, seed=len(pattern) + 7)
        dout.copy_(new_dout)
        dwte.copy_(dwte0)
        dwpe.copy_(dwpe0)
        backward.prepare(tokens)
        graph.replay()
        eager = run_deterministic(DeterministicEncoderBackward(DB, DT, DC, device, max_segment_rows=R), tokens, dout,
                                  dwte0, dwpe0)
        assert torch.equal(dwte, eager[0]) and torch.equal(dwpe, eager[1]), pattern
