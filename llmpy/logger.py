"""The training log, llm.c's format: one line per event, `s:STEP key:value ...`, easy to grep and plot.

    s:0 tel:10.9876                                                 validation loss before step 0's update
    s:0 trl:10.9912 lr:0.000300 norm:5.21 ms:151.2 tok/s:433427     training step 0: loss, lr, grad norm, timing

Steps count from 0, as in llm.c: `s:N tel` is measured before step N trains, `s:N trl` is step N's own loss.
Every line is flushed at once, so a run that dies still leaves its log. A Logger without a folder logs nothing.
"""

import os


class Logger:
    def __init__(self, folder):
        """Starts DIR/main.log afresh (creating DIR); folder None: no log."""
        self.file = None
        if folder:
            os.makedirs(folder, exist_ok=True)
            self.file = open(os.path.join(folder, "main.log"), "w")

    def _write(self, line):
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def log_train(self, step, loss, lr, grad_norm, ms, tokens_per_second):
        self._write(f"s:{step} trl:{loss:.4f} lr:{lr:.6f} norm:{grad_norm:.4f} ms:{ms:.1f} tok/s:{tokens_per_second:.0f}")

    def log_val(self, step, loss):
        self._write(f"s:{step} tel:{loss:.4f}")

    def close(self):
        if self.file:
            self.file.close()
            self.file = None
