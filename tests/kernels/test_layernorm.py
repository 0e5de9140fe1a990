"""LayerNorm kernels against torch's layer_norm and its autograd in float64, per output tensor.

Inputs are seeded random rows with a non-zero mean (x = 2 * randn + 3, so centring matters), weight ~ 1 + 0.5 randn,
bias ~ randn; the reference is computed in float64 from the very values the kernel reads (bf16 ones upcast).
Tolerances:
- fp32 outputs, and every fp32 statistic or gradient (mean, rstd, dweight, dbias, also in bf16 runs): rtol 1e-5,
  atol 1e-5. The kernels compute in fp32: one row's sums carry ~C * 2^-24 relative error at worst (C <= 768 here:
  5e-5 worst, ~1e-6 typical), and dweight/dbias sum <= 70 rows of O(1) terms; 1e-5 is a few times the typical error
  and orders of magnitude below any real mistake (a missing term is O(0.1..1)).
- bf16 activations (out, dinp): the kernel rounds its fp32 result to bf16 once, at most 2^-8 relative
  (half a bf16 ulp), so rtol 2^-8 * 1.01 plus atol 1e-5 for values near zero after cancellation.
Outputs are NaN-filled before the kernel (every element must be written); accumulating outputs (dinp, dweight,
dbias) start from random values, and must end at start + gradient.
Shapes: C = 64 (a power of two), 80 (not: masked columns), 768 (GPT-2's); N not a multiple of the row tile.
"""

import pytest
import torch
import torch.nn.functional as F

from llmpy.kernels.bias import PartialSums
from llmpy.kernels.fp8 import cast
from llmpy.kernels.layernorm import (layernorm_backward, layernorm_backward_scratch, layernorm_forward,
                                    rmsnorm_backward, rmsnorm_backward_scratch, rmsnorm_forward)

EPS = 1e-5
FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
BF16_TOLERANCE = dict(rtol=2**-8 * 1.01, atol=1e-5)
SHAPES = [(70, 64), (37, 80), (9, 768)]  # (N, C)
DTYPES = [torch.float32, torch.bfloat16]


def tolerance_for(dtype):
    return FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE


def random_layer(N, C, dtype, device, seed):
    """x (N, C) and the layer's weight, bias (C,), all in dtype."""
    generator = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(N, C, generator=generator) + 3
    weight = 1 + 0.5 * torch.randn(C, generator=generator)
    bias = torch.randn(C, generator=generator)
    return [t.to(device=device, dtype=dtype) for t in (x, weight, bias)]


def reference_forward(x, weight, bias):
    """out, mean, rstd in float64."""
    x64 = x.double()
    mean = x64.mean(-1)
    rstd = (x64.var(-1, unbiased=False) + EPS).rsqrt()
    out = F.layer_norm(x64, x64.shape[-1:], weight.double(), bias.double(), EPS)
    return out, mean, rstd


def nan_like(t, dtype=None):
    return torch.full_like(t, float("nan"), dtype=dtype)


@pytest.mark.parametrize("N, C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_torch(device, N, C, dtype):
    x, weight, bias = random_layer(N, C, dtype, device, seed=N)
    expected_out, expected_mean, expected_rstd = reference_forward(x, weight, bias)
    out, mean, rstd = nan_like(x), nan_like(x[:, 0], torch.float32), nan_like(x[:, 0], torch.float32)

    layernorm_forward(out, mean, rstd, x, weight, bias, EPS)

    torch.testing.assert_close(out.double(), expected_out, **tolerance_for(dtype))
    torch.testing.assert_close(mean.double(), expected_mean, **FP32_TOLERANCE)
    torch.testing.assert_close(rstd.double(), expected_rstd, **FP32_TOLERANCE)


def run_backward_case(device, N, C, dtype, scratch, deferred=False):
    """Runs layernorm_backward on random inputs and checks dinp, dweight, dbias against float64 autograd, and the
    optional column sums of the updated dinp (the preceding projection's bias gradient) against a float64 sum of the
    dinp the kernel wrote: an fp32 sum of N values, FP32_TOLERANCE as for dweight and dbias.
    deferred: the kernel only writes the partial sums (dweight and dbias None), into a PartialSums's slots (the
    scratch's shape), and PartialSums adds them into dweight, dbias and the column sums afterwards, as the model does."""
    generator = torch.Generator().manual_seed(N * C)
    x, weight, bias = random_layer(N, C, dtype, device, seed=N + 3)
    dout = torch.randn(N, C, generator=generator).to(device=device, dtype=dtype)
    dinp = torch.randn(N, C, generator=generator).to(device=device, dtype=dtype)
    dweight = torch.randn(C, generator=generator).to(device)
    dbias = torch.randn(C, generator=generator).to(device)
    dinp_column_sums = torch.randn(C, generator=generator).to(device)
    # the backward reads the forward's statistics
    out, mean, rstd = torch.empty_like(x), torch.empty(N, device=device), torch.empty(N, device=device)
    layernorm_forward(out, mean, rstd, x, weight, bias, EPS)

    x64, weight64, bias64 = (t.double().requires_grad_() for t in (x, weight, bias))
    F.layer_norm(x64, (C,), weight64, bias64, EPS).backward(dout.double())
    expected_dinp = dinp.double() + x64.grad
    expected_dweight = dweight.double() + weight64.grad
    expected_dbias = dbias.double() + bias64.grad

    expected_dinp_column_sums = dinp_column_sums.double()  # + the written dinp's column sums, below

    if deferred:
        grads = torch.cat([dweight, dbias, dinp_column_sums])  # the targets: slices of one fp32 buffer
        sums = PartialSums(grads, list(grads.view(3, C)), scratch.shape[1], C)
        sums.partials.fill_(float("nan"))
        layernorm_backward(dinp, None, None, dout, x, weight, mean, rstd, sums.partials)
        sums.add_to_targets()
        dweight, dbias, dinp_column_sums = grads.view(3, C)
    else:
        layernorm_backward(dinp, dweight, dbias, dout, x, weight, mean, rstd, scratch,
                           dinp_column_sums=dinp_column_sums)

    torch.testing.assert_close(dinp.double(), expected_dinp, **tolerance_for(dtype))
    torch.testing.assert_close(dweight.double(), expected_dweight, **FP32_TOLERANCE)
    torch.testing.assert_close(dbias.double(), expected_dbias, **FP32_TOLERANCE)
    expected_dinp_column_sums += dinp.double().sum(0)
    torch.testing.assert_close(dinp_column_sums.double(), expected_dinp_column_sums, **FP32_TOLERANCE)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [37, 600])
def test_fp8_output_is_the_cast_of_the_output(device, rms, dtype, N):
    """fp8_out (--precision fp8: the norm writes its matmul's e4m3 input itself): out8 must hold what fp8.cast writes
    for the norm's own output at the same scale (a power of two, 2^7, so that some values saturate at 448), the amax
    must be max |out| maxed into its start value (0.5, below it), the statistics those without fp8_out, and out must
    be left as it was (the norm writes out8 in its stead). Under the interpreter all of it bit for bit. Compiled, the
    kernel with the FP8 store and the one without may sum a row in another order (on the H200 a variant of this
    kernel, 8 tiles a program, did: mean and rstd differed in their last bits), which can move a value of out by one
    bf16 rounding: so there the statistics to 1e-6 relative, and a byte of out8 may be the next e4m3 value, in at
    most 1% of them. C = 80: masked columns; N = 37 rows, less than a tile, and 600, several programs, the last one
    partly."""
    C = 80
    x, weight, bias = random_layer(N, C, dtype, device, seed=11)
    expected = torch.empty(N, C, dtype=dtype, device=device)
    stats, fp8_stats = ([torch.full((N,), float("nan"), device=device) for _ in range(2)] for _ in range(2))
    out = nan_like(expected)
    out8 = torch.full((N, C), 0x55, dtype=torch.uint8).view(torch.float8_e4m3fn).to(device)
    scale, amax = torch.tensor([128.0], device=device), torch.tensor([0.5], device=device)
    if rms:
        rmsnorm_forward(expected, stats[1], x, weight)
        rmsnorm_forward(out, fp8_stats[1], x, weight, fp8_out=(out8, scale, amax))
        stats, fp8_stats = stats[1:], fp8_stats[1:]
    else:
        layernorm_forward(expected, *stats, x, weight, bias)
        layernorm_forward(out, *fp8_stats, x, weight, bias, fp8_out=(out8, scale, amax))
    cast_of_out = torch.empty(N, C, dtype=torch.float8_e4m3fn, device=device)
    cast(cast_of_out, expected, scale)
    if device == "cpu":
        for a, b in zip(stats, fp8_stats):
            assert torch.equal(a, b)
        assert torch.equal(out8.view(torch.uint8), cast_of_out.view(torch.uint8))
        assert amax.item() == max(0.5, expected.float().abs().max().item())
    else:
        for a, b in zip(stats, fp8_stats):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        steps = (out8.view(torch.uint8).int() - cast_of_out.view(torch.uint8).int()).abs()
        assert steps.max().item() <= 1 and (steps > 0).float().mean().item() <= 0.01
        torch.testing.assert_close(amax, torch.tensor([max(0.5, expected.float().abs().max().item())], device=device),
                                   rtol=2.0**-7, atol=0)
    assert (expected.float().abs() * 128 > 448).any()  # some saturate
    assert out.isnan().all()


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_fp8_output_is_the_cast_of_the_updated_dinp(device, rms, dtype):
    """fp8_out in the backward (--precision fp8: the norm's backward writes the projection below's e5m2 output
    gradient itself): out8 must hold, bit for bit, what fp8.cast writes for the dinp the kernel stored, at the same
    scale (2^10, so that some values saturate at 57344), and the amax must be max |dinp| maxed into its start value
    (1e-3, below it). dinp (the residual stream's gradient) must be updated as without fp8_out: exactly in bf16, the
    activation dtype of every FP8 run; in fp32 to 1e-6 relative, as the compiler may contract dinp + dx into one
    fused multiply-add in one of the two kernels and not in the other (on the H200 it does: last bits differ). The
    partial sums must be those without fp8_out (rtol 1e-5: a kernel compiled with the FP8 store may add in another
    order). Shape (37, 80): masked columns, rows not a multiple of the tile, several row groups."""
    N, C = 37, 80
    x, weight, bias = random_layer(N, C, dtype, device, seed=12)
    g = torch.Generator().manual_seed(13)
    dout = (torch.randn(N, C, generator=g) * 4).to(device=device, dtype=dtype)
    dinp0 = (torch.randn(N, C, generator=g) * 40).to(device=device, dtype=dtype)
    mean, rstd = (torch.empty(N, device=device) for _ in range(2))
    if rms:
        rmsnorm_forward(torch.empty_like(x), rstd, x, weight)
        scratch = [rmsnorm_backward_scratch(N, C, device) for _ in range(2)]
    else:
        layernorm_forward(torch.empty_like(x), mean, rstd, x, weight, bias)
        scratch = [layernorm_backward_scratch(N, C, device) for _ in range(2)]
    out8 = torch.full((N, C), 0x55, dtype=torch.uint8).view(torch.float8_e5m2).to(device)
    scale, amax = torch.tensor([2.0**10], device=device), torch.tensor([1e-3], device=device)
    expected, dinp = dinp0.clone(), dinp0.clone()
    for target, sums, fp8_out in ((expected, scratch[0], None), (dinp, scratch[1], (out8, scale, amax))):
        if rms:
            rmsnorm_backward(target, None, dout, x, weight, rstd, sums, fp8_out=fp8_out)
        else:
            layernorm_backward(target, None, None, dout, x, weight, mean, rstd, sums, fp8_out=fp8_out)
    if dtype == torch.bfloat16:
        assert torch.equal(dinp, expected)
    else:
        torch.testing.assert_close(dinp, expected, rtol=1e-6, atol=1e-6)
    cast_of_dinp = torch.empty(N, C, dtype=torch.float8_e5m2, device=device)
    cast(cast_of_dinp, dinp, scale)
    assert torch.equal(out8.view(torch.uint8), cast_of_dinp.view(torch.uint8))
    assert (dinp.float().abs() * 2.0**10 > 57344).any()  # some saturate
    assert amax.item() == dinp.float().abs().max().item()
    torch.testing.assert_close(scratch[1], scratch[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N, C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_accumulates_torch_gradients(device, N, C, dtype):
    scratch = layernorm_backward_scratch(N, C, device).fill_(float("nan"))
    run_backward_case(device, N, C, dtype, scratch)


@pytest.mark.parametrize("N, C", SHAPES)
def test_backward_partial_sums_added_later_give_the_same_gradients(device, N, C):
    run_backward_case(device, N, C, torch.bfloat16, layernorm_backward_scratch(N, C, device), deferred=True)


@pytest.mark.parametrize("groups", [1, 5, 70])
def test_backward_is_right_for_any_number_of_row_groups(device, groups):
    """The scratch's G (row groups, one partial sum each) only sets the order of additions: G = 5 splits 70 rows
    into groups of 14, not a multiple of the 32-row tile at C = 80; G = 70 gives one row per group."""
    N, C = 70, 80
    scratch = torch.full((3, groups, C), float("nan"), device=device)
    run_backward_case(device, N, C, torch.float32, scratch)
