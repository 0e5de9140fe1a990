"""Gradient norm and clipping scale against float64 torch math and torch.nn.utils.clip_grad_norm_.

global_norm_squared: out (NaN before the call: it is overwritten, not accumulated) must equal sum(x^2) computed in
float64. All terms are positive, so fp32 summation has no cancellation: each of the 4096 lanes adds <= 13 values,
then two fixed trees add the lanes and the G partials, a relative error of at most ~(13 + 12 + 10) * 2^-24 = 2e-6;
we allow rtol 1e-5. A dropped or doubled block would be off by ~8% or more at these sizes.
clip_scale: min(1, max_norm / (sqrt(norm_sq) + 1e-6)), one sqrt and one division in fp32: rtol 1e-6.
"""

import pytest
import torch

from llmpy.kernels.norm import clip_scale, global_norm_scratch, global_norm_squared

P = 50_000  # 12.2 blocks of 4096 (3.05 of the interpreter's 16384): several programs, a ragged last block


def random_gradients(device, seed, numel=P):
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(device)


def test_sum_of_squares_with_the_default_scratch(device):
    x = random_gradients(device, seed=0)
    out = torch.full((1,), float("nan"), device=device)
    scratch = global_norm_scratch(P, device).fill_(float("nan"))

    global_norm_squared(out, x, scratch)

    torch.testing.assert_close(out.double(), (x.double() ** 2).sum().reshape(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("programs", [1, 3, 20])
def test_sum_of_squares_for_any_number_of_programs(device, programs):
    """G sets only the summation order: 1 program walks all 13 blocks; 3 programs get 5, 5 and 3 blocks; with 20,
    the programs past the 13th have nothing to add and must contribute exactly 0."""
    x = random_gradients(device, seed=programs)
    out = torch.full((1,), float("nan"), device=device)
    scratch = torch.full((programs,), float("nan"), device=device)

    global_norm_squared(out, x, scratch)

    torch.testing.assert_close(out.double(), (x.double() ** 2).sum().reshape(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "norm_sq, max_norm, expected",
    [
        (100.0, 1.0, 1.0 / (10.0 + 1e-6)),  # norm 10 > 1: scaled down
        (0.25, 1.0, 1.0),  # norm 0.5 <= 1: untouched
        (100.0, 0.0, 1.0),  # max_norm 0: clipping off
        (100.0, -1.0, 1.0),  # negative: clipping off too
    ],
)
def test_clip_scale(device, norm_sq, max_norm, expected):
    scale = torch.full((1,), float("nan"), device=device)
    clip_scale(scale, torch.tensor([norm_sq], device=device), max_norm)
    torch.testing.assert_close(scale.double().cpu(), torch.tensor([expected], dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("max_norm", [1.0, 1000.0])
def test_norm_and_scale_reproduce_clip_grad_norm(device, max_norm):
    """Scaling the gradients by clip_scale(global_norm_squared(...)) gives what torch.nn.utils.clip_grad_norm_ does
    to them (fp32 on both sides: rtol 1e-5, atol 1e-7 for the ~1e-3 values after clipping to norm 1)."""
    grads = random_gradients(device, seed=7)
    norm_sq = torch.full((1,), float("nan"), device=device)
    scale = torch.full((1,), float("nan"), device=device)
    global_norm_squared(norm_sq, grads, global_norm_scratch(P, device))
    clip_scale(scale, norm_sq, max_norm)

    parameter = torch.nn.Parameter(torch.zeros_like(grads))
    parameter.grad = grads.clone()
    total_norm = torch.nn.utils.clip_grad_norm_([parameter], max_norm)

    torch.testing.assert_close(norm_sq.sqrt(), total_norm.reshape(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(grads * scale, parameter.grad, rtol=1e-5, atol=1e-7)
