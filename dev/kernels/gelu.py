"""GELU (tanh approximation), forward and backward: the simplest memory-bound op, what vector width does to it, and
what fusing the next op's reduction into it saves.

The op, elementwise on the MLP's hidden activations (N, 4C) = (B*T, 3072) for GPT-2 d12:
    gelu(x) = 0.5 * x * (1 + tanh(u)),   u = sqrt(2 / pi) * (x + 0.044715 * x^3)
    dinp = dout * gelu'(x),   gelu'(x) = 0.5 * (1 + tanh(u)) + 0.5 * x * (1 - tanh(u)^2) * du/dx
(the kernels use the identity 0.5 * (1 + tanh(u)) = sigmoid(2u): see llmpy/kernels/gelu.py.)
In the model the backward also produces the fc bias gradient: x is the fc matmul's output, so dinp is that output's
gradient and its column sums are the fc bias's gradient, dbias (4C,) fp32 += dinp.sum(0).

Bytes it must move: the forward reads x and writes out, 2 * numel * es; the backward reads x and dout and writes dinp,
3 * numel * es (es = 2 for bf16), with or without the bias gradient (dbias is 4C values, nothing next to N * 4C).
A few dozen flops per element hide under that: the time is the traffic over the bandwidth, so the only question is
how close to copy bandwidth a kernel gets.

The path:
forward   v1  blocks of 128 elements, 4 warps: one element per thread, so every load and store is a 2-byte access,
              and each program does so little that launching and retiring ~1.5 million programs costs as much as
              the work.
          v2  the mainline (llmpy.kernels.gelu.gelu_forward): blocks of 2048 elements with 8 warps, 8 contiguous
              elements per thread: one 16-byte vector load or store per thread per tensor, 16x fewer programs.
backward  v1  v1's layout.
          v2  v2's layout: the flat 16-byte-vector kernel, the mainline's until the bias gradient moved into it.
          v3  the mainline's kernel (llmpy.kernels.gelu.gelu_backward, here without dbias): the same math on 2D
              tiles, program (g, j) walking the rows of group g in column block j as llmpy.kernels.bias's stage 1
              does. The same bytes as v2 in the same 16-byte accesses; the layout is what makes v4 possible: a
              program that owns whole columns of a row group can add them up.
          v4  the mainline as the model calls it (with dbias): v3 also sums the columns of the dinp it writes, one
              partial sum per program, which bias.sum_partials adds up in a fixed order. The alternative, v3 and
              then the bias gradient's own kernel, reads the whole (N, 4C) dinp back (400 MB at d12, B = 64: the
              largest activation of the model): 4 transfers of N * 4C instead of 3. Fused, the sums cost registers
              and a (G, 4C) fp32 scratch of about 1 MB: a quarter of the pair's traffic is saved.
Tried and dropped (commit 3e598fb; H200, 2026-12-05): v5, the backward writing the fc layer's e5m2 gradient in both
    layouts with dbias (tiles of 32 rows turned as 32-bit words, fp8_cast.py's v7), to spare the weight gradient its
    fp8.transpose: 0.561 ms at best against the mainline's e5m2 output, then fp8.transpose, 0.480 (N = 65,536,
    4C = 3072).
The bound: the fastest of torch's eager gelu kernels (F.gelu(approximate="tanh") and aten.gelu_backward, which
allocate their output; for v4, aten.gelu_backward followed by a column sum) and torch.compile of the torch code
writing into our outputs (for v4 the formula and the column sum compiled together, which inductor may fuse).
"""

from common import Result, assert_close, compiled, device, mark_bound, timed

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmpy.kernels import bias
from llmpy.kernels import gelu as mainline
from llmpy.kernels.rounding import round_to

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def reference_forward(x):
    """gelu(x) with torch's tanh, in the dtype of x (float64 for the reference)."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def reference_backward(dout, x):
    """dout * gelu'(x), the derivative written out with tanh, in the inputs' dtype."""
    tanh_u = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    return dout * (0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u * tanh_u) * du_dx)


@triton.jit
def _gelu(x):
    """gelu(x) for fp32 x, and the sigmoid s it is made of: gelu = x * s, s = sigmoid(2u)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    s = tl.sigmoid(2.0 * u)
    return x * s, s


@triton.jit
def _forward_kernel(out_ptr, inp_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(inp_ptr + offsets, mask=mask).to(tl.float32)
    out, _ = _gelu(x)
    tl.store(out_ptr + offsets, round_to(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dinp_ptr, inp_ptr, dout_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(inp_ptr + offsets, mask=mask).to(tl.float32)
    dout = tl.load(dout_ptr + offsets, mask=mask).to(tl.float32)
    _, s = _gelu(x)
    du_dx = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    dinp = dout * (s + x * s * (1.0 - s) * 2.0 * du_dx)  # product rule; sigmoid' = s * (1 - s)
    tl.store(dinp_ptr + offsets, round_to(dinp, dinp_ptr.dtype.element_ty), mask=mask)


def forward_v1(out, inp):
    """Elementwise in blocks of 128 with 4 warps (128 threads): one element, one 2-byte access, per thread.

    The loads are coalesced (a warp reads 64 contiguous bytes), but each thread issues a separate narrow instruction
    per element, and the grid is numel / 128 programs (1.5 million at d12 B = 64): per-program overhead (launch,
    index math, tail handling) is paid for every 256 bytes of bf16 data.
    """
    numel = inp.numel()
    _forward_kernel[(triton.cdiv(numel, 128),)](out, inp, numel, BLOCK=128, num_warps=4)


def forward_v2(out, inp):
    """The mainline, llmpy.kernels.gelu.gelu_forward: 2048 elements per program, 8 warps, 8 contiguous elements
    (16 bytes of bf16) per thread: one vector instruction per thread per tensor, and 16x fewer programs than v1."""
    mainline.gelu_forward(out, inp)


def backward_v1(dinp, inp, dout):
    """v1's layout for the backward: blocks of 128, one element per thread (see forward_v1)."""
    numel = inp.numel()
    _backward_kernel[(triton.cdiv(numel, 128),)](dinp, inp, dout, numel, BLOCK=128, num_warps=4)


def backward_v2(dinp, inp, dout):
    """forward_v2's layout for the backward: the flat buffer in blocks of 2048 elements, 8 warps, one 16-byte vector
    per thread per tensor. At the byte floor, but a program's 2048 elements are part of a row or straddle two: no
    program holds a column of several rows, so the bias gradient needs a pass of its own (see backward_v4)."""
    numel = inp.numel()
    _backward_kernel[(triton.cdiv(numel, 2048),)](dinp, inp, dout, numel, BLOCK=2048, num_warps=8)


def backward_v3(dinp, inp, dout):
    """The mainline's kernel, llmpy.kernels.gelu.gelu_backward without dbias: (N, 4C) in tiles of (16, 256).

    Program (g, j) takes the rows of group g (G groups, about 1024 programs in all, as llmpy.kernels.bias chooses
    them) in column block j and walks down them tile by tile; each tile row is 256 contiguous elements, 512 bytes of
    bf16, so the accesses are 16-byte vectors as in v2 and the traffic is the same 3 transfers. What changes is who
    owns what: each program now owns a (rows of g) x (256 columns) block, whose column sums it can form (v4).
    """
    mainline.gelu_backward(dinp, inp, dout)


def backward_v3_then_bias(dinp, dbias, inp, dout, scratch):
    """v3, then the mainline's bias gradient (llmpy.kernels.bias.bias_backward) reading dinp back from memory:
    two launches and 4 transfers of N * 4C (x, dout, dinp written, dinp read)."""
    backward_v3(dinp, inp, dout)
    bias.bias_backward(dbias, dinp, scratch)


def backward_v4(dinp, dbias, inp, dout, scratch):
    """The mainline as the model calls it, llmpy.kernels.gelu.gelu_backward with dbias: v3 adds each tile of the
    dinp it has just rounded and stored into a (16, 256) fp32 accumulator, and writes the column sums of its row
    group to scratch (G, 4C); bias.sum_partials adds the G partials into dbias in a fixed order (deterministic).
    3 transfers of N * 4C for both gradients: dinp is never read back."""
    mainline.gelu_backward(dinp, inp, dout, dbias=dbias, scratch=scratch)


def eager_forward(inp):
    return F.gelu(inp, approximate="tanh")


def eager_backward(inp, dout):
    return torch.ops.aten.gelu_backward(dout, inp, approximate="tanh")


def eager_backward_bias(dbias, inp, dout):
    """What torch code runs for both gradients: the gelu backward kernel, then a column sum of its output."""
    dinp = eager_backward(inp, dout)
    dbias += dinp.sum(0, dtype=torch.float32)
    return dinp


def torch_forward(out, inp):
    """The torch formula in fp32 into our output: what torch.compile fuses into one kernel."""
    out.copy_(reference_forward(inp.float()))


def torch_backward(dinp, inp, dout):
    dinp.copy_(reference_backward(dout.float(), inp.float()))


def torch_backward_bias(dinp, dbias, inp, dout):
    """Both gradients in torch, for torch.compile to fuse as it can: dinp, then the fp32 column sums of it."""
    torch_backward(dinp, inp, dout)
    dbias += dinp.float().sum(0)


# Tolerances (relative, against float64 from the same rounded inputs):
# - fp32: 1e-5. The kernels evaluate a short formula in fp32 (sigmoid through exp: a few ulps, ~1e-7 relative);
#   a wrong constant or a missing term is O(1e-2).
# - bf16: 4e-3. One rounding of the fp32 result to bf16: about 1.6e-3 in norm (see layernorm.py); the eager bound
#   works in fp32 internally and rounds once as well.
# - dbias: 3e-5 for fp32 (the fp32 sum over N rows errs like 2^-24 * sqrt(N / 2), see bias.py); 4e-3 for bf16, where
#   the columns summed are the rounded dinp (as a separate bias pass would read them): the rounding errors are
#   independent across rows, so the sums err relatively about as much as the elements, 1.6e-3, against the float64
#   sum of the unrounded gradient. A dropped or doubled (16, 256) tile moves a column sum by ~sqrt(16 / N) >= 1.6e-2
#   relative, even at N = 65,536.
FP32_TOL, BF16_TOL, SUM_TOL = 1e-5, 4e-3, 3e-5


def check(small: bool) -> list[str]:
    dev = device()
    N, C4 = (37, 200) if small else (64 * 1024, 3072)  # 37 * 200 is not a multiple of any block, nor 37 of 16 rows
    scratch = bias.bias_backward_scratch(N, C4, dev)
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
        dbias_tol = SUM_TOL if dtype == torch.float32 else BF16_TOL
        tag = "fp32" if dtype == torch.float32 else "bf16"
        g = torch.Generator().manual_seed(N + C4)
        x = (2 * torch.randn(N, C4, generator=g)).to(dev, dtype)  # spans both GELU regimes (|x| up to ~10)
        dout = torch.randn(N, C4, generator=g).to(dev, dtype)
        dbias0 = torch.randn(C4, generator=g).to(dev)  # a random start: dbias accumulates
        out_ref = reference_forward(x.double())
        dinp_ref = reference_backward(dout.double(), x.double())
        dbias_ref = dbias0.double() + dinp_ref.sum(0)

        forwards = {"v1": forward_v1, "v2 mainline": forward_v2,
                    "torch eager": lambda out, inp: out.copy_(eager_forward(inp))}
        backwards = {"v1": backward_v1, "v2": backward_v2, "v3 mainline": backward_v3,
                     "torch eager": lambda dinp, inp, dout: dinp.copy_(eager_backward(inp, dout))}
        backwards_bias = {
            "v3 then bias_backward": lambda *a: backward_v3_then_bias(*a, scratch),
            "v4 mainline": lambda *a: backward_v4(*a, scratch),
            "torch eager": lambda dinp, dbias, inp, dout: dinp.copy_(eager_backward_bias(dbias, inp, dout)),
        }
        if dev == "cuda" and dtype == torch.bfloat16:
            forwards["torch.compile"] = compiled(torch_forward)
            backwards["torch.compile"] = compiled(torch_backward)
            backwards_bias["torch.compile"] = compiled(torch_backward_bias)
        for name, fn in forwards.items():
            out = torch.full_like(x, float("nan"))
            fn(out, x)
            err = assert_close(f"gelu forward {name} {tag}", out, out_ref, tol)
            lines.append(f"forward {name} {tag}: rel error {err:.1e}")
        for name, fn in backwards.items():
            dinp = torch.full_like(x, float("nan"))
            fn(dinp, x, dout)
            err = assert_close(f"gelu backward {name} {tag}", dinp, dinp_ref, tol)
            lines.append(f"backward {name} {tag}: rel error {err:.1e}")
        for name, fn in backwards_bias.items():
            dinp, dbias = torch.full_like(x, float("nan")), dbias0.clone()
            fn(dinp, dbias, x, dout)
            err = assert_close(f"gelu backward + dbias {name} {tag} dinp", dinp, dinp_ref, tol)
            db_err = assert_close(f"gelu backward + dbias {name} {tag} dbias", dbias, dbias_ref, dbias_tol)
            lines.append(f"backward + dbias {name} {tag}: dinp rel error {err:.1e}, dbias {db_err:.1e}")
        dinp, dbias = dout.clone(), dbias0.clone()  # as the model calls it: in place, dinp is dout
        backward_v4(dinp, dbias, x, dinp, scratch)
        err = assert_close(f"gelu backward v4 mainline in place {tag} dinp", dinp, dinp_ref, tol)
        db_err = assert_close(f"gelu backward v4 mainline in place {tag} dbias", dbias, dbias_ref, dbias_tol)
        lines.append(f"backward + dbias v4 mainline in place {tag}: dinp rel error {err:.1e}, dbias {db_err:.1e}")
    return lines


def benchmark() -> list[Result]:
    x = 2 * torch.randn(64 * 1024, 3072, device="cuda", dtype=torch.bfloat16)  # the check's shape: compiled once
    N, C4 = x.shape
    dout = torch.randn_like(x)
    out = torch.empty_like(x)
    dbias = torch.zeros(C4, device="cuda")
    scratch = bias.bias_backward_scratch(N, C4, "cuda")
    forward_bytes = 2 * x.numel() * x.element_size()
    backward_bytes = 3 * x.numel() * x.element_size()  # also with dbias: its 4C values are nothing next to these

    results = [
        timed("gelu_forward", "v1 scalar, 128 per program", forward_v1, (out, x), forward_bytes),
        timed("gelu_forward", "v2 16-byte vectors", forward_v2, (out, x), forward_bytes, mainline=True),
    ]
    results += mark_bound([
        timed("gelu_forward", "torch eager", eager_forward, (x,), forward_bytes),
        timed("gelu_forward", "torch.compile", compiled(torch_forward), (out, x), forward_bytes),
    ])
    results += [
        timed("gelu_backward", "v1 scalar, 128 per program", backward_v1, (out, x, dout), backward_bytes),
        timed("gelu_backward", "v2 flat 16-byte vectors", backward_v2, (out, x, dout), backward_bytes),
        timed("gelu_backward", "v3 2D tiles", backward_v3, (out, x, dout), backward_bytes, mainline=True),
    ]
    results += mark_bound([
        timed("gelu_backward", "torch eager", eager_backward, (x, dout), backward_bytes),
        timed("gelu_backward", "torch.compile", compiled(torch_backward), (out, x, dout), backward_bytes),
    ])
    op = "gelu_backward + dbias"
    results += [
        timed(op, "v3 then bias_backward", backward_v3_then_bias, (out, dbias, x, dout, scratch), backward_bytes),
        timed(op, "v4 fused bias gradient", backward_v4, (out, dbias, x, dout, scratch), backward_bytes, mainline=True),
    ]
    results += mark_bound([
        timed(op, "torch eager", eager_backward_bias, (dbias, x, dout), backward_bytes),
        timed(op, "torch.compile", compiled(torch_backward_bias), (out, dbias, x, dout), backward_bytes),
    ])
    return results


if __name__ == "__main__":
    import sys

    import run

    sys.exit(run.main(["gelu"]))
