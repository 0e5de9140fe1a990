"""GPT-2 on the GPU, the mainline: its activations and its forward and backward pass written out layer by layer.

The model works on the views of a Runtime's flat buffers (llmpy/runtime.py: the parameters, the gradients, the
optimizer, the CUDA graphs, the side stream; built from GPT-2's parameter table, llmpy.configs.gpt2.param_table),
plus the activations of one (B, T) micro-batch, allocated once. Matmuls go to cuBLASLt (llmpy.vendor, in bf16 or
FP8: llmpy.precision) and attention to cuDNN or our own flash attention; every other op is one of our Triton kernels
(llmpy.kernels), except the forward's GELU, which with gelu_fusion runs in the fc matmul's cuBLASLt epilogue.

Notation: B batch, T sequence length, C channels, NH heads, L layers, V vocab, Vp padded vocab, N = B*T rows.
"""

from typing import NamedTuple

import torch

from .. import precision
from ..configs.gpt2 import gpt2_init, param_table
from ..kernels import attention, bias, encoder, gelu, layernorm
from ..runtime import Runtime
from .attention import Attention, choose_attention
from .base import Model


class LayerActivations(NamedTuple):
    """What one layer's forward writes, for N rows of the residual stream: (N, C) unless said. Training passes the
    layer's slices of Activations (kept for the backward); inference passes scratch that every layer reuses."""
    ln1: torch.Tensor
    ln1_mean: torch.Tensor  # fp32 (N,)
    ln1_rstd: torch.Tensor  # fp32 (N,)
    qkv: torch.Tensor  # (N, 3C)
    atty: torch.Tensor  # attention output, heads side by side
    residual2: torch.Tensor  # residual + attention projection
    ln2: torch.Tensor
    ln2_mean: torch.Tensor  # fp32 (N,)
    ln2_rstd: torch.Tensor  # fp32 (N,)
    fch: torch.Tensor  # (N, 4C) MLP hidden, before GELU
    fch_gelu: torch.Tensor  # (N, 4C)
    residual3: torch.Tensor  # residual2 + MLP projection: the layer's output


def layer_forward(p, l, residual, acts, attend, gelu_fusion, matmuls=precision.BF16):
    """Layer l of GPT-2 on N rows of the residual stream, residual (N, C): writes every tensor of acts
    (LayerActivations), the layer's output last, into acts.residual3 (which may be residual itself: residual is last
    read before it is written). p: the parameter views (llmpy.configs.gpt2.split_params). attend(l, acts): the causal
    self-attention, from acts.qkv to acts.atty. gelu_fusion: GELU in the fc matmul's cuBLASLt epilogue (GPU only).
    matmuls: the linear layers' precision (llmpy.precision)."""
    N = residual.shape[0]
    # attention: layernorm, qkv projection, causal self-attention, output projection joining the residual; under FP8
    # the layernorms (and our GELU) write their matmul's e4m3 input themselves (fp8_input; None: they write acts.ln1
    # etc.)
    layernorm.layernorm_forward(acts.ln1, acts.ln1_mean, acts.ln1_rstd, residual, p["ln1w"][l], p["ln1b"][l],
                                fp8_out=matmuls.fp8_input(p["qkvw"][l], N))
    matmuls.forward(acts.qkv, acts.ln1, p["qkvw"][l], p["qkvb"][l])
    attend(l, acts)
    matmuls.forward(acts.residual2, acts.atty, p["attprojw"][l], p["attprojb"][l], residual=residual)
    # MLP: layernorm, fc, GELU, projection joining the residual
    layernorm.layernorm_forward(acts.ln2, acts.ln2_mean, acts.ln2_rstd, acts.residual2, p["ln2w"][l], p["ln2b"][l],
                                fp8_out=matmuls.fp8_input(p["fcw"][l], N))
    if gelu_fusion:  # one cuBLASLt call writes fch and gelu(fch)
        matmuls.forward_gelu(acts.fch_gelu, acts.fch, acts.ln2, p["fcw"][l], p["fcb"][l])
    else:  # our GELU kernel, which under FP8 writes the fc projection's e4m3 input itself too
        matmuls.forward(acts.fch, acts.ln2, p["fcw"][l], p["fcb"][l])
        gelu.gelu_forward(acts.fch_gelu, acts.fch, fp8_out=matmuls.fp8_input(p["fcprojw"][l], N))
    matmuls.forward(acts.residual3, acts.fch_gelu, p["fcprojw"][l], p["fcprojb"][l], residual=acts.residual2)


class Activations:
    """The forward's saved tensors for one micro-batch, and the backward's scratch.

    shared: which outputs one slot holds for all layers, as the backward does not read them as saved. 0 none; 1 the
    GELU output; 2 also the layernorm outputs. Under recompute 1 or 2 the backward recomputes them; under FP8
    (2), which keeps its own e4m3 copies of the linear layers' inputs for the weight gradients, it needs none of them.
    """

    def __init__(self, config, B, T, dtype, device, shared):
        L, C, Vp = config.num_layers, config.channels, config.padded_vocab_size
        N = B * T
        self.shared = shared
        act = dict(dtype=dtype, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.encoded = torch.empty(N, C, **act)  # wte[tokens] + wpe: the residual stream entering layer 0
        self.ln1 = torch.empty(1 if shared >= 2 else L, N, C, **act)
        self.ln1_mean, self.ln1_rstd = torch.empty(L, N, **f32), torch.empty(L, N, **f32)
        self.qkv = torch.empty(L, N, 3 * C, **act)
        self.atty = torch.empty(L, N, C, **act)  # attention output (N, C), heads side by side
        self.residual2 = torch.empty(L, N, C, **act)  # residual + attention projection
        self.ln2 = torch.empty(1 if shared >= 2 else L, N, C, **act)
        self.ln2_mean, self.ln2_rstd = torch.empty(L, N, **f32), torch.empty(L, N, **f32)
        self.fch = torch.empty(L, N, 4 * C, **act)  # MLP hidden, before GELU
        self.fch_gelu = torch.empty(1 if shared >= 1 else L, N, 4 * C, **act)
        self.residual3 = torch.empty(L, N, C, **act)  # residual2 + MLP projection: the next layer's input
        self.lnf = torch.empty(N, C, **act)
        self.lnf_mean, self.lnf_rstd = torch.empty(N, **f32), torch.empty(N, **f32)
        self.logits = torch.empty(N, Vp, **act)  # becomes dlogits in place in the fused classifier
        self.losses = torch.empty(N, **f32)
        # scratch shared by all layers
        self.dresidual = torch.empty(N, C, **act)
        self.dbtc = torch.empty(N, C, **act)
        self.dfch = torch.empty(N, 4 * C, **act)
        self.dqkv = torch.empty(N, 3 * C, **act)


class GPT2Attention(Attention):
    """GPT-2's attention (multi-head), and how it gets the qkv bias's gradient (dqkv's column sums):
    - ours sums it in its backward kernels, per block of tokens, into a scratch of its own;
    - cuDNN writes dqkv only. Of its three column blocks only dq's needs summing: sum_query_bias, beside the chain of
      input gradients, into partial sums added up by finish_backward. Keys: a bias b on every key adds q_i . b to
      all of query i's scores, which the softmax ignores, so the key bias's gradient is exactly zero (it stays as the
      step's start left it). Values: sum_j dv_j = sum_j sum_i P_ij datty_i = sum_i datty_i, as every row of P sums to
      1, and datty's column sums are the attention projection's bias gradient times its weight: finish_backward
      computes them from that gradient, for all layers at once.
    """

    def __init__(self, impl, config, B, T, runtime):
        L, C, NH = config.num_layers, config.channels, config.num_heads
        super().__init__(impl, L, B, T, NH, NH, runtime.device)
        self.C, self.p, self.g = C, runtime.p, runtime.g
        if impl == "cudnn":
            self.query_bias = bias.PartialSums(runtime.grads, [qkvb[:C] for qkvb in self.g["qkvb"]],
                                               bias.bias_backward_groups(B * T, C), C)
        else:
            self.bias_scratch = attention.backward_bias_scratch(B, T, C, NH, runtime.dtype, runtime.device)

    def backward(self, l, dqkv, datty, qkv, atty):
        """Layer l: writes dqkv (N, 3C) from datty (N, C) and the forward's qkv and atty; ours also adds the qkv
        bias's gradient."""
        if self.impl == "cudnn":
            super().backward(l, dqkv, datty, qkv, atty)
        else:
            super().backward(l, dqkv, datty, qkv, atty, self.g["qkvb"][l], self.bias_scratch)

    def sum_query_bias(self, l, dqkv):
        """cuDNN: stage 1 of layer l's query bias gradient from dqkv (N, 3C) (ours has summed it already)."""
        if self.impl == "cudnn":
            bias.bias_backward(None, dqkv[:, :self.C], self.query_bias.partials[l])

    def finish_backward(self):
        """cuDNN: the query and value biases' gradients of every layer, once the attention projection's bias
        gradient is complete."""
        if self.impl == "cudnn":
            self.query_bias.add_to_targets()
            bias.value_bias_backward(self.g["qkvb"][:, 2 * self.C:], self.g["attprojb"], self.p["attprojw"])


class GPT2(Model):
    LINEAR = ("qkvw", "attprojw", "fcw", "fcprojw")  # the blocks' linear layers: FP8 under --precision fp8
    # and the LM head: with it, FP8's val loss over 1,000 steps of d12 on tiny Shakespeare (peak learning rate 1e-4)
    # stays within 0.011 of bf16's up to its minimum, and overfits more slowly after it (BENCHMARKS.md, "Loss")
    FP8_LM_HEAD = True

    def __init__(self, config, B, T, runtime, recompute=0, attention_impl="cudnn", gelu_fusion=0,
                 deterministic=False, precision="bf16", fp8_options=None):
        """GPT-2 of this config for micro-batches of (B, T) tokens, on runtime's buffers (made from
        param_table(config)). recompute 0/1/2 (Activations). attention_impl "cudnn" or "triton" (choose_attention).
        gelu_fusion 1: the forward's GELU in the fc matmul's cuBLASLt epilogue (GPU only); -1: 1 on Hopper and newer
        in bf16, where it was measured faster, 0 on older GPUs, where llm.c found cuBLASLt's GELU epilogues slower,
        and 0 under FP8, where our kernel writes the fc projection's e4m3 input itself (the epilogue writes bf16, then
        a cast reads it): measured faster on the H200 (BENCHMARKS.md).
        deterministic: the embedding's backward in a fixed order (Model). precision "bf16" or "fp8" and fp8_options:
        the linear layers' matmuls (llmpy.precision)."""
        if gelu_fusion not in (-1, 0, 1):
            raise ValueError(f"-ge/--gelu_fusion must be -1, 0 or 1, not {gelu_fusion}")
        device, dtype = runtime.device, runtime.dtype
        attention_impl = choose_attention(config, T, attention_impl, dtype, device)
        if gelu_fusion == -1:
            gelu_fusion = int(device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
                              and precision != "fp8")
        super().__init__(config, B, T, runtime, deterministic, precision, fp8_options)
        self.recompute, shared = self._saved_activations(recompute)
        self.attention_impl = attention_impl
        self.gelu_fusion = gelu_fusion if device.type == "cuda" else 0
        self.acts = Activations(config, B, T, dtype, device, shared)
        self.attention = GPT2Attention(attention_impl, config, B, T, runtime)
        C, N, L, g = config.channels, B * T, config.num_layers, self.g
        # The bias and layernorm gradients are column sums, taken in two stages (llmpy.kernels.bias): stage 1 in the
        # kernel that writes the summed gradient, into partial sums of its own per layer, and stage 2 once, at the
        # end of backward, for all of them (bias.PartialSums). A layernorm's slots: its weight, its bias, and the
        # projection bias whose gradient is the residual gradient it writes (ln1: the layer below's MLP projection,
        # none for layer 0, whose input gradient goes to the encoder; ln2: the attention projection; lnf: the last
        # layer's MLP projection).
        targets, self.layernorm_slots = [], {}

        def add_slots(key, *grads):
            self.layernorm_slots[key] = slice(len(targets), len(targets) + len(grads))
            targets.extend(grads)

        for l in range(L):
            add_slots(("ln1", l), g["ln1w"][l], g["ln1b"][l], *([g["fcprojb"][l - 1]] if l > 0 else []))
            add_slots(("ln2", l), g["ln2w"][l], g["ln2b"][l], g["attprojb"][l])
        add_slots("lnf", g["lnfw"], g["lnfb"], g["fcprojb"][L - 1])
        self.layernorm_sums = bias.PartialSums(runtime.grads, targets, layernorm.layernorm_backward_groups(N, C), C)
        self.fc_bias_sums = bias.PartialSums(runtime.grads, list(g["fcb"]), bias.bias_backward_groups(N, 4 * C),
                                             4 * C)

    def init_weights(self, seed):
        """GPT-2's seeded random initialisation (llmpy.configs.gpt2.gpt2_init)."""
        self.runtime.load_weights(gpt2_init(self.config, seed))

    # ------------------------------------------------------------------------- forward

    def _forward(self, has_targets, dloss, train):
        """The forward of the batch in self.inputs (and self.targets): no host work but launches."""
        cfg, a, p = self.config, self.acts, self.p
        B, T, C, L = self.B, self.T, cfg.channels, cfg.num_layers
        self.matmuls.prepare()
        encoder.encoder_forward(a.encoded.view(B, T, C), self.inputs, p["wte"], p["wpe"])
        for l in range(L):
            residual = a.encoded if l == 0 else a.residual3[l - 1]
            layer_forward(p, l, residual, self._layer_acts(l), self._attend, self.gelu_fusion, self.matmuls)
        layernorm.layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, a.residual3[L - 1], p["lnfw"], p["lnfb"],
                                    fp8_out=self.matmuls.fp8_input(p["wte"], B * T))
        self._head(has_targets, dloss, train)  # LM head, tied to wte: (N, C) @ (C, Vp), and the loss

    def _attend(self, l, acts):
        self.attention.forward(l, acts.qkv, acts.atty)

    def _ln1(self, l):
        return self.acts.ln1[0 if self.acts.shared >= 2 else l]

    def _ln2(self, l):
        return self.acts.ln2[0 if self.acts.shared >= 2 else l]

    def _fch_gelu(self, l):
        return self.acts.fch_gelu[0 if self.acts.shared >= 1 else l]

    def _layer_acts(self, l):
        """Layer l's slices of the activations (one shared slot for those the backward does not read as saved)."""
        a = self.acts
        return LayerActivations(self._ln1(l), a.ln1_mean[l], a.ln1_rstd[l], a.qkv[l], a.atty[l], a.residual2[l],
                                self._ln2(l), a.ln2_mean[l], a.ln2_rstd[l], a.fch[l], self._fch_gelu(l), a.residual3[l])

    # ------------------------------------------------------------------------- backward

    def backward(self, first=False):
        """Backpropagates the dlogits left in acts.logits by forward(targets=...) into the gradients. first: the
        step's first backward, which starts them (runtime.start_gradients) and writes the matmul weights' gradients
        (cuBLASLt with beta = 0); a later one adds to them.

        The bias gradients (column sums of an output gradient) are summed by the kernel that writes that gradient:
        a projection's output gradient is the residual stream's gradient, written by the next layernorm's backward;
        fc's is written by the GELU backward; qkv's by the attention backward (GPT2Attention says how). Those kernels
        leave partial sums, which, with the layernorms' own, are added up for all layers at once at the end
        (__init__).

        On the GPU the weight gradients' matmuls (and cuDNN's query bias sums) run on the runtime's side stream
        (runtime.beside): the chain of input gradients, layer after layer, never waits for them. The chain waits for
        one only before it overwrites what that one reads (fc_read etc. below). BENCHMARKS.md has what this gained.
        """
        cfg, a, p, g, rt = self.config, self.acts, self.p, self.g, self.runtime
        L = cfg.num_layers
        accumulate = not first
        if first:
            rt.start_gradients()
        # LM head: dlnf = dlogits @ wte, dwte += dlogits^T @ lnf (the encoder's gradient is added to it below)
        self.matmuls.backward_input(a.dbtc, a.logits, p["wte"])
        with rt.beside():
            self.matmuls.backward_weight(g["wte"], a.logits, a.lnf, accumulate)
        # final layernorm: the residual stream's gradient starts here (zeroed, then accumulated)
        # under FP8 each layernorm backward also writes the projection below's e5m2 output gradient (fp8_grad)
        N = a.dresidual.shape[0]
        a.dresidual.zero_()
        layernorm.layernorm_backward(a.dresidual, None, None, a.dbtc, a.residual3[L - 1], p["lnfw"], a.lnf_mean,
                                     a.lnf_rstd, self._layernorm_partials("lnf"),
                                     fp8_out=self.matmuls.fp8_grad(p["fcprojw"][L - 1], N))
        fc_read = qkv_read = None  # the layer above's fc and qkv weight gradients, done reading dfch and dqkv
        for l in reversed(range(L)):
            residual = a.encoded if l == 0 else a.residual3[l - 1]
            if self.recompute >= 1:  # the recomputed tensors overwrite the buffers the layer above's read
                rt.wait_for_side_stream()
            if self.recompute >= 2:  # the layernorm outputs are recomputed from the saved statistics
                layernorm.layernorm_forward(self._ln1(l), a.ln1_mean[l], a.ln1_rstd[l], residual,
                                            p["ln1w"][l], p["ln1b"][l])
                layernorm.layernorm_forward(self._ln2(l), a.ln2_mean[l], a.ln2_rstd[l], a.residual2[l],
                                            p["ln2w"][l], p["ln2b"][l])
            if self.recompute >= 1:
                gelu.gelu_forward(self._fch_gelu(l), a.fch[l])
            # MLP projection: dresidual flows into it unchanged (residual3 = residual2 + proj)
            rt.wait(fc_read)
            self.matmuls.backward_input(a.dfch, a.dresidual, p["fcprojw"][l])
            with rt.beside() as fcproj_read:
                self.matmuls.backward_weight(g["fcprojw"][l], a.dresidual, self._fch_gelu(l), accumulate)
            # under FP8 the GELU backward writes the fc layer's e5m2 output gradient itself (fp8_grad)
            gelu.gelu_backward(a.dfch, a.fch[l], a.dfch, scratch=self.fc_bias_sums.partials[l],
                               fp8_out=self.matmuls.fp8_grad(p["fcw"][l], N))
            self.matmuls.backward_input(a.dbtc, a.dfch, p["fcw"][l])
            with rt.beside() as fc_read:
                self.matmuls.backward_weight(g["fcw"][l], a.dfch, self._ln2(l), accumulate)
            rt.wait(fcproj_read)
            layernorm.layernorm_backward(a.dresidual, None, None, a.dbtc, a.residual2[l], p["ln2w"][l],
                                         a.ln2_mean[l], a.ln2_rstd[l], self._layernorm_partials(("ln2", l)),
                                         fp8_out=self.matmuls.fp8_grad(p["attprojw"][l], N))
            # attention projection, attention, qkv projection
            self.matmuls.backward_input(a.dbtc, a.dresidual, p["attprojw"][l])
            with rt.beside() as attproj_read:
                self.matmuls.backward_weight(g["attprojw"][l], a.dresidual, a.atty[l], accumulate)
            rt.wait(qkv_read)
            self.attention.backward(l, a.dqkv, a.dbtc, a.qkv[l], a.atty[l])
            self.matmuls.backward_input(a.dbtc, a.dqkv, p["qkvw"][l])
            with rt.beside() as qkv_read:
                self.matmuls.backward_weight(g["qkvw"][l], a.dqkv, self._ln1(l), accumulate)
                self.attention.sum_query_bias(l, a.dqkv)
            rt.wait(attproj_read)
            layernorm.layernorm_backward(a.dresidual, None, None, a.dbtc, residual, p["ln1w"][l], a.ln1_mean[l],
                                         a.ln1_rstd[l], self._layernorm_partials(("ln1", l)),
                                         fp8_out=self.matmuls.fp8_grad(p["fcprojw"][l - 1], N) if l > 0 else None)
        rt.wait_for_side_stream()  # the encoder's gradient adds to wte's
        self.encoder_backward(g["wte"], g["wpe"], a.dresidual)
        # stage 2 of every bias and layernorm gradient (__init__); the attention's last, as cuDNN's value bias
        # gradient is computed from the attention projection's, which the layernorm sums complete
        self.layernorm_sums.add_to_targets()
        self.fc_bias_sums.add_to_targets()
        self.attention.finish_backward()

    def _layernorm_partials(self, key):
        """A layernorm's slots of partial sums (__init__): (3, G, C), or (2, G, C) for layer 0's ln1."""
        return self.layernorm_sums.partials[self.layernorm_slots[key]]


def build(config, B, T, dtype=torch.bfloat16, device="cuda", dist=None, zero_stage=0, cuda_graphs=False,
          deterministic=False, **options):
    """A GPT-2 and the runtime it trains on: the runtime's buffers from GPT-2's table, the model over them.
    options: GPT2's (recompute, attention_impl, gelu_fusion, precision, fp8_options)."""
    runtime = Runtime(param_table(config), dtype, device, dist, zero_stage, cuda_graphs, deterministic)
    return GPT2(config, B, T, runtime, deterministic=deterministic, **options)
