"""Triton kernels of the mainline, one module per op family.

Conventions shared by every module:
- Activations are row-major (N, C) with N = B*T rows, in the run's dtype (bf16 or fp32); the math inside a kernel
  is fp32. Per-row statistics (layernorm mean/rstd, softmax logsumexp) are fp32.
- Parameter gradients are fp32 and kernels accumulate into them (+=): the model zeroes them once per step, and
  gradient accumulation over micro-steps adds up in fp32.
- Outputs are passed in, never allocated inside: the training step allocates nothing, so it can be captured in a
  CUDA graph.
- With TRITON_INTERPRET=1 the same kernels run on CPU tensors (the tests do this). Triton's interpreter computes
  tl.dot wrongly on bf16 operands, so kernels upcast dot operands to fp32 when INTERPRET is set.
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
