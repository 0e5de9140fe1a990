"""AdamW over the flat parameter buffer: one launch updates every parameter (llm.c's update, decoupled weight decay).

Per element, at step t (1-based) with g = grad * grad_scale:
  m = beta1 * m + (1 - beta1) * g             v = beta2 * v + (1 - beta2) * g^2
  mhat = m / (1 - beta1^t)                    vhat = v / (1 - beta2^t)
  w -= lr * (mhat / (sqrt(vhat) + eps) + wd * w),   wd = weight_decay on decayed tensors, 0 elsewhere.
With fp32 master weights (bf16 runs) the update is applied to the master copy and the bf16 parameters are rewritten
as the master rounded to nearest; in an fp32 run the parameters are their own master.

Values that change from step to step come from device memory, so a CUDA graph captured once replays every step:
- `hparams`, fp32 (3,) = [lr, 1 - beta1^t, 1 - beta2^t], written before each step by `set_adamw_hparams`. The bias
  corrections are computed on the host in float64: computing beta^t in fp32 on the device would lose ~1e-4 of
  1 - 0.999^t to cancellation at small t.
- `grad_scale`, fp32 (1,), from norm.clip_scale.
beta1, beta2, eps and weight_decay are fixed for a run and passed as plain arguments.

Which elements decay: the flat buffer is in the parameter table's order, and every tensor the table decays is one
contiguous range of it (a tensor stacks all layers), so the decayed elements are 5 ranges for GPT-2 (wte and wpe
are adjacent and merge). `decay_segments` builds that table once, an int64 (S, 2) device tensor of [start, end).
Each program loads the S pairs (the same 80 bytes for every program, served from cache) and tests its offsets against
them: no per-element mask is stored or read.

Kernel design: elementwise over the flat buffers, BLOCK = 1024 elements per program (8 fp32 per thread with
4 warps: two 16-byte vectors per buffer). Each element moves grad, m, v, master in (16 bytes) and m, v, master,
param out (12 + 2 bytes in bf16): 30 bytes, each touched once, the bandwidth floor for this update.
"""

import torch
import triton
import triton.language as tl

from ..params import decay_runs
from . import INTERPRET
from .rounding import round_to


_BLOCK = 1 << 16 if INTERPRET else 1024  # the interpreter's cost is per program: few, wide ones there


@triton.jit
def _adamw_kernel(
    params_ptr,  # (P,) bf16 or fp32: the model's parameters, overwritten
    master_ptr,  # fp32 (P,): master weights, updated in place when HAS_MASTER (else unused)
    grads_ptr,  # fp32 (P,)
    m_ptr,  # fp32 (P,): first moment, updated in place
    v_ptr,  # fp32 (P,): second moment, updated in place
    hparams_ptr,  # fp32 (3,): [lr, 1 - beta1^t, 1 - beta2^t]
    grad_scale_ptr,  # fp32 (1,)
    decay_segments_ptr,  # int64 (NUM_SEGMENTS, 2): [start, end) ranges that get weight decay
    P,
    beta1,
    beta2,
    eps,
    weight_decay,
    NUM_SEGMENTS: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < P
    lr = tl.load(hparams_ptr)
    bias_correction1 = tl.load(hparams_ptr + 1)
    bias_correction2 = tl.load(hparams_ptr + 2)
    grad_scale = tl.load(grad_scale_ptr)

    decays = offsets < 0  # all False
    for segment in tl.static_range(NUM_SEGMENTS):
        start = tl.load(decay_segments_ptr + 2 * segment)
        end = tl.load(decay_segments_ptr + 2 * segment + 1)
        decays = decays | ((offsets >= start) & (offsets < end))
    decay = tl.where(decays, weight_decay, 0.0)

    grad = tl.load(grads_ptr + offsets, mask=mask, other=0.0) * grad_scale
    m = tl.load(m_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0)
    if HAS_MASTER:
        w = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    else:
        w = tl.load(params_ptr + offsets, mask=mask, other=0.0)

    m = beta1 * m + (1.0 - beta1) * grad
    v = beta2 * v + (1.0 - beta2) * grad * grad
    m_hat = m / bias_correction1
    v_hat = v / bias_correction2
    w = w - lr * (m_hat / (tl.sqrt(v_hat) + eps) + decay * w)

    tl.store(m_ptr + offsets, m, mask=mask)
    tl.store(v_ptr + offsets, v, mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + offsets, w, mask=mask)
    tl.store(params_ptr + offsets, round_to(w, params_ptr.dtype.element_ty), mask=mask)  # rounds to nearest for bf16


def decay_segments(table, device, start=0, stop=None):
    """int64 (S, 2) [start, end) ranges of the flat parameter buffer that get weight decay (the table's decayed
    tensors, adjacent ones merged: llmpy.params.decay_runs). Build once per run.

    With start/stop, the ranges are those of the slice [start, stop) of the buffer (a ZeRO-1 shard), counted from
    start and clipped to it; a range outside the slice becomes empty, so S is the same for every shard.
    """
    runs = decay_runs(table)
    stop = runs[-1][1] if stop is None else stop
    segments = [[min(max(a, start), stop) - start, min(max(b, start), stop) - start] for a, b, decay in runs if decay]
    return torch.tensor(segments, dtype=torch.int64, device=device)


def set_adamw_hparams(hparams, lr, step, beta1, beta2, staging=None):
    """Writes [lr, 1 - beta1^step, 1 - beta2^step] (step >= 1) into the fp32 (3,) device tensor hparams.

    Call before each (captured or not) update; the values are computed in float64 on the host, then rounded to fp32.
    staging: a pinned fp32 (3,) host tensor to copy from. A copy from pinned memory is queued like a kernel, where
    one from ordinary memory makes the host wait for the GPU; the staging tensor must then not be rewritten before
    the copy has run, which the end of a training step (it waits for its loss) guarantees.
    """
    values = torch.tensor([lr, 1.0 - beta1**step, 1.0 - beta2**step], dtype=torch.float64).to(torch.float32)
    if staging is None:
        hparams.copy_(values)
    else:
        staging.copy_(values)
        hparams.copy_(staging, non_blocking=True)


def adamw_update(params, master, grads, m, v, hparams, grad_scale, beta1, beta2, eps, weight_decay, segments):
    """One AdamW step over the flat buffers, one launch (see the module docstring for the math).

    params: (P,) bf16 with master fp32 (P,), or fp32 with master None (then params are updated in place).
    grads, m, v: fp32 (P,); m and v are updated in place. hparams: fp32 (3,) device tensor from set_adamw_hparams.
    grad_scale: fp32 (1,) device tensor (1.0, or norm.clip_scale's output). segments: decay_segments(table, device).
    """
    P = params.numel()
    if master is None and params.dtype != torch.float32:
        raise ValueError(f"adamw_update: {params.dtype} parameters need fp32 master weights")
    for buffer in (params, grads, m, v) if master is None else (params, master, grads, m, v):
        assert buffer.is_contiguous() and buffer.numel() == P
    assert grads.dtype == m.dtype == v.dtype == torch.float32 and segments.dtype == torch.int64
    has_master = master is not None
    _adamw_kernel[(triton.cdiv(P, _BLOCK),)](
        # without a master the kernel never touches master_ptr: it gets a read-only buffer as a placeholder
        params, master if has_master else grads, grads, m, v, hparams, grad_scale, segments,
        P, beta1, beta2, eps, weight_decay,
        NUM_SEGMENTS=segments.shape[0], HAS_MASTER=has_master, BLOCK=_BLOCK, num_warps=4,
    )
