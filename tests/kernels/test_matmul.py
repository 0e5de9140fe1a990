"""The mainline's matmuls on cuBLASLt (llmpy.vendor) against torch in float64, from the same inputs. GPU only:
cuBLASLt is a CUDA library (CPU runs use torch's matmul).

Shaped like GPT-2's (C -> 3C, 4C -> C ...) with N not a multiple of any tile. Outputs that are overwritten start as
NaN, so an element left unwritten fails; the weight gradient starts random, since it accumulates. Each shape is new
to the process, so each call here is the first of its shape: the one that times the candidate algorithms, which must
leave its output as one call would (the weight gradient's timing adds to it again and again, then restores it).
Errors are per tensor, ||got - ref|| / ||ref||:
  bf16 outputs: an fp32 result rounded to bf16 once, at most 2^-9 relative per element, ~2^-10 in norm. Tolerance
        2^-8, 2-4x that, while a wrong transpose, leading dimension or a missing bias are 1e-2 to 1 off. With GELU,
        cuBLASLt may evaluate its tanh approximately (~2^-11 relative), about as much again: still within 2^-8.
  fp32 outputs (the weight gradient from bf16 operands; fp32 runs with TF32 off): products exact or fp32, fp32 sums
        over at most a few hundred terms, ~1e-7; tolerance 1e-5 (GELU's approximate tanh: 1e-4).
"""

import pytest
import torch
import torch.nn.functional as F

from llmpy import vendor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt needs a GPU")

C = 192
TOLERANCE = {torch.bfloat16: 2**-8, torch.float32: 1e-5}
DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def rel_error(got, ref):
    return (torch.linalg.vector_norm(got.double() - ref) / torch.linalg.vector_norm(ref)).item()


def randn(*shape, dtype, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to("cuda", dtype)


def nans(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_forward(dtype, with_bias):
    N, OC = 301 if with_bias else 302, 3 * C
    x, weight = randn(N, C, dtype=dtype, seed=1), randn(OC, C, dtype=dtype, scale=C ** -0.5, seed=2)
    bias = randn(OC, dtype=dtype, scale=0.5, seed=3) if with_bias else None
    out = nans(N, OC, dtype=dtype)
    vendor.matmul_forward(out, x, weight, bias)
    ref = x.double() @ weight.double().t() + (bias.double() if with_bias else 0)
    assert rel_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_forward_adds_the_residual(dtype):
    """A projection joining the residual stream: out = x @ W^T + bias + residual in one call, the residual left as it
    was (it is cuBLASLt's C, read, while out is D)."""
    N, OC = 305, C
    x, weight = randn(N, 4 * C, dtype=dtype, seed=8), randn(OC, 4 * C, dtype=dtype, scale=(4 * C) ** -0.5, seed=9)
    bias, residual = randn(OC, dtype=dtype, scale=0.5, seed=10), randn(N, OC, dtype=dtype, seed=11)
    residual_before = residual.clone()
    out = nans(N, OC, dtype=dtype)
    vendor.matmul_forward(out, x, weight, bias, residual=residual)
    ref = x.double() @ weight.double().t() + bias.double() + residual.double()
    assert rel_error(out, ref) < TOLERANCE[dtype]
    assert torch.equal(residual, residual_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_forward_row_strided_input(dtype):
    """An input whose rows are further apart than its width (a column slice): the leading dimension is its stride."""
    N, OC = 303, C
    wide = randn(N, C + 64, dtype=dtype, seed=4)
    x, weight = wide[:, :C], randn(OC, C, dtype=dtype, scale=C ** -0.5, seed=5)
    out = nans(N, OC, dtype=dtype)
    vendor.matmul_forward(out, x, weight)
    assert rel_error(out, x.double() @ weight.double().t()) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_backward_input(dtype):
    N, OC = 304, 4 * C
    dout, weight = randn(N, OC, dtype=dtype, seed=6), randn(OC, C, dtype=dtype, scale=OC ** -0.5, seed=7)
    dinp = nans(N, C, dtype=dtype)
    vendor.matmul_backward_input(dinp, dout, weight)
    assert rel_error(dinp, dout.double() @ weight.double()) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_backward_weight_accumulates_in_fp32(dtype):
    N, OC = 305, 3 * C
    dout, inp = randn(N, OC, dtype=dtype, scale=N ** -0.5, seed=8), randn(N, C, dtype=dtype, seed=9)
    dweight = randn(OC, C, dtype=torch.float32, seed=10)
    ref = dweight.double() + dout.double().t() @ inp.double()
    vendor.matmul_backward_weight(dweight, dout, inp)
    assert rel_error(dweight, ref) < TOLERANCE[torch.float32]
    vendor.matmul_backward_weight(dweight, dout, inp)  # a second micro-batch: the plan is cached now
    assert rel_error(dweight, ref + dout.double().t() @ inp.double()) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_backward_weight_overwrites_without_accumulate(dtype):
    """A step's first micro-batch: accumulate=False writes dout^T @ inp over whatever the gradient held (NaN here)."""
    N, OC = 305, 3 * C
    dout, inp = randn(N, OC, dtype=dtype, scale=N ** -0.5, seed=11), randn(N, C, dtype=dtype, seed=12)
    dweight = torch.full((OC, C), float("nan"), device=dout.device)
    vendor.matmul_backward_weight(dweight, dout, inp, accumulate=False)
    assert rel_error(dweight, dout.double().t() @ inp.double()) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_gelu_forward(dtype):
    N = 300
    x, weight = randn(N, C, dtype=dtype, seed=11), randn(4 * C, C, dtype=dtype, scale=C ** -0.5, seed=12)
    bias = randn(4 * C, dtype=dtype, scale=0.5, seed=13)
    pre_ref = x.double() @ weight.double().t() + bias.double()
    pre, out = nans(N, 4 * C, dtype=dtype), nans(N, 4 * C, dtype=dtype)
    vendor.matmul_gelu_forward(out, pre, x, weight, bias)
    tolerance = max(TOLERANCE[dtype], 1e-4)
    assert rel_error(pre, pre_ref) < tolerance
    assert rel_error(out, F.gelu(pre_ref, approximate="tanh")) < tolerance
