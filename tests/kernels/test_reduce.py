"""llmpy.kernels.reduce.sum_into against a float64 torch sum.

out starts at a random value and must end at out + scale * sum(x). Tolerance: the kernel sums in fp32, each of
BLOCK lanes adding n / BLOCK values in order and the lanes then summed as a tree, so its rounding error is at most
about (n / BLOCK + log2(BLOCK)) * 2^-24 * sum|x|; with n <= 10,000 and BLOCK = 4096 that is < 1e-6 * sum|x|, and
we allow 2e-6 * sum|x| (plus the rounding of out itself). bf16 inputs are exact in fp32, so the same bound holds
against the float64 sum of the bf16 values.
"""

import pytest
import torch

from llmpy.kernels.reduce import sum_into


def _check(out_before, out_after, x, scale):
    x64 = x.double()
    expected = out_before.double() + scale * x64.sum()
    tolerance = 2e-6 * abs(scale) * x64.abs().sum() + 1e-7 * expected.abs()
    assert abs(out_after.double() - expected).item() <= tolerance.item()


# sizes: one value, a single partial tile, exactly one tile, several tiles with a ragged last one
@pytest.mark.parametrize("n", [1, 37, 4096, 10_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_into_adds_the_scaled_sum(device, n, dtype):
    generator = torch.Generator().manual_seed(n)
    x = (torch.rand(n, generator=generator) * 10 + 0.5).to(dtype).to(device)  # positive, like losses
    out = torch.randn(1, generator=generator).to(device)
    before = out.clone()
    sum_into(out, x, scale=1.0 / n)
    _check(before.cpu(), out.cpu(), x.cpu(), 1.0 / n)


def test_sum_into_mixed_signs_and_default_scale(device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=generator).to(device)
    out = torch.randn(1, generator=generator).to(device)
    before = out.clone()
    sum_into(out, x)
    _check(before.cpu(), out.cpu(), x.cpu(), 1.0)


def test_sum_into_accumulates_over_calls_and_is_deterministic(device):
    generator = torch.Generator().manual_seed(1)
    batches = [torch.rand(3000, generator=generator).to(device) for _ in range(3)]
    results = []
    for _ in range(2):
        out = torch.zeros(1, device=device)
        for x in batches:
            sum_into(out, x, scale=1.0 / 9000)
        results.append(out.item())
    assert results[0] == results[1]  # the same bits: the order of additions is fixed
    _check(torch.zeros(1), torch.tensor([results[0]]), torch.cat(batches).cpu(), 1.0 / 9000)
