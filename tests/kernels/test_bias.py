"""bias_backward (dbias += column sums of dout) against a float64 torch sum, and its determinism; PartialSums (stage 2
of many sums in one launch) against float64 sums; value_bias_backward (a vector times a matrix per layer) against a
float64 product.

dbias starts from random values and must end at dbias + dout.sum(0). Tolerance: the kernel sums N values per column
in fp32 (per-lane running sums, then fixed trees), so its rounding error is a few times N * 2^-24 * sum|dout| at
worst and ~sqrt(N) * 2^-24 * |dout| typically; rtol 1e-5 with atol 1e-5 (for columns whose sum is near zero; N <= 100
values of size ~1 give sums ~10) leaves a wide margin and still catches a dropped or doubled row (error ~1).
bf16 dout is exact in fp32, so the same tolerance holds against the float64 sum of the bf16 values.
"""

import pytest
import torch

from llmpy.kernels.bias import PartialSums, bias_backward, bias_backward_scratch, sum_partials, value_bias_backward

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def random_inputs(N, OC, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    dout = torch.randn(N, OC, generator=generator).to(device=device, dtype=dtype)
    dbias = torch.randn(OC, generator=generator).to(device)
    return dout, dbias


# OC: a power of two, a non-power of two smaller than a column block, and 4 * 768 (12 column blocks of 256)
# N: not a multiple of the row tile
@pytest.mark.parametrize("N, OC", [(70, 64), (37, 80), (9, 3072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adds_column_sums(device, N, OC, dtype):
    dout, dbias = random_inputs(N, OC, dtype, device, seed=N)
    expected = dbias.double() + dout.double().sum(0)
    scratch = bias_backward_scratch(N, OC, device).fill_(float("nan"))

    bias_backward(dbias, dout, scratch)

    torch.testing.assert_close(dbias.double(), expected, **TOLERANCE)


def test_rows_may_be_strided(device):
    """dout may be a column slice of a wider matrix (the k part of dqkv): only those columns are summed."""
    N, C = 37, 80
    wide, dbias = random_inputs(N, 3 * C, torch.bfloat16, device, seed=11)
    dbias = dbias[:C].clone()
    dout = wide[:, C:2 * C]  # rows 3C apart
    expected = dbias.double() + dout.double().sum(0)

    bias_backward(dbias, dout, bias_backward_scratch(N, C, device).fill_(float("nan")))

    torch.testing.assert_close(dbias.double(), expected, **TOLERANCE)


@pytest.mark.parametrize("C", [64, 80, 160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_bias_backward_is_the_vector_times_the_matrix(device, C, dtype):
    """value_bias_backward: out[l] = vectors[l] @ matrices[l] for each layer, written into the v part of an (L, 3C)
    buffer (rows 3C apart, poisoned with NaN), its other columns untouched. The kernel walks 32 rows by 128 columns:
    C = 80 and 160 end in a partial column block, C = 80 in a partial row block too. Each output sums C <= 160
    products of O(1) values (sums ~10) in fp32, rounding ~1e-5 at worst: rtol 1e-5 with atol 1e-5."""
    L = 3
    generator = torch.Generator().manual_seed(C)
    vectors = torch.randn(L, C, generator=generator).to(device)
    matrices = torch.randn(L, C, C, generator=generator).to(device=device, dtype=dtype)
    out = torch.randn(L, 3 * C, generator=generator).to(device)
    out[:, 2 * C:] = float("nan")
    before = out.clone()

    value_bias_backward(out[:, 2 * C:], vectors, matrices)

    expected = torch.einsum("li,lij->lj", vectors.double(), matrices.double())
    torch.testing.assert_close(out[:, 2 * C:].double(), expected, **TOLERANCE)
    assert torch.equal(out[:, :2 * C], before[:, :2 * C])


def test_sum_partials_adds_up_to_three_sums_in_one_launch(device):
    """sum_partials with a list of K outputs and (K, G, C) partials: out[k] += partials[k].sum(0), each k its own."""
    G, C = 70, 80
    generator = torch.Generator().manual_seed(5)
    partials = torch.randn(3, G, C, generator=generator).to(device)
    outs = [torch.randn(C, generator=generator).to(device) for _ in range(3)]
    expected = [o.double() + p.double().sum(0) for o, p in zip(outs, partials)]

    sum_partials(outs, partials)

    for out, want in zip(outs, expected):
        torch.testing.assert_close(out.double(), want, **TOLERANCE)


def test_partial_sums_add_each_slot_into_its_target(device):
    """PartialSums: targets are (C,) slices of one fp32 buffer, at offsets in any order; slot i's partials (G, C)
    summed over G are added into targets[i]. A slot without a target holds NaN and must not be read; the buffer's
    other elements stay as they were. G = 70 crosses the 64-row stage-2 block, C = 80 ends in a partial column block."""
    G, C = 70, 80
    generator = torch.Generator().manual_seed(9)
    out = torch.randn(10 * C, generator=generator).to(device)
    targets = [out[5 * C:6 * C], None, out[C + 3:2 * C + 3], out[:C]]
    sums = PartialSums(out, targets, G, C)
    sums.partials.copy_(torch.randn(len(targets), G, C, generator=generator))
    sums.partials[1] = float("nan")
    expected = out.double().clone()
    for i, start in ((0, 5 * C), (2, C + 3), (3, 0)):
        expected[start:start + C] += sums.partials[i].double().sum(0)

    sums.add_to_targets()

    torch.testing.assert_close(out.double(), expected, **TOLERANCE)


def test_stage_1_only_then_partial_sums_gives_the_sums(device):
    """bias_backward without dbias leaves the partial sums in scratch (a PartialSums's slot); added later, they give
    dbias + dout.sum(0)."""
    N, OC = 70, 80
    dout, dbias = random_inputs(N, OC, torch.bfloat16, device, seed=7)
    expected = dbias.double() + dout.double().sum(0)
    sums = PartialSums(dbias, [dbias], bias_backward_scratch(N, OC, device).shape[0], OC)

    bias_backward(None, dout, sums.partials[0])
    sums.add_to_targets()

    torch.testing.assert_close(dbias.double(), expected, **TOLERANCE)


@pytest.mark.parametrize("groups", [1, 5, 8, 70])
def test_any_number_of_row_groups_gives_the_sums(device, groups):
    """The scratch's G (row groups, partial sums) only sets the order of additions: G = 5 gives ragged groups of 14
    rows, which are not multiples of the row tile; G = 70 gives one row per group."""
    N, OC = 70, 80
    dout, dbias = random_inputs(N, OC, torch.float32, device, seed=groups)
    expected = dbias.double() + dout.double().sum(0)
    scratch = torch.full((groups, OC), float("nan"), device=device)

    bias_backward(dbias, dout, scratch)

    torch.testing.assert_close(dbias.double(), expected, **TOLERANCE)


def test_is_deterministic(device):
    """The same inputs and scratch give the same bits (no atomics)."""
    N, OC = 70, 80
    dout, dbias = random_inputs(N, OC, torch.bfloat16, device, seed=3)
    scratch = bias_backward_scratch(N, OC, device)
    results = []
    for _ in range(2):
        out = dbias.clone()
        bias_backward(out, dout, scratch)
        results.append(out)
    assert torch.equal(results[0], results[1])
