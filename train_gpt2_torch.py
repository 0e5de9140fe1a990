"""GPT-2 in PyTorch: the reference trainer.

The model is an nn.Module and autograd computes the gradients, as in llm.c's train_gpt2.py and nanoGPT. This file
is the ground truth the other implementations are tested against (`--write_tensors 1` writes llm.c's reference
files) and the baseline they are timed against (`--compile 1 --flash 1 --dtype bfloat16` on a GPU).

    python dev/data/tinyshakespeare.py                     # the token shards, once
    python train_gpt2_torch.py --model d12                 # GPT-2 124M from random init on tiny Shakespeare
    python train_gpt2_torch.py --model d12 --device cpu --write_tensors 1   # the reference files, then exit
    torchrun --standalone --nproc_per_node 8 train_gpt2_torch.py --model d12 -b 16 -t 1024 --total_batch_size 524288

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (NCCL on GPUs, gloo on the CPU):
each rank reads its own batches and only rank 0 prints, logs and samples, as train_gpt2.py does.

Layout shared with llm.c (llmpy/formats.py): the module's vocab is the real V = 50257, while files and flat buffers
hold wte with Vp = 50304 rows (the extra rows zero), per-layer tensors stacked along a leading L axis and weight
matrices as (out, in), which is also nn.Linear's layout.
"""

import argparse
import gc
import glob
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from llmpy import cli, formats, hf
from llmpy.configs.gpt2 import (DESCRIPTORS_HELP, GPT2_EOT, config_from_descriptor, descriptor_of, file_prefix,
                                num_parameters, param_shapes)
from llmpy.params import split_flat
from llmpy.data import DataLoader
from llmpy.logger import Logger
from llmpy.schedule import lr_at
from llmpy.signals import run_quietly
from llmpy.tokenizer import TokenizerError, gpt2_encoding, token_bytes

DATA_HINT = "run `python dev/data/tinyshakespeare.py` to make the tiny Shakespeare shards"


class CausalSelfAttention(nn.Module):
    def __init__(self, config, flash):
        super().__init__()
        C = config.channels
        self.num_heads = config.num_heads
        self.flash = flash
        self.c_attn = nn.Linear(C, 3 * C)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        NH, HS = self.num_heads, C // self.num_heads
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, NH, HS).transpose(1, 2) for t in (q, k, v))  # each (B, NH, T, HS)
        y = causal_attention(q, k, v, self.flash)  # (B, NH, T, HS)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # the heads side by side again
        return self.c_proj(y)


def causal_attention(q, k, v, flash):
    """Each position's softmax(q k^T / sqrt(HS)) over itself and the positions before it, applied to v: q, k, v
    (B, NH, T, HS) -> (B, NH, T, HS). flash: F.scaled_dot_product_attention, else the explicit masked softmax."""
    if flash:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.shape[2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, NH, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))  # position t attends to positions <= t only
    return F.softmax(scores, dim=-1) @ v


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        C = config.channels
        self.c_fc = nn.Linear(C, 4 * C)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU is the tanh approximation
        self.c_proj = nn.Linear(4 * C, C)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""

    def __init__(self, config, flash):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.channels)  # eps 1e-5, as llm.c
        self.attn = CausalSelfAttention(config, flash)
        self.ln_2 = nn.LayerNorm(config.channels)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 for a llmpy.configs.gpt2.GPT2Config. flash: F.scaled_dot_product_attention, else the explicit masked
    softmax."""

    # llm.c's name of each per-layer tensor -> its path inside a Block; the rest are whole-model tensors
    LAYER_TENSORS = {
        "ln1w": "ln_1.weight", "ln1b": "ln_1.bias",
        "qkvw": "attn.c_attn.weight", "qkvb": "attn.c_attn.bias",
        "attprojw": "attn.c_proj.weight", "attprojb": "attn.c_proj.bias",
        "ln2w": "ln_2.weight", "ln2b": "ln_2.bias",
        "fcw": "mlp.c_fc.weight", "fcb": "mlp.c_fc.bias",
        "fcprojw": "mlp.c_proj.weight", "fcprojb": "mlp.c_proj.bias",
    }
    MODEL_TENSORS = {"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight",
                     "lnfw": "transformer.ln_f.weight", "lnfb": "transformer.ln_f.bias"}
    llmc_shapes = staticmethod(param_shapes)  # config -> llm.c's tensors in file order, name -> shape

    def __init__(self, config, flash=True):
        super().__init__()
        self.config = config
        C, V = config.channels, config.vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C),
            wpe=nn.Embedding(config.max_seq_len, C),
            h=nn.ModuleList(Block(config, flash) for _ in range(config.num_layers)),
            ln_f=nn.LayerNorm(C),
        ))
        self.lm_head = nn.Linear(C, V, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: the LM head is the token embedding

    def forward(self, idx, targets=None):
        """idx, targets: int (B, T). Returns logits (B, T, V) and the mean cross-entropy loss.

        Without targets (sampling) only the last position's logits (B, 1, V) are computed, and the loss is None.
        """
        T = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return logits_and_loss(self.lm_head, self.transformer.ln_f(x), targets)


def logits_and_loss(lm_head, x, targets):
    """The LM head on the last hidden states x (B, T, C): logits (B, T, V) and the mean cross-entropy loss; without
    targets (sampling) only the last position's logits (B, 1, V), and the loss is None."""
    if targets is None:
        return lm_head(x[:, -1:, :]), None
    logits = lm_head(x)
    # the loss in float32 even under bf16 autocast: a logsumexp over the vocab (50,257 or 128,256) needs it
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1).long())
    return logits, loss


@torch.no_grad()
def init_weights(model, seed):
    """GPT-2's initialisation, reproducible from seed on any device (drawn from a CPU generator).

    Matrices and embeddings N(0, 0.02); the two projections that write into the residual stream (attn.c_proj,
    mlp.c_proj) N(0, 0.02/sqrt(2L)), so the residual stream's variance does not grow with depth (2 writes a layer);
    biases 0; layernorm weights 1.
    """
    generator = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.config.num_layers)
    for name, p in model.named_parameters():  # lists the tied wte/lm_head weight once
        if p.dim() >= 2:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=generator))
        elif ".ln_" in name and name.endswith(".weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def llmc_parameters(model):
    """llm.c's tensor name (file order) -> the model's parameters it is made of: one per layer, or one.

    The model's class says where they are: LAYER_TENSORS (paths inside each block of transformer.h), MODEL_TENSORS
    (paths inside the model) and llmc_shapes (config -> the tensors in llm.c's order), so GPT and the Llama 3
    reference share this and the flat conversions below.
    """
    params = dict(model.named_parameters())
    layers = range(model.config.num_layers)
    return {name: [params[f"transformer.h.{l}.{model.LAYER_TENSORS[name]}"] for l in layers]
            if name in model.LAYER_TENSORS else [params[model.MODEL_TENSORS[name]]]
            for name in model.llmc_shapes(model.config)}


def _to_flat(model, tensor_of):
    shapes = model.llmc_shapes(model.config)
    flat = np.zeros(sum(math.prod(shape) for shape in shapes.values()), dtype=np.float32)
    views = split_flat(shapes, flat)
    for name, params in llmc_parameters(model).items():
        tensor = torch.stack([tensor_of(p) for p in params]) if name in model.LAYER_TENSORS else tensor_of(params[0])
        # wte fills the first V of its Vp rows; the padding rows stay zero
        views[name][: tensor.shape[0]] = tensor.detach().float().cpu().numpy()
    return flat


def model_to_flat(model):
    """The parameters in llm.c's flat layout: float32 (num_parameters(config),), wte padded to Vp rows with zeros."""
    return _to_flat(model, lambda p: p)


def grads_to_flat(model):
    """The gradients (after backward) in llm.c's flat layout, like model_to_flat."""
    return _to_flat(model, lambda p: p.grad)


@torch.no_grad()
def load_flat(model, flat):
    """Copies flat float32 parameters in llm.c's layout into the model (wte's padding rows are dropped)."""
    views = split_flat(model.llmc_shapes(model.config), torch.from_numpy(np.asarray(flat, dtype=np.float32)))
    for name, params in llmc_parameters(model).items():
        sources = views[name] if name in model.LAYER_TENSORS else [views[name]]
        for p, source in zip(params, sources):
            p.copy_(source[: p.shape[0]])


def model_from_flat(config, flat, flash=True):
    model = GPT(config, flash)
    load_flat(model, flat)
    return model


def configure_optimizer(model, learning_rate, weight_decay, betas=(0.9, 0.95), eps=1e-8, device_type="cpu"):
    """AdamW with weight decay on the matrices and embeddings (dim >= 2) only, not on biases and layernorms.

    These are exactly llmpy.configs.gpt2.decayed_param_names(). torch's decay is decoupled, w -= lr * (adam + wd * w),
    as llm.c's. fused=True (one kernel for all tensors) on CUDA.
    """
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type == "cuda")


def autocast_context(device_type, amp_dtype):
    return torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def train_step(model, optimizer, x, y, learning_rate, grad_clip=1.0, amp_dtype=None):
    """One optimizer step: forward and backward over each micro-batch, clip the gradient norm, AdamW update.

    x, y: int64 (B, T), or (S, B, T) for S micro-batches whose gradients are averaged (gradient accumulation).
    grad_clip: the maximum global gradient norm; 0 disables clipping. amp_dtype: None (float32) or torch.bfloat16
    (the forward under autocast). Returns (mean loss, gradient norm before clipping) as Python floats.
    """
    if x.dim() == 2:
        x, y = x[None], y[None]
    num_micro = x.shape[0]
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile, the module it compiled
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=x.device)
    for i, (x_micro, y_micro) in enumerate(zip(x, y)):
        # DDP averages the gradients over the ranks in the last micro-batch's backward only
        last = i == num_micro - 1
        with nullcontext() if last or not isinstance(ddp, DistributedDataParallel) else ddp.no_sync():
            with autocast_context(x.device.type, amp_dtype):
                _, loss = model(x_micro, y_micro)
            loss_sum += loss.detach()
            # each loss is a mean over B*T tokens; / S makes the summed gradients the mean over all S*B*T tokens
            (loss / num_micro).backward()
    # with max_norm = inf this only measures the norm (the clip factor min(1, inf / norm) is 1)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    optimizer.step()
    return loss_sum.item() / num_micro, norm.item()


@torch.no_grad()
def generate(model, idx, num_tokens, generator, top_k=40):
    """Extends idx (B, T0) by num_tokens tokens sampled from the top_k most likely (temperature 1). No KV cache."""
    for _ in range(num_tokens):
        logits, _ = model(idx[:, -model.config.max_seq_len:])  # (B, 1, V)
        top_logits, top_ids = torch.topk(logits[:, -1, :].float(), top_k)  # (B, top_k)
        choice = torch.multinomial(F.softmax(top_logits, dim=-1), 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, top_ids.gather(1, choice)], dim=1)
    return idx


@torch.no_grad()
def validation_loss(model, loader, steps, device, amp_dtype):
    """The mean loss over the first `steps` batches of the validation shards."""
    loader.reset()
    total = 0.0
    for _ in range(steps):
        x, y = (torch.from_numpy(a).long().to(device) for a in loader.next_batch())
        with autocast_context(device.type, amp_dtype):
            total += model(x, y)[1].item()
    return total / steps


@dataclass(frozen=True)
class ReferenceFiles:
    """How a model family writes llm.c's reference files."""

    write_model: object  # (path, config, flat float32 parameters, "float32" | "bfloat16")
    write_debug_state: object  # (path, config, x, y, logits, loss, flat float32 gradients)
    tokenizer_file: str  # its name
    tokenizer_eot: int  # the token in the tokenizer file's [3]


GPT2_FILES = ReferenceFiles(formats.write_model, formats.write_debug_state, "gpt2_tokenizer.bin", GPT2_EOT)


def write_reference_files(model, x, y, write_dir, prefix, descriptor, encoding, files=GPT2_FILES):
    """llm.c's reference files for one batch x, y (B, T), then the losses of 10 AdamW steps overfitting it:
    {prefix}.bin and {prefix}_bf16.bin (the model), the tokenizer file, {prefix}_debug_state.bin (the batch, its
    logits, loss and every gradient) and {prefix}_debug_losses.json (the hyperparameters and the 10 losses).

    Everything in float32 with TF32 off, so other implementations can be compared to it tightly.
    """
    torch.set_float32_matmul_precision("highest")
    config = model.config
    os.makedirs(write_dir, exist_ok=True)

    def path(name):
        return os.path.join(write_dir, name)

    flat = model_to_flat(model)
    files.write_model(path(f"{prefix}.bin"), config, flat, dtype="float32")
    files.write_model(path(f"{prefix}_bf16.bin"), config, flat, dtype="bfloat16")
    formats.write_tokenizer(path(files.tokenizer_file), token_bytes(encoding), files.tokenizer_eot)

    hyper = {"model": descriptor, "B": x.shape[0], "T": x.shape[1], "learning_rate": 1e-4, "beta1": 0.9,
             "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 0.0}
    optimizer = configure_optimizer(model, hyper["learning_rate"], hyper["weight_decay"],
                                    (hyper["beta1"], hyper["beta2"]), hyper["eps"], x.device.type)
    losses = []
    for step in range(10):
        optimizer.zero_grad(set_to_none=True)
        logits, loss = model(x, y)  # the loss before this step's update
        loss.backward()
        if step == 0:
            files.write_debug_state(path(f"{prefix}_debug_state.bin"), config, x.int().cpu().numpy(),
                                    y.int().cpu().numpy(), logits.detach().cpu().numpy(), loss.item(),
                                    grads_to_flat(model))
        optimizer.step()
        losses.append(loss.item())
        print(f"reference step {step}: loss {losses[-1]:.6f}")
    # the match tests take this file with the debug state: a half-written one must never be read
    formats.write_file_atomic(path(f"{prefix}_debug_losses.json"),
                              [json.dumps({**hyper, "losses": losses}, indent=1).encode()])
    print(f"wrote {prefix}.bin, {prefix}_bf16.bin, {prefix}_debug_state.bin, {prefix}_debug_losses.json and "
          f"{files.tokenizer_file} to {write_dir}")


GPT2_FLAGS = {  # the help and defaults of the flags whose meaning depends on the model family
    "input_bin": dict(default="dev/data/tinyshakespeare/tiny_shakespeare_train.bin",
                      help="training token shards (a glob pattern)"),
    "input_val_bin": dict(default="dev/data/tinyshakespeare/tiny_shakespeare_val.bin",
                          help='validation token shards (a glob pattern); "" disables validation'),
    "model": dict(help=f"{DESCRIPTORS_HELP}: seeded random init; "
                       "gpt2|gpt2-medium|gpt2-large|gpt2-xl: OpenAI's weights from the Hugging Face hub (downloaded "
                       "once); or a Hugging Face GPT-2 folder (config.json, model.safetensors). "
                       "Default: d12, or what --init_from holds"),
    "init_from": dict(help="start from the weights in an llm.c model file (.bin, fp32 or bf16)"),
    "output_prefix": dict(help="name stem of --write_tensors' files; default from the model (d12: gpt2_124M)"),
    "tokenizer": dict(help="GPT-2 BPE ranks file (tiktoken format) for the samples and gpt2_tokenizer.bin; "
                           "default $LLMPY_TIKTOKEN_FILE, else tiktoken's download"),
}


def parse_args(argv=None):
    return build_parser(__doc__, GPT2_FLAGS).parse_args(argv)


# the mainline's (and llm.c's) spellings of the same flags, taken here too
MAINLINE_NAMES = {"input_bin": ["-i"], "input_val_bin": ["-j"], "total_batch_size": ["-d"],
                  "num_iterations": ["-x", "--max_steps"], "learning_rate": ["-l"], "warmup_iters": ["-u"],
                  "final_lr_frac": ["-q"], "weight_decay": ["-c"], "val_loss_every": ["-v"], "val_max_steps": ["-m"],
                  "sample_every": ["-s"], "overfit_single_batch": ["-a"], "output_dir": ["-o", "--output_log_dir"]}


def build_parser(description, family_flags):
    """The reference trainers' flags; family_flags: the help and defaults of those that depend on the family. Each
    flag also takes its mainline spelling (MAINLINE_NAMES), so that a train_gpt2.py command line runs here too
    as far as the flags mean the same."""
    p = cli.OneLineArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name, *short, help, **kwargs):
        if kwargs.get("default") not in (None, ""):
            help += " (default: %(default)s)"
        p.add_argument(name, *short, *MAINLINE_NAMES.get(name.removeprefix("--"), []), help=help, **kwargs)

    flag = dict(type=int, choices=(0, 1))
    for name in ("input_bin", "input_val_bin", "model", "init_from"):
        add(f"--{name}", **family_flags[name])
    add("--batch_size", "-b", type=int, default=4, help="micro-batch size B")
    add("--sequence_length", "-t", type=int, default=64, help="sequence length T")
    add("--total_batch_size", type=int, default=0,
        help="tokens per optimizer step, a multiple of B*T (gradient accumulation); 0 means B*T")
    add("--num_iterations", type=int, default=10, help="optimizer steps; 0: only a validation loss and a sample")
    add("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    add("--warmup_iters", type=int, default=0, help="steps of linear learning-rate warmup")
    add("--final_lr_frac", type=float, default=1.0,
        help="after warmup, a cosine from learning_rate down to learning_rate * final_lr_frac at the last step; "
             "1.0 keeps it constant")
    add("--weight_decay", type=float, default=0.0, help="AdamW weight decay, on the matrices and embeddings only")
    add("--grad_clip", type=float, default=1.0, help="maximum global gradient norm; 0 disables clipping")
    add("--val_loss_every", type=int, default=0, help="validation loss every N steps and at the end; 0 never")
    add("--val_max_steps", type=int, default=20, help="batches per validation loss")
    add("--sample_every", type=int, default=0, help="print a sampled text every N steps and at the end; 0 never")
    add("--sample_length", type=int, default=64, help="tokens per sample")
    add("--overfit_single_batch", **flag, default=0, help="train on the first batch over and over")
    add("--shuffle", **flag, default=1, help="read the training batches in llm.c's shuffled order, as train_gpt2.py "
                                             "does (each rank's own, seeded 42 + rank); 0: in the files' order")
    add("--seed", type=int, default=42, help="seed of the initialisation and of the sampling")
    add("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    add("--dtype", default="float32", choices=("float32", "bfloat16"),
        help="bfloat16: the forward under autocast (weights, gradients, optimizer and loss stay float32)")
    add("--compile", **flag, default=0, help="torch.compile the model")
    add("--flash", **flag, default=1,
        help="attention by F.scaled_dot_product_attention (1) or by the explicit masked softmax (0)")
    add("--tensorcores", **flag, default=0, help="allow TF32 in float32 matmuls")
    add("--write_tensors", **flag, default=0,
        help="write llm.c's reference files for the first batch (in float32) and exit")
    add("--write_dir", default=".", help="folder for --write_tensors' files")
    add("--output_prefix", **family_flags["output_prefix"])
    add("--output_dir", default="", help="folder for main.log, one line a step (s:STEP trl:LOSS, s:STEP tel:LOSS)")
    add("--tokenizer", **family_flags["tokenizer"])
    return p


def check_args(args):
    """Nonsense values -> ValueError with one line naming the flag."""
    for name in ("batch_size", "sequence_length", "val_max_steps", "sample_length"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("total_batch_size", "num_iterations", "warmup_iters", "val_loss_every", "sample_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("learning_rate", "weight_decay", "grad_clip"):
        if not math.isfinite(getattr(args, name)):  # inf and nan would train to nan and still exit 0
            raise ValueError(f"--{name} must be a finite number, got {getattr(args, name)}")
    for name in ("weight_decay", "grad_clip"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}")
    if not 0 <= args.final_lr_frac <= 1:
        raise ValueError(f"--final_lr_frac must be in [0, 1], got {args.final_lr_frac}")
    tokens_per_micro = args.batch_size * args.sequence_length
    if args.total_batch_size % tokens_per_micro:
        raise ValueError(f"--total_batch_size {args.total_batch_size} is not a multiple of B*T = "
                         f"{args.batch_size}*{args.sequence_length} = {tokens_per_micro}")
    if args.output_dir:  # made now if missing: a folder that cannot hold main.log fails before any work
        formats.check_output_folder("--output_dir", args.output_dir)


def model_config(descriptor):
    try:
        return config_from_descriptor(descriptor)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None


def build_model(args):
    """The model from --init_from, Hugging Face (a pretrained name or a folder), or a seeded random init; and its
    descriptor."""
    flash = bool(args.flash)
    if args.init_from:
        config, flat = formats.read_model(args.init_from)
        if args.model and (hf.is_hf_source(args.model) or model_config(args.model) != config):
            raise ValueError(f"--init_from {args.init_from} holds a {descriptor_of(config)} model, "
                             f"but --model says {args.model}")
        return model_from_flat(config, flat, flash), args.model or descriptor_of(config)
    if args.model and hf.is_hf_source(args.model):
        config, flat = hf.load_hf(args.model)
        return model_from_flat(config, flat, flash), descriptor_of(config)
    descriptor = args.model or "d12"
    model = GPT(model_config(descriptor), flash)
    init_weights(model, args.seed)
    return model, descriptor


def open_loader(flag, pattern, B, T, vocab_size, rank=0, world_size=1, shuffle=False, hint=DATA_HINT):
    if not glob.glob(pattern):
        raise ValueError(f"--{flag} {pattern}: no such file; {hint}")
    return DataLoader(pattern, B, T, rank=rank, world_size=world_size, shuffle=shuffle, vocab_size=vocab_size)


def load_encoding(family, ranks_file, required):
    """The family's tiktoken encoding; None with a note if it cannot be had and is not required."""
    try:
        return family.encoding(ranks_file)
    except TokenizerError as e:
        if required:
            raise ValueError(f"--tokenizer: {e}") from None
        print(f"note: samples are printed as token ids: no {family.name} tokenizer ({e})")
        return None


def init_ddp(device):
    """Under torchrun with WORLD_SIZE > 1: joins the process group (NCCL on GPUs, gloo on the CPU) and returns
    (rank, world size, this rank's device: cuda:LOCAL_RANK on GPUs); otherwise (0, 1, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world_size, device


def mean_over_ranks(value, world_size, device):
    """A Python float averaged over the ranks: all-reduced as a sum (gloo has no average), then divided."""
    if world_size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.item() / world_size


@dataclass(frozen=True)
class ModelFamily:
    """What the training loop below needs to know of a model family; GPT2 here, LLAMA3 in train_llama3_torch.py."""

    name: str  # in messages: "GPT-2"
    build_model: object  # args -> (the nn.Module, its descriptor)
    describe: object  # config -> its size in words, for the first line of a run
    encoding: object  # ranks file or None -> its tiktoken encoding (TokenizerError)
    start_token: int  # the token samples start from: the one the data puts before every document
    file_prefix: object  # descriptor -> the name stem of --write_tensors' files
    files: ReferenceFiles
    data_hint: str  # how to make the default data


GPT2 = ModelFamily("GPT-2", build_model, lambda config: f"{num_parameters(config):,} parameters (padded vocab)",
                   gpt2_encoding, GPT2_EOT, file_prefix, GPT2_FILES, DATA_HINT)


def train(args, family=GPT2):
    check_args(args)
    rank, world_size, device = init_ddp(cli.pick_device(args.device))
    try:
        train_on(args, device, rank, world_size, family)
    finally:
        if world_size > 1:
            # DDP's reducer lives in reference cycles: collected after the group is gone, at exit, gloo aborts the
            # process (torch 2.13, ~1 run in 4); collected first, it leaves cleanly
            gc.collect()
            torch.distributed.destroy_process_group()


def train_on(args, device, rank, world_size, family):
    """This rank's run; only rank 0 prints, logs and samples."""
    say = print if rank == 0 else lambda *_, **__: None
    B, T = args.batch_size, args.sequence_length
    model, descriptor = family.build_model(args)
    config = model.config
    if T > config.max_seq_len:
        raise ValueError(f"--sequence_length {T} exceeds the model's max_seq_len {config.max_seq_len}")
    # llm.c's shuffled order for training, as train_gpt2.py (the reference files take the first batch of the file)
    shuffle = bool(args.shuffle) and not args.overfit_single_batch and not args.write_tensors
    train_loader = open_loader("input_bin", args.input_bin, B, T, config.vocab_size, rank, world_size, shuffle,
                               family.data_hint)
    model.to(device)

    if args.write_tensors:
        if world_size > 1:
            raise ValueError("--write_tensors runs in one process, not under torchrun")
        encoding = load_encoding(family, args.tokenizer, required=True)
        x, y = (torch.from_numpy(a).long().to(device) for a in train_loader.next_batch())
        prefix = args.output_prefix or family.file_prefix(descriptor)
        write_reference_files(model, x, y, args.write_dir, prefix, descriptor, encoding, family.files)
        return

    torch.set_float32_matmul_precision("high" if args.tensorcores else "highest")
    amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    val_loader = None
    if args.input_val_bin and args.val_loss_every > 0:
        val_loader = open_loader("input_val_bin", args.input_val_bin, B, T, config.vocab_size, rank, world_size,
                                 hint=family.data_hint)
    encoding = load_encoding(family, args.tokenizer, required=False) if args.sample_every > 0 and rank == 0 else None
    tokens_per_micro = B * T * world_size  # one micro-batch on every rank
    if args.total_batch_size % tokens_per_micro:
        raise ValueError(f"--total_batch_size {args.total_batch_size} is not a multiple of B*T*processes = "
                         f"{B}*{T}*{world_size} = {tokens_per_micro}")
    grad_accum_steps = max(1, args.total_batch_size // tokens_per_micro)
    tokens_per_step = grad_accum_steps * tokens_per_micro
    say(f"model {descriptor}: {family.describe(config)}, device {device}, "
        f"dtype {args.dtype}, B={B} T={T}, {grad_accum_steps} micro-batch(es)"
        f"{f' x {world_size} processes (DDP)' if world_size > 1 else ''} = {tokens_per_step:,} tokens a step")
    # the ranks read disjoint validation batches: --val_max_steps of them together (rounded up to a multiple)
    val_steps = -(-args.val_max_steps // world_size)

    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay, device_type=device.type)
    ddp_model = model
    if world_size > 1:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(ddp_model) if args.compile else ddp_model
    sample_generator = torch.Generator(device=device).manual_seed(args.seed)
    logger = Logger(args.output_dir if rank == 0 else None)  # main.log, as train_gpt2.py writes it
    first_batch = None
    for step in range(args.num_iterations + 1):
        last_step = step == args.num_iterations
        if val_loader and (step % args.val_loss_every == 0 or last_step):
            val_loss = validation_loss(step_model, val_loader, val_steps, device, amp_dtype)
            val_loss = mean_over_ranks(val_loss, world_size, device)
            say(f"step {step}: val loss {val_loss:.6f}")
            logger.log_val(step, val_loss)
        # and at the last step, as llm.c: so --num_iterations 0 evaluates a model with a validation loss and a sample
        if args.sample_every and ((step > 0 and step % args.sample_every == 0) or last_step) and rank == 0:
            start = torch.full((1, 1), family.start_token, dtype=torch.long, device=device)
            ids = generate(model, start, args.sample_length, sample_generator)[0, 1:].tolist()
            print("sample:", encoding.decode(ids) if encoding else ids)
        if last_step:
            break

        if first_batch is not None:
            micro_batches = first_batch
        else:
            micro_batches = [train_loader.next_batch() for _ in range(grad_accum_steps)]
            if args.overfit_single_batch:
                first_batch = micro_batches
        x = torch.from_numpy(np.stack([xb for xb, _ in micro_batches])).long().to(device)  # (S, B, T)
        y = torch.from_numpy(np.stack([yb for _, yb in micro_batches])).long().to(device)
        lr = lr_at(step, args.num_iterations, args.learning_rate, args.warmup_iters, args.final_lr_frac, "cosine")
        t0 = time.perf_counter()
        loss, norm = train_step(step_model, optimizer, x, y, lr, args.grad_clip, amp_dtype)  # .item() syncs
        ms = (time.perf_counter() - t0) * 1000
        loss = mean_over_ranks(loss, world_size, device)  # norm is global already: DDP averaged the gradients
        say(f"step {step + 1:4d}/{args.num_iterations} | loss {loss:.6f} | norm {norm:.4f} | lr {lr:.2e} | "
            f"{ms:.2f} ms | {tokens_per_step / ms * 1000:.0f} tok/s")
        logger.log_train(step, loss, lr, norm, ms, tokens_per_step / ms * 1000)
    logger.close()


def main(argv=None, parse=parse_args, family=GPT2):
    args = parse(argv)
    # under torchrun every rank gets a signal and prints its own line
    run_quietly(lambda: train(args, family), (formats.FormatError, ValueError, OSError))


if __name__ == "__main__":
    main()
