"""The mainline's match test (llm.c's test_gpt2cu): our GPU GPT-2 against the PyTorch reference, tensor by tensor.
(test_llama3.py runs the same for Llama 3.)

First write the reference files (fp32, on any device):
    python train_gpt2_torch.py --model d12 --write_tensors 1
then:
    python test_gpt2.py                         # bf16, cuDNN attention
    python test_gpt2.py --dtype float32 --attention triton --recompute 2

It loads the model and the debug state the reference wrote (one batch's inputs, targets, logits, loss and every
parameter gradient), runs our forward and backward on that batch and compares; then takes 10 AdamW steps on the
same batch with the reference's hyperparameters and compares the losses. One line per tensor, then
`overall okay: 1` (exit 0) or `overall okay: 0` (exit 1).

Error measure: relative error ||ours - ref|| / ||ref|| over the whole tensor, because bf16's error is relative to
the size of the values, and a max-abs threshold would be too loose for small tensors and too tight for large ones.
Tolerances, from what was measured on an H100 at d12 (B=4, T=64; 2026-11-24) with a margin of about 5-10x:
- float32 (TF32 off): the only differences are summation order (cuBLAS vs the reference's BLAS, our reductions vs
  torch's): measured 1.4e-6 on the logits, at most 1.0e-6 on a gradient, 5e-6 on the 10 losses. Tolerance 1e-5
  relative, 1e-4 absolute on the losses. A real bug (a missing term, a wrong layer) gives errors of 1e-2 or more.
- bfloat16: parameters and activations are rounded to 8 significant bits (2^-9 relative per rounding), and the
  roundings compound through the layers: measured 1.1e-2 on the logits, at most 1.05e-2 on a gradient, and the 10
  losses (about 11 down to 3.4) within 0.014. Tolerance 5e-2 relative, 5e-2 absolute on the losses.
- --precision fp8 (bf16 elsewhere; llmpy/precision.py): the blocks' matmul operands keep 3 (e4m3) or 2 (e5m2)
  mantissa bits, a rounding step 32-64x bf16's. Measured on an H200 at d12 (2026-12-03), alike in the three modes of
  dev/gpu_check.sh: 9.7e-2 on the logits, at most 1.43e-1 on a gradient (wpe), the 10 losses within 0.14 (at
  step 3, the reference's spike from 7.9 to 9.9); on the CPU's tiny model 3.3e-2 and 1.05e-1. Tolerance 2e-1 on the
  logits, 3e-1 on the gradients and the losses: a margin of 1.5-2x only, as FP8's own error is some 10x bf16's while
  a bug's stays O(1) (a wrong scale is off by a power of two, a wrong layout by ~100%). FP8's products are checked
  tightly where they are made: tests/kernels/test_matmul_fp8.py (GPU, 2^-8 against float64 products of the same
  FP8 values) and tests/test_precision.py (1e-5).
"""

import argparse
import os
import sys

import numpy as np

from llmpy import families
from llmpy.formats import FormatError
from llmpy.reference_files import read_reference_files

TOLERANCES = {  # dtype -> (logits and loss, gradients: relative; each of the 10 losses: absolute)
    "float32": (1e-5, 1e-5, 1e-4),
    "bfloat16": (5e-2, 5e-2, 5e-2),
    "fp8": (2e-1, 3e-1, 3e-1),
}


def relative_error(ours, ref):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def check(name, ours, ref, tol):
    """Prints one line for a tensor; returns whether it is within tolerance."""
    err = relative_error(ours, ref)
    ok = bool(np.isfinite(ours).all() and err <= tol)
    maxabs = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))
    print(f"{name:10s} rel err {err:.3e}  max abs diff {maxabs:.3e}  (tol {tol:.0e})  {'OK' if ok else 'NOT OK'}")
    return ok


def parse_args(argv=None, family=families.GPT2):
    p = argparse.ArgumentParser(description=f"Match the {family.name} mainline against the PyTorch reference's debug "
                                            "state.")
    default = "d12" if family is families.GPT2 else "tiny"
    p.add_argument("--model", default=default, help=f"descriptor whose reference files to load ({default} -> "
                                                    f"{family.file_prefix(default)}.*)")
    p.add_argument("--dir", default=".", help="folder holding the reference files")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=10, help="AdamW steps whose losses are compared (at most the "
                   "reference's 10); fewer for a quick check of the first step's tensors")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp8"],
                   help="the linear layers' matmuls, as train_gpt2.py's --precision (fp8: with --dtype bfloat16 on "
                        "the GPU, or float32 on the CPU, where FP8's products are emulated exactly)")
    p.add_argument("--recompute", "-r", type=int, default=0, choices=[0, 1, 2])
    p.add_argument("--attention", default="cudnn", choices=["cudnn", "triton"])
    p.add_argument("--device", default="cuda", help="cuda, or cpu with TRITON_INTERPRET=1 (tests)")
    p.add_argument("--cuda_graphs", type=int, default=1, choices=[0, 1],
                   help="replay the training steps from a CUDA graph, as train_gpt2.py does")
    if family is families.GPT2:
        p.add_argument("--gelu_fusion", "-ge", type=int, default=-1, choices=[-1, 0, 1],
                       help="GELU in the fc matmul's cuBLASLt epilogue, as train_gpt2.py's -ge")
    args = p.parse_args(argv)
    if args.steps < 0:
        p.error(f"--steps must be >= 0, got {args.steps}")
    return args


def main(argv=None, family=families.GPT2, tolerances=TOLERANCES):
    args = parse_args(argv, family)
    prog = os.path.basename(sys.argv[0])
    reference_trainer = "train_gpt2_torch.py" if family is families.GPT2 else "train_llama3_torch.py"
    # the reference files first, before torch and the device: a missing or stale set is told at once, on any machine
    command = f"python {reference_trainer} --model {args.model} --write_tensors 1 --write_dir {args.dir}"
    try:
        config, weights, state, reference = read_reference_files(args.dir, family.file_prefix(args.model), command,
                                                                 family)
    except FormatError as e:
        sys.exit(f"{prog}: error: {e}")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: our kernels run on CPU tensors
    import torch

    from llmpy import models

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"{prog}: no CUDA device; run with --device cpu for the Triton interpreter")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32
    torch.backends.cudnn.allow_tf32 = False

    B, T = state.x.shape
    V = config.vocab_size
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    try:
        model = models.build(config, B, T, dtype=dtype, device=args.device, cuda_graphs=bool(args.cuda_graphs),
                             recompute=args.recompute, attention_impl=args.attention,
                             gelu_fusion=getattr(args, "gelu_fusion", 0), precision=args.precision)
    except ValueError as e:  # e.g. --attention cudnn without the cuDNN frontend installed
        sys.exit(f"{prog}: {e}")
    runtime = model.runtime
    runtime.load_weights(weights)
    print(f"[{prog}] {args.model}: B={B} T={T} dtype={args.dtype} precision={args.precision} "
          f"recompute={args.recompute} attention={model.attention_impl} device={args.device} cuda_graphs={int(runtime.cuda_graphs)}"
          + (f" gelu_fusion={model.gelu_fusion}" if family is families.GPT2 else ""))
    tol_logits, tol_grads, tol_loss = tolerances["fp8" if args.precision == "fp8" else args.dtype]
    x, y = torch.from_numpy(state.x), torch.from_numpy(state.y)
    ok = True

    # forward without targets leaves plain logits; with targets they become dlogits
    model.forward(x)
    logits = model.acts.logits.view(B, T, -1)[:, :, :V].float().cpu().numpy()
    ok &= check("logits", logits, state.logits, tol_logits)
    runtime.grads.fill_(float("nan"))  # a step's first backward must leave nothing of what the gradients held
    model.forward(x, y)
    loss = model.acts.losses.double().mean().item()
    ok &= check("loss", np.array([loss]), np.array([state.loss]), tol_logits)
    model.backward(first=True)
    ref_grads = family.split_params(config, state.grads)
    for name, grad in model.g.items():
        ok &= check(name, grad.cpu().numpy(), ref_grads[name], tol_grads)

    # 10 AdamW steps on the same batch, with the reference's hyperparameters, as train_gpt2.py takes them (from the
    # second step on replayed from a CUDA graph unless --cuda_graphs 0)
    losses = []
    loss_sum = torch.zeros(1, dtype=torch.float32, device=args.device)
    for step in range(1, min(args.steps, len(reference["losses"])) + 1):
        loss_sum.zero_()
        model.train_micro_batch(x, y, 1.0 / (B * T), loss_sum, first=True)
        losses.append(loss_sum.item())
        runtime.clip_and_update(reference["learning_rate"], step, reference["beta1"], reference["beta2"],
                                reference["eps"], reference["weight_decay"], reference["grad_clip"])
    for step, (ours, ref) in enumerate(zip(losses, reference["losses"])):
        step_ok = abs(ours - ref) <= tol_loss
        ok &= step_ok
        print(f"step {step}: loss {ours:.6f} reference {ref:.6f}  (tol {tol_loss:.0e})  {'OK' if step_ok else 'NOT OK'}")

    print(f"overall okay: {int(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
