"""AdamW kernel against the update written out in torch (fp32) and against torch.optim.AdamW, over several steps.

The model is a small GPT-2 layout (2 layers, C = 16, Vp = 64: 7,760 parameters, not a multiple of the kernel's
1024-element block, with decayed and non-decayed tensors interleaved at offsets that do not fall on block
boundaries). Parameters, gradients and moments are seeded random values (moments too, as mid-training); each of the
4 steps has a new gradient, a new learning rate and a new gradient scale, written into the same device tensors, as a
replayed CUDA graph would see them.
Tolerances: the reference is the same update in float64, so the kernel's fp32 results differ from it by fp32
rounding, a few ulp per operation (~1e-7 relative), compounding over 4 steps; on the GPU fused multiply-adds and
the approximate sqrt/division add a few ulp more. rtol 1e-5 (atol 1e-7 for values near zero) allows that and is
far below the size of any real mistake: a missing weight decay is lr * wd = 1e-3 relative, a wrong bias correction
>= 1e-2. (A float32 torch reference was tried first: torch 2.13's fp32 CPU ops alone, with no Triton involved,
computed this update wrong by up to 4.7e-5 on ~400 elements in 3 processes of 12, while the kernel was right
against float64; so the reference is float64.)
"""

import pytest
import torch

from llmpy.configs.gpt2 import GPT2Config, decayed_param_names, num_parameters, param_table, split_params
from llmpy.kernels.adamw import adamw_update, decay_segments, set_adamw_hparams

CONFIG = GPT2Config(max_seq_len=8, vocab_size=50, padded_vocab_size=64, num_layers=2, num_heads=2, channels=16)
BETA1, BETA2, EPS, WEIGHT_DECAY = 0.9, 0.95, 1e-8, 0.1
STEPS = [(1, 1e-2, 1.0), (2, 3e-2, 0.5), (3, 2e-2, 1.0), (4, 5e-3, 0.25)]  # (t, lr, grad_scale)
TOLERANCE = dict(rtol=1e-5, atol=1e-7)


def decay_mask(device):
    """1.0 on the elements of decayed tensors, 0.0 elsewhere, built from the parameter views (not from segments)."""
    mask = torch.zeros(num_parameters(CONFIG), device=device)
    views = split_params(CONFIG, mask)
    for name in decayed_param_names():
        views[name].fill_(1.0)
    return mask


def reference_step(w, m, v, grad, lr, t, grad_scale, mask):
    """llm.c's AdamW in float64 torch ops; returns new (w, m, v) in float64."""
    w, m, v, grad, mask = w.double(), m.double(), v.double(), grad.double(), mask.double()
    g = grad * grad_scale
    m = BETA1 * m + (1 - BETA1) * g
    v = BETA2 * v + (1 - BETA2) * g * g
    m_hat = m / (1 - BETA1**t)
    v_hat = v / (1 - BETA2**t)
    w = w - lr * (m_hat / (v_hat.sqrt() + EPS) + WEIGHT_DECAY * mask * w)
    return w, m, v


def random_state(device, seed):
    generator = torch.Generator().manual_seed(seed)
    P = num_parameters(CONFIG)
    weights = torch.randn(P, generator=generator)
    m = 0.1 * torch.randn(P, generator=generator)
    v = 0.01 * torch.rand(P, generator=generator) + 1e-4
    grads = [torch.randn(P, generator=generator) for _ in STEPS]
    return weights.to(device), m.to(device), v.to(device), [g.to(device) for g in grads]


def test_decay_segments_cover_exactly_the_decayed_tensors(device):
    segments = decay_segments(param_table(CONFIG), device)
    offsets = torch.arange(num_parameters(CONFIG), device=device)
    from_segments = torch.zeros(num_parameters(CONFIG), device=device)
    for start, end in segments.tolist():
        from_segments[(offsets >= start) & (offsets < end)] = 1.0
    assert segments.dtype == torch.int64
    assert segments.shape == (5, 2)  # wte+wpe (adjacent, merged), qkvw, attprojw, fcw, fcprojw
    assert torch.equal(from_segments, decay_mask(device))


@pytest.mark.parametrize("mixed_precision", [False, True], ids=["fp32_params", "bf16_params_fp32_master"])
def test_steps_match_reference(device, mixed_precision):
    weights, m, v, step_grads = random_state(device, seed=0)
    mask = decay_mask(device)
    expected_w, expected_m, expected_v = weights.clone(), m.clone(), v.clone()
    if mixed_precision:
        master = weights.clone()
        params = torch.full_like(weights, float("nan"), dtype=torch.bfloat16)
    else:
        master, params = None, weights.clone()
    segments = decay_segments(param_table(CONFIG), device)
    hparams = torch.full((3,), float("nan"), device=device)
    grad_scale = torch.full((1,), float("nan"), device=device)

    for (t, lr, scale), grads in zip(STEPS, step_grads):
        set_adamw_hparams(hparams, lr, t, BETA1, BETA2)
        grad_scale.fill_(scale)
        adamw_update(params, master, grads, m, v, hparams, grad_scale, BETA1, BETA2, EPS, WEIGHT_DECAY, segments)
        expected_w, expected_m, expected_v = reference_step(
            expected_w, expected_m, expected_v, grads, lr, t, scale, mask
        )

        torch.testing.assert_close(m.double(), expected_m, **TOLERANCE)
        torch.testing.assert_close(v.double(), expected_v, **TOLERANCE)
        if mixed_precision:
            torch.testing.assert_close(master.double(), expected_w, **TOLERANCE)
            assert torch.equal(params, master.to(torch.bfloat16))  # the master rounded to nearest, every element
        else:
            torch.testing.assert_close(params.double(), expected_w, **TOLERANCE)


def test_fp32_steps_match_torch_optim_adamw(device):
    """An independent reference: torch.optim.AdamW with the decayed tensors in a weight-decay group (torch decays
    w by (1 - lr * wd) before the Adam step, the same decoupled update), gradients pre-scaled by grad_scale."""
    weights, m, v, step_grads = random_state(device, seed=1)
    mask = decay_mask(device).bool()
    decayed, other = torch.nn.Parameter(weights[mask].clone()), torch.nn.Parameter(weights[~mask].clone())
    optimizer = torch.optim.AdamW(
        [dict(params=[decayed], weight_decay=WEIGHT_DECAY), dict(params=[other], weight_decay=0.0)],
        betas=(BETA1, BETA2), eps=EPS, foreach=False,
    )
    for group_param in (decayed, other):  # start torch from the same moments, at step 0
        select = mask if group_param is decayed else ~mask
        optimizer.state[group_param] = dict(
            step=torch.tensor(0.0), exp_avg=m[select].clone(), exp_avg_sq=v[select].clone()
        )
    params = weights.clone()
    segments = decay_segments(param_table(CONFIG), device)
    hparams, grad_scale = torch.empty(3, device=device), torch.empty(1, device=device)

    for (t, lr, scale), grads in zip(STEPS, step_grads):
        set_adamw_hparams(hparams, lr, t, BETA1, BETA2)
        grad_scale.fill_(scale)
        adamw_update(params, None, grads, m, v, hparams, grad_scale, BETA1, BETA2, EPS, WEIGHT_DECAY, segments)
        for group in optimizer.param_groups:
            group["lr"] = lr
        decayed.grad, other.grad = grads[mask] * scale, grads[~mask] * scale
        optimizer.step()

        torch.testing.assert_close(params[mask], decayed.detach(), **TOLERANCE)
        torch.testing.assert_close(params[~mask], other.detach(), **TOLERANCE)


def test_bf16_params_without_master_weights_are_refused(device):
    P = num_parameters(CONFIG)
    params = torch.zeros(P, device=device, dtype=torch.bfloat16)
    buffers = [torch.zeros(P, device=device) for _ in range(3)]
    with pytest.raises(ValueError, match="need fp32 master weights"):
        adamw_update(params, None, *buffers, torch.ones(3, device=device), torch.ones(1, device=device),
                     BETA1, BETA2, EPS, WEIGHT_DECAY, decay_segments(param_table(CONFIG), device))
