"""Global gradient norm: the sum of squares of every gradient, one scalar out of 124 million values.

The op: out = sum over i of x[i]^2, for x the flat fp32 gradient buffer (P = 124,475,904 for GPT-2 124M); the trainer
clips the gradients by sqrt(out). Bytes it must move: x once, 4P bytes (498 MB for d12). One multiply-add per element:
memory-bound, as long as the reduction is spread over the whole GPU.

A full reduction to one number is the extreme case of the bias gradient's problem (dev/kernels/bias.py): every
program's result has to meet every other's. Two ways to make them meet:
v1  atomics: each program sums a block of BLOCK = 4096 values in registers and adds its total to out with one float
    atomic add. Fast, and no second kernel; but P / 4096 = 30,390 atomic adds to one address land in an order the
    hardware picks, so the norm (hence the clip factor, hence every weight) can differ in its last bits run to run.
v2  the mainline (llmpy.kernels.norm.global_norm_squared): two stages. G = 1024 programs each stream a contiguous
    chunk of x into a 4096-lane register accumulator and write one partial sum; then one program adds the 1024
    partials in a fixed order. Deterministic, and the second stage reads 4 KB.
The bound: the fastest of torch.linalg.vector_norm (torch's single-pass reduction kernel; it returns the norm, not
its square, a negligible difference in work) and torch.compile of sum(x * x).
"""

from common import Result, assert_close, compiled, device, mark_bound, time_ms

import torch
import triton
import triton.language as tl

from llmpy.configs.gpt2 import GPT2Config, num_parameters
from llmpy.kernels import norm as mainline


def reference(x):
    return (x * x).sum()


@triton.jit
def _sum_of_squares_atomic_kernel(out_ptr, x_ptr, P, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < P, other=0.0)
    tl.atomic_add(out_ptr, tl.sum(x * x, axis=0), sem="relaxed")


def v1(out, x):
    """out = sum(x^2): zero it, then P / 4096 programs, each squaring and summing 4096 values (16 per thread with
    8 warps, 16-byte vector loads) and atomically adding the total to out[0]. One pass over x, but the atomics on a
    single address are serialized in L2 and their order (hence the rounding of the sum) is not reproducible."""
    out.zero_()
    P = x.numel()
    _sum_of_squares_atomic_kernel[(triton.cdiv(P, 4096),)](out, x, P, BLOCK=4096, num_warps=8)


def v2(out, x, scratch):
    """The mainline, llmpy.kernels.norm.global_norm_squared: G = scratch.numel() programs (1024 for d12) write
    partial sums of contiguous chunks, a second one-program kernel adds them in order (see the module docstring)."""
    mainline.global_norm_squared(out=out, x=x, scratch=scratch)


def eager(x):
    return torch.linalg.vector_norm(x)


def torch_norm_squared(out, x):
    """The torch code, for torch.compile."""
    out.copy_((x * x).sum())


# Tolerance: 2e-5 relative. The terms are all positive (no cancellation), so each fp32 addition errs by at most 2^-24
# of the running sum, and independent roundings add like a random walk. The longest chain is v1's 30,390 atomic adds
# at d12: a standard deviation of about 2^-24 * sqrt(30,390) / 3 = 3.5e-6 of the total; 2e-5 is over 5 of them.
# The two-stage sums are far shorter chains. A dropped block of 4096 values is 3.3e-5 of the d12 total, a wrong
# square or a doubled chunk much more. torch's vector_norm returns the norm: its square is compared.
TOL = 2e-5


def check(small: bool) -> list[str]:
    dev = device()
    P = 10_007 if small else num_parameters(GPT2Config())  # small: prime, so no block divides it
    g = torch.Generator().manual_seed(P)
    x = torch.randn(P, generator=g).to(dev)
    expected = reference(x.double())
    scratch = mainline.global_norm_scratch(P, dev)
    versions = {
        "v1": v1,
        "v2 mainline": lambda out, x: v2(out, x, scratch),
        "torch eager": lambda out, x: out.copy_(eager(x).square()),
    }
    if dev == "cuda":
        versions["torch.compile"] = compiled(torch_norm_squared)
    lines = []
    for name, fn in versions.items():
        out = torch.full((1,), float("nan"), device=dev)
        fn(out, x)
        lines.append(f"{name}: rel error {assert_close(f'global norm {name}', out[0], expected, TOL):.1e}")
    return lines


def benchmark() -> list[Result]:
    P = num_parameters(GPT2Config())
    x = torch.randn(P, device="cuda")
    out = torch.empty(1, device="cuda")
    scratch = mainline.global_norm_scratch(P, "cuda")
    compiled_norm = compiled(torch_norm_squared)
    results = [
        Result("global_norm", "v1 atomics", time_ms(lambda: v1(out, x)), bytes=4 * P),
        Result("global_norm", "v2 two stages", time_ms(lambda: v2(out, x, scratch)), bytes=4 * P, mainline=True),
    ]
    return results + mark_bound([
        Result("global_norm", "torch vector_norm", time_ms(lambda: eager(x)), bytes=4 * P),
        Result("global_norm", "torch.compile", time_ms(lambda: compiled_norm(out, x)), bytes=4 * P),
    ])


if __name__ == "__main__":
    import sys

    import run

    sys.exit(run.main(["global_norm"]))
