"""RMSNorm, Llama 3's norm, forward and backward: from one row per program to the mainline's.

The op, per row x of C channels (N = B*T rows; C = 2048 for Llama 3.2 1B, 4096 for Llama 3.1 8B):
    rstd = 1 / sqrt(sum(x^2) / C + eps),   xhat = x * rstd,   out = xhat * weight   (rstd kept, fp32, for the backward)
LayerNorm (layernorm.py) without the centring and without the bias. Backward, with dnorm = dout * weight:
    dinp += rstd * (dnorm - xhat * mean(dnorm * xhat)),   dweight += sum over rows of dout * xhat
(dinp accumulates: the norm's input is the residual stream, whose gradient also arrives through the residual
connection; dweight is fp32 and accumulates over micro-steps.)

Bytes the op must move (bf16 activations, es = 2 bytes): the forward reads x and writes out (2 * N*C*es) plus 4 bytes
of rstd a row; the backward reads dout, x and dinp and writes dinp (4 * N*C*es) plus rstd. weight and dweight are C
values, nothing next to N*C. At the benchmark's size, Llama 3.2 1B's (N = 8192 rows: B = 4, T = 2048; C = 2048), that
is 67 MB forward and 134 MB backward for a few flops a byte: memory-bound, and the best a kernel can do is touch each
byte once, in wide vector accesses, with enough loads in flight to cover the memory's latency.

The path, each step a function below (timed by `benchmark`, explained in dev/kernels/README.md):
forward   v1  one program per row, the whole row in registers: x read once, out written once.
          v2  the mainline (llmpy.kernels.layernorm.rmsnorm_forward, LayerNorm's kernel with RMS=True): several
              rows per program.
backward  v1  one program per row, dweight summed with float atomics.
          v2  the mainline (llmpy.kernels.layernorm.rmsnorm_backward): row groups, partial sums of dweight, a
              deterministic second stage.
The bound: the fastest of torch's fused eager kernels (aten._fused_rms_norm and aten._fused_rms_norm_backward, what
F.rms_norm and its autograd run on CUDA; the backward followed by the accumulations ours fuse) and torch.compile of
the torch code (`torch_forward`, `torch_backward`: the formulas in fp32, with our in-place accumulation).
"""

from common import Result, compare, compiled, device, mark_bound, precisions, timed

import torch
import triton
import triton.language as tl

from llmpy.kernels import layernorm as mainline
from llmpy.kernels.rounding import round_to

EPS = 1e-5  # Llama 3's norm_eps


def reference_forward(inp, weight, eps=EPS):
    """(out, rstd) in the dtype of the inputs: plain torch, used in float64 as the reference."""
    rstd = torch.rsqrt((inp * inp).mean(-1) + eps)
    return inp * rstd[:, None] * weight, rstd


def reference_backward(dout, inp, weight):
    """(dinp, dweight) by float64 autograd through reference_forward: a reference that does not share the backward's
    formula with the kernels (dinp without accumulation)."""
    inp, weight = inp.double().requires_grad_(), weight.double().requires_grad_()
    out, _ = reference_forward(inp, weight)
    return torch.autograd.grad(out, (inp, weight), dout.double())


# Forward v1 and backward v1: one program per row, the row in registers (BLOCK_C = next power of two >= C, the tail
# masked; masked lanes load 0, which adds nothing to the sums).


@triton.jit
def _forward_row_kernel(out_ptr, rstd_ptr, inp_ptr, weight_ptr, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK_C)
    mask = columns < C
    offsets = row.to(tl.int64) * C + columns  # int64: N * C may pass 2^31 elements
    x = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)
    weight = tl.load(weight_ptr + columns, mask=mask).to(tl.float32)
    tl.store(out_ptr + offsets, round_to(x * rstd * weight, out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _backward_row_kernel(dinp_ptr, dweight_ptr, dout_ptr, inp_ptr, weight_ptr, rstd_ptr, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK_C)
    mask = columns < C
    offsets = row.to(tl.int64) * C + columns
    rstd = tl.load(rstd_ptr + row)
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.load(inp_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * rstd
    dnorm = dout * tl.load(weight_ptr + columns, mask=mask, other=0.0).to(tl.float32)
    dx = (dnorm - xhat * (tl.sum(dnorm * xhat, axis=0) / C)) * rstd
    dinp = tl.load(dinp_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(dinp_ptr + offsets, round_to(dinp + dx, dinp_ptr.dtype.element_ty), mask=mask)
    tl.atomic_add(dweight_ptr + columns, dout * xhat, mask=mask, sem="relaxed")


def forward_v1(out, rstd, inp, weight):
    """One program per row holding the whole row in registers (4 warps; at C = 2048, 16 values a thread).

    The row is loaded once, its sum of squares is a reduction over registers and the normalized row is written from
    the same registers: the 2 row-sized transfers of the floor, in one launch. What is left: each of the N programs
    works on one 4 KB row, with that row's loads in flight and no more, and reloads the weight.
    """
    N, C = inp.shape
    _forward_row_kernel[(N,)](out, rstd, inp, weight, C, EPS, BLOCK_C=triton.next_power_of_2(C), num_warps=4)


def forward_v2(out, rstd, inp, weight):
    """The mainline, llmpy.kernels.layernorm.rmsnorm_forward: LayerNorm's forward kernel with the constexpr RMS
    switch, which compiles the mean and the bias away. (ROWS, BLOCK_C) tiles of ~4096 elements, 2 rows at C = 2048,
    with 8 warps: each program has twice v1's bytes in flight and loads the weight once for both rows."""
    mainline.rmsnorm_forward(out, rstd, inp, weight, EPS)


def backward_v1(dinp, dweight, dout, inp, weight, rstd):
    """One program per row: its dinp (the row's one reduction, mean(dnorm * xhat), is row-local), and its dout * xhat
    added into dweight with float atomics.

    The row traffic is at the floor, but all N programs add into the same C addresses: L2's atomic units serialize
    N adds per address (8192 at the benchmark's size). And float addition is not associative: the last bits of
    dweight depend on the order the programs happen to run in, so they change from run to run.
    """
    N, C = inp.shape
    _backward_row_kernel[(N,)](dinp, dweight, dout, inp, weight, rstd, C, BLOCK_C=triton.next_power_of_2(C),
                               num_warps=4)


def backward_v2(dinp, dweight, dout, inp, weight, rstd, scratch):
    """The mainline, llmpy.kernels.layernorm.rmsnorm_backward: LayerNorm's backward kernel with RMS=True.

    Two stages, no atomics. Stage 1: G programs (G = scratch.shape[0], up to 512: 4 an SM), each over a contiguous
    group of rows (16 at the benchmark's size) in (ROWS, BLOCK_C) tiles (2 rows at C = 2048), its tile loop
    software-pipelined 3 deep so the next tiles' loads are in flight while this one is reduced; each writes its
    tiles' dinp and sums dout * xhat in fp32 registers, written at the end as one partial sum per group to scratch
    (G, C). Stage 2: llmpy.kernels.bias.sum_partials adds the G partials into dweight in a fixed order. The order of
    every addition depends on N, C and G only: the same bits every run. The partials are 4 MB at C = 2048.
    """
    mainline.rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, scratch)


# The bound.


def eager_forward(inp, weight):
    """(out, rstd) of torch's fused RMSNorm kernel, which F.rms_norm runs (it allocates its outputs; rstd (N, 1))."""
    return torch.ops.aten._fused_rms_norm(inp, [inp.shape[-1]], weight, EPS)


def eager_backward(dinp, dweight, dout, inp, weight, eager_rstd):
    """torch's fused RMSNorm backward (what autograd runs after eager_forward; eager_rstd is its rstd), then the
    accumulations our kernels fuse: dinp +=, and the fp32 dweight += of its gradient in the weight's dtype."""
    dx, dw = torch.ops.aten._fused_rms_norm_backward(dout, inp, [inp.shape[-1]], eager_rstd, weight, [True, True])
    dinp += dx
    dweight += dw


def torch_forward(out, rstd, inp, weight):
    """reference_forward in fp32 writing into our outputs: what torch.compile fuses into its own kernel."""
    o, r = reference_forward(inp.float(), weight.float())
    out.copy_(o)
    rstd.copy_(r)


def torch_backward(dinp, dweight, dout, inp, weight, rstd):
    """The backward's formula (the module docstring's) in fp32 with our in-place accumulation, for torch.compile."""
    xhat = inp.float() * rstd[:, None]
    dnorm = dout.float() * weight.float()
    dx = (dnorm - xhat * (dnorm * xhat).mean(-1, keepdim=True)) * rstd[:, None]
    dinp.copy_(dinp.float() + dx)
    dweight += (dout.float() * xhat).sum(0)


# Checks. Tolerances (relative: error norm / reference norm, against float64 on the same rounded inputs):
# - fp32 outputs and rstd: 1e-5. The kernels compute in fp32 (2^-24 = 6e-8 an operation) over rows of C <= 2048
#   values: a few 1e-7 typical. A wrong term (a centring, a missing weight, a wrong scale) is O(1e-2) or more.
# - dweight, fp32: 3e-5. A sum over N rows: fp32 rounding grows like 2^-24 * sqrt(N / 2), 4e-6 at N = 8192 summed in
#   the worst (sequential, atomic) order; the deterministic groups are far tighter.
# - bf16 activations (out, dinp): 4e-3. Rounding an fp32 result to bf16 errs by up to half a step of 2^-7
#   relative, uniformly: in norm about 1.6e-3 (layernorm.py), whatever the size.
# - torch's eager backward returns dweight in the weight's dtype: bf16 when the run is, rounded once after its own
#   summation, whose order and precision are its own; the CPU path of LayerNorm's, which sums bf16-rounded terms,
#   errs by 7e-3 (layernorm.py). 1.5e-2 for that output only: a wrong gradient is O(1).
FP32_TOL, SUM_TOL, BF16_TOL, EAGER_BF16_SUM_TOL = 1e-5, 3e-5, 4e-3, 1.5e-2


def _inputs(N, C, dtype, dev, seed):
    """Seeded x (rows with a non-zero mean, which RMSNorm must not subtract), weight ~ 1 + 0.5 randn, dout, in dtype,
    and random starting values of what the backward accumulates into: dinp in dtype, dweight fp32."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(N, C, generator=g) + 3
    weight = 1 + 0.5 * torch.randn(C, generator=g)
    dout, dinp = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)
    return [t.to(dev, dtype) for t in (x, weight, dout, dinp)] + [torch.randn(C, generator=g).to(dev)]


def check(small: bool) -> list[str]:
    """Every version, and the bounds, against float64. small: 37 rows of 96 channels (N not a multiple of the
    mainline's 32-row tile at this C, C not a power of two); else the benchmark's shape (torch.compile compiles once).
    torch's eager backward has no CPU kernel: without a GPU only its forward is checked."""
    dev = device()
    N, C = (37, 96) if small else (8 * 1024, 2048)
    lines = []
    for dtype, tag, act_tol in precisions(FP32_TOL, BF16_TOL):
        x, weight, dout, dinp0, dweight0 = _inputs(N, C, dtype, dev, seed=N + C)
        out_ref, rstd_ref = reference_forward(x.double(), weight.double())
        dx_ref, dweight_ref = reference_backward(dout, x, weight)
        dinp_ref, dweight_ref = dinp0.double() + dx_ref, dweight0.double() + dweight_ref

        forwards = {"v1": forward_v1, "v2 mainline": forward_v2,
                    "torch eager": lambda out, rstd, inp, weight: out.copy_(eager_forward(inp, weight)[0])}
        if dev == "cuda" and dtype == torch.bfloat16:
            forwards["torch.compile"] = compiled(torch_forward)
        for name, fn in forwards.items():
            out = torch.full_like(x, float("nan"))
            rstd = torch.full((N,), float("nan"), device=dev)
            fn(out, rstd, x, weight)
            outputs = {"out": (out, out_ref, act_tol)}
            if name != "torch eager":  # torch's rstd is its own (N, 1) tensor, not written into ours
                outputs["rstd"] = (rstd, rstd_ref, FP32_TOL)
            lines.append(compare(f"forward {name} {tag}", **outputs))

        rstd = rstd_ref.float()
        scratch = mainline.rmsnorm_backward_scratch(N, C, dev)
        backwards = {"v1": backward_v1, "v2 mainline": lambda *a: backward_v2(*a, scratch)}
        if dev == "cuda":
            _, eager_rstd = eager_forward(x, weight)
            backwards["torch eager"] = lambda *a: eager_backward(*a[:5], eager_rstd)
            if dtype == torch.bfloat16:
                backwards["torch.compile"] = compiled(torch_backward)
        for name, fn in backwards.items():
            dinp, dweight = dinp0.clone(), dweight0.clone()
            fn(dinp, dweight, dout, x, weight, rstd)
            sum_tol = EAGER_BF16_SUM_TOL if name == "torch eager" and dtype == torch.bfloat16 else SUM_TOL
            lines.append(compare(f"backward {name} {tag}", dinp=(dinp, dinp_ref, act_tol),
                                 dweight=(dweight, dweight_ref, sum_tol)))
    return lines


def benchmark() -> list[Result]:
    N, C = 8 * 1024, 2048  # Llama 3.2 1B at B = 4, T = 2048
    dev = "cuda"
    x, weight, dout, dinp, dweight = _inputs(N, C, torch.bfloat16, dev, seed=0)
    out, rstd = torch.empty_like(x), torch.empty(N, device=dev)
    scratch = mainline.rmsnorm_backward_scratch(N, C, dev)
    mainline.rmsnorm_forward(out, rstd, x, weight, EPS)
    _, eager_rstd = eager_forward(x, weight)
    row_bytes = N * C * x.element_size()
    forward_bytes = 2 * row_bytes + 4 * N
    backward_bytes = 4 * row_bytes + 4 * N
    forward_args = (out, rstd, x, weight)
    backward_args = (dinp, dweight, dout, x, weight, rstd)

    results = [
        timed("rmsnorm_forward", "v1 row per program", forward_v1, forward_args, forward_bytes),
        timed("rmsnorm_forward", "v2 rows per program", forward_v2, forward_args, forward_bytes, mainline=True),
    ]
    results += mark_bound([
        timed("rmsnorm_forward", "torch eager", eager_forward, (x, weight), forward_bytes),
        timed("rmsnorm_forward", "torch.compile", compiled(torch_forward), forward_args, forward_bytes),
    ])
    results += [
        timed("rmsnorm_backward", "v1 atomics", backward_v1, backward_args, backward_bytes),
        timed("rmsnorm_backward", "v2 row groups, two stages", backward_v2, backward_args + (scratch,),
              backward_bytes, mainline=True),
    ]
    results += mark_bound([
        timed("rmsnorm_backward", "torch eager", eager_backward, backward_args[:5] + (eager_rstd,), backward_bytes),
        timed("rmsnorm_backward", "torch.compile", compiled(torch_backward), backward_args, backward_bytes),
    ])
    return results


if __name__ == "__main__":
    import sys

    import run

    sys.exit(run.main(["rmsnorm"]))
