"""Matmul: out = inp @ weight^T (+ bias), GPT-2's linear layers, and their two backward products.

The op. A linear layer with weight (OC, C) (PyTorch's and llm.c's layout: one row per output channel) maps the
rows inp (N, C) to out (N, OC):
    out[n, o] = sum_c inp[n, c] * weight[o, c] + bias[o]
and its backward, given dout = dloss/dout (N, OC), is
    dinp (N, C)      = dout @ weight       (a sum over the OC output channels)
    dweight (OC, C) += dout^T @ inp        (a sum over the N = B*T tokens, into the fp32 gradient)
All three are one GEMM, c[M, N] = a[M, K] @ b[K, N], with other operands and transposes:
    forward   a = inp (N, C),    b = weight^T,  M, N, K = N, OC, C
    dinp      a = dout (N, OC),  b = weight,    M, N, K = N, C, OC
    dweight   a = dout^T,        b = inp,       M, N, K = OC, C, N     (c is fp32 and accumulated: +=)
so every version below is one function `vX(c, a, b, bias=None, accumulate=False)` that takes a and b as strided
views (a transpose is a view, not a copy) and `forward`, `backward_input`, `backward_weight` say which views.
GPT-2 d12 at B=64, T=1024: N = 65,536 tokens, C = 768 and OC = 3C (qkv), C (attention projection), 4C (fc), C from
K = 4C (fc projection), and the LM head's Vp = 50,304 outputs (tied to wte, no bias). bf16 operands, fp32
accumulation, as the mainline.

Compute-bound. A GEMM does 2*M*N*K flops on M*K + K*N + M*N elements: the qkv matmul is 232 GFLOP on 0.4 GB,
~570 flops per byte, where an H100 does ~990 TFLOP/s of dense bf16 against ~3.3 TB/s of HBM (~300 flops per byte).
So the table reports TFLOP/s, and the question is how close a kernel keeps the tensor cores to busy. The mainline does
not use any of the Triton versions: it calls cuBLAS (llmpy.vendor: torch.addmm / torch.mm, which pick a tuned
cuBLASLt kernel per shape, bias in the epilogue), and cuBLAS is the bound here. The versions show what it takes to
get near it.

The tiling (all versions). Each program computes a (BLOCK_M, BLOCK_N) tile of c: it walks K in BLOCK_K steps,
loading a (BLOCK_M, BLOCK_K) block of a and a (BLOCK_K, BLOCK_N) block of b and adding their product (tl.dot: the
tensor cores, wgmma on an H100) into an fp32 accumulator held in registers; then it adds the bias, rounds to the
output dtype and stores the tile once. A tile reads (BLOCK_M + BLOCK_N) * K elements for 2 * BLOCK_M * BLOCK_N * K
flops, so bigger tiles need fewer bytes per flop: BLOCK_M * BLOCK_N / (BLOCK_M + BLOCK_N) flops per byte of bf16,
32 for 64x64 tiles, 85 for 128x256. What one tile reads the other tiles of its row and column read again, from L2
when they run at about the same time.

v1, straightforward: 64x64x32 tiles, 4 warps, programs in row-major tile order (program 0 = tile (0, 0), program 1 =
tile (0, 1), ...). Small tiles reload a and b many times, and the programs that run together (one wave: a few
hundred) cover a few tile rows but every tile column, i.e. all of b: for the LM head b is 77 MB, more than the 50 MB
L2, so b's blocks come from HBM again for every tile row.
v2, the same kernel launched differently: 128x256x64 tiles with 8 warps (two warpgroups, each a 64-row wgmma) and a
3-deep software pipeline (num_stages=3: the loads of the next two K steps are in flight while the tensor cores work
on this one), and grouped program order: consecutive programs walk GROUP_M = 8 tile rows down one tile column before
moving right, so the programs in flight share 8 row blocks of a and a few column blocks of b, which stay in L2.
v3, persistent + TMA: as many programs as SMs, each looping over tiles (tile = program id, + #SMs, ...), so there is
no tail of short-lived programs and the compiler can pipeline across tiles (tl.range(flatten=True): the next tile's
first loads are issued while this tile finishes). The blocks are fetched by the Tensor Memory Accelerator: one
instruction copies a whole block into shared memory, in the swizzled layout the tensor cores read, with the
addresses computed and the out-of-bounds parts zero-filled by the hardware (host-side TensorDescriptors, one per
operand; a transposed operand is loaded as stored and transposed in shared memory). For dweight, whose K = N tokens
is long and output small (3072 x 768 = 72 tiles of 128x256 for 132 SMs: half the GPU idle), v3 also splits K: S
slices of the tokens (S = 8 for fc, 1 for the LM head's 1,179 tiles) each store their own fp32 partial tile, and
llmpy.kernels.bias.sum_partials adds the S partials into dweight in a fixed order (deterministic, like the mainline's
two-stage reductions); the GEMM itself never reads dweight back, which would spill registers at 128x256.
Where they stand on the H100 (dev/kernels/README.md has the table): v3 reaches 91-98% of cuBLAS on the qkv, fc and
fcproj forwards and on dinp (100% on the LM head's), 84% on the LM head's forward and 92% on its dweight, and least
on the small ones: 60% on attproj's forward (K = N = 768: 12 K steps a tile, so each tile's pipeline fill and
epilogue weigh most) and 73% on fc's dweight.
"""

# common first: without a GPU it sets TRITON_INTERPRET=1, which must precede importing triton
from common import INTERPRET, Result, assert_close, device, time_ms

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from llmpy import vendor
from llmpy.kernels.bias import sum_partials
from llmpy.kernels.rounding import round_to

# Launch configurations: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Under the interpreter every
# version uses small tiles, so that the checks' small matrices span several tiles and K steps.
_SMALL = (32, 32, 16, 2, 4, 2)
_V1 = (64, 64, 32, 1, 4, 2)
# v2: 128x256 tiles for bf16 outputs; 128x128 for the fp32 dweight (c += a @ b), whose accumulating epilogue (the
# old fp32 tile loaded next to the new one) spills registers at 128x256 (ptxas for sm_90).
_V2 = (128, 256, 64, 8, 8, 3)
_V2_ACCUMULATE = (128, 128, 64, 8, 8, 3)
_V3 = _V2  # v3 writes dweight's fp32 partials without reading c back: no spills at 128x256
_INTERPRETER_PROGRAMS = 4  # v3's "SMs" under the interpreter: few, so each program loops over several tiles


@triton.jit
def _tile_coordinates(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    # Tile index -> (tile row, tile column), GROUP_M tile rows at a time: tiles 0, 1, ..., GROUP_M - 1 are the first
    # column of the first GROUP_M rows, the next GROUP_M the second column, and so on. GROUP_M = 1: row-major order.
    tiles_per_group = GROUP_M * tiles_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)  # the last group may have fewer rows
    tile_m = first_m + (tile % tiles_per_group) % group_rows
    tile_n = (tile % tiles_per_group) // group_rows
    return tile_m, tile_n


@triton.jit
def _store_tile(c_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr):
    # The epilogue: acc (BLOCK_M, BLOCK_N) fp32 (+ bias) stored to c (rounded to c's dtype), or added to c (fp32).
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    # int64 rows: the LM head's logits (65,536 x 50,304) have more than 2^31 elements
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask)
    tl.store(c_ptrs, round_to(acc, c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_kernel(c_ptr, a_ptr, b_ptr, bias_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   UPCAST: tl.constexpr):
    # v1 and v2: one program per tile of c, operands through pointers and strides.
    tile_m, tile_n = _tile_coordinates(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows of a past M and columns of b past N wrap around to valid ones instead of being masked: their products land
    # in rows and columns of the tile that are never stored, and the loads need a mask along K only.
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N).to(tl.int64)[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k, other=0.0)  # (BLOCK_M, BLOCK_K)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k, other=0.0)  # (BLOCK_K, BLOCK_N)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    _store_tile(c_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS, ACCUMULATE)


@triton.jit
def _persistent_tma_kernel(c_ptr, a_desc, b_desc, bias_ptr, M, N, K, k_per_split, num_splits,
                           stride_c_split, stride_cm, stride_cn,
                           A_TRANSPOSED: tl.constexpr, B_TRANSPOSED: tl.constexpr,
                           HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                           NUM_PROGRAMS: tl.constexpr, UPCAST: tl.constexpr):
    # v3: NUM_PROGRAMS programs loop over num_splits * (tiles of c); a work item is (K slice, tile). Slice s covers
    # k in [s * k_per_split, (s + 1) * k_per_split), k_per_split a multiple of BLOCK_K, and stores its tile (+ bias)
    # at c + s * stride_c_split (num_splits > 1: fp32 partials). a_desc holds a as (M, K), or as (K, M) when
    # A_TRANSPOSED; b_desc holds b as (K, N), or as (N, K) when B_TRANSPOSED.
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_split = tiles_m * tiles_n
    for work in tl.range(tl.program_id(0), tiles_per_split * num_splits, NUM_PROGRAMS, flatten=True):
        split = work // tiles_per_split
        tile_m, tile_n = _tile_coordinates(work % tiles_per_split, tiles_m, tiles_n, GROUP_M)
        start_m = tile_m * BLOCK_M
        start_n = tile_n * BLOCK_N
        k_start = split * k_per_split
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # the block past K (and past M or N) reads as zeros: TMA fills what lies outside the tensor
        for k in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            if A_TRANSPOSED:
                a = a_desc.load([k, start_m]).T  # (BLOCK_K, BLOCK_M) in memory -> (BLOCK_M, BLOCK_K)
            else:
                a = a_desc.load([start_m, k])
            if B_TRANSPOSED:
                b = b_desc.load([start_n, k]).T  # (BLOCK_N, BLOCK_K) in memory -> (BLOCK_K, BLOCK_N)
            else:
                b = b_desc.load([k, start_n])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        c_split_ptr = c_ptr + split.to(tl.int64) * stride_c_split
        # plain stores from registers: a TMA store through shared memory (a 64 KB tile buffer next to the 144 KB of
        # pipeline buffers) measured 3-17% slower on every forward and dinp shape on the H100
        _store_tile(c_split_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS, False)


def _check_operands(c, a, b, bias, accumulate):
    M, K = a.shape
    if b.shape[0] != K or c.shape != (M, b.shape[1]) or a.dtype != b.dtype:
        raise ValueError(f"matmul: c {tuple(c.shape)} = a {tuple(a.shape)} @ b {tuple(b.shape)} does not fit "
                         f"(a {a.dtype}, b {b.dtype})")
    if accumulate and (c.dtype != torch.float32 or bias is not None):
        raise ValueError("matmul: accumulate=True adds into an fp32 c, without a bias")


def _gemm(config, c, a, b, bias, accumulate):
    _check_operands(c, a, b, bias, accumulate)
    M, K = a.shape
    N = b.shape[1]
    block_m, block_n, block_k, group_m, num_warps, num_stages = _SMALL if INTERPRET else config
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _matmul_kernel[grid](c, a, b, bias if bias is not None else c, M, N, K,
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                         HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, UPCAST=INTERPRET,
                         num_warps=num_warps, num_stages=num_stages)


def v1(c, a, b, bias=None, accumulate=False):
    """c (M, N) = a (M, K) @ b (K, N) (+ bias (N,)), or c (fp32) += a @ b with accumulate.

    One program per 64x64 tile, in row-major tile order, 2 pipeline stages: the straightforward tiled GEMM.
    a and b: bf16, any strides (transposed views included); c: bf16 or fp32.
    """
    _gemm(_V1, c, a, b, bias, accumulate)


def v2(c, a, b, bias=None, accumulate=False):
    """v1's kernel with tiles and order for the H100: 128x256x64 tiles (2.7x the flops per byte loaded of 64x64),
    8 warps, 3 pipeline stages, and grouped program order (8 tile rows per column sweep) so that the blocks of a and
    b that the programs in flight share are read from L2 rather than HBM. (128x128 tiles for accumulate.)"""
    _gemm(_V2_ACCUMULATE if accumulate else _V2, c, a, b, bias, accumulate)


def _num_sms():
    return _INTERPRETER_PROGRAMS if INTERPRET else torch.cuda.get_device_properties(0).multi_processor_count


def _descriptor(x, block_rows, block_cols):
    """A TMA descriptor of the 2-D view x, which must be row-major or a transpose of row-major. Returns
    (descriptor, transposed): when x's unit stride is along its rows, the descriptor describes x^T, row-major, and
    blocks (block_cols, block_rows) of it are loaded and transposed in the kernel."""
    if x.stride(1) == 1:
        return TensorDescriptor.from_tensor(x, [block_rows, block_cols]), False
    if x.stride(0) == 1:
        return TensorDescriptor.from_tensor(x.t(), [block_cols, block_rows]), True
    raise ValueError(f"matmul v3: operands must have a unit stride, got strides {x.stride()}")


def _split_k(tiles, K, block_k, num_sms):
    """How many K slices (1, 2, 4 or 8) the work items need to fill the last wave of SMs to 85%: with few work items
    the partly filled last wave leaves SMs idle. Every slice keeps at least two K steps."""
    splits = 1
    while splits < 8 and K >= 2 * splits * 2 * block_k:
        waves = tiles * splits / num_sms
        if waves / math.ceil(waves) >= 0.85:
            break
        splits *= 2
    return splits


def v3(c, a, b, bias=None, accumulate=False):
    """Persistent and TMA: one program per SM loops over the tiles (pipelined across tiles), with every block of a
    and b copied into shared memory by the Tensor Memory Accelerator. With accumulate (dweight: a long K, few tiles)
    K is split into slices whose fp32 partial tiles go to a scratch buffer, then summed into c by a second,
    deterministic kernel: the GEMM's epilogue never reads c, which keeps it out of register spills at 128x256.

    Same contract as v1, but a and b must each be row-major or a transpose of row-major, with 16-byte aligned
    strides, and with accumulate c must be contiguous.
    """
    _check_operands(c, a, b, bias, accumulate)
    if accumulate and not c.is_contiguous():
        raise ValueError(f"matmul v3: c must be contiguous with accumulate, got strides {c.stride()}")
    M, K = a.shape
    N = b.shape[1]
    block_m, block_n, block_k, group_m, num_warps, num_stages = _SMALL if INTERPRET else _V3
    a_desc, a_transposed = _descriptor(a, block_m, block_k)
    b_desc, b_transposed = _descriptor(b, block_k, block_n)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    num_sms = _num_sms()
    splits = _split_k(tiles, K, block_k, num_sms) if accumulate else 1
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    # with accumulate the product goes to fp32 partials (splits, M, N), summed into c below
    target = torch.empty((splits, M, N), dtype=torch.float32, device=c.device) if accumulate else c
    stride_cm, stride_cn = (N, 1) if accumulate else (c.stride(0), c.stride(1))
    num_programs = min(num_sms, tiles * splits)
    _persistent_tma_kernel[(num_programs,)](
        target, a_desc, b_desc, bias if bias is not None else c, M, N, K, k_per_split, splits,
        M * N, stride_cm, stride_cn,
        A_TRANSPOSED=a_transposed, B_TRANSPOSED=b_transposed, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        NUM_PROGRAMS=num_programs, UPCAST=INTERPRET, num_warps=num_warps, num_stages=num_stages)
    if accumulate:
        sum_partials(c.view(-1), target.view(splits, M * N))


VERSIONS = {"v1": v1, "v2": v2, "v3": v3}


def forward(gemm, out, inp, weight, bias=None):
    """out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC,) with one of the GEMMs above."""
    gemm(out, inp, weight.t(), bias)


def backward_input(gemm, dinp, dout, weight):
    """dinp (N, C) = dout (N, OC) @ weight (OC, C)."""
    gemm(dinp, dout, weight)


def backward_weight(gemm, dweight, dout, inp):
    """dweight (OC, C) fp32 += dout (N, OC)^T @ inp (N, C)."""
    gemm(dweight, dout.t(), inp, accumulate=True)


def reference(inp, weight, bias=None):
    """The forward in float64: inp (N, C) @ weight (OC, C)^T + bias."""
    out = inp.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


def bound_forward(out, inp, weight, bias=None):
    """cuBLAS through torch, with its heuristic's algorithm (the mainline calls cuBLASLt and times the candidates)."""
    if bias is None:
        torch.mm(inp, weight.t(), out=out)
    else:
        torch.addmm(bias, inp, weight.t(), out=out)


def bound_backward_input(dinp, dout, weight):
    torch.mm(dout, weight, out=dinp)


def bound_backward_weight(dweight, dout, inp):
    """cuBLAS multiplies bf16 and accumulates into the fp32 gradient in one call (GPU only: torch has no mixed-dtype
    matmul on the CPU)."""
    torch.addmm(dweight, dout.t(), inp, out_dtype=torch.float32, out=dweight)


# The shapes: (name, N, C, OC, bias). N is the checks' row count at d12 sizes; the benchmark uses 65,536.
_LAYERS = [("qkv", 768, 2304, True), ("attproj", 768, 768, True), ("fc", 768, 3072, True),
           ("fcproj", 3072, 768, True), ("lm_head", 768, 50304, False)]

# Tolerances, as ||got - ref|| / ||ref|| against float64 on the same bf16 inputs:
# - bf16 outputs (forward, dinp): the products of bf16 numbers are exact in fp32 and the fp32 sums are off by ~1e-6
#   relative, so the error is the final rounding to bf16, 2^-9 at most per element and ~2^-9/sqrt(3) = 1.1e-3 in the
#   norm. 4e-3 leaves room for that and fails anything that accumulates in bf16 or misplaces a tile.
_TOL_BF16 = 4e-3
# - fp32 dweight (+=): fp32 sums of K products, ~sqrt(K) * 2^-24 = 5e-6 relative at K = 8192; 1e-4 is 20x that, and
#   fails a kernel that overwrites instead of accumulating (the initial dweight is ~1% of the result's norm).
_TOL_FP32 = 1e-4


def _inputs(N, C, OC, generator):
    """Seeded random inp (N, C), weight (OC, C), bias (OC,), dout (N, OC) in bf16 and dweight (OC, C) fp32, drawn on
    the generator's device (the LM head's dout has 3.3 billion elements at the benchmark's N)."""
    dev = generator.device
    inp = torch.randn(N, C, generator=generator, device=dev).to(torch.bfloat16)
    weight = (torch.randn(OC, C, generator=generator, device=dev) / math.sqrt(C)).to(torch.bfloat16)
    bias = torch.randn(OC, generator=generator, device=dev).to(torch.bfloat16)
    dout = torch.randn(N, OC, generator=generator, device=dev, dtype=torch.bfloat16)
    dweight = torch.randn(OC, C, generator=generator, device=dev)
    return inp, weight, bias, dout, dweight


def check(small: bool) -> list[str]:
    """Every version, the mainline (llmpy.vendor) and the bound against float64: forward on every shape, both
    backward products on the qkv and LM head shapes (small: the same roles at tiny sizes, with row counts and
    widths that are not multiples of the tiles)."""
    dev = device()
    if small:
        N, shapes = 100, [("qkv", 72, 40, True), ("lm_head", 24, 200, False)]
    else:
        N, shapes = 8192, _LAYERS
    generator = torch.Generator(dev).manual_seed(1234)
    contenders = dict(VERSIONS)
    lines = []
    for name, C, OC, has_bias in shapes:
        inp, weight, bias, dout, dweight0 = _inputs(N, C, OC, generator)
        bias = bias if has_bias else None
        ref = reference(inp, weight, bias)
        ref_dinp = dout.double() @ weight.double()
        ref_dweight = dweight0.double() + dout.double().t() @ inp.double()
        runs = [(f"{v} ", lambda o, i, w, b, g=g: forward(g, o, i, w, b),
                 lambda d, o, w, g=g: backward_input(g, d, o, w),
                 lambda dw, o, i, g=g: backward_weight(g, dw, o, i)) for v, g in contenders.items()]
        runs.append(("mainline (llmpy.vendor) ", vendor.matmul_forward, vendor.matmul_backward_input,
                     vendor.matmul_backward_weight))
        runs.append(("bound (torch cuBLAS) ", bound_forward, bound_backward_input,
                     bound_backward_weight if dev == "cuda" else None))
        for label, fwd, bwd_input, bwd_weight in runs:
            out = torch.full((N, OC), float("nan"), dtype=torch.bfloat16, device=dev)
            fwd(out, inp, weight, bias)
            err = assert_close(f"matmul {label}forward {name}", out, ref, _TOL_BF16)
            line = f"{label}{name} (N={N}, C={C}, OC={OC}): forward {err:.1e}"
            if name not in ("qkv", "lm_head"):
                lines.append(line)
                continue
            dinp = torch.full((N, C), float("nan"), dtype=torch.bfloat16, device=dev)
            bwd_input(dinp, dout, weight)
            line += f", dinp {assert_close(f'matmul {label}dinp {name}', dinp, ref_dinp, _TOL_BF16):.1e}"
            if bwd_weight is None:
                lines.append(line + ", dweight: GPU only")
                continue
            dweight = dweight0.clone()
            bwd_weight(dweight, dout, inp)
            line += f", dweight {assert_close(f'matmul {label}dweight {name}', dweight, ref_dweight, _TOL_FP32):.1e}"
            lines.append(line)
    return lines


def benchmark() -> list[Result]:
    """d12 at B=64, T=1024 (N = 65,536 rows): the forward of every linear layer and the LM head, and both backward
    products of the fc layer and the LM head. TFLOP/s count 2*M*N*K."""
    N = 64 * 1024
    generator = torch.Generator("cuda").manual_seed(0)
    names = {"v1": "v1 64x64 tiles", "v2": "v2 128x256, grouped", "v3": "v3 persistent, TMA"}
    results = []

    def contenders(op, flops, ours, mainline, bound, bound_name):
        """Our versions (ours(gemm) runs one), the mainline's vendor call and torch's cuBLAS call, timed."""
        rows = [Result(op, names[v], time_ms(lambda: ours(gemm)), flops=flops) for v, gemm in VERSIONS.items()]
        rows.append(Result(op, "cuBLAS (llmpy.vendor)", time_ms(mainline), flops=flops, mainline=True))
        rows.append(Result(op, bound_name, time_ms(bound), flops=flops, bound=True))
        return rows

    for name, C, OC, has_bias in _LAYERS:
        inp, weight, bias, dout, dweight = _inputs(N, C, OC, generator)
        bias = bias if has_bias else None
        out = torch.empty(N, OC, dtype=torch.bfloat16, device="cuda")
        flops = 2 * N * C * OC
        results += contenders(f"matmul fwd {name} {N}x{C}x{OC}", flops,
                              lambda gemm: forward(gemm, out, inp, weight, bias),
                              lambda: vendor.matmul_forward(out, inp, weight, bias),
                              lambda: bound_forward(out, inp, weight, bias), "torch.addmm/mm")
        if name not in ("fc", "lm_head"):
            continue
        dinp = torch.empty(N, C, dtype=torch.bfloat16, device="cuda")
        results += contenders(f"matmul bwd dinp {name} {N}x{OC}x{C}", flops,
                              lambda gemm: backward_input(gemm, dinp, dout, weight),
                              lambda: vendor.matmul_backward_input(dinp, dout, weight),
                              lambda: bound_backward_input(dinp, dout, weight), "torch.mm")
        results += contenders(f"matmul bwd dweight {name} {OC}x{N}x{C}", flops,
                              lambda gemm: backward_weight(gemm, dweight, dout, inp),
                              lambda: vendor.matmul_backward_weight(dweight, dout, inp),
                              lambda: bound_backward_weight(dweight, dout, inp), "torch.addmm")
    return results

if __name__ == "__main__":
    import run

    raise SystemExit(run.main(["matmul"]))
