"""GELU (tanh approximation) kernels against PyTorch's gelu(approximate="tanh") and its autograd, computed in float64.

fp32: rtol 1e-5, atol 1e-6. The kernels evaluate x * sigmoid(2u) in fp32, a different but equal form of torch's
0.5 x (1 + tanh(u)); each result carries a few fp32 roundings (~1e-7 relative), so 1e-5 has two orders of margin
and still catches any wrong constant or term.
bf16: inputs in bf16, the reference computed in float64 from those same inputs; the kernel rounds its fp32 result to
bf16 once, which is off by at most 2^-8 relative (half a bf16 ulp), so rtol 2^-8 * 1.01 per element (1% for the
fp32 math before the rounding).
Sizes are not multiples of the kernels' blocks (2048 elements forward; 256-column tiles backward), so the masked
tails are covered; outputs are filled with NaN first, so an element the kernel fails to write fails the comparison.
The backward's optional column sums (the fc bias gradient) are checked against a float64 sum of the dinp the kernel
wrote: fp32 sums of N values of size ~1, so rtol 1e-5, atol 1e-5 as in test_bias.py.
"""

import pytest
import torch
import torch.nn.functional as F

from llmpy.kernels.bias import PartialSums, bias_backward_groups, bias_backward_scratch
from llmpy.kernels.fp8 import cast
from llmpy.kernels.gelu import gelu_backward, gelu_forward

# x down to -12 makes sigmoid's exp(-2u) overflow to inf (the right limit, gelu -> -0); under the interpreter numpy
# warns about it
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
BF16_TOLERANCE = dict(rtol=2**-8 * 1.01, atol=1e-6)
SHAPE = (7, 1000)  # 7000 elements: three full blocks of 2048 and a partial one


def reference_gelu_and_grad(x, dout):
    """gelu(x) and dout * gelu'(x) in float64 by torch's own GELU and autograd."""
    x64 = x.double().requires_grad_()
    out = F.gelu(x64, approximate="tanh")
    out.backward(dout.double())
    return out.detach(), x64.grad


def random_inputs(device, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(SHAPE, generator=generator)).to(device=device, dtype=dtype)  # covers both tails
    dout = torch.randn(SHAPE, generator=generator).to(device=device, dtype=dtype)
    return x, dout


@pytest.mark.parametrize("shape", [SHAPE, (100, 170)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_output_is_the_cast_of_the_output(device, shape, dtype):
    """fp8_out (--precision fp8: the GELU writes the fc projection's e4m3 input itself): out8 must hold, bit for bit,
    what fp8.cast writes for the GELU's own output at the same scale (2^7: values past 3.5 saturate at 448), the amax
    must be max |out| maxed into its start value, and out must be left as it was. 17,000 elements: more than one
    program's 8 blocks of 2048, the last program partly masked."""
    x = (3 * torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))).to(device=device, dtype=dtype)
    expected = torch.empty_like(x)
    gelu_forward(expected, x)
    out = torch.full_like(x, float("nan"))
    out8 = torch.full(shape, 0x55, dtype=torch.uint8).view(torch.float8_e4m3fn).to(device)
    scale, amax = torch.tensor([128.0], device=device), torch.tensor([0.5], device=device)
    gelu_forward(out, x, fp8_out=(out8, scale, amax))
    cast_of_out = torch.empty(shape, dtype=torch.float8_e4m3fn, device=device)
    cast(cast_of_out, expected, scale)
    assert torch.equal(out8.view(torch.uint8), cast_of_out.view(torch.uint8))
    assert (expected.float() * 128 > 448).any()
    assert amax.item() == expected.float().abs().max().item()
    assert out.isnan().all()


@pytest.mark.parametrize("N, OC", [(7, 1000), (300, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_fp8_output_is_the_cast_of_dinp(device, N, OC, dtype):
    """fp8_out in the backward (--precision fp8: the GELU backward writes the fc layer's e5m2 output gradient itself):
    out8 must hold, bit for bit, what fp8.cast writes for the backward's own dinp at the same scale (2^14: values
    past 3.5 saturate at 57344), the amax must be max |dinp| maxed into its start value, the column sums (the fc
    bias gradient) must be those without fp8_out (to the column sums' tolerance, rtol 1e-5: the kernel compiled with
    the FP8 store may add a tile's fp32 values in another order; on the H200 it does at (300, 80)), and dinp must be
    left as it was. (300, 80): several row groups, so several programs max into amax; (7, 1000): a masked column
    block."""
    generator = torch.Generator().manual_seed(OC)
    x = (3 * torch.randn(N, OC, generator=generator)).to(device=device, dtype=dtype)
    dout = (2 * torch.randn(N, OC, generator=generator)).to(device=device, dtype=dtype)
    expected, expected_sums = torch.empty_like(x), bias_backward_scratch(N, OC, device)
    gelu_backward(expected, x, dout, scratch=expected_sums)
    dinp, sums = torch.full_like(x, float("nan")), bias_backward_scratch(N, OC, device).fill_(float("nan"))
    out8 = torch.full((N, OC), 0x55, dtype=torch.uint8).view(torch.float8_e5m2).to(device)
    scale, amax = torch.tensor([2.0**14], device=device), torch.tensor([0.25], device=device)
    gelu_backward(dinp, x, dout, scratch=sums, fp8_out=(out8, scale, amax))
    cast_of_dinp = torch.empty((N, OC), dtype=torch.float8_e5m2, device=device)
    cast(cast_of_dinp, expected, scale)
    assert torch.equal(out8.view(torch.uint8), cast_of_dinp.view(torch.uint8))
    assert (expected.float() * 2.0**14 > 57344).any()
    assert amax.item() == expected.float().abs().max().item()
    torch.testing.assert_close(sums, expected_sums, rtol=1e-5, atol=1e-5)
    assert dinp.isnan().all()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, FP32_TOLERANCE), (torch.bfloat16, BF16_TOLERANCE)])
def test_forward_and_backward_match_torch(device, dtype, tolerance):
    x, dout = random_inputs(device, dtype, seed=0)
    expected_out, expected_dinp = reference_gelu_and_grad(x, dout)

    out = torch.full_like(x, float("nan"))
    gelu_forward(out, x)
    dinp = torch.full_like(x, float("nan"))
    gelu_backward(dinp, x, dout)

    assert out.dtype == dinp.dtype == dtype
    torch.testing.assert_close(out.double(), expected_out, **tolerance)
    torch.testing.assert_close(dinp.double(), expected_dinp, **tolerance)


def test_backward_in_place_over_dout_gives_the_same_result(device):
    x, dout = random_inputs(device, torch.bfloat16, seed=1)
    separate = torch.full_like(x, float("nan"))
    gelu_backward(separate, x, dout)

    gelu_backward(dout, x, dout)  # dinp is dout

    assert torch.equal(dout, separate)


@pytest.mark.parametrize("N, OC", [(7, 1000), (37, 80), (9, 3072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_adds_the_column_sums_of_dinp(device, N, OC, dtype):
    generator = torch.Generator().manual_seed(N)
    x = (3 * torch.randn(N, OC, generator=generator)).to(device=device, dtype=dtype)
    dout = torch.randn(N, OC, generator=generator).to(device=device, dtype=dtype)
    dbias = torch.randn(OC, generator=generator).to(device)
    expected_dbias = dbias.double()
    _, expected_dinp = reference_gelu_and_grad(x, dout)
    dinp = torch.full_like(x, float("nan"))

    gelu_backward(dinp, x, dout, dbias, bias_backward_scratch(N, OC, device).fill_(float("nan")))

    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(dinp.double(), expected_dinp, **tolerance)
    torch.testing.assert_close(dbias.double(), expected_dbias + dinp.double().sum(0), rtol=1e-5, atol=1e-5)


def test_backward_partial_sums_added_later_give_the_column_sums(device):
    """With scratch but no dbias the kernel leaves its partial sums in scratch (here a PartialSums's slot, as in the
    model), and PartialSums adds them into dbias afterwards: the same sum as above."""
    N, OC = 37, 80
    generator = torch.Generator().manual_seed(4)
    x = (3 * torch.randn(N, OC, generator=generator)).to(device=device, dtype=torch.bfloat16)
    dout = torch.randn(N, OC, generator=generator).to(device=device, dtype=torch.bfloat16)
    dbias = torch.randn(OC, generator=generator).to(device)
    expected_dbias = dbias.double()
    sums = PartialSums(dbias, [dbias], bias_backward_groups(N, OC), OC)
    sums.partials.fill_(float("nan"))
    dinp = torch.full_like(x, float("nan"))

    gelu_backward(dinp, x, dout, scratch=sums.partials[0])
    sums.add_to_targets()

    torch.testing.assert_close(dbias.double(), expected_dbias + dinp.double().sum(0), rtol=1e-5, atol=1e-5)


def test_forward_extremes_are_exact_limits(device):
    """Far in the tails gelu(x) is x (x >> 0) and 0 (x << 0), with gradients 1 and 0; no NaN from exp overflow."""
    x = torch.tensor([[-60.0, -20.0, 20.0, 60.0]], device=device)
    out = torch.full_like(x, float("nan"))
    gelu_forward(out, x)
    dinp = torch.full_like(x, float("nan"))
    gelu_backward(dinp, x, torch.ones_like(x))

    assert out.tolist() == [[0.0, 0.0, 20.0, 60.0]]
    assert dinp.tolist() == [[0.0, 0.0, 1.0, 1.0]]
