"""AdamW: the optimizer update, elementwise over every parameter, and why one launch beats 148.

The op (llm.c's AdamW, decoupled weight decay), per parameter element at step t with g = grad * grad_scale:
    m = beta1 * m + (1 - beta1) * g           v = beta2 * v + (1 - beta2) * g^2
    w -= lr * (m / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps) + wd * w)
with wd = weight_decay on the 2-D tensors (embeddings, matmul weights) and 0 on biases and layernorm parameters.
w is the fp32 master copy; the bf16 parameters the model computes with are rewritten as w rounded.

Bytes it must move per element: grad (4), m, v, master read and written (24), the bf16 parameter written (2): 30 bytes,
3.7 GB per step for GPT-2 124M (P = 124,475,904 with the padded vocabulary). A dozen flops per element: memory-bound.

The path:
v1  one launch per parameter tensor, as an nn.Module's parameters come: 148 tensors for d12 (12 per layer, plus wte,
    wpe and the final layernorm's two), learning rate and bias corrections passed from the host. Two thirds of the
    tensors are biases and layernorm parameters of 768 to 3072 values, so most launches do almost nothing; and the
    host-side scalars change every step, so the launches cannot be replayed from a captured CUDA graph either.
    Measured on the H100: 4.15 ms, against 1.25 ms for v2.
v2  the mainline (llmpy.kernels.adamw): one launch over the flat buffer, 1024 elements per program; the step's
    values (lr, bias corrections, grad scale) are read from device memory and the decayed ranges from a small table.
The bound: the fastest of torch._fused_adamw_ (what torch.optim.AdamW(fused=True) runs: one multi-tensor launch per
parameter group - decayed and not - over the fp32 masters, plus the copy to the bf16 parameters our update also
writes) and torch.compile of the flat torch update (one fused kernel; it also reads a 1-byte decay mask).
"""

from common import Result, assert_close, compiled, device, mark_bound, time_ms

import torch
import triton
import triton.language as tl

from llmpy.configs.gpt2 import GPT2Config, decayed_param_names, num_parameters, param_shapes, param_table, split_params
from llmpy.kernels import adamw as mainline
from llmpy.kernels.rounding import round_to

BETA1, BETA2, EPS, WEIGHT_DECAY = 0.9, 0.95, 1e-8, 0.1
LR, STEP, GRAD_SCALE = 1e-2, 3, 0.5
# small: a GPT-2 layout of 7,760 parameters (2 layers, C = 16, Vp = 64), not a multiple of any block
SMALL_CONFIG = GPT2Config(max_seq_len=8, vocab_size=50, padded_vocab_size=64, num_layers=2, num_heads=2, channels=16)
_WHOLE_MODEL_TENSORS = ("wte", "wpe", "lnfw", "lnfb")  # every other tensor stacks one tensor per layer


def decay_mask(config, dev):
    """bool (P,): True on the elements of decayed tensors, built from the parameter views."""
    mask = torch.zeros(num_parameters(config), dtype=torch.bool, device=dev)
    views = split_params(config, mask)
    for name in decayed_param_names():
        views[name].fill_(True)
    return mask


def reference(master, grads, m, v, mask, lr, step, grad_scale):
    """(master, m, v) after one step, in the inputs' dtype (float64 for the reference)."""
    g = grads * grad_scale
    m = BETA1 * m + (1 - BETA1) * g
    v = BETA2 * v + (1 - BETA2) * g * g
    m_hat = m / (1 - BETA1**step)
    v_hat = v / (1 - BETA2**step)
    return master - lr * (m_hat / (v_hat.sqrt() + EPS) + WEIGHT_DECAY * mask * master), m, v


def module_tensors(config, buffers):
    """The parameters as an nn.Module holds them: a list of (decays, views of each buffer), one per tensor per layer.

    buffers: flat (P,) tensors in the parameter layout (params, master, grads, m, v)."""
    decayed = set(decayed_param_names())
    per_buffer = [split_params(config, b) for b in buffers]
    tensors = []
    for name in param_shapes(config):
        layers = 1 if name in _WHOLE_MODEL_TENSORS else config.num_layers
        for layer in range(layers):
            views = [b[name] if name in _WHOLE_MODEL_TENSORS else b[name][layer] for b in per_buffer]
            tensors.append((name in decayed, views))
    return tensors


@triton.jit
def _adamw_tensor_kernel(params_ptr, master_ptr, grads_ptr, m_ptr, v_ptr, n, lr, bias_correction1,
                         bias_correction2, grad_scale, beta1, beta2, eps, weight_decay, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    grad = tl.load(grads_ptr + offsets, mask=mask) * grad_scale
    m = beta1 * tl.load(m_ptr + offsets, mask=mask) + (1.0 - beta1) * grad
    v = beta2 * tl.load(v_ptr + offsets, mask=mask) + (1.0 - beta2) * grad * grad
    w = tl.load(master_ptr + offsets, mask=mask)
    w = w - lr * ((m / bias_correction1) / (tl.sqrt(v / bias_correction2) + eps) + weight_decay * w)
    tl.store(m_ptr + offsets, m, mask=mask)
    tl.store(v_ptr + offsets, v, mask=mask)
    tl.store(master_ptr + offsets, w, mask=mask)
    tl.store(params_ptr + offsets, round_to(w, params_ptr.dtype.element_ty), mask=mask)


def v1(tensors, lr, step, grad_scale):
    """One launch per tensor of `module_tensors` (148 for d12), with that tensor's weight decay and the step's
    scalars as kernel arguments. Each launch is the flat update at the floor of its own traffic, but a 768-element
    bias is one program on one SM: the GPU idles between launches (several microseconds each), and the host
    computes and passes the scalars anew every step."""
    bias_correction1, bias_correction2 = 1 - BETA1**step, 1 - BETA2**step
    for decays, (params, master, grads, m, v) in tensors:
        n = params.numel()
        _adamw_tensor_kernel[(triton.cdiv(n, 1024),)](
            params, master, grads, m, v, n, lr, bias_correction1, bias_correction2, grad_scale,
            BETA1, BETA2, EPS, WEIGHT_DECAY if decays else 0.0, BLOCK=1024, num_warps=4,
        )


def v2(params, master, grads, m, v, hparams, grad_scale, segments):
    """The mainline, llmpy.kernels.adamw.adamw_update: one launch over all P elements (121,559 programs for d12),
    every SM busy from start to end; lr and the bias corrections (hparams) and the grad scale come from device
    tensors, the decayed ranges from a 5-row table, so a captured CUDA graph replays it every step."""
    mainline.adamw_update(params=params, master=master, grads=grads, m=m, v=v, hparams=hparams,
                          grad_scale=grad_scale, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WEIGHT_DECAY,
                          segments=segments)


def fused_groups(config, master, grads, m, v):
    """The [decayed, not decayed] parameter groups for torch._fused_adamw_: per group, the lists of master, grads,
    m, v views, one view per parameter tensor (16 in all: each stacks its layers)."""
    views = [split_params(config, b) for b in (master, grads, m, v)]
    decayed = set(decayed_param_names())
    groups = []
    for decays in (True, False):
        names = [name for name in param_shapes(config) if (name in decayed) == decays]
        groups.append((decays, [[b[name] for name in names] for b in views]))
    return groups


def fused_torch(params, master, groups, steps, lr, grad_scale):
    """torch._fused_adamw_ per group (it divides the gradients by grad_scale, as an AMP unscale: pass 1 / ours),
    then the masters rounded into the bf16 parameters."""
    for decays, (masters, grads, m, v) in groups:
        torch._fused_adamw_(masters, grads, m, v, [], steps[:len(masters)], lr=lr, beta1=BETA1, beta2=BETA2,
                            weight_decay=WEIGHT_DECAY if decays else 0.0, eps=EPS, amsgrad=False, maximize=False,
                            grad_scale=grad_scale)
    params.copy_(master)


def torch_flat(params, master, grads, m, v, mask, hparams, grad_scale):
    """The flat update in torch, the step's values from device tensors as the mainline's: for torch.compile."""
    lr, bias_correction1, bias_correction2 = hparams[0], hparams[1], hparams[2]
    g = grads * grad_scale
    m.mul_(BETA1).add_((1 - BETA1) * g)
    v.mul_(BETA2).add_((1 - BETA2) * g * g)
    w = master - lr * ((m / bias_correction1) / ((v / bias_correction2).sqrt() + EPS) + WEIGHT_DECAY * mask * master)
    master.copy_(w)
    params.copy_(w)


# Tolerances (relative, against float64 from the same fp32 state): master, m, v 1e-6: one step of fp32 arithmetic,
# a few ulps (2^-24 = 6e-8 each) per element; a missing weight decay shows at lr * wd = 1e-3, a wrong bias correction
# or moment at 1e-3 or more. bf16 parameters 4e-3: the master rounded once to bf16 (1.6e-3 in norm, see layernorm.py).
FP32_TOL, BF16_TOL = 1e-6, 4e-3


def _state(config, dev, seed):
    """Seeded mid-training state: master weights, gradients, first moments and positive second moments (fp32)."""
    g = torch.Generator().manual_seed(seed)
    P = num_parameters(config)
    master = torch.randn(P, generator=g)
    grads = torch.randn(P, generator=g)
    m = 0.1 * torch.randn(P, generator=g)
    v = 0.01 * torch.rand(P, generator=g) + 1e-4
    return [t.to(dev) for t in (master, grads, m, v)]


def check(small: bool) -> list[str]:
    dev = device()
    config = SMALL_CONFIG if small else GPT2Config()
    master0, grads, m0, v0 = _state(config, dev, seed=7)
    mask = decay_mask(config, dev)
    expected = reference(master0.double(), grads.double(), m0.double(), v0.double(), mask.double(), LR, STEP,
                         GRAD_SCALE)
    hparams = torch.empty(3, device=dev)
    mainline.set_adamw_hparams(hparams, LR, STEP, BETA1, BETA2)
    grad_scale = torch.full((1,), GRAD_SCALE, device=dev)
    segments = mainline.decay_segments(param_table(config), dev)
    steps = [torch.full((), float(STEP), device=dev) for _ in range(len(param_shapes(config)))]

    def run_v1(params, master, grads, m, v):
        v1(module_tensors(config, (params, master, grads, m, v)), LR, STEP, GRAD_SCALE)

    def run_fused(params, master, grads, m, v):
        fused_torch(params, master, fused_groups(config, master, grads, m, v), steps, LR, 1 / grad_scale)

    versions = {
        "v1": run_v1,
        "v2 mainline": lambda *buffers: v2(*buffers, hparams, grad_scale, segments),
        "torch._fused_adamw_": run_fused,
    }
    if dev == "cuda":
        versions["torch.compile"] = lambda *buffers: compiled(torch_flat)(*buffers, mask, hparams, grad_scale)
    lines = []
    for name, fn in versions.items():
        # fresh copies for each version: they update master, m, v in place, and torch's fused kernel also writes the
        # unscaled gradients (grads / its grad_scale) back into grads
        master, grads_copy, m, v = master0.clone(), grads.clone(), m0.clone(), v0.clone()
        params = torch.full_like(master, float("nan"), dtype=torch.bfloat16)
        fn(params, master, grads_copy, m, v)
        errors = [assert_close(f"adamw {name} {label}", got, ref, FP32_TOL)
                  for label, got, ref in zip(("master", "m", "v"), (master, m, v), expected)]
        errors.append(assert_close(f"adamw {name} params", params, expected[0], BF16_TOL))
        lines.append(f"{name}: rel error master {errors[0]:.1e}, m {errors[1]:.1e}, v {errors[2]:.1e}, "
                     f"bf16 params {errors[3]:.1e}")
    return lines


def benchmark() -> list[Result]:
    config = GPT2Config()
    dev = "cuda"
    master, grads, m, v = _state(config, dev, seed=0)
    params = master.to(torch.bfloat16)
    P = master.numel()
    moved = 30 * P
    hparams = torch.empty(3, device=dev)
    mainline.set_adamw_hparams(hparams, LR, STEP, BETA1, BETA2)
    grad_scale = torch.ones(1, device=dev)
    segments = mainline.decay_segments(param_table(config), dev)
    mask = decay_mask(config, dev)
    tensors = module_tensors(config, (params, master, grads, m, v))
    groups = fused_groups(config, master, grads, m, v)
    steps = [torch.full((), float(STEP), device=dev) for _ in range(len(param_shapes(config)))]
    compiled_flat = compiled(torch_flat)
    # the updates run again and again on the same state: lr = 1e-2 over ~60 steps keeps every value finite
    results = [
        Result("adamw", "v1 launch per tensor", time_ms(lambda: v1(tensors, LR, STEP, 1.0)), bytes=moved),
        Result("adamw", "v2 one flat launch", time_ms(lambda: v2(params, master, grads, m, v, hparams, grad_scale,
                                                                  segments)), bytes=moved, mainline=True),
    ]
    results += mark_bound([
        Result("adamw", "torch._fused_adamw_ + copy",
               time_ms(lambda: fused_torch(params, master, groups, steps, LR, None)), bytes=moved),
        Result("adamw", "torch.compile", time_ms(lambda: compiled_flat(params, master, grads, m, v, mask, hparams,
                                                                        grad_scale)), bytes=moved),
    ])
    return results


if __name__ == "__main__":
    import sys

    import run

    sys.exit(run.main(["adamw"]))
