"""The fc matmul with GELU in cuBLASLt's epilogue (llmpy.vendor.matmul_gelu_forward) against torch's matmul and GELU
in float64, from the same inputs. GPU only: cuBLASLt is a CUDA library (CPU runs use the unfused path).

pre = x @ W^T + b and out = gelu(pre), shaped like GPT-2's fc (C -> 4C) with N not a multiple of any tile; outputs
start as NaN, so an element left unwritten fails. Errors are per tensor, ||got - ref|| / ||ref||:
  bf16: each output is an fp32 result rounded to bf16 once, at most 2^-9 relative per element, ~2^-10 in norm;
        cuBLASLt may evaluate GELU's tanh with the GPU's approximate tanh (~2^-11 relative), about as much again.
        Tolerance 2^-8: 2-4x the expected error, while a wrong transpose, a missing bias or the erf GELU instead of
        the tanh one are 1e-3 to 1 off.
  fp32: fp32 products and sums (TF32 off), plus the approximate tanh: tolerance 1e-4.
"""

import pytest
import torch
import torch.nn.functional as F

from llmpy import vendor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt needs a GPU")

N, C = 300, 192
TOLERANCE = {torch.bfloat16: 2**-8, torch.float32: 1e-4}


def rel_error(got, ref):
    return (torch.linalg.vector_norm(got.double() - ref) / torch.linalg.vector_norm(ref)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matmul_gelu_forward_matches_torch(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=generator).to("cuda", dtype)
    weight = (C ** -0.5 * torch.randn(4 * C, C, generator=generator)).to("cuda", dtype)
    bias = (0.5 * torch.randn(4 * C, generator=generator)).to("cuda", dtype)
    pre_ref = x.double() @ weight.double().t() + bias.double()

    pre = torch.full((N, 4 * C), float("nan"), dtype=dtype, device="cuda")
    out = torch.full_like(pre, float("nan"))
    vendor.matmul_gelu_forward(out, pre, x, weight, bias)

    assert rel_error(pre, pre_ref) < TOLERANCE[dtype]
    assert rel_error(out, F.gelu(pre_ref, approximate="tanh")) < TOLERANCE[dtype]
