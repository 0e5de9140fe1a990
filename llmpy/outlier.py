"""The outlier guard's detector, as llm.c's (llmc/outlier_detector.h): the z-score of each new value against a moving
window of the last 128, from a running sum and sum of squares in float64. Pure Python.

The trainer feeds it every step's loss and grad norm (-sl, -sg) and skips the update of a step whose z-score is above
the threshold. The value enters the window either way, as in llm.c. state() / from_state() carry the window through a
checkpoint, so a resumed run skips exactly the steps the uninterrupted one would.
"""

import math

WINDOW = 128


class OutlierDetector:
    def __init__(self):
        self.values = []  # the window, oldest at self.index once full
        self.index = 0
        self.sum = 0.0
        self.sum_sq = 0.0

    def update(self, value):
        """Adds value to the window; returns its z-score against the window (value included), nan until the window
        is full, 0.0 for a window with no spread."""
        value = float(value)
        if len(self.values) < WINDOW:
            self.values.append(value)
            self.sum += value
            self.sum_sq += value * value
            return math.nan
        old = self.values[self.index]
        self.sum -= old
        self.sum_sq -= old * old
        self.values[self.index] = value
        self.sum += value
        self.sum_sq += value * value
        self.index = (self.index + 1) % WINDOW
        mean = self.sum / WINDOW
        variance = self.sum_sq / WINDOW - mean * mean
        std = math.sqrt(variance) if variance > 0 else 0.0
        return 0.0 if std == 0.0 else (value - mean) / std

    def state(self):
        """A JSON-able dict; floats survive JSON exactly (Python writes the shortest repr that reads back the same)."""
        return {"values": list(self.values), "index": self.index, "sum": self.sum, "sum_sq": self.sum_sq}

    @classmethod
    def from_state(cls, state):
        detector = cls()
        detector.values = [float(v) for v in state["values"]]
        detector.index, detector.sum, detector.sum_sq = int(state["index"]), float(state["sum"]), float(state["sum_sq"])
        return detector


class OutlierGuard:
    """-sl / -sg: skip the update of a step whose loss or grad norm z-score is above a threshold (0: that check off).
    Both detectors see every step, guarded or not, so the z-scores can be logged either way."""

    def __init__(self, loss_threshold=0.0, grad_threshold=0.0):
        self.loss_threshold, self.grad_threshold = loss_threshold, grad_threshold
        self.loss, self.grad_norm = OutlierDetector(), OutlierDetector()

    @property
    def active(self):
        return self.loss_threshold > 0 or self.grad_threshold > 0

    def check(self, loss, grad_norm):
        """Feeds the step's loss and grad norm; returns (loss z, grad z, why the update is skipped or None)."""
        zl, zg = self.loss.update(loss), self.grad_norm.update(grad_norm)
        reason = None
        if self.loss_threshold > 0 and math.isfinite(zl) and zl > self.loss_threshold:
            reason = f"loss z-score {zl:.2f} > {self.loss_threshold:g} (-sl)"
        elif self.grad_threshold > 0 and math.isfinite(zg) and zg > self.grad_threshold:
            reason = f"grad norm z-score {zg:.2f} > {self.grad_threshold:g} (-sg)"
        return zl, zg, reason

    def state(self):
        return {"loss": self.loss.state(), "grad_norm": self.grad_norm.state()}

    def load_state(self, state):
        self.loss = OutlierDetector.from_state(state["loss"])
        self.grad_norm = OutlierDetector.from_state(state["grad_norm"])
