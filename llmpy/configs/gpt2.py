"""GPT-2 configuration and the parameter layout shared by every trainer and file.

The parameters of a GPT-2 model live in one flat array, in llm.c's order (the model file's, llmpy/formats.py).
Each tensor is a view into that array, so the optimizer, the gradient norm and the
file readers and writers all work on a single buffer. This module is NumPy-only and
the views work the same for NumPy arrays and torch tensors (both slice and reshape).
"""

import math
import re
from dataclasses import dataclass

from .. import params
from ..params import ParamSpec

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
# GPT-3's sizes as llm.c names them (gpt3:cC, by channels; the GPT-3 paper's table): channels -> (layers, head size).
# llm.c's table also lists c5140 for the 13B model, which its own check refuses (5140 is not a multiple of 128).
# The same architecture as GPT-2 (dense attention everywhere, not GPT-3's alternating banded layers) with 2048
# positions.
GPT3_SIZES = {384: (6, 64), 768: (12, 64), 1024: (24, 64), 1536: (24, 96), 2048: (24, 128), 2560: (32, 80),
              4096: (32, 128), 12288: (96, 128)}
GPT3_MAX_SEQ_LEN = 2048
# short names for test configs
_ALIASES = {"tiny": "d2c64h4"}
DESCRIPTORS_HELP = "d12, d24, d36, d48 (GPT-2), gpt3:c768 ... gpt3:c12288 (GPT-3), tiny, or dLcChH like d2c64h4"


def _descriptor_match(descriptor):
    desc = _ALIASES.get(descriptor, descriptor)
    m = re.fullmatch(r"(?:gpt2:)?d(\d+)(?:c(\d+)h(\d+))?|gpt3:c(?P<gpt3>\d+)", desc)
    if m is None or (m.group(1) is not None and m.group(2) is None and int(m.group(1)) not in _GPT2_SIZES):
        return None
    return m


def is_descriptor(text):
    """Whether text has a descriptor's form (d12, gpt2:d12, gpt3:c768, tiny, dLcChH), whatever its numbers: the
    trainers take a model file or a descriptor in one flag, and a well-formed descriptor's error should be about its
    numbers."""
    return _descriptor_match(text) is not None


def config_from_descriptor(descriptor):
    """'d12', 'd24', 'd36', 'd48' (GPT-2 124M..1.5B; also as llm.c's 'gpt2:d12'), 'gpt3:c768' and the rest of
    GPT3_SIZES, or 'dLcChH' (e.g. 'd2c64h4', alias 'tiny'). ValueError, one line: what the descriptors look like, or
    for a well-formed one what is wrong with its numbers."""
    m = _descriptor_match(descriptor)
    if m is None:
        raise ValueError(f"unknown model descriptor {descriptor!r}: use {DESCRIPTORS_HELP}")
    if m.group("gpt3") is not None:
        channels = int(m.group("gpt3"))
        if channels not in GPT3_SIZES:
            raise ValueError(f"model descriptor {descriptor!r}: GPT-3's sizes are gpt3:c"
                             + ", gpt3:c".join(map(str, GPT3_SIZES)))
        layers, head_size = GPT3_SIZES[channels]
        return GPT2Config(max_seq_len=GPT3_MAX_SEQ_LEN, num_layers=layers, num_heads=channels // head_size,
                          channels=channels)
    layers = int(m.group(1))
    channels, heads = (int(m.group(2)), int(m.group(3))) if m.group(2) else _GPT2_SIZES[layers]
    if layers < 1 or channels < 1 or heads < 1:
        raise ValueError(f"model descriptor {descriptor!r}: layers, channels and heads must be positive")
    if channels % heads:
        raise ValueError(f"model descriptor {descriptor!r}: {channels} channels are not divisible by {heads} heads")
    return GPT2Config(num_layers=layers, num_heads=heads, channels=channels)


def descriptor_of(config):
    """The name of a config: GPT-2's (d12 ...) or GPT-3's (gpt3:c768 ...) for one of their sizes, else dLcChH."""
    for descriptor in [*(f"d{layers}" for layers in _GPT2_SIZES), *(f"gpt3:c{c}" for c in GPT3_SIZES)]:
        if config_from_descriptor(descriptor) == config:
            return descriptor
    return f"d{config.num_layers}c{config.channels}h{config.num_heads}"


def param_table(config):
    """GPT-2's parameters in llm.c's file order (llmpy.params.ParamSpec): the matrices and embeddings N(0, 0.02) and
    decayed, the residual projections (attprojw, fcprojw) N(0, 0.02/sqrt(2L)) so that the residual stream's variance
    does not grow with depth, biases 0, layernorm gains 1. Weight matrices are (out, in)."""
    Vp, C, L, maxT = config.padded_vocab_size, config.channels, config.num_layers, config.max_seq_len
    std, residual_std = 0.02, 0.02 / math.sqrt(2 * L)

    def matrix(name, shape, init_std=std):  # a matmul's weight: decayed, its gradient written by the matmul
        return ParamSpec(name, shape, decay=True, init_std=init_std, matmul_grad=True)

    def vector(name, shape, init_value=0.0):  # a bias or a layernorm's gain
        return ParamSpec(name, shape, decay=False, init_std=0.0, init_value=init_value)

    return [
        matrix("wte", (Vp, C)),  # token embedding, also the LM head (tied); rows >= V are zero
        ParamSpec("wpe", (maxT, C), decay=True, init_std=std),  # position embedding: its gradient is the encoder's
        vector("ln1w", (L, C), 1.0), vector("ln1b", (L, C)),
        matrix("qkvw", (L, 3 * C, C)), vector("qkvb", (L, 3 * C)),
        matrix("attprojw", (L, C, C), residual_std), vector("attprojb", (L, C)),
        vector("ln2w", (L, C), 1.0), vector("ln2b", (L, C)),
        matrix("fcw", (L, 4 * C, C)), vector("fcb", (L, 4 * C)),
        matrix("fcprojw", (L, C, 4 * C), residual_std), vector("fcprojb", (L, C)),
        vector("lnfw", (C,), 1.0), vector("lnfb", (C,)),
    ]


def param_shapes(config):
    """The parameter tensors in llm.c's file order, name -> shape."""
    return params.param_shapes(param_table(config))


def num_parameters(config):
    """Total parameter count, with the padded vocab (124,475,904 for d12)."""
    return sum(math.prod(s) for s in param_shapes(config).values())


def split_params(config, flat):
    """Views of a flat parameter (or gradient) buffer, name -> tensor of param_shapes' shape."""
    return params.split_flat(param_shapes(config), flat)


def decayed_param_names():
    """The tensors that get weight decay (the same names at every size)."""
    return tuple(spec.name for spec in param_table(GPT2Config()) if spec.decay)


# llm.c names its files by parameter count: gpt2_124M.bin, gpt2_124M_debug_state.bin, ...
_FILE_PREFIXES = {"d12": "gpt2_124M", "d24": "gpt2_350M", "d36": "gpt2_774M", "d48": "gpt2_1558M"}


def file_prefix(descriptor):
    """The name stem of the files written for a model descriptor: 'd12' -> 'gpt2_124M', 'tiny' -> 'gpt2_tiny',
    'gpt3:c768' -> 'gpt3_c768'."""
    descriptor = descriptor.removeprefix("gpt2:")
    if descriptor.startswith("gpt3:"):
        return descriptor.replace(":", "_")
    return _FILE_PREFIXES.get(descriptor, f"gpt2_{descriptor}")


def gpt2_init(config, seed):
    """GPT-2's seeded initialisation as a flat float32 buffer (param_table's inits), wte's padding rows 0."""
    flat = params.init_flat(param_table(config), seed)
    split_params(config, flat)["wte"][config.vocab_size:] = 0
    return flat
