"""Bias gradient: the column sums of dout. A reduction across rows, and how to parallelise it without atomics.

The op: a bias of OC channels is added to each of the N = B*T rows, so dbias[c] += sum over n of dout[n, c];
dout (N, OC) in bf16, dbias fp32. For GPT-2 d12, OC = 768 (attention and MLP projections) or 3072 (the MLP's
first layer), N = 65,536 rows at B = 64. dout may be a column slice of a wider matrix (the q, k, v parts of dqkv),
so rows are stride_row elements apart.

Bytes it must move: dout once, N * OC * es, plus dbias read and written (OC * 8 bytes, negligible). The sum is one
add per element loaded: memory-bound. The difficulty is parallelism: the output has only OC values, so giving each
output its own program (v1) leaves the GPU nearly idle and reads memory in a hostile pattern.

The path:
v1  one program per column, walking down the rows: OC programs (768, fewer than 6 per SM), each reading a column
    with a stride of a whole row: every 2-byte value comes from a different 32-byte memory sector.
v2  (ROWS, BLOCK_OC) tiles: program (i, j) sums rows block i of column block j (coalesced row segments), then adds
    its BLOCK_OC sums into dbias with float atomics. Thousands of programs, but the order of the atomic adds, hence
    the result's last bits, changes from run to run.
v3  the mainline (llmpy.kernels.bias.bias_backward): the same tiles, each program summing a group of row tiles into
    a partial sum per group, written to a scratch buffer; a second kernel adds the partials in a fixed order.
    Deterministic, and as parallel as v2.
The bound: the fastest of torch's eager column sum (dout.sum(0, dtype=float32), then +=) and torch.compile of it.
"""

from common import Result, assert_close, compiled, device, mark_bound, time_ms

import torch
import triton
import triton.language as tl

from llmpy.kernels import bias as mainline


def reference(dout):
    """The column sums of dout, in its dtype (float64 for the reference)."""
    return dout.sum(0)


@triton.jit
def _column_kernel(dbias_ptr, dout_ptr, N, stride_row, BLOCK_ROWS: tl.constexpr):
    column = tl.program_id(0)
    total = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for start in range(0, N, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        total += tl.load(dout_ptr + rows.to(tl.int64) * stride_row + column, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(dbias_ptr + column, tl.load(dbias_ptr + column) + tl.sum(total, axis=0))


def v1(dbias, dout):
    """One program per column, summing BLOCK_ROWS = 256 rows of it per iteration into a register vector.

    Correct and deterministic, but with OC programs of one column each the loads are scattered: the 256 values of an
    iteration are a row apart in memory, so each 2-byte load fetches a 32-byte sector (16x the useful bytes, unless
    a neighbouring column's program happens to hit the same sector in L2 first), and 768 programs cannot keep
    enough loads in flight to cover memory latency on 132 SMs.
    """
    N, OC = dout.shape
    _column_kernel[(OC,)](dbias, dout, N, dout.stride(0), BLOCK_ROWS=256, num_warps=4)


@triton.jit
def _tile_atomic_kernel(dbias_ptr, dout_ptr, N, OC, stride_row, ROWS: tl.constexpr, BLOCK_OC: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    columns = tl.program_id(1) * BLOCK_OC + tl.arange(0, BLOCK_OC)
    column_mask = columns < OC
    mask = (rows < N)[:, None] & column_mask[None, :]
    tile = tl.load(dout_ptr + rows.to(tl.int64)[:, None] * stride_row + columns[None, :], mask=mask, other=0.0)
    tl.atomic_add(dbias_ptr + columns, tl.sum(tile.to(tl.float32), axis=0), mask=column_mask, sem="relaxed")


def v2(dbias, dout):
    """A grid of (64, 256)-element tiles: program (i, j) loads rows 64i.. of columns 256j.. (each row segment 512
    contiguous bytes of bf16: coalesced, vectorised), sums them over rows and adds the 256 sums into dbias with
    relaxed float atomics.

    N / 64 * OC / 256 programs (3,072 at OC = 768) fill the GPU, and dout is read once at full width. The cost:
    N / 64 atomic adds land on each dbias value, in whatever order the programs finish, so the result is not
    bitwise reproducible - unacceptable for a parameter gradient in a trainer that promises reproducible runs.
    """
    N, OC = dout.shape
    block_oc = min(256, triton.next_power_of_2(OC))
    grid = (triton.cdiv(N, 64), triton.cdiv(OC, block_oc))
    _tile_atomic_kernel[grid](dbias, dout, N, OC, dout.stride(0), ROWS=64, BLOCK_OC=block_oc, num_warps=8)


def v3(dbias, dout, scratch):
    """The mainline, llmpy.kernels.bias.bias_backward: v2's tiles, but program (g, j) sums all the row tiles of a
    contiguous group g of rows in fp32 registers and writes one partial sum per group to scratch (G, OC); a second
    kernel adds the G partials column by column in a fixed order. G is chosen from the shapes (about 1024 programs in
    all), so the result depends only on the shapes: the same bits every run."""
    mainline.bias_backward(dbias=dbias, dout=dout, scratch=scratch)


def eager(dbias, dout):
    dbias += dout.sum(0, dtype=torch.float32)


def torch_bias(dbias, dout):
    """The torch code, for torch.compile: an fp32 column sum added into dbias."""
    dbias += dout.float().sum(0)


# Tolerance: 3e-5 relative for every version, bf16 or fp32 dout. bf16 inputs are exact in fp32, so the error is the
# fp32 summation's alone: it grows like 2^-24 * sqrt(N / 2) for a sequential sum, 3e-6 at N = 65,536 in the worst
# order; a dropped tile or a double-counted row shows up at 1e-3 or more.
SUM_TOL = 3e-5


def check(small: bool) -> list[str]:
    dev = device()
    N, OC = (37, 200) if small else (64 * 1024, 768)
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        g = torch.Generator().manual_seed(N + OC)
        # the middle third of a (N, 3 OC) matrix, as the q, k, v parts of dqkv: rows 3 * OC elements apart
        wide = torch.randn(N, 3 * OC, generator=g).to(dev, dtype)
        dout = wide[:, OC:2 * OC]
        dbias0 = torch.randn(OC, generator=g).to(dev)
        expected = dbias0.double() + reference(dout.double())
        scratch = mainline.bias_backward_scratch(N, OC, dev)
        versions = {"v1": v1, "v2": v2, "v3 mainline": lambda dbias, dout: v3(dbias, dout, scratch),
                    "torch eager": eager}
        if dev == "cuda" and dtype == torch.bfloat16:
            versions["torch.compile"] = compiled(torch_bias)
        for name, fn in versions.items():
            dbias = dbias0.clone()  # random start: the kernels must add to it
            fn(dbias, dout)
            err = assert_close(f"bias {name} {tag}", dbias, expected, SUM_TOL)
            lines.append(f"{name} {tag}: rel error {err:.1e}")

    return lines


def benchmark() -> list[Result]:
    N = 64 * 1024
    results = []
    for OC in (768, 3072):
        op = f"bias_backward OC={OC}"
        dout = torch.randn(N, OC, device="cuda", dtype=torch.bfloat16)
        dbias = torch.zeros(OC, device="cuda")
        scratch = mainline.bias_backward_scratch(N, OC, "cuda")
        moved = N * OC * dout.element_size() + 2 * OC * 4
        results += [
            Result(op, "v1 program per column", time_ms(lambda: v1(dbias, dout)), bytes=moved),
            Result(op, "v2 tiles + atomics", time_ms(lambda: v2(dbias, dout)), bytes=moved),
            Result(op, "v3 tiles, two stages", time_ms(lambda: v3(dbias, dout, scratch)), bytes=moved, mainline=True),
        ]
        compiled_bias = compiled(torch_bias)
        results += mark_bound([
            Result(op, "torch eager", time_ms(lambda: eager(dbias, dout)), bytes=moved),
            Result(op, "torch.compile", time_ms(lambda: compiled_bias(dbias, dout)), bytes=moved),
        ])

    return results


if __name__ == "__main__":
    import sys

    import run

    sys.exit(run.main(["bias"]))
