"""GPT-2 configuration and the parameter layout shared by every trainer and file.

The parameters of a GPT-2 model live in one flat array, in llm.c's order (the model file's, llmpy/formats.py).
Each tensor is a view into that array, so the optimizer, the gradient norm and the
file readers and writers all work on a single buffer. This module is NumPy-only and
the views work the same for NumPy arrays and torch tensors (both slice and reshape).
"""

import math
import re
from dataclasses import dataclass

import numpy as np

GPT2_VOCAB_SIZE = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
GPT2_EOT = 50256


def pad_vocab(vocab_size, multiple=128):
    """The vocab rounded up to a multiple of 128 (50257 -> 50304): matmul-friendly shapes."""
    return (vocab_size + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class GPT2Config:
    max_seq_len: int = 1024  # maxT: rows of the position embedding
    vocab_size: int = GPT2_VOCAB_SIZE  # V: tokens the model can emit
    padded_vocab_size: int = pad_vocab(GPT2_VOCAB_SIZE)  # Vp: rows of wte
    num_layers: int = 12  # L
    num_heads: int = 12  # NH
    channels: int = 768  # C

    def __post_init__(self):
        if self.channels % self.num_heads:
            raise ValueError(f"channels ({self.channels}) must be divisible by num_heads ({self.num_heads})")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size ({self.padded_vocab_size}) < vocab_size ({self.vocab_size})")


# GPT-2's published sizes: layers -> (channels, heads)
_GPT2_SIZES = {12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25)}
# short names for test configs
_ALIASES = {"tiny": "d2c64h4"}


def _descriptor_match(descriptor):
    desc = _ALIASES.get(descriptor, descriptor)
    m = re.fullmatch(r"d(\d+)(?:c(\d+)h(\d+))?", desc)
    return None if m is None or (m.group(2) is None and int(m.group(1)) not in _GPT2_SIZES) else m


def is_descriptor(text):
    """Whether text has a descriptor's form (d12, tiny, dLcChH), whatever its numbers: the trainers take a model
    file or a descriptor in one flag, and a well-formed descriptor's error should be about its numbers."""
    return _descriptor_match(text) is not None


def config_from_descriptor(descriptor):
    """'d12', 'd24', 'd36', 'd48' (GPT-2 124M..1.5B) or 'dLcChH' (e.g. 'd2c64h4', alias 'tiny'). ValueError, one
    line: what the descriptors look like, or for a well-formed one what is wrong with its numbers."""
    m = _descriptor_match(descriptor)
    if m is None:
        raise ValueError(f"unknown model descriptor {descriptor!r}: use d12, d24, d36, d48, tiny, or dLcChH like d2c64h4")
    layers = int(m.group(1))
    channels, heads = (int(m.group(2)), int(m.group(3))) if m.group(2) else _GPT2_SIZES[layers]
    if layers < 1 or channels < 1 or heads < 1:
        raise ValueError(f"model descriptor {descriptor!r}: layers, channels and heads must be positive")
    if channels % heads:
        raise ValueError(f"model descriptor {descriptor!r}: {channels} channels are not divisible by {heads} heads")
    return GPT2Config(num_layers=layers, num_heads=heads, channels=channels)


def param_shapes(config):
    """The parameter tensors in llm.c's file order, name -> shape. Weight matrices are (out, in)."""
    Vp, C, L, maxT = config.padded_vocab_size, config.channels, config.num_layers, config.max_seq_len
    return {
        "wte": (Vp, C),  # token embedding, also the LM head (tied); rows >= V are zero
        "wpe": (maxT, C),  # position embedding
        "ln1w": (L, C),
        "ln1b": (L, C),
        "qkvw": (L, 3 * C, C),
        "qkvb": (L, 3 * C),
        "attprojw": (L, C, C),
        "attprojb": (L, C),
        "ln2w": (L, C),
        "ln2b": (L, C),
        "fcw": (L, 4 * C, C),
        "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C),
        "fcprojb": (L, C),
        "lnfw": (C,),
        "lnfb": (C,),
    }


def num_parameters(config):
    """Total parameter count, with the padded vocab (124,475,904 for d12)."""
    return sum(math.prod(s) for s in param_shapes(config).values())


def split_params(config, flat):
    """Views of a flat parameter (or gradient) buffer, name -> tensor of param_shapes' shape."""
    return split_flat(param_shapes(config), flat)


def split_flat(shapes, flat):
    """Views of a flat buffer holding tensors of these shapes (name -> shape, in order) one after another, for any
    model family's parameter table. NumPy arrays and torch tensors alike."""
    total = sum(math.prod(shape) for shape in shapes.values())
    if tuple(flat.shape) != (total,):
        raise ValueError(f"flat buffer has shape {tuple(flat.shape)}, expected ({total},)")
    views, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        views[name] = flat[offset:offset + n].reshape(shape)
        offset += n
    return views


def decayed_param_names():
    """The tensors that are 2-D per layer (embeddings and matmul weights): only these get weight decay."""
    return ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw")


# llm.c names its files by parameter count: gpt2_124M.bin, gpt2_124M_debug_state.bin, ...
_FILE_PREFIXES = {"d12": "gpt2_124M", "d24": "gpt2_350M", "d36": "gpt2_774M", "d48": "gpt2_1558M"}


def file_prefix(descriptor):
    """The name stem of the files written for a model descriptor: 'd12' -> 'gpt2_124M', 'tiny' -> 'gpt2_tiny'."""
    return _FILE_PREFIXES.get(descriptor, f"gpt2_{descriptor}")


def gpt2_init(config, seed):
    """GPT-2's initialisation as a flat float32 buffer, seeded: weights and embeddings N(0, 0.02), the residual
    projections (attprojw, fcprojw) N(0, 0.02/sqrt(2L)) so the residual stream's variance does not grow with depth,
    biases 0, layernorm weights 1 and biases 0, wte's padding rows 0."""
    rng = np.random.default_rng(seed)
    flat = np.zeros(num_parameters(config), dtype=np.float32)
    views = split_params(config, flat)
    residual_std = 0.02 / math.sqrt(2 * config.num_layers)
    for name in decayed_param_names():
        std = residual_std if name in ("attprojw", "fcprojw") else 0.02
        views[name][...] = rng.standard_normal(views[name].shape, dtype=np.float32) * np.float32(std)
    views["wte"][config.vocab_size:] = 0
    for name in ("ln1w", "ln2w", "lnfw"):
        views[name][...] = 1
    return flat
