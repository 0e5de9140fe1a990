"""Which of FP8's products moves the loss, and by how much: an emulation on the CPU.

Trains the PyTorch reference (train_gpt2_torch.py's GPT, fp32, GPT-2's whole vocabulary) with the operands of its
linear layers' products rounded as the mainline rounds them, one variant at a time, from the same init and batches,
and prints each variant's val loss along the way and its train loss, against a base variant's.

A variant names the products that run in FP8, for the transformer blocks' four linear layers and for the LM head,
as BLOCKS/HEAD, each a subset of the letters
  f  the forward         out = inp @ W^T     inp e4m3, W e4m3
  d  the input gradient  dinp = dout @ W     dout e5m2, W e4m3
  w  the weight gradient dW = dout^T @ inp   dout e5m2, inp e4m3
and rounds every other product's operands to bf16 (the bf16 mainline's). So
  bf16 = /             every product in bf16
  fp8  = fdw/fdw       the mainline's --precision fp8 (GPT-2's LM head in FP8 too)
  fdw/                 ... with the head in bf16 (--fp8_lm_head 0)
  fdw/dw               ... with the head's logits in bf16 (--fp8_lm_head gradients)
  fd/fd                ... with the weight gradients in bf16 (--fp8_weight_grads 0)
  fp32                 nothing rounded: the reference itself
Rounding to FP8: x -> fp8(x * s) / s with s = 2^floor(log2(max / amax(x))), the tensor's own amax (current scaling;
the mainline's delayed scale takes amax from the tensor's last 16 casts instead, which differs when a tensor
outgrows its history). The products themselves are exact here (fp32), as cuBLASLt's FP8 matmul multiplies FP8 values
exactly; only the operands' rounding is emulated. Everything outside the linear layers (attention, layernorms, the
loss, AdamW) is fp32 in every variant: the differences between variants are the operands' rounding alone, and the
emulation is deterministic, so two variants that round alike agree to the last bit.

    python dev/fp8_emulation.py --variants bf16,fp8,fdw/,fd/fd [--steps 1000] [-b 8] [-t 64]
    python dev/fp8_emulation.py --train_tokens 16384 ...   # the first 16,384 tokens only: memorises them
    python dev/fp8_emulation.py -i dev/data/python_sources/python_sources_train.bin \\
                                -j dev/data/python_sources/python_sources_val.bin ...   # text that does not repeat

--log_dir DIR writes each variant's llm.c-style log (DIR/VARIANT/main.log, "/" written as "_"), for
dev/compare_logs.py and dev/plot.py. Needs the tiny Shakespeare shards (python dev/data/tinyshakespeare.py) by default.
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmpy.configs.gpt2 import GPT2Config  # noqa: E402
from llmpy.formats import FormatError, read_shard  # noqa: E402
from llmpy.logger import Logger  # noqa: E402
from llmpy.schedule import lr_at  # noqa: E402
from train_gpt2_torch import GPT, configure_optimizer, init_weights  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ALIASES = {"bf16": "/", "fp8": "fdw/fdw"}
TRAIN = "dev/data/tinyshakespeare/tiny_shakespeare_train.bin"
VAL = "dev/data/tinyshakespeare/tiny_shakespeare_val.bin"


def rounded(x, fmt):
    """x's values after the cast a product's operand gets (float32 again): fmt None leaves x as it is, bfloat16
    rounds it, an FP8 format casts x * s (per-tensor power-of-two scale s, saturating) and divides by s."""
    if fmt is None:
        return x
    if fmt is torch.bfloat16:
        return x.to(fmt).float()
    amax = x.abs().max().item()
    if amax == 0:
        return x
    top = torch.finfo(fmt).max  # 448 (e4m3), 57344 (e5m2)
    scale = 2.0 ** math.floor(math.log2(top / amax))
    return (x * scale).clamp(-top, top).to(fmt).float() / scale


def operand_formats(fp8_products):
    """fp8_products (a subset of "fdw", or None: fp32) -> the formats of (forward's inp and W, input gradient's dout
    and W, weight gradient's dout and inp)."""
    if fp8_products is None:
        return (None,) * 6
    bf16 = torch.bfloat16
    f, d, w = (p in fp8_products for p in "fdw")
    return (E4M3 if f else bf16, E4M3 if f else bf16, E5M2 if d else bf16, E4M3 if d else bf16,
            E5M2 if w else bf16, E4M3 if w else bf16)


class RoundedLinear(torch.autograd.Function):
    """out = inp @ W^T (+ b) and its two gradients, each product's operands rounded to its formats first."""

    @staticmethod
    def forward(ctx, inp, weight, bias, formats):
        ctx.save_for_backward(inp, weight)
        ctx.formats, ctx.has_bias = formats, bias is not None
        out = rounded(inp, formats[0]) @ rounded(weight, formats[1]).t()  # (B, T, OC)
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, dout):
        inp, weight = ctx.saved_tensors
        f = ctx.formats
        dinp = rounded(dout, f[2]) @ rounded(weight, f[3])  # (B, T, IC)
        dout2, inp2 = dout.reshape(-1, dout.shape[-1]), inp.reshape(-1, inp.shape[-1])  # (BT, OC), (BT, IC)
        dweight = rounded(dout2, f[4]).t() @ rounded(inp2, f[5])  # (OC, IC)
        return dinp, dweight, dout2.sum(0) if ctx.has_bias else None, None


def parse_variant(variant):
    """'BLOCKS/HEAD' (or an alias, or fp32) -> (the blocks' FP8 products, the head's), each a string or None."""
    if variant == "fp32":
        return None, None
    spec = ALIASES.get(variant, variant)
    parts = spec.split("/")
    if len(parts) != 2 or any(set(p) - set("fdw") for p in parts):
        raise ValueError(f"variant {variant!r}: not fp32, bf16, fp8 or BLOCKS/HEAD of the letters f, d, w")
    return parts[0], parts[1]


def emulate(model, variant):
    """Routes every linear layer of model through RoundedLinear with variant's formats."""
    blocks, head = parse_variant(variant)
    if blocks is None:
        return

    def route(linear, products):
        formats = operand_formats(products)
        linear.forward = lambda x: RoundedLinear.apply(x, linear.weight, linear.bias, formats)

    for block in model.transformer.h:
        for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            route(linear, blocks)
    route(model.lm_head, head)


def batches(tokens, B, T):
    """Consecutive (inputs, targets) batches of (B, T) int64 over tokens, from the start again at its end."""
    span = B * T
    count = (len(tokens) - 1) // span
    if count == 0:
        raise ValueError(f"{len(tokens)} tokens do not make one batch of {B} x {T} (+1)")
    for i in range(count):
        chunk = torch.from_numpy(tokens[i * span: (i + 1) * span + 1].astype(np.int64))
        yield chunk[:-1].view(B, T), chunk[1:].view(B, T)


def train(variant, config, train_tokens, val_tokens, args):
    """Trains one variant from the seeded init; returns {step: val loss} and the train losses, a float a step."""
    torch.manual_seed(0)
    model = GPT(config, flash=False)
    init_weights(model, args.seed)
    emulate(model, variant)
    optimizer = configure_optimizer(model, args.learning_rate, args.weight_decay)
    folder = os.path.join(args.log_dir, variant.replace("/", "_")) if args.log_dir else None
    if folder:
        os.makedirs(folder, exist_ok=True)
    logger = Logger(folder)
    val_losses, train_losses = {}, []
    stream = iter(())
    start = time.time()
    for step in range(args.steps + 1):
        if step % args.val_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                losses = [model(x, y)[1].item() for x, y in batches(val_tokens, args.batch_size, args.sequence_length)]
            model.train()
            val_losses[step] = float(np.mean(losses))
            logger.log_val(step, val_losses[step])
        if step == args.steps:
            break
        batch = next(stream, None)
        if batch is None:
            stream = batches(train_tokens, args.batch_size, args.sequence_length)
            batch = next(stream)
        lr = lr_at(step, args.steps, args.learning_rate, args.warmup_iters, args.final_lr_frac, "cosine")
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, loss = model(*batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
        optimizer.step()
        train_losses.append(loss.item())
        logger.log_train(step, train_losses[-1], lr, norm, 0.0, 0.0)
        if step % 100 == 0:
            print(f"  {variant}: step {step} train loss {train_losses[-1]:.4f} ({time.time() - start:.0f} s)",
                  flush=True)
    logger.close()
    return val_losses, np.array(train_losses)


def read_tokens(path, count, flag):
    """The first count tokens (all: 0) of the shard at path, or the exit that says what is wrong with it."""
    try:
        tokens = read_shard(path, vocab_size=50257)
    except FormatError as e:
        hint = " (python dev/data/tinyshakespeare.py makes the default shards)" if path in (TRAIN, VAL) else ""
        sys.exit(f"fp8_emulation.py: {flag}: {e}{hint}")
    return tokens[:count] if count else tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="bf16,fp8", help="comma-separated: fp32, bf16, fp8 or BLOCKS/HEAD")
    ap.add_argument("--base", default=None, help="the variant the others are compared to (default: the first)")
    ap.add_argument("-i", "--input_bin", default=TRAIN, help="the training tokens (an llm.c shard)")
    ap.add_argument("-j", "--input_val_bin", default=VAL, help="the validation tokens")
    ap.add_argument("--train_tokens", type=int, default=0, help="use only the first N training tokens (0: all)")
    ap.add_argument("--val_tokens", type=int, default=8 * 64 * 8 + 1, help="the first N validation tokens")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("-b", "--batch_size", type=int, default=8)
    ap.add_argument("-t", "--sequence_length", type=int, default=64)
    ap.add_argument("-c", "--channels", type=int, default=128)
    ap.add_argument("-L", "--layers", type=int, default=2)
    ap.add_argument("-l", "--learning_rate", type=float, default=6e-4)
    ap.add_argument("-u", "--warmup_iters", type=int, default=100)
    ap.add_argument("-q", "--final_lr_frac", type=float, default=0.1)
    ap.add_argument("-w", "--weight_decay", type=float, default=0.1)
    ap.add_argument("--grad_clip", type=float, default=1.0)
    ap.add_argument("-v", "--val_every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--log_dir", default=None, help="write DIR/VARIANT/main.log for each variant")
    args = ap.parse_args()
    variants = args.variants.split(",")
    base = args.base or variants[0]
    for v in (*variants, base):
        try:
            parse_variant(v)
        except ValueError as e:
            sys.exit(f"fp8_emulation.py: {e}")
    if base not in variants:
        sys.exit(f"fp8_emulation.py: --base {base} is not one of --variants {args.variants}")
    for flag in ("steps", "batch_size", "sequence_length", "channels", "layers", "val_every"):
        if getattr(args, flag) < 1:
            sys.exit(f"fp8_emulation.py: --{flag} must be at least 1, not {getattr(args, flag)}")
    torch.set_num_threads(os.cpu_count())
    train_tokens = read_tokens(args.input_bin, args.train_tokens, "-i")
    val_tokens = read_tokens(args.input_val_bin, args.val_tokens, "-j")
    config = GPT2Config(max_seq_len=args.sequence_length, vocab_size=50257, padded_vocab_size=50304,
                        num_layers=args.layers, num_heads=4, channels=args.channels)
    passes = args.steps * args.batch_size * args.sequence_length / len(train_tokens)
    print(f"{len(train_tokens):,} training tokens ({passes:.2f} passes), {len(val_tokens):,} validation tokens; "
          f"d{args.layers} C={args.channels}, B={args.batch_size} T={args.sequence_length}, lr {args.learning_rate}")
    results = {}
    for v in variants:
        try:
            results[v] = train(v, config, train_tokens, val_tokens, args)
        except ValueError as e:
            sys.exit(f"fp8_emulation.py: {e}")
    base_val, base_train = results[base]
    steps = sorted(base_val)
    print(f"\nval loss (and minus {base}'s):")
    print(f"{'step':>8} " + " ".join(f"{v:>17}" for v in variants))
    for s in steps:
        cells = [f"{results[v][0][s]:8.4f}" + ("" if v == base else f" {results[v][0][s] - base_val[s]:+8.4f}")
                 for v in variants]
        print(f"{s:>8} " + " ".join(f"{c:>17}" for c in cells))
    quarter = max(1, args.steps // 4)
    print(f"\ntrain loss, mean of the last {quarter} steps (and minus {base}'s); mean gap over all steps:")
    for v in variants:
        last = results[v][1][-quarter:].mean()
        print(f"{v:>10} {last:8.4f} {last - base_train[-quarter:].mean():+8.4f} "
              f"{np.mean(results[v][1] - base_train):+8.4f}")


if __name__ == "__main__":
    main()
