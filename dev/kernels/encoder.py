"""The encoder: token plus position embeddings, forward (a gather) and backward (a scatter-add).

The op, for tokens (B, T) and embedding tables wte (Vp, C), wpe (maxT, C):
    forward   out[b, t] = wte[tokens[b, t]] + wpe[t]                             (B, T, C), bf16
    backward  dwpe[t] += sum over b of dout[b, t]                                 fp32 (maxT, C)
              dwte[v] += sum of dout[b, t] over the (b, t) with tokens[b, t] = v  fp32 (Vp, C)
GPT-2 d12: C = 768, Vp = 50,304, T = 1024, B = 64 (N = B*T = 65,536 rows).

Bytes they must move (es = 2 for bf16): the forward reads N rows of wte (one per token; rows repeat when tokens do,
but count them all, as a kernel streaming rows must), T rows of wpe (shared by the batch: read once at best), the
tokens (4N) and writes N rows: (2N + T) * C * es + 4N. The backward reads dout (N * C * es) and the tokens, and
reads and writes the dwpe rows of T positions and the dwte rows of the distinct tokens in fp32: U = number of
distinct tokens, 8 (T + U) C bytes.

dwte is the hard part: which rows it accumulates into depends on the data, and many rows of dout go to the same
token (in text, the commonest tokens fill several % of all positions). A deterministic sum needs the rows grouped
by token first (llm.c sorts them on the host); the mainline uses float atomics for dwte by default - see
llmpy/kernels/encoder.py for why that trade is made (and what it costs: dwte is not bitwise reproducible) - and
sorts on the host, as llm.c does, in its deterministic mode (v3).

The path:
forward   v1  one program per row: the whole row of C channels, gathered, added, written.
          v2  the mainline (llmpy.kernels.encoder): ROWS rows per program (tiles of ~4096 elements), 4x fewer
              programs at C = 768, more loads in flight per program.
backward  v1  one program per row: its dout row atomically added into dwte[token] and into dwpe[t]. 2 * N * C
              atomics; the dwpe ones collide B-way on each position.
          v2  the mainline: one program per (position t, block of channels), looping over the batch: dwpe[t] is
              summed in registers and written once (deterministic), only dwte uses atomics.
          v3  deterministic (for the mainline's --deterministic 1): the rows grouped by token on the host (a
              stable sort, each token's run cut into segments of at most R = 64 rows); one kernel sums each segment's
              whole rows in increasing row order into dwte[token] (the token's whole run) or a scratch slot (a split
              run), a second adds each split run's slots in order into dwte[token]; dwpe as in v2, without the
              atomics. No atomics: the same bits every run, for reading dout twice and two more launches.
The bound: the fastest of torch eager (an embedding gather and an add; index_add_ and a column sum) and
torch.compile of the same torch code.
"""

import functools

from common import Result, assert_close, compiled, device, mark_bound, timed

import torch
import triton
import triton.language as tl

from llmpy.kernels import encoder as mainline
from llmpy.kernels.rounding import round_to


def reference_forward(tokens, wte, wpe):
    T = tokens.shape[1]
    return wte[tokens] + wpe[:T]


def reference_backward(dout, tokens, Vp, maxT):
    """(dwte, dwpe), fresh (not accumulated), in dout's dtype."""
    B, T, C = dout.shape
    dwte = torch.zeros(Vp, C, dtype=dout.dtype, device=dout.device)
    dwte.index_add_(0, tokens.reshape(-1).long(), dout.reshape(-1, C))
    dwpe = torch.zeros(maxT, C, dtype=dout.dtype, device=dout.device)
    dwpe[:T] = dout.sum(0)
    return dwte, dwpe


@triton.jit
def _forward_row_kernel(out_ptr, tokens_ptr, wte_ptr, wpe_ptr, T, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK_C)
    mask = columns < C
    token = tl.load(tokens_ptr + row).to(tl.int64)
    position = row % T
    out = (tl.load(wte_ptr + token * C + columns, mask=mask).to(tl.float32)
           + tl.load(wpe_ptr + position * C + columns, mask=mask).to(tl.float32))
    tl.store(out_ptr + row.to(tl.int64) * C + columns, round_to(out, out_ptr.dtype.element_ty), mask=mask)


def forward_v1(out, tokens, wte, wpe):
    """One program per row (b, t): load its token id, gather the wte row and the wpe row, add in fp32, write.

    Already at the byte floor - every row is a contiguous gather, as coalesced as a copy - but a row of 768 bf16
    values is only 1.5 KB: 65,536 small programs, each waiting on its token id before it can start its real loads.
    """
    B, T = tokens.shape
    C = wte.shape[1]
    _forward_row_kernel[(B * T,)](out, tokens, wte, wpe, T, C, BLOCK_C=triton.next_power_of_2(C), num_warps=4)


def forward_v2(out, tokens, wte, wpe):
    """The mainline, llmpy.kernels.encoder.encoder_forward: (ROWS, BLOCK_C) tiles, 4 rows per program at C = 768,
    so 4 token ids are loaded together and 4 rows of gathers are in flight per program."""
    mainline.encoder_forward(out, tokens, wte, wpe)


@triton.jit
def _backward_row_kernel(dwte_ptr, dwpe_ptr, dout_ptr, tokens_ptr, T, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK_C)
    mask = columns < C
    token = tl.load(tokens_ptr + row).to(tl.int64)
    position = row % T
    dout = tl.load(dout_ptr + row.to(tl.int64) * C + columns, mask=mask).to(tl.float32)
    tl.atomic_add(dwte_ptr + token * C + columns, dout, mask=mask, sem="relaxed")
    tl.atomic_add(dwpe_ptr + position * C + columns, dout, mask=mask, sem="relaxed")


def backward_v1(dwte, dwpe, dout, tokens):
    """One program per row: its dout row is added into dwte[token] and into dwpe[t] with float atomics.

    The simplest scatter-add: dout is read once, but 2 * N * C atomic adds go to L2, and every dwpe value receives B
    of them (all B rows at position t), in an order that changes from run to run: neither gradient is reproducible.
    """
    B, T = tokens.shape
    C = dwte.shape[1]
    _backward_row_kernel[(B * T,)](dwte, dwpe, dout, tokens, T, C, BLOCK_C=triton.next_power_of_2(C), num_warps=4)


def backward_v2(dwte, dwpe, dout, tokens):
    """The mainline, llmpy.kernels.encoder.encoder_backward: one program per (position t, 256 channels) loops over
    b = 0..B-1 in order, summing dout[b, t] into a register accumulator for dwpe[t] (written once at the end: half the
    atomics gone, and dwpe deterministic) and adding each row into dwte[token] with fire-and-forget atomics."""
    mainline.encoder_backward(dwte=dwte, dwpe=dwpe, dout=dout, tokens=tokens)


def deterministic_backward(dout, tokens, **options):
    """A DeterministicEncoderBackward prepared for these tokens: call it with (dwte, dwpe, dout)."""
    backward = mainline.DeterministicEncoderBackward(*tokens.shape, dout.shape[-1], dout.device, **options)
    backward.prepare(tokens.cpu())
    return backward


def backward_v3(dwte, dwpe, dout, tokens, **options):
    """The mainline's deterministic backward, llmpy.kernels.encoder.DeterministicEncoderBackward, used as in training:
    prepare(tokens) on the host (the grouping and one copy to the device), then three launches: dwpe (v2's kernel
    without the dwte atomics), the segments' sums, the split runs' sums. The benchmark times only the launches: in
    training the host's work for a micro-batch overlaps the GPU's work on the one before."""
    deterministic_backward(dout, tokens, **options)(dwte, dwpe, dout)


def eager_forward(tokens, wte, wpe):
    """torch: the embedding gather (writes a (B, T, C) tensor), then the broadcast add (reads it back)."""
    return torch.nn.functional.embedding(tokens, wte) + wpe[:tokens.shape[1]]


def eager_backward(dwte, dwpe, dout, tokens):
    """torch: index_add_ (a scatter-add with atomics on the GPU) of the upcast rows, and the batch sum for dwpe."""
    B, T, C = dout.shape
    dwte.index_add_(0, tokens.reshape(-1), dout.reshape(-1, C).float())
    dwpe[:T] += dout.sum(0, dtype=torch.float32)


def torch_forward(out, tokens, wte, wpe):
    """The torch code for torch.compile, which fuses the gather and the add into one kernel."""
    out.copy_(wte[tokens].float() + wpe[:tokens.shape[1]].float())


def zipf_tokens(B, T, V, generator, dev):
    """int32 (B, T) tokens drawn with p(rank r) proportional to 1 / r, like words in text: the commonest token is ~9%
    of all positions, and some 15,000 distinct tokens appear in B*T = 65,536. Ranks are shuffled over the vocabulary."""
    probabilities = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)
    ranks = torch.multinomial(probabilities, B * T, replacement=True, generator=generator)
    return torch.randperm(V, generator=generator)[ranks].reshape(B, T).to(dev, torch.int32)


# Tolerances (relative, against float64 on the same rounded inputs):
# - forward: one fp32 add rounded to the output dtype: 1e-6 in fp32 (one rounding of 2^-24), 4e-3 in bf16 (one
#   rounding to bf16, about 1.6e-3 in norm: see layernorm.py).
# - backward: fp32 sums over the rows of a token or a position, in any order: 3e-5 as for any fp32 sum over up to N
#   rows (2^-24 * sqrt(N / 2) = 3e-6 at N = 65,536). bf16 dout values are exact in fp32.
FORWARD_TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3}
SUM_TOL = 3e-5


def check(small: bool) -> list[str]:
    dev = device()
    # small: 50 tokens over 39 rows (repeats are certain: the atomic adds must collide); T < maxT; C not a power of 2
    B, T, C, Vp, maxT = (3, 13, 96, 50, 16) if small else (64, 1024, 768, 50304, 1024)
    g = torch.Generator().manual_seed(B * T + C)
    tokens = zipf_tokens(B, T, Vp, g, dev)
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        wte = torch.randn(Vp, C, generator=g).to(dev, dtype)
        wpe = torch.randn(maxT, C, generator=g).to(dev, dtype)
        dout = torch.randn(B, T, C, generator=g).to(dev, dtype)
        out_ref = reference_forward(tokens.long(), wte.double(), wpe.double())
        dwte_ref, dwpe_ref = reference_backward(dout.double(), tokens, Vp, maxT)
        dwte0, dwpe0 = torch.randn(Vp, C, generator=g).to(dev), torch.randn(maxT, C, generator=g).to(dev)
        dwte_ref += dwte0.double()
        dwpe_ref += dwpe0.double()

        forwards = {"v1": forward_v1, "v2 mainline": forward_v2,
                    "torch eager": lambda out, *inputs: out.copy_(eager_forward(*inputs))}
        # small: segments of at most 2 rows, so that the commonest tokens' runs are split as at d12 with R = 64
        v3 = functools.partial(backward_v3, max_segment_rows=2) if small else backward_v3
        backwards = {"v1": backward_v1, "v2 mainline": backward_v2, "v3 deterministic": v3,
                     "torch eager": eager_backward}
        if dev == "cuda" and dtype == torch.bfloat16:
            forwards["torch.compile"] = compiled(torch_forward)
            backwards["torch.compile"] = compiled(eager_backward)
        for name, fn in forwards.items():
            out = torch.full((B, T, C), float("nan"), dtype=dtype, device=dev)
            fn(out, tokens, wte, wpe)
            err = assert_close(f"encoder forward {name} {tag}", out, out_ref, FORWARD_TOL[dtype])
            lines.append(f"forward {name} {tag}: rel error {err:.1e}")
        for name, fn in backwards.items():
            dwte, dwpe = dwte0.clone(), dwpe0.clone()
            fn(dwte, dwpe, dout, tokens)
            err = assert_close(f"encoder backward {name} {tag} dwte", dwte, dwte_ref, SUM_TOL)
            pe_err = assert_close(f"encoder backward {name} {tag} dwpe", dwpe, dwpe_ref, SUM_TOL)
            lines.append(f"backward {name} {tag}: dwte rel error {err:.1e}, dwpe {pe_err:.1e}")
        # v3's point: the same bits on every call (v1 and v2's dwte may differ in the last bits on a GPU)
        results = []
        for _ in range(2):
            dwte, dwpe = dwte0.clone(), dwpe0.clone()
            v3(dwte, dwpe, dout, tokens)
            results.append((dwte, dwpe))
        if not (torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])):
            raise AssertionError(f"encoder backward v3 deterministic {tag}: two calls differ")
        lines.append(f"backward v3 deterministic {tag}: bitwise equal on a second call")
    return lines


def benchmark() -> list[Result]:
    B, T, C, Vp = 64, 1024, 768, 50304
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    tokens = zipf_tokens(B, T, Vp, g, dev)
    wte = torch.randn(Vp, C, device=dev, dtype=torch.bfloat16)
    wpe = torch.randn(T, C, device=dev, dtype=torch.bfloat16)
    out = torch.empty(B, T, C, device=dev, dtype=torch.bfloat16)
    dout = torch.randn_like(out)
    dwte, dwpe = torch.zeros(Vp, C, device=dev), torch.zeros(T, C, device=dev)
    N, es = B * T, out.element_size()
    distinct = torch.unique(tokens).numel()
    forward_bytes = (2 * N + T) * C * es + 4 * N
    backward_bytes = N * C * es + 4 * N + 8 * (T + distinct) * C

    forward_args, backward_args = (out, tokens, wte, wpe), (dwte, dwpe, dout, tokens)
    results = [
        timed("encoder_forward", "v1 row per program", forward_v1, forward_args, forward_bytes),
        timed("encoder_forward", "v2 rows per program", forward_v2, forward_args, forward_bytes, mainline=True),
    ]
    results += mark_bound([
        timed("encoder_forward", "torch eager", eager_forward, (tokens, wte, wpe), forward_bytes),
        timed("encoder_forward", "torch.compile", compiled(torch_forward), forward_args, forward_bytes),
    ])
    results += [
        timed("encoder_backward", "v1 atomics per row", backward_v1, backward_args, backward_bytes),
        timed("encoder_backward", "v2 dwpe in registers", backward_v2, backward_args, backward_bytes, mainline=True),
        timed("encoder_backward", "v3 deterministic", deterministic_backward(dout, tokens), (dwte, dwpe, dout),
            backward_bytes),
    ]
    results += mark_bound([
        timed("encoder_backward", "torch eager", eager_backward, backward_args, backward_bytes),
        timed("encoder_backward", "torch.compile", compiled(eager_backward), backward_args, backward_bytes),
    ])
    return results


if __name__ == "__main__":
    import sys

    import run

    sys.exit(run.main(["encoder"]))
