"""llmpy.schedule.lr_at: the learning rate at chosen steps, against values worked out by hand.

One run for every kind: peak lr 1.0, 10 warmup steps, 105 steps (0..104), final_frac 0.1 (min lr 0.1).
- warmup: step s < 10 runs at (s + 1) / 10; step 9, the last warmup step, at the peak 1.0.
- cosine and linear decay from step 10 (1.0) to step 104 (0.1): 94 steps, so step 57 is halfway (0.55 for both).
- wsd is flat until the last 20% of the steps (21 of 105: steps 84..104), then follows 0.1 + 0.9 * (1 - sqrt(p))
  with p from 0 at step 84 to 1 at step 104: p = 1/4 at step 89, where the rate is 0.1 + 0.9 * 0.5 = 0.55.
Exact arithmetic up to float rounding: compared with rel=1e-12.
"""

import math

import pytest

from llmpy.schedule import SCHEDULES, lr_at

RUN = dict(max_steps=105, lr=1.0, warmup=10, final_frac=0.1)

EXPECTED = {  # kind -> {step: lr}
    "constant": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 57: 1.0, 104: 1.0},
    "linear": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 57: 0.55, 104: 0.1},
    "cosine": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 57: 0.55, 104: 0.1},
    "wsd": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 57: 1.0, 83: 1.0, 84: 1.0, 89: 0.55, 104: 0.1},
}


@pytest.mark.parametrize("kind", SCHEDULES)
def test_values_at_warmup_midpoint_and_end(kind):
    for step, expected in EXPECTED[kind].items():
        assert lr_at(step, kind=kind, **RUN) == pytest.approx(expected, rel=1e-12), f"{kind} step {step}"


def test_cosine_is_above_linear_a_quarter_through_the_decay():
    run = {**RUN, "max_steps": 51}  # decay over steps 10..50, 40 steps: step 20 is a quarter through
    assert lr_at(20, kind="cosine", **run) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert lr_at(20, kind="linear", **run) == pytest.approx(1.0 - 0.9 / 4, rel=1e-12)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_never_increases_after_warmup_and_stays_within_bounds(kind):
    rates = [lr_at(s, kind=kind, **RUN) for s in range(10, 105)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert min(rates) >= 0.1 - 1e-12 and max(rates) <= 1.0


@pytest.mark.parametrize("kind", SCHEDULES)
def test_final_frac_one_is_constant_after_warmup(kind):
    assert {lr_at(s, kind=kind, **{**RUN, "final_frac": 1.0}) for s in range(9, 105)} == {1.0}


@pytest.mark.parametrize("kind", SCHEDULES)
def test_no_warmup_starts_at_the_peak(kind):
    assert lr_at(0, kind=kind, **{**RUN, "warmup": 0}) == 1.0


def test_steps_past_the_end_stay_at_the_minimum():
    assert lr_at(200, kind="cosine", **RUN) == pytest.approx(0.1, rel=1e-12)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="cosine, linear, constant, wsd"):
        lr_at(0, kind="step", **RUN)
