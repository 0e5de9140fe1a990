"""The training log, llm.c's format: one line per event, `s:STEP key:value ...`, easy to grep and plot.

    s:0 tel:10.987612                                                 validation loss before step 0's update
    s:0 trl:10.991234 lr:0.000300 norm:5.2100 ms:151.2 tok/s:433427   training step 0: loss, lr, grad norm, timing
    s:20 eval:0.2891                                                  HellaSwag accuracy before step 20's update (-h 1)

Steps count from 0, as in llm.c: `s:N tel` and `s:N eval` are measured before step N trains, `s:N trl` is step N's
own loss (with the outlier guard on, also its z-scores zl and zg, and skip:1 when its update was skipped). Losses
carry 6 decimals (llm.c writes 4), enough to see two runs agree to fp32; the accuracy has llm.c's 4. Every line is
flushed at once, so a run that dies still leaves its log. A Logger without a folder logs nothing.

A resumed run (-y 1) from the checkpoint of step S keeps the lines of steps before S, of every kind, and appends
from there: the lines a killed run wrote after its checkpoint are dropped (step S's validation and HellaSwag lines
too, which the resumed run measures again), so the log reads as one run that was never stopped.
"""

import os
import re

from .formats import write_file_atomic

_STEP = re.compile(r"^s:(\d+) ")


class Logger:
    def __init__(self, folder, resume_step=None):
        """Starts DIR/main.log afresh, or keeps its lines of steps before resume_step; folder None: no log."""
        self.file = None
        if not folder:
            return
        path = os.path.join(folder, "main.log")
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.endswith("\n") and (m := _STEP.match(line))
                        and int(m.group(1)) < resume_step]
            write_file_atomic(path, [line.encode() for line in kept])
            self.file = open(path, "a")
        else:
            self.file = open(path, "w")

    def _write(self, line):
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def log_train(self, step, loss, lr, grad_norm, ms, tokens_per_second, zscores=None, skipped=False):
        guard = "" if zscores is None else f" zl:{zscores[0]:.2f} zg:{zscores[1]:.2f}" + (" skip:1" if skipped else "")
        self._write(f"s:{step} trl:{loss:.6f} lr:{lr:.6f} norm:{grad_norm:.4f} ms:{ms:.1f} "
                    f"tok/s:{tokens_per_second:.0f}{guard}")

    def log_val(self, step, loss):
        self._write(f"s:{step} tel:{loss:.6f}")

    def log_eval(self, step, accuracy):
        self._write(f"s:{step} eval:{accuracy:.4f}")

    def close(self):
        if self.file:
            self.file.close()
            self.file = None


def read_main_log(path):
    """A main.log's numbers by field, {field: {step: value}} in step order: "trl", "tel", "lr", "norm", "ms", "tok/s",
    "zl", "zg", "skip" as written here, and "eval" (HellaSwag accuracy) as llm.c writes it. Raises OSError.

    llm.c appends to the log of a resumed run, from its checkpoint's step: a line whose step is lower than the line
    before it drops what the log held from that step on, as the killed run went on past its checkpoint, so the log
    reads as the run that went on (a step logged twice: the last line wins). A last line without its newline is left
    out (a killed run's, or one being written as the log is read), as are values that are not numbers."""
    fields, last_step = {}, 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.endswith("\n") or not (m := _STEP.match(line)):
                continue
            step = int(m.group(1))
            if step < last_step:
                fields = {key: {s: v for s, v in values.items() if s < step} for key, values in fields.items()}
            last_step = step
            for item in line[m.end():].split():
                key, _, text = item.partition(":")
                try:
                    value = float(text)
                except ValueError:
                    continue
                fields.setdefault(key, {})[step] = value
    return {key: dict(sorted(values.items())) for key, values in fields.items() if values}
