"""The outlier guard (-sl, -sg): llm.c's detector (llmc/outlier_detector.h) and what the trainer does with it.

The detector's z-score is compared with NumPy's mean and population standard deviation of the last 128 values, the
new one included, computed afresh (the detector keeps running sums: the comparison also catches drift in them).
The trainer is run in this process with the guard's decision replaced by a fixed list of steps to skip, training
one batch over and over (-a 1): a step whose update is skipped leaves the weights as they were, so the next step's
loss equals its own, to the bit; any other step changes it.
"""

import math
import re

import numpy as np
import pytest

import train_gpt2
from llmpy.outlier import WINDOW, OutlierDetector, OutlierGuard
from test_train_gpt2 import base_args, files  # noqa: F401 (files is a fixture)


def test_z_scores_are_those_of_the_last_128_values():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(3.0, 0.1, 300), [9.0], rng.normal(3.0, 0.1, 50)])
    detector = OutlierDetector()
    for i, value in enumerate(values):
        z = detector.update(value)
        if i < WINDOW:
            assert math.isnan(z), "no z-score until the window is full"
            continue
        window = values[i - WINDOW + 1: i + 1]
        expected = (value - window.mean()) / window.std()
        assert z == pytest.approx(expected, rel=1e-9, abs=1e-9), i
    assert OutlierDetector.from_state(detector.state()).update(3.0) == detector.update(3.0)


def test_the_guard_names_the_check_that_skips_and_lets_the_rest_through():
    guard = OutlierGuard(loss_threshold=3.0, grad_threshold=0.0)
    rng = np.random.default_rng(1)
    for _ in range(WINDOW):
        assert guard.check(rng.normal(3.0, 0.1), rng.normal(1.0, 0.1))[2] is None
    zl, zg, reason = guard.check(4.0, 100.0)  # a 10-sigma loss; the grad norm check is off
    assert zl > 3.0 and zg > 3.0 and reason == f"loss z-score {zl:.2f} > 3 (-sl)"
    guard = OutlierGuard(loss_threshold=0.0, grad_threshold=3.0)
    for _ in range(WINDOW):
        guard.check(3.0, rng.normal(1.0, 0.1))
    assert guard.check(3.0, 1.05)[2] is None
    assert guard.check(3.0, 5.0)[2].startswith("grad norm z-score")
    assert not OutlierGuard().active and OutlierGuard(0.0, 2.0).active


def test_the_trainer_skips_exactly_the_updates_the_guard_refuses(files, tmp_path, monkeypatch, capsys):
    skip_steps = {2, 3, 6}  # 0-based steps, as main.log counts them
    calls = []

    def check(self, loss, grad_norm):
        step = len(calls)
        calls.append(step)
        return 0.5, 0.25, "told to" if step in skip_steps else None

    monkeypatch.setattr(OutlierGuard, "check", check)
    log_dir = tmp_path / "log"
    train_gpt2.main([*map(str, base_args(files)), "-a", "1", "-l", "1e-3", "-x", "8", "-v", "0", "-s", "0",
                     "-sl", "4", "-o", str(log_dir)])
    out = capsys.readouterr().out
    lines = [line.split() for line in (log_dir / "main.log").read_text().splitlines()]
    losses = [float(fields[1][4:]) for fields in lines]
    skipped = [i for i, fields in enumerate(lines) if "skip:1" in fields]
    assert skipped == sorted(skip_steps)
    assert all("zl:0.50" in fields and "zg:0.25" in fields for fields in lines)
    for step in range(7):
        if step in skip_steps:
            assert losses[step + 1] == losses[step], f"step {step}'s update was skipped: the weights stayed"
        else:
            assert losses[step + 1] < losses[step], f"step {step} updated"
    assert len(re.findall(r"^step \d+: update skipped, told to$", out, re.M)) == 3
