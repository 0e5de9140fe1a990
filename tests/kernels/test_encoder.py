"""Encoder kernels (token + position embedding) against plain torch indexing.

Forward: out = wte[tokens] + wpe[:T] must equal torch's result bit for bit, in fp32 and bf16: both add the two values
in fp32 and round once to the activation dtype (to nearest), so there is nothing to tolerate.
Backward: dwte and dwpe start from random values and must end at start + gradient, the gradient computed in float64
by index_add_ (dwte) and a sum over the batch (dwpe). dwte is accumulated with float atomics in an arbitrary order,
so the comparison has a tolerance that allows any order: each dwte row sums at most B*T = 40 rows of O(1) values
in fp32 (error < 40 * 2^-24 * sum|dout| ~ 1e-5 worst case), hence rtol 1e-5, atol 1e-5. Tokens come from a small
vocabulary (V = 7, so rows repeat a token ~6 times each and the atomics collide); wte has padding rows (Vp = 9) that
no token selects, and their gradient must stay exactly as it was, like dwpe's rows past T.
"""

import pytest
import torch

from llmpy.kernels.encoder import encoder_backward, encoder_forward

V, VP, MAX_T = 7, 9, 12  # vocabulary, padded vocabulary (rows of wte), position table rows (> T)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
SHAPES = [(4, 10, 64), (3, 7, 80), (2, 5, 768)]  # (B, T, C): C a power of two, not one, GPT-2's


def random_tokens(B, T, device, generator):
    return torch.randint(0, V, (B, T), generator=generator, dtype=torch.int32).to(device)


@pytest.mark.parametrize("B, T, C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_torch_embedding_sum(device, B, T, C, dtype):
    generator = torch.Generator().manual_seed(C)
    tokens = random_tokens(B, T, device, generator)
    wte = torch.randn(VP, C, generator=generator).to(device=device, dtype=dtype)
    wpe = torch.randn(MAX_T, C, generator=generator).to(device=device, dtype=dtype)
    out = torch.full((B, T, C), float("nan"), device=device, dtype=dtype)

    encoder_forward(out, tokens, wte, wpe)

    assert torch.equal(out, wte[tokens.long()] + wpe[:T])


@pytest.mark.parametrize("B, T, C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_accumulates_embedding_gradients(device, B, T, C, dtype):
    generator = torch.Generator().manual_seed(C + 1)
    tokens = random_tokens(B, T, device, generator)
    dout = torch.randn(B, T, C, generator=generator).to(device=device, dtype=dtype)
    dwte = torch.randn(VP, C, generator=generator).to(device)
    dwpe = torch.randn(MAX_T, C, generator=generator).to(device)
    expected_dwte = dwte.double().index_add_(0, tokens.flatten().long(), dout.reshape(-1, C).double())
    expected_dwpe = dwpe.double()
    expected_dwpe[:T] += dout.double().sum(0)

    encoder_backward(dwte, dwpe, dout, tokens)

    torch.testing.assert_close(dwte.double(), expected_dwte, **TOLERANCE)
    torch.testing.assert_close(dwpe.double(), expected_dwpe, **TOLERANCE)
    assert torch.equal(dwte[V:].double(), expected_dwte[V:])  # padding rows untouched
    assert torch.equal(dwpe[T:].double(), expected_dwpe[T:])  # positions past T untouched
