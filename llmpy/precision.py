"""The precision of the linear layers' matmuls, in one place: --precision bf16 (the default) or fp8.

A model calls its matmuls through one of these objects (model.matmuls), never llmpy.vendor's matmuls directly, so
which product runs in which format is decided here and nowhere else:

  BF16     every matmul in the run's dtype (bf16; fp32 in tests): llmpy.vendor's, as they are.
  FP8      the transformer blocks' linear layers (GPT-2's qkv, attention projection, fc and fc projection; Llama's
           also its gate) in FP8 on Hopper's tensor cores, per-tensor scaled (llmpy.kernels.fp8):
             forward          out = inp @ W^T            inp e4m3, W e4m3
             input gradient   dinp = dout @ W            dout e5m2, W^T e4m3
             weight gradient  dW (+)= dout^T @ inp       dout^T e5m2, inp^T e4m3   (or in bf16: weight_grads_fp8)
           Everything else stays as it was: the LM head (its logits' precision is the loss's; the model's
           fp8_options lm_head=True puts it in FP8 too, dev/bench.py's fp8_head), attention, norms, the optimizer
           with its fp32 master weights, and every output of these matmuls (bf16, or the fp32 weight gradients they
           accumulate into). e4m3 has the precision (3 mantissa bits) that weights and activations need;
           e5m2 the range (2^-16 .. 57344) that gradients need.

Scaling. Activations and gradients: delayed, each tensor's scale from the largest amax of its last HISTORY casts
(one per micro-batch), each cast writing its tensor's amax as it goes (llmpy.kernels.fp8.update_scales), so a
tensor is read once. A tensor's first cast takes its own amax (current scaling): there is no history yet. A tensor
that outgrows its history's amax saturates at the format's largest value rather than overflowing, for one
micro-batch. The weights: current, their amax read just before their cast, at the start of every forward (the
weights change at every step; they are small next to the activations); their FP8 copies, W and W^T, take about a
byte per parameter each. All of it stays on the device (no host sync), so a micro-batch still replays as one CUDA
graph.

Hopper's FP8 matmuls take both operands K-major (vendor.matmul_fp8), so W^T, dout^T and inp^T are cast transposed.
"""

import torch

from . import vendor
from .kernels import fp8

PRECISIONS = ("bf16", "fp8")


class BF16:
    """Every matmul in the run's dtype: llmpy.vendor's, unchanged."""

    @staticmethod
    def prepare():
        pass

    @staticmethod
    def state():
        return None

    forward = staticmethod(vendor.matmul_forward)
    forward_gelu = staticmethod(vendor.matmul_gelu_forward)
    backward_input = staticmethod(vendor.matmul_backward_input)
    backward_weight = staticmethod(vendor.matmul_backward_weight)


HISTORY = 16  # the micro-batches whose amax a delayed scale covers
_STRIDE = 64  # fp32 values between two tensors' scales: 256 bytes, so that each scale pointer is aligned as an
# allocation is (cuBLASLt refuses a pointer 8 bytes into a tensor: status 15, not supported, on the H200)


class _Scales:
    """The scales of n FP8 tensors of one format ("e4m3" or "e5m2"): tensor i's amax, scale and 1/scale are column 0
    of row i of (n, _STRIDE) arrays, and its amax history (n, HISTORY) serves delayed scaling."""

    def __init__(self, n, fmt, device):
        f32 = dict(dtype=torch.float32, device=device)
        self.fmt = fmt
        self.history = torch.zeros(n, HISTORY, **f32)
        self.amax, self.scale, self.inverse = (torch.zeros(n, _STRIDE, **f32) for _ in range(3))
        self.calibrated = [False] * n  # tensor i has been cast once (its history is not empty)

    def update(self):
        """Every delayed scale from its history, with the amax of the casts since the last update (one launch)."""
        fp8.update_scales(self.history, self.amax, self.scale, self.inverse, self.fmt)

    def state(self):
        """What the next update needs, for a checkpoint: the histories and the amax not yet in them (host lists)."""
        return {"history": self.history.tolist(), "amax": self.amax[:, 0].tolist()}

    def load_state(self, state):
        """Sets state(); the next update then makes the scales the run would have had. A tensor that had been cast
        counts as calibrated."""
        history = torch.tensor(state["history"], dtype=torch.float32)
        amax = torch.tensor(state["amax"], dtype=torch.float32)
        if history.shape != self.history.shape or amax.shape != (self.amax.shape[0],):
            raise ValueError(f"FP8 scale state of shape {tuple(history.shape)}, the model has "
                             f"{tuple(self.history.shape)}")
        self.history.copy_(history)
        self.amax[:, 0].copy_(amax)
        self.calibrated = [bool(h.any() or a > 0) for h, a in zip(history, amax)]

    def cast(self, i, out, x, transpose=False, current=False):
        """out = fp8(x * s) (transposed if asked) with tensor i's scale s; returns 1/s (fp32 (1,)), the matmul's.
        Delayed: s from the history, the cast adding x's amax to the next update's. current (and a tensor's first
        cast, which runs eagerly: a CUDA graph's first call does): s from x's own amax, read first."""
        amax, scale, inverse = self.amax[i, :1], self.scale[i, :1], self.inverse[i, :1]
        if current or not self.calibrated[i]:
            fp8.amax(amax, x)
            fp8.scale_from_amax(scale, inverse, amax, self.fmt)
            fp8.cast(out, x, scale, transpose=transpose)
            self.calibrated[i] = True
        else:
            fp8.cast(out, x, scale, amax_out=amax, transpose=transpose)
        return inverse

    def cast_again(self, i, out, x, transpose):
        """A second FP8 copy of the tensor cast last as tensor i (the same values, e.g. transposed for the weight
        gradient), with the same scale; returns 1/s."""
        assert self.calibrated[i], "cast_again follows a cast of the same tensor"
        fp8.cast(out, x, self.scale[i, :1], transpose=transpose)
        return self.inverse[i, :1]


class FP8:
    def __init__(self, weights, rows, device, weight_grads_fp8=True, fast_accum=False):
        """weights: [(weight (OC, K) view, its gradient view)] of the linear layers to run in FP8; a matmul on any
        other weight (the LM head) runs in bf16. rows: N, the micro-batch's tokens. weight_grads_fp8: the weight
        gradients in FP8 too (else in bf16, from the bf16 tensors). fast_accum: cuBLASLt's FP8 fast accumulation."""
        self.weight_grads_fp8, self.fast_accum = weight_grads_fp8, fast_accum
        self._weights = [w for w, _ in weights]
        self._index = {w.data_ptr(): i for i, w in enumerate(self._weights)}
        self._grad_index = {g.data_ptr(): i for i, (_, g) in enumerate(weights)}
        n = len(weights)
        # scales: the weights' (current: they change every step, and reading them is cheap), and each linear
        # layer's input (e4m3) and output gradient (e5m2), delayed (reading an activation twice is not)
        self._weight_scales = _Scales(n, "e4m3", device)
        self._input_scales, self._grad_scales = _Scales(n, "e4m3", device), _Scales(n, "e5m2", device)
        # W and W^T of every weight in e4m3, in one buffer each (the same offsets)
        sizes = [w.numel() for w in self._weights]
        offsets = [sum(sizes[:i]) for i in range(n)]
        self._w8 = torch.empty(sum(sizes), dtype=torch.float8_e4m3fn, device=device)
        self._w8t = torch.empty_like(self._w8)
        self._w8_views = [(self._w8[o:o + size].view(w.shape), self._w8t[o:o + size].view(w.shape[1], w.shape[0]))
                          for o, size, w in zip(offsets, sizes, self._weights)]
        # the casts' outputs, N rows of the widest input (K) or output (OC) of these matmuls; the forward's and the
        # input gradient's on the main stream, the weight gradient's (transposed) on the side stream
        widest_in, widest_out = (max(w.shape[d] for w in self._weights) * rows for d in (1, 0))
        e4m3, e5m2 = dict(dtype=torch.float8_e4m3fn, device=device), dict(dtype=torch.float8_e5m2, device=device)
        self._input8, self._dout8 = torch.empty(widest_in, **e4m3), torch.empty(widest_out, **e5m2)
        if weight_grads_fp8:
            self._input8t, self._dout8t = torch.empty(widest_in, **e4m3), torch.empty(widest_out, **e5m2)

    def prepare(self):
        """Once before each forward: the delayed scales from the last micro-batch's amax, and the weights' FP8
        copies, W and W^T."""
        self._input_scales.update()
        self._grad_scales.update()
        for i, (w, (w8, w8t)) in enumerate(zip(self._weights, self._w8_views)):
            self._weight_scales.cast(i, w8, w, current=True)
            self._weight_scales.cast_again(i, w8t, w, transpose=True)

    def state(self):
        """The delayed scales' state, for a checkpoint (a sync with the GPU: small lists)."""
        return {"inputs": self._input_scales.state(), "grads": self._grad_scales.state()}

    def load_state(self, state):
        """Restores state(): a resumed run scales its first casts as the run that went on would have."""
        self._input_scales.load_state(state["inputs"])
        self._grad_scales.load_state(state["grads"])

    def _weight(self, weight, transposed=False):
        """weight's index, FP8 copy ((K, OC) if transposed) and inverse scale; None if weight runs in bf16."""
        i = self._index.get(weight.data_ptr())
        if i is None:
            return None
        return i, self._w8_views[i][1 if transposed else 0], self._weight_scales.inverse[i, :1]

    @staticmethod
    def _view(buffer, shape):
        return buffer[:shape[0] * shape[1]].view(shape)

    def _input(self, i, inp):
        out = self._view(self._input8, inp.shape)
        return out, self._input_scales.cast(i, out, inp)

    def forward(self, out, inp, weight, bias=None, residual=None):
        """vendor.matmul_forward, in FP8 for the FP8 weights."""
        w = self._weight(weight)
        if w is None:
            vendor.matmul_forward(out, inp, weight, bias, residual)
            return
        i, w8, w_inverse = w
        vendor.matmul_fp8(out, *self._input(i, inp), w8, w_inverse, bias=bias, c=residual,
                          fast_accum=self.fast_accum)

    def forward_gelu(self, out, pre_gelu, inp, weight, bias):
        """vendor.matmul_gelu_forward, in FP8 (GELU in cuBLASLt's epilogue)."""
        i, w8, w_inverse = self._weight(weight)
        vendor.matmul_fp8(out, *self._input(i, inp), w8, w_inverse, bias=bias, pre_gelu=pre_gelu,
                          fast_accum=self.fast_accum)

    def backward_input(self, dinp, dout, weight, accumulate=False):
        """vendor.matmul_backward_input: dinp (N, K) (+)= dout (N, OC) @ W, in FP8 as dout @ (W^T)^T."""
        w = self._weight(weight, transposed=True)
        if w is None:
            vendor.matmul_backward_input(dinp, dout, weight, accumulate)
            return
        i, w8t, w_inverse = w
        dout8 = self._view(self._dout8, dout.shape)
        vendor.matmul_fp8(dinp, dout8, self._grad_scales.cast(i, dout8, dout), w8t, w_inverse,
                          c=dinp if accumulate else None, fast_accum=self.fast_accum)

    def backward_weight(self, dweight, dout, inp, accumulate=True):
        """vendor.matmul_backward_weight: dW (OC, K) fp32 (+)= dout (N, OC)^T @ inp (N, K), in FP8 as
        dout^T @ (inp^T)^T when weight_grads_fp8, each cast again transposed with the scale of its first cast (the
        input's in the forward, the gradient's in backward_input, which runs first)."""
        i = self._grad_index.get(dweight.data_ptr())
        if not self.weight_grads_fp8 or i is None:
            vendor.matmul_backward_weight(dweight, dout, inp, accumulate)
            return
        (N, OC), K = dout.shape, inp.shape[1]
        dout8t, input8t = self._view(self._dout8t, (OC, N)), self._view(self._input8t, (K, N))
        vendor.matmul_fp8(dweight, dout8t, self._grad_scales.cast_again(i, dout8t, dout, transpose=True),
                          input8t, self._input_scales.cast_again(i, input8t, inp, transpose=True),
                          c=dweight if accumulate else None, fast_accum=self.fast_accum)


def matmuls(precision, weights, rows, dtype, device, **options):
    """The matmuls of a model in this precision ("bf16" or "fp8"), for a run in dtype on device. weights, rows,
    options: FP8's (unused in bf16). ValueError, one line, for what cannot run: FP8 takes bf16 runs on GPUs with FP8
    tensor cores (compute capability 8.9: Ada, Hopper and newer), and any run on the CPU (tests: vendor.matmul_fp8
    emulates the products)."""
    if precision == "bf16":
        return BF16
    if precision != "fp8":
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    device = torch.device(device)
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            raise ValueError("--precision fp8 runs with --dtype bfloat16 (FP8's matmuls write bf16)")
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(f"--precision fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper "
                             f"and later); this GPU is {capability[0]}.{capability[1]}: use --precision bf16")
    return FP8(weights, rows, device, **options)
