"""A model family's parameters as one table, and everything that follows from it. Family-neutral, NumPy only.

Each family (llmpy/configs/gpt2.py's GPT-2, llmpy/configs/llama3.py) lists its tensors once, in llm.c's file order, with
what the rest of the code needs to know about each: its shape, whether AdamW decays it, its init, and whether its
gradient is written by a matmul's backward. From that table come the flat buffer's layout and views (split_flat),
the ranges AdamW decays (decay_runs: the GPU kernel's segments and the NumPy trainer's chunks), the seeded init
(init_flat) and the gradients a step must zero first (those not written by a matmul).
"""

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor."""

    name: str  # llm.c's name: wte, qkvw, ...
    shape: tuple  # matrices (out, in); per-layer tensors lead with L
    decay: bool  # AdamW's weight decay: the matrices and embeddings (2-D per layer), not the biases and norm gains
    init_std: float  # N(0, init_std) at init; 0 for a constant
    init_value: float = 0.0  # the constant, when init_std is 0: 1 for norm gains, 0 for biases
    matmul_grad: bool = False  # the backward's matmul writes its gradient (the first micro-batch need not zero it)


def param_shapes(table):
    """name -> shape, in the table's (the flat buffer's) order."""
    return {spec.name: spec.shape for spec in table}


def split_flat(shapes, flat):
    """Views of a flat buffer holding tensors of these shapes (name -> shape, in order) one after another. NumPy
    arrays and torch tensors alike."""
    total = sum(math.prod(shape) for shape in shapes.values())
    if tuple(flat.shape) != (total,):
        raise ValueError(f"flat buffer has shape {tuple(flat.shape)}, expected ({total},)")
    views, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        views[name] = flat[offset:offset + n].reshape(shape)
        offset += n
    return views


def decay_runs(table):
    """[(start, end, decay)]: the flat buffer cut into runs of adjacent tensors that all get weight decay or all do
    not, covering it in order."""
    runs, offset = [], 0
    for spec in table:
        n = math.prod(spec.shape)
        if runs and runs[-1][2] == spec.decay:
            runs[-1][1] += n
        else:
            runs.append([offset, offset + n, spec.decay])
        offset += n
    return [tuple(run) for run in runs]


def init_flat(table, seed):
    """The seeded init as a flat float32 buffer: the random tensors drawn in table order from one generator, each
    N(0, its init_std); the others their constant."""
    rng = np.random.default_rng(seed)
    flat = np.empty(sum(math.prod(spec.shape) for spec in table), dtype=np.float32)
    views = split_flat(param_shapes(table), flat)
    for spec in table:
        if spec.init_std:
            views[spec.name][...] = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(spec.init_std)
        else:
            views[spec.name][...] = spec.init_value
    return flat
