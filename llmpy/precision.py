"""The precision of the linear layers' matmuls, in one place: --precision bf16 (the default) or fp8.

A model calls its matmuls through one of these objects (model.matmuls), never llmpy.vendor's matmuls directly, so
which product runs in which format is decided here and nowhere else:

  BF16     every matmul in the run's dtype (bf16; fp32 in tests): llmpy.vendor's, as they are.
  FP8      the linear layers (GPT-2's qkv, attention projection, fc and fc projection; Llama's also its gate; the
           LM head) in FP8 on Hopper's tensor cores, per-tensor scaled (llmpy.kernels.fp8):
             forward          out = inp @ W^T            inp e4m3, W e4m3
             input gradient   dinp = dout @ W            dout e5m2, W^T e4m3
             weight gradient  dW (+)= dout^T @ inp       dout^T e5m2, inp^T e4m3   (or in bf16: weight_grads_fp8)
           The LM head is the model's choice (its fp8_options lm_head: True, GPT-2's default; "gradients", its two
           gradients only, its logits in bf16: bf16_forward below; False, all in bf16, Llama 3's default). Everything
           else stays as it was: attention, norms, the optimizer with its fp32 master weights, and every output of
           these matmuls (bf16, or the fp32 weight gradients they accumulate into). e4m3 has the precision (3
           mantissa bits) that weights and activations need; e5m2 the range (2^-16 .. 57344) that gradients need.

Scaling. Activations and gradients: delayed, each tensor's scale from the largest amax of its last HISTORY casts
(one per micro-batch), each cast writing its tensor's amax as it goes (llmpy.kernels.fp8.update_scales), so a
tensor is read once. A tensor's first cast takes its own amax (current scaling): there is no history yet. A tensor
that outgrows its history's amax saturates at the format's largest value rather than overflowing, for one
micro-batch. The weights: current, their amax read just before their cast, at the start of every forward (the
weights change at every step; they are small next to the activations); their FP8 copies, W and W^T, take about a
byte per parameter each. All of it stays on the device (no host sync), so a micro-batch still replays as one CUDA
graph.

Hopper's FP8 matmuls take both operands K-major (vendor.matmul_fp8), so the weight gradient needs dout^T and inp^T,
and the input gradient W^T. Each is turned from the FP8 copy the matmul before it made (fp8.transpose: 2 bytes an
element, where casting the bf16 tensor again would move 3): W^T from W; inp^T from the forward's e4m3 input, which is
kept for the backward (N * K bytes a weight: 7 bytes a token and channel a GPT-2 layer, where the bf16 inputs the
model would save take 12: it keeps them as scratch instead, keeps_inputs); dout^T from the input
gradient's e5m2 dout, one buffer a kind of layer (a group: every layer's qkv, ...), which the next input gradient of
that kind waits to overwrite until the weight gradient, on the side stream, has read it.

Fused casts: a kernel that writes a linear layer's input can write it in e4m3 itself, with its amax (fp8_input):
GPT-2's layernorms and its GELU kernel (with -ge 0; cuBLASLt's GELU epilogue writes bf16), Llama's first RMSNorm
of a layer and the final norm (the LM head's input, with the head in FP8) do, so those inputs cost no cast of their
own. So can a kernel that writes a linear layer's output gradient write it in e5m2 (fp8_grad): the norms' backward
(LayerNorm's and RMSNorm's), for the projection below them (the residual stream's gradient they update is its
output gradient), GPT-2's GELU backward, for the fc layer, Llama's SwiGLU backward, for the gate and up
projections, and the fused classifier, for the LM head in FP8. What is still cast: the attention output and the
qkv gradient (and with -ge 1 the GELU output, which cuBLASLt's epilogue writes in bf16).
"""

import torch

from . import vendor
from .kernels import fp8

PRECISIONS = ("bf16", "fp8")


class BF16:
    """Every matmul in the run's dtype: llmpy.vendor's, unchanged."""

    keeps_inputs = False  # the weight gradients read the bf16 inputs the model saved

    @staticmethod
    def prepare():
        pass

    @staticmethod
    def state():
        return None

    @staticmethod
    def fp8_input(weight, rows):
        return None

    fp8_grad = fp8_input

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


class FP8:
    def __init__(self, groups, rows, device, weight_grads_fp8=True, fast_accum=False, bf16_forward=()):
        """groups: the linear layers to run in FP8, one group a kind of layer (every layer's qkv projection, ...):
        [[(weight (OC, K) view, its gradient view), ...], ...]; a matmul on any other weight runs in bf16. rows: N,
        the micro-batch's tokens. weight_grads_fp8: the weight gradients in FP8 too (else in bf16, from the bf16
        tensors). fast_accum: cuBLASLt's FP8 fast accumulation. bf16_forward: the groups (indices) whose
        forward runs in bf16 and only their gradients in FP8 (the LM head: its logits are the loss's); their forward
        still casts the input, for the weight gradient."""
        self.weight_grads_fp8, self.fast_accum = weight_grads_fp8, fast_accum
        # the weight gradients read the e4m3 inputs kept here: the model need not save its bf16 ones
        self.keeps_inputs = weight_grads_fp8
        pairs = [pair for group in groups for pair in group]
        self._weights = [w for w, _ in pairs]
        self._group = [g for g, group in enumerate(groups) for _ in group]
        self._bf16_forward = [g in bf16_forward for g in self._group]
        self._index = {w.data_ptr(): i for i, w in enumerate(self._weights)}
        self._grad_index = {grad.data_ptr(): i for i, (_, grad) in enumerate(pairs)}
        n = len(pairs)
        # scales: the weights' (current: they change every step, and reading them is cheap), and each linear
        # layer's input (e4m3) and output gradient (e5m2), delayed (reading an activation twice is not)
        self._weight_scales = _Scales(n, "e4m3", device)
        self._input_scales, self._grad_scales = _Scales(n, "e4m3", device), _Scales(n, "e5m2", device)
        e4m3, e5m2 = dict(dtype=torch.float8_e4m3fn, device=device), dict(dtype=torch.float8_e5m2, device=device)
        # W and W^T of every weight in e4m3, in one buffer each (the same offsets)
        self._w8 = torch.empty(sum(w.numel() for w in self._weights), **e4m3)
        self._w8t = torch.empty_like(self._w8)
        self._w8_views = [(w8.view(w.shape), w8t.view(w.shape[1], w.shape[0])) for w, w8, w8t in
                          zip(self._weights, self._split(self._w8), self._split(self._w8t))]
        # the forward's e4m3 inputs, (N, K) each: kept, a buffer a weight, for FP8 weight gradients; else one for all
        widths = [w.shape[1] * rows for w in self._weights]
        self._input8 = (self._split(torch.empty(sum(widths), **e4m3), widths) if weight_grads_fp8 else
                        [torch.empty(max(widths), **e4m3)] * n)
        # the output gradients in e5m2, (N, OC), a buffer a group; the transposed copies (on the side stream, one
        # after the other) in one buffer each
        self._dout8 = [torch.empty(max(w.shape[0] for w, _ in group) * rows, **e5m2) for group in groups]
        if weight_grads_fp8:
            self._input8t = torch.empty(max(widths), **e4m3)
            self._dout8t = torch.empty(max(w.shape[0] for w in self._weights) * rows, **e5m2)
        self._produced = [False] * n  # the next forward's FP8 input was written by its producer (fp8_input)
        self._grad_produced = [False] * n  # the next input gradient's FP8 dout was written by its producer
        self._events = torch.device(device).type == "cuda"
        self._dout_of = [None] * len(groups)  # the weight whose gradient's dout a group's buffer holds
        self._dout_read = [None] * len(groups)  # the event after a weight gradient read it (CUDA)

    def _split(self, buffer, sizes=None):
        """buffer cut into consecutive flat views: one a weight (its numel), or of the given sizes."""
        sizes = [w.numel() for w in self._weights] if sizes is None else sizes
        return list(buffer.split(sizes))

    def prepare(self):
        """Once before each forward: the delayed scales from the last micro-batch's amax, and the weights' FP8
        copies, W and W^T."""
        self._input_scales.update()
        self._grad_scales.update()
        for i, (w, (w8, w8t)) in enumerate(zip(self._weights, self._w8_views)):
            self._weight_scales.cast(i, w8, w, current=True)
            fp8.transpose(w8t, w8)
        # a new micro-batch: its backward_weight reads this one's dout copies, and waits on no event of an earlier
        # one (whose backward joined its side stream before it ended; in a CUDA graph's capture such a wait would be
        # an error)
        self._dout_of = [None] * len(self._dout_of)
        self._dout_read = [None] * len(self._dout_read)

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

    def fp8_input(self, weight, rows):
        """For the kernel that writes weight's next input (a layernorm) to write it in FP8 itself, the cast fused
        into it: (out (rows, K) e4m3, scale, amax), fp32 (1,) each, to write fp8(x * scale) into out and max |x| into
        amax; forward then takes out as it is. None if weight runs in bf16, if its forward or weight gradient does
        (they read the bf16 input), or if its input has no scale yet (its first cast takes the tensor's own amax: the
        producer writes the bf16 tensor and forward casts it)."""
        i = self._index.get(weight.data_ptr())
        if i is None or self._bf16_forward[i] or not self.weight_grads_fp8 or not self._input_scales.calibrated[i]:
            return None
        self._produced[i] = True
        scales = self._input_scales
        return self._view(self._input8[i], (rows, weight.shape[1])), scales.scale[i, :1], scales.amax[i, :1]

    def fp8_grad(self, weight, rows):
        """fp8_input's twin for the backward: for the kernel that writes weight's output gradient (a norm's backward,
        GPT-2's GELU backward, the classifier) to write it in e5m2 itself, into the buffer of weight's group:
        (out (rows, OC) e5m2, scale, amax), or None (as fp8_input). The next backward_input of weight then takes out
        as it is."""
        i = self._index.get(weight.data_ptr())
        if i is None or not self.weight_grads_fp8 or not self._grad_scales.calibrated[i]:
            return None
        self._grad_produced[i] = True
        group = self._group[i]
        self._wait_for_dout_read(group)  # the producer overwrites the buffer now, not the input gradient
        scales = self._grad_scales
        return self._view(self._dout8[group], (rows, weight.shape[0])), scales.scale[i, :1], scales.amax[i, :1]

    def _wait_for_dout_read(self, group):
        """The current stream waits until the last weight gradient of group (on the side stream) has read the
        group's dout buffer."""
        if self._dout_read[group] is not None:
            torch.cuda.current_stream().wait_event(self._dout_read[group])

    def _input(self, i, inp):
        """weight i's FP8 input and its inverse scale: written by its producer (fp8_input), or cast from inp."""
        out = self._view(self._input8[i], inp.shape)
        if self._produced[i]:
            self._produced[i] = False
            return out, self._input_scales.inverse[i, :1]
        return out, self._input_scales.cast(i, out, inp)

    def forward(self, out, inp, weight, bias=None, residual=None):
        """vendor.matmul_forward, in FP8 for the FP8 weights."""
        w = self._weight(weight)
        if w is None:
            vendor.matmul_forward(out, inp, weight, bias, residual)
            return
        i, w8, w_inverse = w
        inp8, inp_inverse = self._input(i, inp)
        if self._bf16_forward[i]:  # the e4m3 input is for the weight gradient only
            vendor.matmul_forward(out, inp, weight, bias, residual)
            return
        vendor.matmul_fp8(out, inp8, inp_inverse, w8, w_inverse, bias=bias, c=residual, fast_accum=self.fast_accum)

    def forward_gelu(self, out, pre_gelu, inp, weight, bias):
        """vendor.matmul_gelu_forward, in FP8 (GELU in cuBLASLt's epilogue)."""
        i, w8, w_inverse = self._weight(weight)
        vendor.matmul_fp8(out, *self._input(i, inp), w8, w_inverse, bias=bias, pre_gelu=pre_gelu,
                          fast_accum=self.fast_accum)

    def backward_input(self, dinp, dout, weight, accumulate=False):
        """vendor.matmul_backward_input: dinp (N, K) (+)= dout (N, OC) @ W, in FP8 as dout @ (W^T)^T; dout's e5m2
        copy (cast here, or written by its producer: fp8_grad) stays in its group's buffer for backward_weight."""
        w = self._weight(weight, transposed=True)
        if w is None:
            vendor.matmul_backward_input(dinp, dout, weight, accumulate)
            return
        i, w8t, w_inverse = w
        group = self._group[i]
        dout8 = self._view(self._dout8[group], dout.shape)
        if self._grad_produced[i]:  # written by its producer (fp8_grad)
            self._grad_produced[i] = False
            dout_inverse = self._grad_scales.inverse[i, :1]
        else:
            self._wait_for_dout_read(group)
            dout_inverse = self._grad_scales.cast(i, dout8, dout)
        self._dout_of[group] = i
        vendor.matmul_fp8(dinp, dout8, dout_inverse, w8t, w_inverse, c=dinp if accumulate else None,
                          fast_accum=self.fast_accum)

    def backward_weight(self, dweight, dout, inp, accumulate=True):
        """vendor.matmul_backward_weight: dW (OC, K) fp32 (+)= dout (N, OC)^T @ inp (N, K). With FP8 weight
        gradients, as dout^T @ (inp^T)^T from the FP8 copies of dout (backward_input's, which must come first) and of
        inp (the forward's), each turned (fp8.transpose), at the scales of their casts; dout and inp give the shapes
        only. Else in bf16 from dout and inp."""
        i = self._grad_index.get(dweight.data_ptr())
        if not self.weight_grads_fp8 or i is None:
            vendor.matmul_backward_weight(dweight, dout, inp, accumulate)
            return
        group = self._group[i]
        if self._dout_of[group] != i:
            raise RuntimeError("FP8.backward_weight of a weight follows its backward_input (whose dout it reads)")
        (N, OC), K = dout.shape, inp.shape[1]
        dout8t, input8t = self._view(self._dout8t, (OC, N)), self._view(self._input8t, (K, N))
        fp8.transpose(dout8t, self._view(self._dout8[group], (N, OC)))
        fp8.transpose(input8t, self._view(self._input8[i], (N, K)))
        vendor.matmul_fp8(dweight, dout8t, self._grad_scales.inverse[i, :1], input8t,
                          self._input_scales.inverse[i, :1], c=dweight if accumulate else None,
                          fast_accum=self.fast_accum)
        if self._events:
            self._dout_read[group] = torch.cuda.Event()
            self._dout_read[group].record()


def matmuls(precision, groups, rows, dtype, device, **options):
    """The matmuls of a model in this precision ("bf16" or "fp8"), for a run in dtype on device. groups, rows,
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
    return FP8(groups, rows, device, **options)
