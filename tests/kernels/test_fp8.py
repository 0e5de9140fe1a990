"""FP8 casts (llmpy/kernels/fp8.py) against torch's own float8 conversion, exactly.

The reference for fp8(x * s) is torch's CPU conversion of the same fp32 product, which rounds to nearest even; it
does not saturate (e4m3fn has no infinity: past 448 it gives NaN), so the reference clamps to +-FP8_MAX first, as
the kernel's saturation does. Everything is compared bit for bit (as fp32 values, NaN where NaN): the kernel's
rounding is exact, not approximate, on the GPU (hardware cvt.rn) and under the interpreter (fp32 rounding by hand).
Inputs: every finite value of the format and every midpoint between neighbours (the ties, where to-even decides),
random normals over 20 binades, subnormals, values past the largest, +-inf and NaN; bf16 and fp32 tensors with a row
stride wider than the row, shapes that are not multiples of the tiles. amax must be the exact max |x|; the scale the
largest power of two that keeps amax * s within range.
"""

import pytest
import torch

from llmpy.kernels.fp8 import FORMATS, amax, cast, scale_from_amax, transpose, update_scales

FMTS = list(FORMATS)


def reference(x, s, fmt):
    dtype, fp8_max = FORMATS[fmt][:2]
    y = x.float() * s
    return torch.where(y.isnan(), y, y.clamp(-fp8_max, fp8_max)).to(dtype).float()


def same(a, b):
    """Equal as values, NaN where the other is NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def hard_values(fmt):
    """Every finite value of the format, the midpoints between neighbours, and values out of range."""
    dtype, fp8_max = FORMATS[fmt][:2]
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[grid.isfinite()].unique()  # sorted, +0 and -0 as one
    midpoints = (grid[1:] + grid[:-1]) / 2
    special = torch.tensor([fp8_max * 1.01, -fp8_max * 3, 1e30, float("inf"), -float("inf"), float("nan")])
    return torch.cat([grid, midpoints, midpoints.nextafter(torch.tensor(float("inf"))), special])


@pytest.mark.parametrize("fmt", FMTS)
def test_rounds_every_value_and_every_tie_like_torch(device, fmt):
    x = hard_values(fmt)
    x = torch.cat([x, torch.zeros((-len(x)) % 64)]).view(-1, 64)
    out = torch.empty(x.shape, dtype=FORMATS[fmt][0], device=device)
    one = torch.ones(1, device=device)
    cast(out, x.to(device), one)
    assert same(out.float().cpu(), reference(x, 1.0, fmt))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transposed"])
def test_scaled_cast_and_its_amax(device, fmt, dtype, transpose):
    """R = 291, C = 300: not multiples of the (32, 128) tile, more rows than a program's 8 tiles; x a view with 7
    spare columns a row; magnitudes over 20 binades and a few subnormal ones after scaling. amax_out starts below the
    tensor's amax and must end at it."""
    R, C = 291, 300
    generator = torch.Generator().manual_seed(R + len(fmt))
    wide = torch.randn(R, C + 7, generator=generator) * torch.exp2(torch.randint(-10, 10, (R, C + 7),
                                                                                  generator=generator).float())
    x = wide.to(dtype)[:, :C].to(device)
    s = 2.0 ** -3
    out = torch.full((C, R) if transpose else (R, C), float("nan"), device=device).to(FORMATS[fmt][0])
    amax_out = torch.full((1,), 0.5, device=device)
    cast(out, x, torch.tensor([s], device=device), amax_out, transpose=transpose)
    expected = reference(x.cpu(), s, fmt)
    assert same(out.float().cpu(), expected.T if transpose else expected)
    assert amax_out.item() == x.float().abs().max().item()


@pytest.mark.parametrize("fmt", FMTS)
def test_amax_and_the_power_of_two_scale(device, fmt):
    fp8_max = FORMATS[fmt][1]
    x = (torch.randn(77, 129, generator=torch.Generator().manual_seed(3)) * 37).to(device)
    out, scale, inverse = (torch.full((1,), -1.0, device=device) for _ in range(3))
    amax(out, x)
    assert out.item() == x.abs().max().item()
    scale_from_amax(scale, inverse, out, fmt)
    s = scale.item()
    assert s == 2.0 ** round(torch.tensor(s).log2().item())  # a power of two
    assert fp8_max / 2 < out.item() * s <= fp8_max and inverse.item() * s == 1.0
    out.zero_()
    scale_from_amax(scale, inverse, out, fmt)  # an all-zero tensor: scale 1
    assert scale.item() == 1.0 and inverse.item() == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="4.3 GB on the GPU (the interpreter would take hours)")
def test_amax_of_a_tensor_past_2_to_the_31_elements():
    """The LM head's gradient at d12 B=64 is (65,536, 50,304): 3.3e9 elements. With R * C computed in the kernel's
    32-bit arguments the count wrapped negative, every load was masked and the amax came out 0 (the dlogits' scale
    1, and most of them flushed to zero in e5m2). Here (65,536, 32,800) bf16, 2.15e9 elements, whose largest value
    sits in the last row, past element 2^31."""
    x = torch.zeros(65536, 32800, dtype=torch.bfloat16, device="cuda")
    x[0, 0], x[-1, -1] = 1.0, -3.0
    out = torch.zeros(1, device="cuda")
    amax(out, x)
    assert out.item() == 3.0


@pytest.mark.parametrize("fmt", FMTS)
def test_delayed_scales_follow_the_amax_history(device, fmt):
    """update_scales against a history kept here in Python: 37 tensors (more than a block), H = 4, five updates in
    which each tensor was cast (a random amax) or not (0: its history stays). Each scale must be what
    scale_from_amax gives for the history's largest amax, and the amax slots zeroed."""
    n, H, stride = 37, 4, 8
    g = torch.Generator().manual_seed(5)
    history = torch.zeros(n, H, device=device)
    amax_now, scale, inverse = (torch.full((n, stride), -7.0, device=device) for _ in range(3))
    expected = [[0.0] * H for _ in range(n)]
    for update in range(5):
        values = torch.rand(n, generator=g) * 10.0 ** torch.randint(-6, 3, (n,), generator=g)
        values[torch.rand(n, generator=g) < 0.3] = 0.0
        amax_now[:, 0] = values.to(device)
        update_scales(history, amax_now, scale, inverse, fmt)
        for i, value in enumerate(values.tolist()):
            if value > 0:
                expected[i] = [value] + expected[i][:-1]
        assert torch.equal(history.cpu(), torch.tensor(expected))
        assert (amax_now[:, 0] == 0).all() and (amax_now[:, 1:] == -7).all()  # only column 0 is touched
        for i in range(n):
            one_scale, one_inverse = torch.zeros(1, device=device), torch.zeros(1, device=device)
            scale_from_amax(one_scale, one_inverse, torch.tensor([max(expected[i])], device=device), fmt)
            assert scale[i, 0].item() == one_scale.item() and inverse[i, 0].item() == one_inverse.item()


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", [(300, 129), (64, 2304), (1, 5)])
def test_transpose_of_an_fp8_copy_is_exact(device, fmt, shape):
    """transpose against torch's .t() of the same bytes: every one of the 256 bit patterns (NaN included) at random
    positions; shapes that are not multiples of the 128-byte tile, one as wide as GPT-2 d12's qkv, and a single
    row. The output starts as other bytes, so an element left unwritten fails."""
    g = torch.Generator().manual_seed(shape[0] * shape[1])
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(FORMATS[fmt][0])
    out = torch.full(shape[::-1], 0x55, dtype=torch.uint8).view(FORMATS[fmt][0]).to(device)
    transpose(out, x.to(device))
    assert torch.equal(out.cpu().view(torch.uint8), x.view(torch.uint8).t())


def test_bad_arguments_are_one_line(device):
    x = torch.zeros(4, 8, device=device)
    scale = torch.ones(1, device=device)
    with pytest.raises(ValueError, match="float8_e4m3fn or float8_e5m2 of shape"):
        cast(torch.empty(4, 8, device=device), x, scale)
    with pytest.raises(ValueError, match=r"of shape \(8, 4\)"):
        cast(torch.empty(4, 8, device=device).to(torch.float8_e4m3fn), x, scale, transpose=True)
    with pytest.raises(ValueError, match="unit column stride"):
        cast(torch.empty(8, 4, device=device).to(torch.float8_e4m3fn), x.t(), scale)
    x8 = torch.zeros(4, 8, device=device).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="transpose: x must be a contiguous"):
        transpose(torch.empty(4, 8, device=device).to(torch.float8_e4m3fn), x8)
    with pytest.raises(ValueError, match="transpose: x must be a contiguous"):
        transpose(torch.empty(8, 4, device=device).to(torch.float8_e5m2), x8)
