"""Llama 3: its configuration, the named sizes, the parameter table in llm.c's file order, the seeded init and the
rotary embedding's tables. NumPy only.

The architecture (Meta's llama3/model.py, llm.c's train_llama3.py): the token embedding, then L pre-norm blocks
    x = x + attn(rmsnorm(x))   grouped-query attention with RoPE on q and k
    x = x + mlp(rmsnorm(x))    SwiGLU: fcprojw @ (silu(fc2w @ x) * (fcw @ x))
then a last RMSNorm and the LM head (a matrix of its own, or wte when tied). No biases anywhere, and no position
embedding: positions enter only through the rotation of q and k.

The parameters in llm.c's order (train_llama3.py's write_tensors); matrices are (out, in), as nn.Linear's:
    wte (V, C) · ln1w (L, C) · qkvw (L, (NH + 2 KV) hs, C) · attprojw (L, C, C) · ln2w (L, C) · fcw (L, H, C) ·
    fc2w (L, H, C) · fcprojw (L, C, H) · lnfw (C,) · lmhead (V, C)
with hs = C / NH the head size and H the SwiGLU width. qkvw's rows are the NH query heads, then the KV key heads,
then the KV value heads, hs rows each. fcw is llm.c's c_fc (Meta's w3, "up"), fc2w its c_fc2 (Meta's w1, the gate
that goes through SiLU). A tied model has no lmhead of its own: its parameters end at lnfw (llm.c's model files
repeat wte in lmhead's place, llmpy/formats.py).
"""

import math
from dataclasses import dataclass

import numpy as np

from .. import params
from ..params import ParamSpec, init_flat, split_flat

LLAMA3_VOCAB_SIZE = 128256  # 128,000 BPE tokens + 256 special tokens; a multiple of 128, so wte has no padding rows
BEGIN_OF_TEXT = 128000  # <|begin_of_text|>: llm.c's Llama 3 data puts it before every document; samples start with it
END_OF_TEXT = 128001  # <|end_of_text|>

# Llama 3.1's RoPE frequency scaling (Meta's apply_scaling, llm.c's too), fixed for the family; llm.c's header has
# only the on/off switch. Wavelengths shorter than 8192/4 positions stay, those longer than 8192/1 are stretched 8x,
# and the band between blends the two.
ROPE_SCALE_FACTOR = 8.0
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192  # Llama 3's pretraining context


@dataclass(frozen=True)
class Llama3Config:
    num_layers: int  # L
    num_heads: int  # NH, query heads
    num_kv_heads: int  # KV key and value heads, each shared by NH / KV query heads (grouped-query attention)
    channels: int  # C
    max_seq_len: int = 8192  # the longest T: rows of the RoPE tables (llm.c's block_size)
    vocab_size: int = LLAMA3_VOCAB_SIZE  # V
    ffn_dim_multiplier: float = 1.0  # scales the SwiGLU width (see ffn_hidden)
    multiple_of: int = 256  # the SwiGLU width is rounded up to a multiple of this
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    rope_theta: float = 500000.0  # RoPE's base: pair i of a head turns by theta^(-2i/hs) radians a position
    use_scaled_rope: bool = True  # Llama 3.1's frequency scaling (the ROPE_* constants)
    tied_embeddings: bool = False  # the LM head is wte (Llama 3.2 1B) or a matrix of its own (Llama 3.1 8B)
    llama_version: tuple = (3, 1)  # the release, (major, minor): llm.c's header slots [14] and [15]

    def __post_init__(self):
        for name in ("num_layers", "num_heads", "num_kv_heads", "channels", "max_seq_len", "vocab_size",
                     "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        if self.channels % self.num_heads:
            raise ValueError(f"channels ({self.channels}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_size % 2:
            raise ValueError(f"the head size {self.head_size} must be even: RoPE turns pairs of channels")

    @property
    def head_size(self):
        return self.channels // self.num_heads

    @property
    def qkv_channels(self):
        """Rows of qkvw: NH query heads, KV key heads, KV value heads."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_size

    @property
    def ffn_hidden(self):
        """H, the SwiGLU width (swiglu_width)."""
        return swiglu_width(self.channels, self.ffn_dim_multiplier, self.multiple_of)


def swiglu_width(channels, ffn_dim_multiplier, multiple_of):
    """The SwiGLU width by Meta's rule: two thirds of 4C (SwiGLU's three matrices cost what GPT-2's two of 4C do),
    scaled by ffn_dim_multiplier, rounded up to multiple_of. 8B: 10922 * 1.3 -> 14198 -> 14336."""
    hidden = int(ffn_dim_multiplier * _two_thirds_of_4c(channels))
    return -(-hidden // multiple_of) * multiple_of


def _two_thirds_of_4c(channels):
    return int(2 * 4 * channels / 3)


def swiglu_rule_for(channels, width):
    """An (ffn_dim_multiplier, multiple_of) for which swiglu_width gives this width, for a model known by its width
    alone (a Hugging Face config's intermediate_size), or None if none does (widths below 2 only). Meta's own pairs
    first, those of DESCRIPTORS (Llama 3.2 1B's 1.5 and 256, 3.1 8B's 1.3 and 1024, tiny's 1.3 and 32), so that
    Meta's models and ours come back as they were; else multiple_of = width and ffn_dim_multiplier = width /
    int(8C/3), whose product falls on the width or one below it, and rounding up to a multiple of the width lands on
    it."""
    if width < 1:
        return None
    pairs = [(d.ffn_dim_multiplier, d.multiple_of) for d in DESCRIPTORS.values()]
    pairs.append((width / _two_thirds_of_4c(channels), width))
    return next((pair for pair in pairs if swiglu_width(channels, *pair) == width), None)


DESCRIPTORS = {
    # Llama 3 in miniature, for tests: grouped queries (2 per KV head), a rounded SwiGLU width (int(1.3 * 170) = 221
    # -> 224) and the real vocab, so it reads Llama 3 token shards
    "tiny": Llama3Config(num_layers=2, num_heads=4, num_kv_heads=2, channels=64, max_seq_len=1024,
                         ffn_dim_multiplier=1.3, multiple_of=32),
    # Meta's published shapes (llama_models' sku_list): 1,235,814,400 and 8,030,261,248 parameters
    "llama3.2-1b": Llama3Config(num_layers=16, num_heads=32, num_kv_heads=8, channels=2048, ffn_dim_multiplier=1.5,
                                multiple_of=256, tied_embeddings=True, llama_version=(3, 2)),
    "llama3.1-8b": Llama3Config(num_layers=32, num_heads=32, num_kv_heads=8, channels=4096, ffn_dim_multiplier=1.3,
                                multiple_of=1024),
}
# llm.c's file names (llama3.1_8B.bin, ...); other descriptors get llama3_<descriptor>
_FILE_PREFIXES = {"llama3.2-1b": "llama3.2_1B", "llama3.1-8b": "llama3.1_8B"}


def config_from_descriptor(descriptor):
    if descriptor not in DESCRIPTORS:
        raise ValueError(f"unknown model descriptor {descriptor!r}: use {', '.join(DESCRIPTORS)}")
    return DESCRIPTORS[descriptor]


def descriptor_of(config):
    """The config's descriptor if it is one of DESCRIPTORS, else its shape, fit for a file name:
    L2-C32-NH4-KV2-H112-V300, with -tied for a tied head."""
    for descriptor, known in DESCRIPTORS.items():
        if known == config:
            return descriptor
    c = config
    return (f"L{c.num_layers}-C{c.channels}-NH{c.num_heads}-KV{c.num_kv_heads}-H{c.ffn_hidden}-V{c.vocab_size}"
            f"{'-tied' if c.tied_embeddings else ''}")


def file_prefix(descriptor):
    """The name stem of the files written for a descriptor: 'llama3.1-8b' -> 'llama3.1_8B', 'tiny' -> 'llama3_tiny'."""
    return _FILE_PREFIXES.get(descriptor, f"llama3_{descriptor}")


def _llmc_table(config):
    """Every tensor of llm.c's files, lmhead included, in their order."""
    L, C, V, H = config.num_layers, config.channels, config.vocab_size, config.ffn_hidden
    # the two projections that add into the residual stream get std / sqrt(2L), as GPT-2's: the stream's variance
    # then does not grow with depth (two additions a layer)
    std, residual_std = 0.02, 0.02 / math.sqrt(2 * L)

    def matrix(name, shape, init_std, matmul_grad=True):
        return ParamSpec(name, shape, decay=True, init_std=init_std, matmul_grad=matmul_grad)

    def gain(name, shape):  # an RMSNorm's weight
        return ParamSpec(name, shape, decay=False, init_std=0.0, init_value=1.0)

    return [
        # the embedding's gradient is written by the LM head's matmul when the head is wte (the encoder's backward
        # then adds to it); untied, only the encoder's backward adds to it, so a step starts it from zero
        matrix("wte", (V, C), std, matmul_grad=config.tied_embeddings),
        gain("ln1w", (L, C)),
        matrix("qkvw", (L, config.qkv_channels, C), std),
        matrix("attprojw", (L, C, C), residual_std),
        gain("ln2w", (L, C)),
        matrix("fcw", (L, H, C), std),
        matrix("fc2w", (L, H, C), std),
        matrix("fcprojw", (L, C, H), residual_std),
        gain("lnfw", (C,)),
        matrix("lmhead", (V, C), std),
    ]


def param_table(config):
    """The model's parameters in llm.c's order: all of llm.c's tensors, less lmhead when the head is tied to wte."""
    table = _llmc_table(config)
    return table[:-1] if config.tied_embeddings else table


def param_shapes(config):
    return params.param_shapes(param_table(config))


def file_shapes(config):
    """The tensors of an llm.c model file or debug state: lmhead always (for a tied model, a copy of wte)."""
    return params.param_shapes(_llmc_table(config))


def num_parameters(config):
    return sum(math.prod(shape) for shape in param_shapes(config).values())


def split_params(config, flat):
    """Views of a flat parameter (or gradient) buffer, name -> tensor of param_shapes' shape."""
    return split_flat(param_shapes(config), flat)


def init_params(config, seed):
    """The seeded initialisation as a flat float32 buffer (llmpy.params.init_flat): each matrix N(0, its init_std)
    (0.02; the residual projections 0.02 / sqrt(2L)), drawn in table order from one generator; the RMSNorm gains 1."""
    return init_flat(param_table(config), seed)


def rope_frequencies(config):
    """Each pair of a head's channels turns by freq[i] radians a position: float32 (hs/2,), theta^(-2i/hs), then
    with use_scaled_rope Llama 3.1's scaling. Float32 throughout, as Meta's precompute_freqs_cis."""
    hs = config.head_size
    freqs = 1.0 / np.float32(config.rope_theta) ** (np.arange(0, hs, 2, dtype=np.float32) / np.float32(hs))
    if not config.use_scaled_rope:
        return freqs
    wavelength = np.float32(2 * math.pi) / freqs
    short, long = ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR
    # 0 at the long end of the band, 1 at the short end: how much of the unscaled frequency to keep
    band = ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR
    smooth = (ROPE_ORIGINAL_CONTEXT / wavelength - ROPE_LOW_FREQ_FACTOR) / band
    blended = (1 - smooth) * freqs / ROPE_SCALE_FACTOR + smooth * freqs
    return np.where(wavelength < short, freqs, np.where(wavelength > long, freqs / ROPE_SCALE_FACTOR, blended))


def rope_tables(config, T):
    """cos and sin of every position's angles, float32 (T, hs/2) each: position t turns pair i by t * freq[i]."""
    angles = np.outer(np.arange(T, dtype=np.float32), rope_frequencies(config))  # float32, as Meta's
    return np.cos(angles), np.sin(angles)
