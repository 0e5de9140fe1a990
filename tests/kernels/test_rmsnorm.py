"""RMSNorm kernels (llmpy.kernels.layernorm's RMS switch) against RMSNorm written out in float64 and its autograd,
per output tensor; and the forward against train_llama3_torch.py's RMSNorm class itself.

The reference's math is train_llama3_torch.py's RMSNorm: out = x * rsqrt(mean(x^2) + eps) * weight. Inputs are
test_layernorm's seeded random layers, their bias unused: rows with a non-zero mean (x = 2 * randn + 3, which
RMSNorm must not subtract), weight ~ 1 + 0.5 randn. The float64 reference is computed from the very values the
kernel reads (bf16 ones upcast). Tolerances (test_layernorm's, and one more for the class):
- fp32 outputs, and every fp32 statistic or gradient (rstd, dweight, also in bf16 runs): rtol 1e-5, atol 1e-5.
  The kernels compute in fp32: one row's sum of squares carries ~C * 2^-24 relative error at worst (C <= 2048
  here: 1.2e-4 worst, ~1e-6 typical), and dweight sums <= 45 rows of O(1) terms; 1e-5 is a few times the typical
  error and orders of magnitude below any real mistake (a missing term or a centring is O(0.1..1)).
- bf16 activations (out, dinp): the kernel computes x * rstd * weight (or dinp + its gradient) in fp32 and rounds
  to bf16 once, at most u = 2^-8 relative (half a bf16 ulp), so rtol 2^-8 * 1.01 plus atol 1e-5 for values near
  zero after cancellation.
- The class itself: it normalises in fp32, rounds `normed` to x's dtype, then multiplies by the weight, which in
  bf16 rounds a second time, where the kernel computes x * rstd * weight in fp32 and rounds once. The class is
  within ~2u of the exact value where the kernel is within u, so in bf16 the two differ by up to ~3u (on these
  inputs about a quarter of the elements differ, by one bf16 ulp): rtol 3 * 2^-8 * 1.02 there (1.02: the bound is
  relative to the exact value, assert_close's to the class's). In fp32 both compute the same float32 products:
  FP32_TOLERANCE. The double rounding is why the kernel is checked against the exact value, not the class, at
  one rounding's tolerance in bf16 (a kernel that rounded like the class fails the bf16 forward tests).
Outputs are NaN-filled before the kernel (every element must be written); accumulating outputs (dinp, dweight)
start from random values, and must end at start + gradient. Deterministic: two runs give the same bits.
Shapes: C = 96 and 200 (not powers of two: masked columns), 2048 (Llama 3.2 1B's); N not a multiple of the row
tile (32, 16 and 2 rows).
"""

import pytest
import torch

import train_llama3_torch
from llmpy.kernels.bias import PartialSums
from llmpy.kernels.layernorm import rmsnorm_backward, rmsnorm_backward_groups, rmsnorm_backward_scratch
from llmpy.kernels.layernorm import rmsnorm_forward
from test_layernorm import DTYPES, EPS, FP32_TOLERANCE, nan_like, random_layer, tolerance_for

BF16_CLASS_TOLERANCE = dict(rtol=3 * 2**-8 * 1.02, atol=1e-5)
SHAPES = [(37, 96), (45, 200), (5, 2048)]  # (N, C)


def reference_rmsnorm(x, weight):
    """out, rstd: RMSNorm in float64 (differentiable)."""
    rstd = (x.pow(2).mean(-1) + EPS).rsqrt()
    return x * rstd[:, None] * weight, rstd


def forward(x, weight):
    """out, rstd from rmsnorm_forward, into NaN-filled tensors."""
    out, rstd = nan_like(x), nan_like(x[:, 0], torch.float32)
    rmsnorm_forward(out, rstd, x, weight, EPS)
    return out, rstd


@pytest.mark.parametrize("N, C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_float64(device, N, C, dtype):
    x, weight, _ = random_layer(N, C, dtype, device, seed=N)
    expected_out, expected_rstd = reference_rmsnorm(x.double(), weight.double())

    out, rstd = forward(x, weight)

    torch.testing.assert_close(out.double(), expected_out, **tolerance_for(dtype))
    torch.testing.assert_close(rstd.double(), expected_rstd, **FP32_TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_the_reference_class(device, dtype):
    N, C = 37, 96
    x, weight, _ = random_layer(N, C, dtype, device, seed=7)
    norm = train_llama3_torch.RMSNorm(C, EPS).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        expected = norm(x)

    out, _ = forward(x, weight)

    assert expected.dtype == dtype
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_CLASS_TOLERANCE
    torch.testing.assert_close(out.double(), expected.double(), **tolerance)


def backward_case(device, N, C, dtype, seed):
    """Random inputs for a backward: x, weight, rstd (from rmsnorm_forward), dout, and the initial dinp, dweight."""
    generator = torch.Generator().manual_seed(seed)
    x, weight, _ = random_layer(N, C, dtype, device, seed=seed + 3)
    dout = torch.randn(N, C, generator=generator).to(device=device, dtype=dtype)
    dinp = torch.randn(N, C, generator=generator).to(device=device, dtype=dtype)
    dweight = torch.randn(C, generator=generator).to(device)
    _, rstd = forward(x, weight)  # the backward reads the forward's statistics
    return x, weight, rstd, dout, dinp, dweight


def run_backward_case(device, N, C, dtype, scratch, deferred=False):
    """Runs rmsnorm_backward on random inputs and checks dinp and dweight against float64 autograd.
    deferred: the kernel only writes the partial sums (dweight None), into a PartialSums's slot (the scratch's
    shape), and PartialSums adds them into dweight afterwards, as a model does."""
    x, weight, rstd, dout, dinp, dweight = backward_case(device, N, C, dtype, seed=N * C)

    x64, weight64 = (t.double().requires_grad_() for t in (x, weight))
    reference_rmsnorm(x64, weight64)[0].backward(dout.double())
    expected_dinp = dinp.double() + x64.grad
    expected_dweight = dweight.double() + weight64.grad

    if deferred:
        grads = dweight.clone()  # the target: a slice of an fp32 buffer, here all of it
        sums = PartialSums(grads, [grads], scratch.shape[0], C)
        sums.partials.fill_(float("nan"))
        rmsnorm_backward(dinp, None, dout, x, weight, rstd, sums.partials[0])
        sums.add_to_targets()
        dweight = grads
    else:
        rmsnorm_backward(dinp, dweight, dout, x, weight, rstd, scratch)

    torch.testing.assert_close(dinp.double(), expected_dinp, **tolerance_for(dtype))
    torch.testing.assert_close(dweight.double(), expected_dweight, **FP32_TOLERANCE)


@pytest.mark.parametrize("N, C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_accumulates_float64_gradients(device, N, C, dtype):
    scratch = rmsnorm_backward_scratch(N, C, device).fill_(float("nan"))
    run_backward_case(device, N, C, dtype, scratch)


@pytest.mark.parametrize("N, C", SHAPES)
def test_backward_partial_sums_added_later_give_the_same_gradients(device, N, C):
    run_backward_case(device, N, C, torch.bfloat16, rmsnorm_backward_scratch(N, C, device), deferred=True)


@pytest.mark.parametrize("groups", [1, 5, 37])
def test_backward_is_right_for_any_number_of_row_groups(device, groups):
    """The scratch's G (row groups, one partial sum each) only sets the order of additions: G = 5 splits 37 rows
    into groups of 8, not a multiple of the 32-row tile at C = 96; G = 37 gives one row per group."""
    N, C = 37, 96
    scratch = torch.full((groups, C), float("nan"), device=device)
    run_backward_case(device, N, C, torch.float32, scratch)


def test_scratch_has_a_row_per_group():
    assert rmsnorm_backward_scratch(45, 200, "cpu").shape == (rmsnorm_backward_groups(45, 200), 200) == (3, 200)


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_inputs_give_the_same_bits(device, dtype):
    N, C = 45, 200
    x, weight, rstd, dout, dinp, dweight = backward_case(device, N, C, dtype, seed=11)
    scratch = rmsnorm_backward_scratch(N, C, device)
    runs = []
    for _ in range(2):
        out, run_rstd = forward(x, weight)
        run_dinp, run_dweight = dinp.clone(), dweight.clone()
        rmsnorm_backward(run_dinp, run_dweight, dout, x, weight, run_rstd, scratch)
        runs.append([out, run_rstd, run_dinp, run_dweight])
    for first, second in zip(*runs):  # out, rstd, dinp, dweight
        assert torch.equal(bits(first), bits(second))


def bits(t):
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)
