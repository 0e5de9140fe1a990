"""Which of the LM head's FP8 gradients costs loss, and what would not: an emulation on the CPU.

The mainline's fp8_options lm_head="gradients" (llmpy/precision.py) runs the LM head's input and weight gradients in
FP8 (dlogits in e5m2, wte and lnf in e4m3, per-tensor power-of-two scales) and measured -7 ms a step at d12 on the
H200, but a loss 0.22 above the bf16 head's after 13 steps (BENCHMARKS.md, FP8; later found to be a bug's, which
dev/fp8_head_check.py caught). This script trains a small GPT-2
(the reference, train_gpt2_torch.py, in fp32, with GPT-2's whole vocabulary: the head is the part in question) on
tiny Shakespeare with the head's backward replaced by products of FP8-rounded operands, one variant at a time, from
the same init and data:

  fp32        the reference's own backward
  both        dlnf = q5(dlogits) @ q4(wte), dwte += q5(dlogits)^T @ q4(lnf): the mainline's lm_head="gradients"
  dgrad       the input gradient only in FP8 (the weight gradient in fp32)
  wgrad       the weight gradient only in FP8
  both_e4m3   both, dlogits in e4m3 (3 mantissa bits, less range) instead of e5m2
  all         both, and the forward too: logits = q4(lnf) @ q4(wte)^T (the mainline's lm_head=True)

q4 / q5: x -> fp8(x * s) / s with s = 2^floor(log2(max / amax(x))), the tensor's own amax (current scaling; the
mainline's delayed scale differs only in where amax comes from). The products themselves are exact (fp32 here):
only the operands' rounding is emulated, as cuBLASLt's FP8 matmul multiplies FP8 values exactly.

    python dev/fp8_head_emulation.py [--steps 150] [-b 16] [-t 64] [--variants fp32,both,all]

Prints each variant's loss at a few steps and its mean over the last 20 against fp32's. Needs the tiny Shakespeare
shard (python dev/data/tinyshakespeare.py).
"""

import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmpy.configs.gpt2 import GPT2Config  # noqa: E402
from llmpy.data import DataLoader  # noqa: E402
from train_gpt2_torch import GPT, configure_optimizer, init_weights  # noqa: E402

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
SHARD = "dev/data/tinyshakespeare/tiny_shakespeare_train.bin"


def fp8_round(x, dtype):
    """x's values after a per-tensor scaled, saturating cast to dtype and back (float32)."""
    amax = x.abs().max().item()
    if amax == 0:
        return x
    scale = 2.0 ** math.floor(math.log2(FP8_MAX[dtype] / amax))
    return (x * scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype).float() / scale


class EmulatedHead(torch.autograd.Function):
    """logits = x @ w^T exactly; the backward's operands rounded to FP8 as the variant says."""

    @staticmethod
    def forward(ctx, x, w, variant):
        ctx.save_for_backward(x, w)
        ctx.variant = variant
        if variant == "all":
            return fp8_round(x, torch.float8_e4m3fn) @ fp8_round(w, torch.float8_e4m3fn).t()
        return x @ w.t()

    @staticmethod
    def backward(ctx, dlogits):
        x, w = ctx.saved_tensors
        grad_format = torch.float8_e4m3fn if ctx.variant == "both_e4m3" else torch.float8_e5m2
        q = fp8_round(dlogits, grad_format)
        e4m3 = torch.float8_e4m3fn
        fp8_dgrad = ctx.variant in ("both", "dgrad", "both_e4m3", "all")
        fp8_wgrad = ctx.variant in ("both", "wgrad", "both_e4m3", "all")
        dx = q @ fp8_round(w, e4m3) if fp8_dgrad else dlogits @ w
        x2 = x.reshape(-1, x.shape[-1])
        dw = (q.reshape(-1, q.shape[-1]).t() @ fp8_round(x2, e4m3) if fp8_wgrad
              else dlogits.reshape(-1, dlogits.shape[-1]).t() @ x2)
        return dx, dw, None


def train(variant, config, args):
    """The losses of args.steps steps of one variant from the seeded init and the same batches."""
    torch.manual_seed(0)
    model = GPT(config, flash=False)
    init_weights(model, 0)
    if variant != "fp32":
        head = model.lm_head
        head.forward = lambda x: EmulatedHead.apply(x, head.weight, variant)
    optimizer = configure_optimizer(model, args.lr, 0.1)
    loader = DataLoader(SHARD, args.batch_size, args.sequence_length, 0, 1, vocab_size=config.vocab_size)
    losses = []
    for _ in range(args.steps):
        x, y = (torch.from_numpy(a.astype(np.int64)) for a in loader.next_batch())
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return np.array(losses)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("-b", "--batch_size", type=int, default=16)
    ap.add_argument("-t", "--sequence_length", type=int, default=64)
    ap.add_argument("-c", "--channels", type=int, default=128)
    ap.add_argument("-l", "--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--variants", default="fp32,both,dgrad,wgrad,both_e4m3,all")
    args = ap.parse_args()
    if not os.path.exists(SHARD):
        sys.exit(f"fp8_head_emulation.py: {SHARD} not found: python dev/data/tinyshakespeare.py")
    config = GPT2Config(max_seq_len=args.sequence_length, vocab_size=50257, padded_vocab_size=50304,
                        num_layers=args.layers, num_heads=4, channels=args.channels)
    variants = args.variants.split(",")
    results = {v: train(v, config, args) for v in variants}
    base = results.get("fp32")
    marks = [s for s in (0, 12, 25, 50, 100, args.steps - 1) if s < args.steps]
    print(f"{'variant':<10} " + " ".join(f"step {s:>4}" for s in marks) + "   last-20 mean  vs fp32")
    for v, losses in results.items():
        last = losses[-20:].mean()
        gap = f"{last - base[-20:].mean():+.4f}" if base is not None else ""
        print(f"{v:<10} " + " ".join(f"{losses[s]:9.4f}" for s in marks) + f"   {last:12.4f}  {gap}")


if __name__ == "__main__":
    main()
