"""The LM head's FP8 gradients (fp8_options lm_head="gradients") at a real size, on the GPU: are they the products of
their FP8 operands, and how far are those from the bf16 head's?

dev/fp8_head_emulation.py (since dev/fp8_emulation.py) found that rounding the head's backward operands to FP8 costs
no loss at a small size on the CPU, where the mainline measured 0.22 after 13 steps at d12 B=64; this check found why
(BENCHMARKS.md, FP8: an amax that came out 0 past 2^31 elements, scale 1, and it prints the scale first). It checks
the mainline's own path at d12 (B=64, T=1024 by default) after one calibrating micro-batch, on a second one:
  1. the classifier's e5m2 dlogits against a cast of dlogits computed by torch from the same logits (the bytes that
     differ: softmax's last bits may flip a bf16 rounding);
  2. the input gradient dlnf = dlogits @ wte (bf16 out) and the weight gradient dwte = dlogits^T @ lnf (fp32 out)
     against float64 products of the same FP8 values (what cuBLASLt should compute: expected within bf16's rounding
     for dlnf, ~1e-4 for dwte) and against float64 products of the bf16 operands (FP8's rounding: expected a few %).

    python dev/fp8_head_check.py [--model d12] [-b 64] [-t 1024]

tests/test_precision.py runs it on a tiny model under Triton's interpreter.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmpy import models  # noqa: E402
from llmpy.configs.gpt2 import config_from_descriptor  # noqa: E402
from llmpy.data import DataLoader  # noqa: E402
from llmpy.kernels.fp8 import FORMATS  # noqa: E402

SHARD = "dev/data/tinyshakespeare/tiny_shakespeare_train.bin"


def rel(got, ref):
    return (torch.linalg.vector_norm(got.double() - ref) / torch.linalg.vector_norm(ref)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="d12")
    ap.add_argument("-b", "--batch_size", type=int, default=64)
    ap.add_argument("-t", "--sequence_length", type=int, default=1024)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1 (tiny sizes)")
    ap.add_argument("--input_bin", default=SHARD, help="the token shard the two batches come from")
    args = ap.parse_args()
    config = config_from_descriptor(args.model)
    B, T = args.batch_size, args.sequence_length
    N, C, V, Vp = B * T, config.channels, config.vocab_size, config.padded_vocab_size
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32  # the interpreter: fp32 (as the CPU tests)
    model = models.build(config, B, T, dtype=dtype, device=args.device, precision="fp8",
                         fp8_options={"lm_head": "gradients"})
    model.init_weights(0)
    loader = DataLoader(args.input_bin, B, T)
    loss_sum = torch.zeros(1, device=args.device)
    x, y = (torch.from_numpy(a) for a in loader.next_batch())
    model.train_micro_batch(x, y, 1.0 / N, loss_sum, first=True)  # calibrates the head's dlogits scale
    x, y = (torch.from_numpy(a) for a in loader.next_batch())
    model.forward(x, y, dloss=1.0 / N, train=True)  # the classifier writes e5m2 dlogits, logits stay
    mm, a, wte = model.matmuls, model.acts, model.p["wte"]
    i = mm._index[wte.data_ptr()]
    out8 = mm._dout8[mm._group[i]][:N * Vp].view(N, Vp)
    scale, g_inv = mm._grad_scales.scale[i, 0].item(), mm._grad_scales.inverse[i, 0].item()
    w8t, w_inv = mm._w8_views[i][1], mm._weight_scales.inverse[i, 0].item()  # (C, Vp)
    lnf8, in_inv = mm._input8[i][:N * C].view(N, C), mm._input_scales.inverse[i, 0].item()
    print(f"{args.model} B={B} T={T}: dlogits scale 2^{torch.tensor(scale).log2().item():.0f}, "
          f"amax history max {mm._grad_scales.history[i].max().item():.3e}, dloss {1.0 / N:.3e}")

    # 1. the classifier's bytes against torch's dlogits, cast the same way
    logits = a.logits[:, :V].float()
    dlogits = torch.zeros(N, Vp, device=args.device, dtype=dtype)
    probs = torch.softmax(logits, dim=1)
    del logits
    probs[torch.arange(N, device=probs.device), model.targets.view(-1).long()] -= 1.0
    dlogits[:, :V] = (probs / N).to(dtype)
    del probs
    e5m2_max = FORMATS["e5m2"][1]
    cast = (dlogits.float() * scale).clamp(-e5m2_max, e5m2_max).to(torch.float8_e5m2)
    differ = (cast.view(torch.uint8) != out8.view(torch.uint8))
    print(f"classifier e5m2 bytes differing from torch's cast: {differ.sum().item()} of {N * Vp} "
          f"({differ.float().mean().item():.1e})")
    del cast, differ

    # 2. the two products
    dlnf = torch.empty(N, C, device=args.device, dtype=dtype)
    mm.backward_input(dlnf, a.logits, wte)
    dwte = model.g["wte"]  # the gradient buffer FP8 knows the head by (another would run the bf16 product)
    mm.backward_weight(dwte, a.logits, a.lnf, accumulate=False)
    if args.device != "cpu":
        torch.cuda.synchronize()
    q = out8.double() * g_inv  # (N, Vp) the e5m2 values
    fp8_dlnf = q @ (w8t.double().t() * w_inv)
    exact_dlnf = dlogits.double() @ wte.double()
    print(f"dlnf: against the float64 product of its FP8 operands {rel(dlnf, fp8_dlnf):.2e}, "
          f"against the bf16 operands' {rel(dlnf, exact_dlnf):.2e} (FP8's rounding: "
          f"{rel(fp8_dlnf, exact_dlnf):.2e})")
    del fp8_dlnf, exact_dlnf
    fp8_dwte = q.t() @ (lnf8.double() * in_inv)
    del q
    exact_dwte = dlogits.double().t() @ a.lnf.double()
    print(f"dwte: against the float64 product of its FP8 operands {rel(dwte, fp8_dwte):.2e}, "
          f"against the bf16 operands' {rel(dwte, exact_dwte):.2e} (FP8's rounding: "
          f"{rel(fp8_dwte, exact_dwte):.2e})")
    # the rows of tokens not in the batch: their gradient is all push-down, sum_i p_ij lnf_i / N
    present = torch.zeros(Vp, dtype=torch.bool, device=args.device)
    present[model.targets.view(-1).long()] = True
    absent = ~present
    absent[V:] = False
    print(f"dwte rows of the {absent.sum().item()} tokens absent from the targets: FP8 against bf16 operands "
          f"{rel(dwte[absent], exact_dwte[absent]):.2e}, mean ratio of norms "
          f"{(dwte[absent].double().norm(dim=1) / exact_dwte[absent].norm(dim=1)).mean().item():.4f}")


if __name__ == "__main__":
    main()
