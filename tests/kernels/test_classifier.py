"""The fused classifier (llmpy/kernels/classifier.py) against torch's cross-entropy and its autograd gradient.

The reference takes the real columns logits[:, :V] (the same values the kernel reads, upcast to float64), computes
F.cross_entropy(reduction="none") per row and, by autograd, the gradient of dloss * sum(losses) with respect to the
logits; the padded columns' gradient is 0. The padded columns are filled with garbage (huge values, +inf, NaN) that
must not reach either result.

Tolerances:
- losses: all math is fp32 on the logits' values, so fp32 rounding only: rtol = atol = 1e-5 (losses are O(5)),
  for bf16 logits too (the reference sees the same bf16 values).
- dlogits, fp32: (softmax - onehot) * dloss in fp32: atol = 1e-6 * dloss on entries of size <= dloss, rtol 1e-5.
- dlogits, bf16: the result is rounded to bf16 (relative 2^-8 at worst, 2^-9 on average when rounding to nearest;
  Triton's interpreter truncates, up to 2^-7): ||got - ref|| / ||ref|| <= 1e-2, and the padded columns exactly 0.
Sizes: V = 300 and Vp = 384 span three of the interpreter's 128-column blocks, the last one partly padding.
"""

import pytest
import torch
import torch.nn.functional as F

from llmpy.kernels.classifier import fused_classifier

N, V, VP = 6, 300, 384


def make_logits(dtype, device, seed, scale=3.0, offset=0.0):
    """Random logits (N, VP) with garbage in the padded columns, and random targets, seeded."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, VP, generator=generator) * scale + offset
    logits[:, V:] = 1e4  # would dominate the softmax if the padding were read
    logits[0, V] = float("inf")
    logits[1, V + 1] = float("nan")
    targets = torch.randint(0, V, (N,), generator=generator, dtype=torch.int32)
    targets[0] = V - 1  # the last real column, in the block that also holds padding
    return logits.to(dtype=dtype, device=device), targets.to(device)


def reference(logits, targets, dloss):
    """float64 cross-entropy per row over the real columns, and dloss * d(sum of losses)/d(logits), padding 0."""
    real = logits[:, :V].double().requires_grad_(True)
    losses = F.cross_entropy(real, targets.long(), reduction="none")
    (losses.sum() * dloss).backward()
    dlogits = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    dlogits[:, :V] = real.grad
    return losses.detach(), dlogits


def run_classifier(logits, targets, dloss, write_dlogits=True):
    """The kernel on a copy of logits, with losses poisoned with NaN so an unwritten row fails."""
    result = logits.clone()
    losses = torch.full((N,), float("nan"), dtype=torch.float32, device=logits.device)
    fused_classifier(result, losses, targets, V, dloss, write_dlogits=write_dlogits)
    return losses, result


def test_float32_losses_and_dlogits(device):
    dloss = 1.0 / (N * 4)  # a mean over N rows and 4 accumulation steps
    logits, targets = make_logits(torch.float32, device, seed=0)
    losses, dlogits = run_classifier(logits, targets, dloss)
    ref_losses, ref_dlogits = reference(logits, targets, dloss)
    torch.testing.assert_close(losses.double(), ref_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dlogits.double(), ref_dlogits, rtol=1e-5, atol=1e-6 * dloss)
    assert torch.all(dlogits[:, V:] == 0)


def test_bfloat16_losses_and_dlogits(device):
    dloss = 1.0 / N
    logits, targets = make_logits(torch.bfloat16, device, seed=1)
    losses, dlogits = run_classifier(logits, targets, dloss)
    ref_losses, ref_dlogits = reference(logits, targets, dloss)
    assert dlogits.dtype == torch.bfloat16
    torch.testing.assert_close(losses.double(), ref_losses, rtol=1e-5, atol=1e-5)
    error = ((dlogits.double() - ref_dlogits).norm() / ref_dlogits.norm()).item()
    assert error <= 1e-2, f"dlogits relative error {error:.2e}"
    assert torch.all(dlogits[:, V:] == 0)


def test_large_logits_do_not_overflow(device):
    """Logits around 1000: exp overflows fp32 unless the row max is subtracted first."""
    dloss = 0.5
    logits, targets = make_logits(torch.float32, device, seed=2, offset=1000.0)
    losses, dlogits = run_classifier(logits, targets, dloss)
    ref_losses, ref_dlogits = reference(logits, targets, dloss)
    torch.testing.assert_close(losses.double(), ref_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dlogits.double(), ref_dlogits, rtol=1e-5, atol=1e-6 * dloss)


def test_without_dlogits_only_losses_are_written(device):
    logits, targets = make_logits(torch.bfloat16, device, seed=3)
    losses, untouched = run_classifier(logits, targets, dloss=1.0, write_dlogits=False)
    ref_losses, _ = reference(logits, targets, 1.0)
    torch.testing.assert_close(losses.double(), ref_losses, rtol=1e-5, atol=1e-5)
    assert torch.equal(untouched.view(torch.int16), logits.view(torch.int16))  # bit for bit, NaN included


def test_target_outside_vocab_gives_nan_loss(device):
    """An out-of-range target is not read out of bounds: its row's loss is NaN, the other rows are unaffected."""
    logits, targets = make_logits(torch.float32, device, seed=4)
    targets[2] = V  # a padded column, not a token
    targets[3] = -1
    losses, _ = run_classifier(logits, targets, dloss=1.0, write_dlogits=False)
    assert torch.isnan(losses[2]) and torch.isnan(losses[3])
    good = [0, 1, 4, 5]
    ref_losses, _ = reference(logits[good], targets[good], 1.0)
    torch.testing.assert_close(losses[good].double(), ref_losses, rtol=1e-5, atol=1e-5)


def test_rejects_mismatched_losses(device):
    logits, targets = make_logits(torch.float32, device, seed=5)
    losses = torch.empty(N, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="losses must be"):
        fused_classifier(logits, losses, targets, V, 1.0)


def test_fp8_output_is_the_cast_of_dlogits(device):
    """fp8_out (--precision fp8 with the LM head's gradients in FP8: the classifier writes dlogits in e5m2 itself):
    out8 must hold, bit for bit, what fp8.cast writes for the classifier's own bf16 dlogits at the same scale (2^20:
    the target columns' values, near -dloss = -1/6, saturate at -57344; the padded columns are 0), the amax must be
    max |dlogits| maxed into its start value, the losses must be those without fp8_out, and the logits must be left as
    they were."""
    from llmpy.kernels.fp8 import cast

    dloss = 1.0 / N
    logits, targets = make_logits(torch.bfloat16, device, seed=5)
    expected_losses, expected = run_classifier(logits, targets, dloss)
    out8 = torch.full((N, VP), 0x55, dtype=torch.uint8).view(torch.float8_e5m2).to(device)
    scale, amax = torch.tensor([2.0**20], device=device), torch.tensor([1e-3], device=device)
    result, losses = logits.clone(), torch.full((N,), float("nan"), device=device)
    fused_classifier(result, losses, targets, V, dloss, fp8_out=(out8, scale, amax))
    cast_of_dlogits = torch.empty((N, VP), dtype=torch.float8_e5m2, device=device)
    cast(cast_of_dlogits, expected, scale)
    assert torch.equal(out8.view(torch.uint8), cast_of_dlogits.view(torch.uint8))
    assert (expected.float() * scale.item() < -57344).any()
    assert amax.item() == expected.float().abs().max().item()
    torch.testing.assert_close(losses, expected_losses, rtol=0, atol=0)
    assert torch.equal(result.view(torch.int16), logits.view(torch.int16))
