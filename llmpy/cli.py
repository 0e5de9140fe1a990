"""What the programs share on their command lines: a parser whose errors are one line, and the --device flag.

Standard library only at import (torch is imported by pick_device alone), so that the NumPy trainer, which must run
without torch, shares the parser too.
"""

import argparse


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a bad value) are one line, `prog: error: message (see --help)`,
    without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def pick_device(name, flag="--device"):
    """The torch device a flag names: auto (cuda when there is a GPU, else cpu), cpu, cuda or cuda:N. ValueError, one
    line naming the flag, for anything else or a GPU that is not there."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"{flag} {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: no CUDA GPU is available")
    return device
