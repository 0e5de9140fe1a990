"""Learning-rate schedules, as llm.c's schedulers: the rate of each optimizer step. Pure Python.

Every schedule starts with the same linear warmup: step s < warmup runs at lr * (s + 1) / warmup, so the first
step already moves (lr / warmup) and step warmup - 1 reaches the peak lr. After the warmup:

  constant  lr to the end
  linear    a straight line from lr down to lr * final_frac at the last step
  cosine    half a cosine from lr down to lr * final_frac at the last step
  wsd       warmup-stable-decay: lr until the last 20% of the steps, then down to lr * final_frac at the last step
            along 1 - sqrt(progress), the cooldown of Hägele et al. 2024 ("Scaling Laws and Compute-Optimal
            Training Beyond Fixed Training Durations"), also llm.c's. The rate stays high for most of the
            cooldown and falls fast at its end.

Steps count from 0 and the last step is max_steps - 1: the decays reach lr * final_frac exactly there (as in
train_gpt2_torch.py's cosine), so final_frac = 1.0 makes every kind constant after the warmup.
"""

import math

SCHEDULES = ("cosine", "linear", "constant", "wsd")
WSD_DECAY_FRACTION = 0.2  # wsd decays over the last 20% of the steps


def _progress(step, start, max_steps):
    """How far step is through a decay from start to the last step, max_steps - 1: 0.0 at start, 1.0 at the end."""
    return min(1.0, max(0.0, (step - start) / max(1, max_steps - 1 - start)))


def lr_at(step, max_steps, lr, warmup, final_frac, kind):
    """The learning rate of step (0-based) of a run of max_steps steps with peak rate lr."""
    if kind not in SCHEDULES:
        raise ValueError(f"learning-rate schedule must be one of {', '.join(SCHEDULES)}, not {kind!r}")
    if step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * final_frac
    if kind == "constant":
        return lr
    if kind == "linear":
        return lr - (lr - min_lr) * _progress(step, warmup, max_steps)
    if kind == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup, max_steps))) * (lr - min_lr)
    # wsd: the decay starts 20% of the steps before the end, or right after the warmup if that is later
    decay_start = max(warmup, max_steps - round(WSD_DECAY_FRACTION * max_steps))
    if step < decay_start:
        return lr
    return min_lr + (1.0 - math.sqrt(_progress(step, decay_start, max_steps))) * (lr - min_lr)
