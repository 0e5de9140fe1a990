"""Llama 3 in PyTorch: the reference trainer.

The model is an nn.Module and autograd computes the gradients, as in llm.c's train_llama3.py: RMSNorm, rotary
position embeddings (RoPE, theta 500000, Llama 3.1's frequency scaling), grouped-query attention, a SwiGLU MLP, no
biases, the LM head tied to the token embedding or not. It is the ground truth for the Llama 3 mainline to come:
`--write_tensors 1` writes llm.c's reference files (the model in fp32 and bf16, its debug state, the tokenizer
file, the losses of 10 steps). The training loop, the flags, the log and the reference files' logic are
train_gpt2_torch.py's, which this file imports.

    python dev/data/tinyshakespeare.py -m llama-3            # Llama 3 token shards, once (pip install llama-models)
    python train_llama3_torch.py --model tiny --device cpu   # a 2-layer Llama 3 from random init on tiny Shakespeare
    python train_llama3_torch.py --model llama3.2-1b --device cpu --write_tensors 1   # the reference files, then exit
    python train_llama3_torch.py --init_from path/to/Llama-3.2-1B   # a Hugging Face Llama folder (downloaded before)
    torchrun --standalone --nproc_per_node 8 train_llama3_torch.py --model llama3.2-1b -b 8 -t 2048 \\
        --total_batch_size 524288 --dtype bfloat16 --compile 1

Layout shared with llm.c (llmpy/configs/llama3.py, llmpy/formats.py): per-layer tensors stacked along a leading L
axis, matrices as (out, in) (nn.Linear's layout), qkvw's rows the query heads, then the key heads, then the value
heads. RoPE turns each head's adjacent channels (2i, 2i+1) together, as Meta's and llm.c's code do; Hugging Face's
Llama turns channel i with channel i + hs/2, so its q and k weights are these with their rows permuted (llmpy/hf.py
permutes them both ways: --init_from takes a Hugging Face Llama folder, dev/eval/export_hf.py writes one).
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmpy import formats, hf
from llmpy.configs import llama3
from llmpy.tokenizer import LLAMA3_TOKENIZER_FILE_EOT, llama3_encoding
from train_gpt2_torch import ModelFamily, ReferenceFiles, build_parser, causal_attention, load_flat, logits_and_loss
from train_gpt2_torch import main as run_family

DEFAULT_MODEL = "llama3.2-1b"
DATA_HINT = "run `python dev/data/tinyshakespeare.py -m llama-3` to make the tiny Shakespeare Llama 3 shards"


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) over the channels, times a gain, normalised in float32 (Meta's and llm.c's)."""

    def __init__(self, channels, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotate(x, cos, sin):
    """RoPE: x (B, T, heads, hs) with each pair (2i, 2i+1) of every head turned by position t's angle for pair i;
    cos, sin (T, hs/2). In float32 and back, as Meta's."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, heads, hs/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, hs/2): the same angles for every sequence and head
    turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return turned.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    """Grouped-query attention: NH query heads, KV key and value heads, query head h reading KV head h // (NH/KV)."""

    def __init__(self, config, flash):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = config.num_heads, config.num_kv_heads, config.head_size
        self.flash = flash
        self.c_attn = nn.Linear(config.channels, config.qkv_channels, bias=False)  # q, k, v of all heads at once
        self.c_proj = nn.Linear(config.channels, config.channels, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        NH, KV, hs = self.num_heads, self.num_kv_heads, self.head_size
        q, k, v = self.c_attn(x).split((NH * hs, KV * hs, KV * hs), dim=-1)
        q, k, v = q.view(B, T, NH, hs), k.view(B, T, KV, hs), v.view(B, T, KV, hs)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # positions enter here, and only here
        # each key and value head serves NH / KV consecutive query heads: repeat it for them
        k, v = (t.repeat_interleave(NH // KV, dim=2) for t in (k, v))  # (B, T, NH, hs)
        y = causal_attention(*(t.transpose(1, 2) for t in (q, k, v)), self.flash)  # (B, NH, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU: c_proj(silu(c_fc2(x)) * c_fc(x)), H = config.ffn_hidden wide."""

    def __init__(self, config):
        super().__init__()
        C, H = config.channels, config.ffn_hidden
        self.c_fc = nn.Linear(C, H, bias=False)  # Meta's w3 ("up")
        self.c_fc2 = nn.Linear(C, H, bias=False)  # Meta's w1: the gate, through SiLU
        self.c_proj = nn.Linear(H, C, bias=False)  # Meta's w2 ("down")

    def forward(self, x):
        return self.c_proj(F.silu(self.c_fc2(x)) * self.c_fc(x))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.)), both norms RMSNorms."""

    def __init__(self, config, flash):
        super().__init__()
        self.ln_1 = RMSNorm(config.channels, config.norm_eps)
        self.attn = CausalSelfAttention(config, flash)
        self.ln_2 = RMSNorm(config.channels, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class Llama(nn.Module):
    """Llama 3 for a llmpy.configs.llama3.Llama3Config. flash: F.scaled_dot_product_attention, else the explicit
    masked softmax."""

    # llm.c's name of each per-layer tensor -> its path inside a Block; the rest are whole-model tensors
    # (train_gpt2_torch.llmc_parameters reads these to convert to and from llm.c's flat layout)
    LAYER_TENSORS = {"ln1w": "ln_1.weight", "qkvw": "attn.c_attn.weight", "attprojw": "attn.c_proj.weight",
                     "ln2w": "ln_2.weight", "fcw": "mlp.c_fc.weight", "fc2w": "mlp.c_fc2.weight",
                     "fcprojw": "mlp.c_proj.weight"}
    MODEL_TENSORS = {"wte": "transformer.wte.weight", "lnfw": "transformer.ln_f.weight", "lmhead": "lm_head.weight"}
    llmc_shapes = staticmethod(llama3.param_shapes)  # tied: no lmhead

    def __init__(self, config, flash=True):
        super().__init__()
        self.config = config
        C, V = config.channels, config.vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C),
            h=nn.ModuleList(Block(config, flash) for _ in range(config.num_layers)),
            ln_f=RMSNorm(C, config.norm_eps),
        ))
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.tied_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # RoPE's cos and sin (max_seq_len, hs/2), float32: buffers, so .to(device) moves them; not in state_dict
        cos, sin = llama3.rope_tables(config, config.max_seq_len)
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)

    def forward(self, idx, targets=None):
        """idx, targets: int (B, T). Returns logits (B, T, V) and the mean cross-entropy loss.

        Without targets (sampling) only the last position's logits (B, 1, V) are computed, and the loss is None.
        """
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.transformer.wte(idx)  # (B, T, C); no position embedding
        for block in self.transformer.h:
            x = block(x, cos, sin)
        return logits_and_loss(self.lm_head, self.transformer.ln_f(x), targets)


def model_from_flat(config, flat, flash=True):
    """A Llama with the flat float32 parameters (llmpy.configs.llama3's layout)."""
    model = Llama(config, flash)
    load_flat(model, flat)
    return model


def init_weights(model, seed):
    """The seeded init of llmpy.configs.llama3.init_params (N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)),
    RMSNorm gains 1): the same weights on any device, and the mainline's."""
    load_flat(model, llama3.init_params(model.config, seed))


def model_config(args):
    """--model's config, its head tied or not as --tied_embeddings says."""
    try:
        config = llama3.config_from_descriptor(args.model or DEFAULT_MODEL)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None
    if args.tied_embeddings is not None:
        config = dataclasses.replace(config, tied_embeddings=bool(args.tied_embeddings))
    return config


def build_model(args):
    """The model from --init_from (a Llama 3 model file or a Hugging Face Llama folder) or a seeded random init; and
    its descriptor."""
    flash = bool(args.flash)
    if not args.init_from:
        model = Llama(model_config(args), flash)
        init_weights(model, args.seed)
        return model, args.model or DEFAULT_MODEL
    config, flat = hf.load_llama3_weights(args.init_from)
    holds = f"--init_from {args.init_from} holds a {llama3.descriptor_of(config)} model"
    if args.model and model_config(args) != config:
        raise ValueError(f"{holds}, but --model says {llama3.descriptor_of(model_config(args))}")
    if args.tied_embeddings is not None and bool(args.tied_embeddings) != config.tied_embeddings:
        raise ValueError(f"{holds} with {'tied' if config.tied_embeddings else 'untied'} embeddings, "
                         f"but --tied_embeddings is {args.tied_embeddings}")
    return model_from_flat(config, flat, flash), args.model or llama3.descriptor_of(config)


LLAMA3_FLAGS = {  # the flags whose meaning differs from GPT-2's
    "input_bin": dict(default="dev/data/tinyshakespeare/tiny_shakespeare_llama3_train.bin",
                      help="training token shards, Llama 3's uint32 (a glob pattern)"),
    "input_val_bin": dict(default="dev/data/tinyshakespeare/tiny_shakespeare_llama3_val.bin",
                          help='validation token shards (a glob pattern); "" disables validation'),
    "model": dict(help=f"{', '.join(llama3.DESCRIPTORS)}: Meta's shapes (tiny: 2 layers, 64 channels, for tests), "
                       f"seeded random init. Default: {DEFAULT_MODEL}, or what --init_from holds"),
    "init_from": dict(help="start from the weights in a Llama 3 model file (.bin, fp32 or bf16; llm.c's or ours) or "
                           "a Hugging Face Llama folder (config.json, model.safetensors). Meta's models on the hub "
                           "are gated: download one first (huggingface-cli download meta-llama/Llama-3.2-1B "
                           "--local-dir DIR, after accepting its licence) and pass the folder"),
    "output_prefix": dict(help="name stem of --write_tensors' files; default from the model (llama3.2-1b: "
                               "llama3.2_1B, tiny: llama3_tiny)"),
    "tokenizer": dict(help="Llama 3's tokenizer.model (tiktoken format) for the samples and llama3_tokenizer.bin; "
                           "default $LLMPY_LLAMA3_TOKENIZER_FILE, else the llama-models package's"),
}


def parse_args(argv=None):
    p = build_parser(__doc__, LLAMA3_FLAGS)
    p.add_argument("--tied_embeddings", type=int, choices=(0, 1),
                   help="1: the LM head is the token embedding; 0: a matrix of its own "
                        "(default: the model's, tied for llama3.2-1b only)")
    return p.parse_args(argv)


LLAMA3 = ModelFamily(
    "Llama 3", build_model, lambda config: f"{llama3.num_parameters(config):,} parameters", llama3_encoding,
    llama3.BEGIN_OF_TEXT, llama3.file_prefix,
    ReferenceFiles(formats.write_llama3_model, formats.write_llama3_debug_state, "llama3_tokenizer.bin",
                   LLAMA3_TOKENIZER_FILE_EOT),
    DATA_HINT)


def main(argv=None):
    run_family(argv, parse_args, LLAMA3)


if __name__ == "__main__":
    main()
