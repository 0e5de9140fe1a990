"""SwiGLU, Llama 3's MLP activation, forward and backward: from one element a thread to the mainline's tiles.

The op. Llama 3's MLP is c_proj(silu(gate) * up), gate and up (N, H) the outputs of two matmuls of the same input
(N = B*T rows; H = 8192 for Llama 3.2 1B, 14,336 for Llama 3.1 8B). Between the matmuls, elementwise:
    forward:  out = silu(gate) * up,   silu(g) = g * s,  s = sigmoid(g)
    backward: dup = dout * silu(gate),   dgate = dout * up * silu'(gate),   silu'(g) = s * (1 + g * (1 - s))
in fp32, each output rounded once to the activation dtype. gate and up may be separate tensors or the two halves of
one (N, 2H) buffer (one matmul for both); dgate and dup likewise.

Bytes the op must move (es = 2 bytes in bf16): the forward reads gate and up and writes out, 3 * N*H*es; the backward
reads gate, up and dout and writes dgate and dup, 5 * N*H*es. At the benchmark's size, Llama 3.2 1B's MLP on
N = 8192 rows (B = 4, T = 2048), H = 8192: 403 MB forward and 671 MB backward, for an exponential, a division and a
few products an element: memory-bound, as GELU is (gelu.py).

The path, each step a function below (timed by `benchmark`, explained in dev/kernels/README.md):
v1  the textbook elementwise kernel on contiguous (N, H) tensors: blocks of 128 elements, one a thread.
v2  the mainline (llmpy.kernels.swiglu): (ROWS, BLOCK_H) tiles of 2048 elements, 16-byte vectors, any row strides.
    Timed on the halves of (N, 2H) buffers (the mainline's layout: llmpy/models/llama3.py keeps up and gate side by
    side in one buffer) and on separate (N, H) tensors.
The bound: the fastest of torch's eager kernels (F.silu(gate) * up; for the backward, the gradients autograd
computes, each op its own kernel) and torch.compile of the torch code (`torch_forward`, `torch_backward`: the
formulas in fp32 writing into our outputs).
"""

from common import Result, compare, compiled, device, mark_bound, precisions, timed

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmpy.kernels import swiglu as mainline
from llmpy.kernels.rounding import round_to


def reference_forward(gate, up):
    """silu(gate) * up, in the inputs' dtype (float64 for the reference)."""
    return gate * torch.sigmoid(gate) * up


def reference_backward(dout, gate, up):
    """(dgate, dup) by float64 autograd through reference_forward: a reference that does not share the derivative's
    formula with the kernels."""
    gate, up = gate.double().requires_grad_(), up.double().requires_grad_()
    return torch.autograd.grad(reference_forward(gate, up), (gate, up), dout.double())


_V1_BLOCK = 128  # elements a program: one a thread with 4 warps


@triton.jit
def _forward_kernel(out_ptr, gate_ptr, up_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    gate = tl.load(gate_ptr + offsets, mask=mask).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(out_ptr + offsets, round_to(gate * tl.sigmoid(gate) * up, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dgate_ptr, dup_ptr, dout_ptr, gate_ptr, up_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    gate = tl.load(gate_ptr + offsets, mask=mask).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask).to(tl.float32)
    dout = tl.load(dout_ptr + offsets, mask=mask).to(tl.float32)
    s = tl.sigmoid(gate)
    dgate = dout * up * s * (1.0 + gate * (1.0 - s))  # silu' = s + g * s' with s' = s * (1 - s)
    tl.store(dgate_ptr + offsets, round_to(dgate, dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, round_to(dout * gate * s, dup_ptr.dtype.element_ty), mask=mask)


def forward_v1(out, gate, up):
    """The (N, H) tensors as flat contiguous buffers in blocks of 128 elements with 4 warps: one element, one 2-byte
    access a tensor, per thread; sigmoid as Triton's tl.sigmoid, 1 / (1 + exp(-g)).

    The loads are coalesced (a warp reads 64 contiguous bytes), but every thread issues a narrow instruction per
    element, and the grid is N*H / 128 programs (524,288 at the benchmark's size): each pays its launch, index math
    and masking for 768 bytes of bf16. Contiguous tensors only: gate and up as halves of one (N, 2H) buffer (one
    matmul for both) would need copies.
    """
    numel = gate.numel()
    assert gate.is_contiguous() and up.is_contiguous() and out.is_contiguous()
    _forward_kernel[(triton.cdiv(numel, _V1_BLOCK),)](out, gate, up, numel, BLOCK=_V1_BLOCK, num_warps=4)


def backward_v1(dgate, dup, dout, gate, up):
    """forward_v1's layout for the backward: flat blocks of 128, one element a thread, contiguous tensors only."""
    numel = gate.numel()
    assert all(t.is_contiguous() for t in (dgate, dup, dout, gate, up))
    _backward_kernel[(triton.cdiv(numel, _V1_BLOCK),)](dgate, dup, dout, gate, up, numel, BLOCK=_V1_BLOCK,
                                                       num_warps=4)


def forward_v2(out, gate, up):
    """The mainline, llmpy.kernels.swiglu.swiglu_forward: program (i, j) takes a (ROWS, BLOCK_H) tile of 2048
    elements (one row segment of 2048 columns at H = 8192) with 8 warps, so each thread moves 8 contiguous values of
    each tensor, one 16-byte vector of bf16: a sixteenth of v1's programs and instructions for the same bytes. Each
    tensor has its own row stride, so gate and up may be the halves of one (N, 2H) buffer. Sigmoid from
    exp(-|g|) <= 1, which never overflows and keeps 1 - s accurate where s is near 1."""
    mainline.swiglu_forward(out, gate, up)


def backward_v2(dgate, dup, dout, gate, up):
    """The mainline, llmpy.kernels.swiglu.swiglu_backward: forward_v2's tiles for the backward's three reads and two
    writes; dgate and dup may be the halves of one (N, 2H) gradient buffer, and may overwrite gate and up."""
    mainline.swiglu_backward(dgate, dup, dout, gate, up)


def eager_forward(gate, up):
    """torch's eager kernels, as the torch trainer's MLP runs them: silu, then the product (each allocates)."""
    return F.silu(gate) * up


def eager_backward(dout, gate, up):
    """(dgate, dup) from torch's eager kernels for the gradients autograd computes: dout * up, then silu_backward of
    it; silu(gate), then dout * it. (Autograd would keep silu(gate) from the forward rather than recompute it: one
    (N, H) tensor more written there and read here.)"""
    return torch.ops.aten.silu_backward(dout * up, gate), dout * F.silu(gate)


def torch_forward(out, gate, up):
    """reference_forward in fp32 into our output: what torch.compile fuses into one kernel."""
    out.copy_(reference_forward(gate.float(), up.float()))


def torch_backward(dgate, dup, dout, gate, up):
    """The derivative (the module docstring's) in fp32 into our outputs, for torch.compile."""
    gate, up, dout = gate.float(), up.float(), dout.float()
    s = torch.sigmoid(gate)
    dgate.copy_(dout * up * s * (1 + gate * (1 - s)))
    dup.copy_(dout * gate * s)


# Tolerances (relative: error norm / reference norm, against float64 on the same rounded inputs):
# - fp32: 1e-5. A short formula in fp32, an exponential and a division among a handful of roundings, ~1e-7 relative
#   each; a wrong term or factor is O(1e-2) or more.
# - bf16: 4e-3. One rounding of each fp32 result to bf16: about 1.6e-3 in norm (layernorm.py), whatever the size.
#   torch's eager kernels round twice (silu(gate) and dout * up are bf16 tensors before the products): 2.4e-3.
FP32_TOL, BF16_TOL = 1e-5, 4e-3


def _inputs(N, H, dtype, dev, seed):
    """Seeded gate = 3 randn (both tails of the sigmoid: |gate| up to ~15), up and dout randn, (N, H) in dtype."""
    g = torch.Generator().manual_seed(seed)
    gate = 3 * torch.randn(N, H, generator=g)
    return [t.to(dev, dtype) for t in (gate, torch.randn(N, H, generator=g), torch.randn(N, H, generator=g))]


def _halves(a, b):
    """a and b (N, H) copied into the two halves of one (N, 2H) buffer, returned as its two (N, H) views."""
    H = a.shape[1]
    both = torch.cat((a, b), dim=1)
    return both[:, :H], both[:, H:]


# The mainline's other layouts, as functions of separate tensors for the check: the results are copied out of the
# buffers the kernel wrote.


def _forward_v2_halves(out, gate, up):
    forward_v2(out, *_halves(gate, up))


def _backward_v2_halves(dgate, dup, dout, gate, up):
    """gate | up read from one (N, 2H) buffer, dgate | dup written into another."""
    gradients = _halves(dgate, dup)
    backward_v2(*gradients, dout, *_halves(gate, up))
    dgate.copy_(gradients[0])
    dup.copy_(gradients[1])


def _backward_v2_in_place(dgate, dup, dout, gate, up):
    """dgate written over gate and dup over up, the halves of one (N, 2H) buffer: the kernel reads each element
    before it writes it."""
    buffer_gate, buffer_up = _halves(gate, up)
    backward_v2(buffer_gate, buffer_up, dout, buffer_gate, buffer_up)
    dgate.copy_(buffer_gate)
    dup.copy_(buffer_up)


def _eager_backward_into(dgate, dup, dout, gate, up):
    for into, gradient in zip((dgate, dup), eager_backward(dout, gate, up)):
        into.copy_(gradient)


def check(small: bool) -> list[str]:
    """Every version, and the bounds, against float64, in each layout the mainline takes: separate tensors, halves
    of (N, 2H) buffers, and (backward) the gradients over gate and up themselves. small: N = 37 rows of H = 200
    (not multiples of any tile: the mainline's is 8 x 256 here); else the benchmark's shape."""
    dev = device()
    N, H = (37, 200) if small else (8 * 1024, 8192)
    lines = []
    for dtype, tag, tol in precisions(FP32_TOL, BF16_TOL):
        gate, up, dout = _inputs(N, H, dtype, dev, seed=N + H)
        out_ref = reference_forward(gate.double(), up.double())
        dgate_ref, dup_ref = reference_backward(dout, gate, up)

        forwards = {"v1": forward_v1, "v2 mainline": forward_v2, "v2 mainline, halves of (N, 2H)": _forward_v2_halves,
                    "torch eager": lambda out, g, u: out.copy_(eager_forward(g, u))}
        backwards = {"v1": backward_v1, "v2 mainline": backward_v2,
                     "v2 mainline, halves of (N, 2H)": _backward_v2_halves,
                     "v2 mainline, in place over gate and up": _backward_v2_in_place,
                     "torch eager": _eager_backward_into}
        if dev == "cuda" and dtype == torch.bfloat16:
            forwards["torch.compile"] = compiled(torch_forward)
            backwards["torch.compile"] = compiled(torch_backward)
        for name, fn in forwards.items():
            out = torch.full_like(gate, float("nan"))
            fn(out, gate, up)
            lines.append(compare(f"forward {name} {tag}", out=(out, out_ref, tol)))
        for name, fn in backwards.items():
            dgate, dup = torch.full_like(gate, float("nan")), torch.full_like(gate, float("nan"))
            fn(dgate, dup, dout, gate, up)
            lines.append(compare(f"backward {name} {tag}", dgate=(dgate, dgate_ref, tol), dup=(dup, dup_ref, tol)))
    return lines


def benchmark() -> list[Result]:
    N, H = 8 * 1024, 8192  # Llama 3.2 1B's MLP at B = 4, T = 2048
    gate, up, dout = _inputs(N, H, torch.bfloat16, "cuda", seed=0)
    out, dgate, dup = torch.empty_like(gate), torch.empty_like(gate), torch.empty_like(gate)
    gate_up, dgate_dup = _halves(gate, up), _halves(dgate, dup)  # the halves of (N, 2H) buffers
    forward_bytes = 3 * gate.numel() * gate.element_size()
    backward_bytes = 5 * gate.numel() * gate.element_size()

    results = [
        timed("swiglu_forward", "v1 one element a thread", forward_v1, (out, gate, up), forward_bytes),
        timed("swiglu_forward", "v2 tiles", forward_v2, (out, gate, up), forward_bytes),
        timed("swiglu_forward", "v2 tiles, halves of (N, 2H)", forward_v2, (out, *gate_up), forward_bytes,
              mainline=True),
    ]
    results += mark_bound([
        timed("swiglu_forward", "torch eager", eager_forward, (gate, up), forward_bytes),
        timed("swiglu_forward", "torch.compile", compiled(torch_forward), (out, gate, up), forward_bytes),
    ])
    backward_args = (dgate, dup, dout, gate, up)
    results += [
        timed("swiglu_backward", "v1 one element a thread", backward_v1, backward_args, backward_bytes),
        timed("swiglu_backward", "v2 tiles", backward_v2, backward_args, backward_bytes),
        timed("swiglu_backward", "v2 tiles, halves of (N, 2H)", backward_v2, (*dgate_dup, dout, *gate_up),
              backward_bytes, mainline=True),
    ]
    results += mark_bound([
        timed("swiglu_backward", "torch eager", eager_backward, (dout, gate, up), backward_bytes),
        timed("swiglu_backward", "torch.compile", compiled(torch_backward), backward_args, backward_bytes),
    ])
    return results


if __name__ == "__main__":
    import sys

    import run

    sys.exit(run.main(["swiglu"]))
