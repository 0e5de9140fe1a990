"""SwiGLU kernels against PyTorch's F.silu(gate) * up and its autograd, computed in float64 from the same inputs.

fp32: rtol 1e-5, atol 1e-6. The kernels evaluate sigmoid from exp(-|g|) and silu'(g) as s * (1 + g * (1 - s)), forms
equal to torch's but not the same operations; each result carries a handful of fp32 roundings (~1e-7 relative each;
an exp computed as 2^(g log2(e)), as on the GPU, adds up to ~1.3e-6 relative at |g| = 30 from rounding g log2(e)),
so 1e-5 leaves a wide margin and still catches any wrong term or factor. The atol covers the one place the error is
absolute, not relative: near silu's minimum (g ~ -1.28) silu'(g) passes through 0 by cancellation in
1 + g * (1 - s), an error of a few 1e-8 * |dout up|.
bf16: inputs in bf16, the reference computed in float64 from those same inputs; the kernel rounds each fp32 result to
bf16 once, which is off by at most 2^-8 relative (half a bf16 ulp), so rtol 2^-8 * 1.01 per element (1% for the
fp32 math before the rounding).
Sizes are not multiples of the kernels' tiles (2048 elements: up to 2048 columns, rows to fill), so the masked
edges are covered; outputs are filled with NaN first, so an element the kernels fail to write fails the comparison.
Inputs are fresh seeded random numbers, gate = 3 randn so both tails of the sigmoid are visited, and a sweep of gate
over [-30, 30] checks the tails explicitly; beyond, the results are the exact limits, with no NaN or inf.
"""

import pytest
import torch
import torch.nn.functional as F

from llmpy.kernels.swiglu import swiglu_backward, swiglu_forward

FP32_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
BF16_TOLERANCE = dict(rtol=2**-8 * 1.01, atol=1e-6)
DTYPES_AND_TOLERANCES = [(torch.float32, FP32_TOLERANCE), (torch.bfloat16, BF16_TOLERANCE)]


def reference_swiglu_and_grads(gate, up, dout):
    """silu(gate) * up and its gradients (dgate, dup) for dout, in float64 by torch's own SiLU and autograd."""
    gate64 = gate.double().requires_grad_()
    up64 = up.double().requires_grad_()
    out = F.silu(gate64) * up64
    out.backward(dout.double())
    return out.detach(), gate64.grad, up64.grad


def random_inputs(N, H, device, dtype, seed):
    """gate, up, dout (N, H): gate = 3 randn (both tails of the sigmoid), up and dout randn."""
    generator = torch.Generator().manual_seed(seed)
    gate = (3 * torch.randn(N, H, generator=generator)).to(device=device, dtype=dtype)
    up = torch.randn(N, H, generator=generator).to(device=device, dtype=dtype)
    dout = torch.randn(N, H, generator=generator).to(device=device, dtype=dtype)
    return gate, up, dout


def nans(N, H, device, dtype):
    return torch.full((N, H), float("nan"), device=device, dtype=dtype)


def run_kernels(gate, up, dout):
    """out, dgate, dup from the kernels, into NaN-filled contiguous tensors."""
    out, dgate, dup = (nans(*gate.shape, gate.device, gate.dtype) for _ in range(3))
    swiglu_forward(out, gate, up)
    swiglu_backward(dgate, dup, dout, gate, up)
    return out, dgate, dup


def assert_match_reference(out, dgate, dup, gate, up, dout, tolerance):
    expected = reference_swiglu_and_grads(gate, up, dout)
    for actual, wanted in zip((out, dgate, dup), expected):
        assert actual.dtype == gate.dtype
        torch.testing.assert_close(actual.double(), wanted, **tolerance)


# (7, 1000): tiles of 2 rows x 1024 columns, masked in both directions; (9, 221): 8 x 256 tiles; (3, 224): the tiny
# Llama's width; (2, 4100): one-row tiles of 2048 columns, three column blocks, the last one 4 columns wide
@pytest.mark.parametrize("N, H", [(7, 1000), (9, 221), (3, 224), (2, 4100)])
@pytest.mark.parametrize("dtype, tolerance", DTYPES_AND_TOLERANCES)
def test_forward_and_backward_match_torch(device, N, H, dtype, tolerance):
    gate, up, dout = random_inputs(N, H, device, dtype, seed=N)

    out, dgate, dup = run_kernels(gate, up, dout)

    assert_match_reference(out, dgate, dup, gate, up, dout, tolerance)


@pytest.mark.parametrize("dtype, tolerance", DTYPES_AND_TOLERANCES)
def test_halves_of_one_buffer_and_row_strides(device, dtype, tolerance):
    """gate and up the halves of one (N, 2H) buffer (one matmul for both), dgate and dup the halves of one gradient
    buffer, out rows wider than H: the kernels follow each tensor's row stride and write nothing outside its view."""
    N, H = 7, 1000
    gate, up, dout = random_inputs(N, H, device, dtype, seed=10)
    both = torch.cat([gate, up], dim=1)  # (N, 2H): gate | up
    out_padded = nans(N, H + 24, device, dtype)
    dboth = nans(N, 2 * H, device, dtype)

    swiglu_forward(out_padded[:, :H], both[:, :H], both[:, H:])
    swiglu_backward(dboth[:, :H], dboth[:, H:], dout, both[:, :H], both[:, H:])

    assert_match_reference(out_padded[:, :H], dboth[:, :H], dboth[:, H:], gate, up, dout, tolerance)
    assert out_padded[:, H:].isnan().all()
    assert torch.equal(both, torch.cat([gate, up], dim=1))  # the inputs are left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_in_place_over_gate_and_up_gives_the_same_result(device, dtype):
    """dgate written over gate and dup over up, in the halves of one (N, 2H) buffer as the mainline may do: the same
    bits as into separate tensors (every element is read before it is overwritten)."""
    N, H = 9, 221
    gate, up, dout = random_inputs(N, H, device, dtype, seed=11)
    _, expected_dgate, expected_dup = run_kernels(gate, up, dout)
    both = torch.cat([gate, up], dim=1)

    swiglu_backward(both[:, :H], both[:, H:], dout, both[:, :H], both[:, H:])  # dgate is gate, dup is up

    assert torch.equal(both[:, :H], expected_dgate)
    assert torch.equal(both[:, H:], expected_dup)


def test_forward_in_place_over_up_gives_the_same_result(device):
    gate, up, dout = random_inputs(7, 1000, device, torch.bfloat16, seed=12)
    expected_out, _, _ = run_kernels(gate, up, dout)

    swiglu_forward(up, gate, up)  # out is up

    assert torch.equal(up, expected_out)


@pytest.mark.parametrize("dtype, tolerance", DTYPES_AND_TOLERANCES)
def test_both_tails_of_the_sigmoid(device, dtype, tolerance):
    """gate swept over [-30, 30] (silu(-30) ~ -3e-12, silu'(30) = 1 + 3e-12): every result finite and within the
    tolerance, relative, of the float64 reference."""
    N, H = 3, 601
    generator = torch.Generator().manual_seed(13)
    gate = torch.linspace(-30, 30, H).repeat(N, 1).to(device=device, dtype=dtype)
    up = torch.randn(N, H, generator=generator).to(device=device, dtype=dtype)
    dout = torch.randn(N, H, generator=generator).to(device=device, dtype=dtype)

    out, dgate, dup = run_kernels(gate, up, dout)

    assert all(t.isfinite().all() for t in (out, dgate, dup))
    assert_match_reference(out, dgate, dup, gate, up, dout, tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_far_tails_are_exact_limits(device, dtype):
    """Far in the tails silu(g) is 0 (g << 0) and g (g >> 0), with silu' 0 and 1; no NaN from the exponential."""
    gate = torch.tensor([[-1000.0, -200.0, 200.0, 1000.0]], device=device, dtype=dtype)  # exact in bf16 too
    ones = torch.ones_like(gate)

    out, dgate, dup = run_kernels(gate, ones, ones)

    assert out.tolist() == dup.tolist() == [[0.0, 0.0, 200.0, 1000.0]]
    assert dgate.tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_bad_shapes_and_dtypes_are_refused(device):
    N, H = 4, 8
    gate, up, dout = random_inputs(N, H, device, torch.float32, seed=14)
    out = nans(N, H, device, torch.float32)
    with pytest.raises(ValueError, match=r"swiglu_forward: up must be \(4, 8\) torch.float32"):
        swiglu_forward(out, gate, up[:, :7])
    with pytest.raises(ValueError, match="out must be .* with unit column stride"):
        swiglu_forward(nans(H, N, device, torch.float32).t(), gate, up)
    with pytest.raises(ValueError, match="gate must be .N, H. bfloat16 or float32"):
        swiglu_forward(out.half(), gate.half(), up.half())
    with pytest.raises(ValueError, match="dout must be .* torch.float32"):
        swiglu_backward(gate.clone(), up.clone(), dout.bfloat16(), gate, up)
    with pytest.raises(ValueError, match="dgate and dup must be different tensors"):
        swiglu_backward(out, out, dout, gate, up)


@pytest.mark.parametrize("which", ["both", "gate", "up"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_fp8_outputs_are_the_casts_of_the_gradients(device, which, dtype):
    """fp8_gate, fp8_up (--precision fp8: the backward writes the gate and up projections' e5m2 output gradients
    itself), either or both: each out8 must hold, bit for bit, what fp8.cast writes for the gradient the backward
    writes without it, at its own scale (2^14 and 2^13: the largest values saturate at 57344), each amax must be max
    |gradient| maxed into its start value, the gradient it replaces must be left as it was and the other written as
    ever. gate and up are the halves of one (N, 2H) buffer, dgate and dup of another, as in the model; (7, 1000):
    masked tiles in both directions, several programs maxing into each amax."""
    from llmpy.kernels.fp8 import cast

    N, H = 7, 1000
    gate, up, dout = random_inputs(N, H, device, dtype, seed=5)
    gate_up, dgate_dup = torch.cat([gate, up], 1), nans(N, 2 * H, device, dtype)
    gate, up, dgate, dup = gate_up[:, :H], gate_up[:, H:], dgate_dup[:, :H], dgate_dup[:, H:]
    _, expected_dgate, expected_dup = run_kernels(gate.contiguous(), up.contiguous(), 4 * dout)
    scales = {"gate": 2.0**14, "up": 2.0**13}
    outputs = {name: (torch.full((N, H), 0x55, dtype=torch.uint8).view(torch.float8_e5m2).to(device),
                      torch.tensor([scales[name]], device=device), torch.tensor([0.125], device=device))
               for name in (("gate", "up") if which == "both" else (which,))}
    swiglu_backward(dgate, dup, 4 * dout, gate, up, fp8_gate=outputs.get("gate"), fp8_up=outputs.get("up"))
    for name, expected, written in (("gate", expected_dgate, dgate), ("up", expected_dup, dup)):
        if name not in outputs:
            assert torch.equal(written, expected)
            continue
        out8, scale, amax = outputs[name]
        cast_of_gradient = torch.empty((N, H), dtype=torch.float8_e5m2, device=device)
        cast(cast_of_gradient, expected, scale)
        assert torch.equal(out8.view(torch.uint8), cast_of_gradient.view(torch.uint8))
        assert (expected.float() * scale > 57344).any()
        assert amax.item() == expected.float().abs().max().item()
        assert written.isnan().all()
