"""Llama 3 on the GPU, the mainline: its activations and its forward and backward pass written out layer by layer.

The model works on the views of a Runtime's flat buffers (llmpy/runtime.py, built from Llama 3's parameter table,
llmpy.configs.llama3.param_table), plus the activations of one (B, T) micro-batch, allocated once, as GPT-2's
(llmpy/models/gpt2.py) does. Matmuls go to cuBLASLt (llmpy.vendor, in bf16 or FP8: llmpy.precision), attention to
cuDNN or our flash attention (llmpy/models/attention.py, grouped-query), and every other op is one of our Triton
kernels: RMSNorm (layernorm.py's RMS variant), RoPE, SwiGLU, the embedding without positions, the fused classifier.

A layer, pre-norm, no biases (x: the residual stream, (N, C)):
    ln1  = rmsnorm(x) * ln1w                      (N, C), and its rstd (N,) fp32 for the backward
    qkv  = ln1 @ qkvw^T, q and k turned by RoPE   (N, (NH + 2 KV) hs): NH query heads, KV key heads, KV value heads
    atty = attention(qkv)                         (N, C), query head h reading key/value head h // (NH / KV)
    x2   = x + atty @ attprojw^T
    ln2  = rmsnorm(x2) * ln2w
    fch  = [ln2 @ fcw^T | ln2 @ fc2w^T]           (N, 2H): up, then gate, side by side in one buffer
    sw   = silu(gate) * up                        (N, H)
    x3   = x2 + sw @ fcprojw^T                    the layer's output
then rmsnorm(x) * lnfw and the LM head (wte when tied, else lmhead) into the fused classifier.

Notation: B batch, T sequence length, C channels, NH query heads, KV key/value heads, hs = C / NH, H the SwiGLU
width, L layers, V vocab (128,256: a multiple of 128, so no padding), N = B*T rows.
"""

import torch

from ..configs.llama3 import init_params, param_table, rope_tables
from ..kernels import bias, encoder, layernorm, rope, swiglu
from ..runtime import Runtime
from .attention import Attention, choose_attention
from .base import Model


class Activations:
    """The forward's saved tensors for one micro-batch, and the backward's scratch.

    shared: which outputs one slot holds for all layers, as the backward does not read them as saved. 0 none; 1 the
    SwiGLU output; 2 also the RMSNorm outputs. Under recompute 1 or 2 the backward recomputes them; under FP8
    (2), which keeps its own e4m3 copies of the linear layers' inputs for the weight gradients, it needs none of them.
    """

    def __init__(self, config, B, T, dtype, device, shared):
        L, C, V, H, Q = config.num_layers, config.channels, config.vocab_size, config.ffn_hidden, config.qkv_channels
        N = B * T
        self.shared = shared
        act = dict(dtype=dtype, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.encoded = torch.empty(N, C, **act)  # wte[tokens]: the residual stream entering layer 0
        self.ln1 = torch.empty(1 if shared >= 2 else L, N, C, **act)
        self.ln1_rstd = torch.empty(L, N, **f32)
        self.qkv = torch.empty(L, N, Q, **act)  # q and k after RoPE: what the attention read
        self.atty = torch.empty(L, N, C, **act)  # attention output, heads side by side
        self.residual2 = torch.empty(L, N, C, **act)  # residual + attention projection
        self.ln2 = torch.empty(1 if shared >= 2 else L, N, C, **act)
        self.ln2_rstd = torch.empty(L, N, **f32)
        self.fch = torch.empty(L, N, 2 * H, **act)  # [up | gate], before SwiGLU
        self.fch_swiglu = torch.empty(1 if shared >= 1 else L, N, H, **act)
        self.residual3 = torch.empty(L, N, C, **act)  # residual2 + MLP projection: the next layer's input
        self.lnf = torch.empty(N, C, **act)
        self.lnf_rstd = torch.empty(N, **f32)
        self.logits = torch.empty(N, V, **act)  # becomes dlogits in place in the fused classifier
        self.losses = torch.empty(N, **f32)
        # scratch shared by all layers
        self.dresidual = torch.empty(N, C, **act)
        self.dbtc = torch.empty(N, C, **act)
        self.dfch = torch.empty(N, 2 * H, **act)  # [dup | dgate]
        self.dswiglu = torch.empty(N, H, **act)
        self.dqkv = torch.empty(N, Q, **act)


def halves(fch):
    """up and gate, the (N, H) halves of an (N, 2H) buffer (views: the SwiGLU kernels take any row stride)."""
    H = fch.shape[-1] // 2
    return fch[:, :H], fch[:, H:]


class Llama3(Model):
    LINEAR = ("qkvw", "attprojw", "fcw", "fc2w", "fcprojw")  # the blocks' linear layers: FP8 under --precision fp8
    # not the LM head, until a loss curve says so: at Llama 3.2 1B, test_llama3.py's 6 steps moved further from the
    # reference with it (0.45 at step 4, where the bf16 head's moved 0.27)
    FP8_LM_HEAD = False

    def __init__(self, config, B, T, runtime, recompute=0, attention_impl="cudnn", deterministic=False,
                 precision="bf16", fp8_options=None):
        """Llama 3 of this config for micro-batches of (B, T) tokens, on runtime's buffers (made from
        param_table(config)). recompute 0/1/2 (Activations). attention_impl "cudnn" or "triton" (choose_attention).
        deterministic: the embedding's backward in a fixed order (Model). precision "bf16" or "fp8" and
        fp8_options: the linear layers' matmuls (llmpy.precision)."""
        device, dtype = runtime.device, runtime.dtype
        attention_impl = choose_attention(config, T, attention_impl, dtype, device)
        super().__init__(config, B, T, runtime, deterministic, precision, fp8_options)
        self.recompute, shared = self._saved_activations(recompute)
        self.attention_impl = attention_impl
        L, C, N, NH, KV = config.num_layers, config.channels, B * T, config.num_heads, config.num_kv_heads
        self.acts = Activations(config, B, T, dtype, device, shared)
        self.attention = Attention(attention_impl, L, B, T, NH, KV, device)
        self.rope_cos, self.rope_sin = (torch.from_numpy(t).to(device) for t in rope_tables(config, T))
        self.head = self.head_name(config)  # the LM head's weight, (V, C)
        # Each RMSNorm's weight gradient is a column sum, taken in two stages (llmpy.kernels.bias): stage 1 in the
        # norm's backward kernel, into a slot of partial sums of its own, stage 2 once at the end of the backward for
        # every norm (bias.PartialSums). Slots by name: ("ln1", l), ("ln2", l), "lnf".
        g = self.g
        slots = [(name, l) for l in range(L) for name in ("ln1", "ln2")] + ["lnf"]
        targets = [g[f"{name}w"][l] for l in range(L) for name in ("ln1", "ln2")] + [g["lnfw"]]
        self.norm_slot = {key: i for i, key in enumerate(slots)}
        self.norm_sums = bias.PartialSums(runtime.grads, targets, layernorm.rmsnorm_backward_groups(N, C), C)

    @staticmethod
    def head_name(config):
        return "wte" if config.tied_embeddings else "lmhead"

    def init_weights(self, seed):
        """Llama 3's seeded random initialisation (llmpy.configs.llama3.init_params)."""
        self.runtime.load_weights(init_params(self.config, seed))

    # ------------------------------------------------------------------------- forward

    def _forward(self, has_targets, dloss, train):
        """The forward of the batch in self.inputs (and self.targets): no host work but launches."""
        cfg, a, p = self.config, self.acts, self.p
        B, T, C, L = self.B, self.T, cfg.channels, cfg.num_layers
        self.matmuls.prepare()
        encoder.encoder_forward(a.encoded.view(B, T, C), self.inputs, p["wte"], None)  # no position embedding
        for l in range(L):
            self._layer_forward(l, a.encoded if l == 0 else a.residual3[l - 1])
        layernorm.rmsnorm_forward(a.lnf, a.lnf_rstd, a.residual3[L - 1], p["lnfw"], cfg.norm_eps,
                                  fp8_out=self.matmuls.fp8_input(p[self.head], B * T))
        self._head(has_targets, dloss, train)  # (N, C) @ (C, V), and the loss

    def _layer_forward(self, l, residual):
        """Layer l on the residual stream residual (N, C), into its activations; its output is acts.residual3[l]."""
        cfg, a, p, eps = self.config, self.acts, self.p, self.config.norm_eps
        # attention: RMSNorm, qkv projection, RoPE on q and k, grouped-query attention, projection joining the stream
        # under FP8 the first RMSNorm writes qkv's e4m3 input itself (fp8_input); the second's output feeds two
        # matmuls (up and gate), each casting it
        layernorm.rmsnorm_forward(self._ln1(l), a.ln1_rstd[l], residual, p["ln1w"][l], eps,
                                  fp8_out=self.matmuls.fp8_input(p["qkvw"][l], residual.shape[0]))
        self.matmuls.forward(a.qkv[l], self._ln1(l), p["qkvw"][l])
        rope.rope_forward(self._qkv_rows(a.qkv[l]), self.rope_cos, self.rope_sin, cfg.num_heads, cfg.num_kv_heads)
        self.attention.forward(l, a.qkv[l], a.atty[l])
        self.matmuls.forward(a.residual2[l], a.atty[l], p["attprojw"][l], residual=residual)
        # MLP: RMSNorm, up and gate projections side by side, SwiGLU, projection joining the stream
        layernorm.rmsnorm_forward(self._ln2(l), a.ln2_rstd[l], a.residual2[l], p["ln2w"][l], eps)
        up, gate = halves(a.fch[l])
        self.matmuls.forward(up, self._ln2(l), p["fcw"][l])
        self.matmuls.forward(gate, self._ln2(l), p["fc2w"][l])
        swiglu.swiglu_forward(self._swiglu(l), gate, up)
        self.matmuls.forward(a.residual3[l], self._swiglu(l), p["fcprojw"][l], residual=a.residual2[l])

    def _qkv_rows(self, qkv):
        return qkv.view(self.B, self.T, -1)

    def _ln1(self, l):
        return self.acts.ln1[0 if self.acts.shared >= 2 else l]

    def _ln2(self, l):
        return self.acts.ln2[0 if self.acts.shared >= 2 else l]

    def _swiglu(self, l):
        return self.acts.fch_swiglu[0 if self.acts.shared >= 1 else l]

    # ------------------------------------------------------------------------- backward

    def backward(self, first=False):
        """Backpropagates the dlogits left in acts.logits by forward(targets=...) into the gradients. first: the
        step's first backward, which starts them (runtime.start_gradients) and writes the matmul weights' gradients
        (cuBLASLt with beta = 0); a later one adds to them.

        As GPT-2's: the weight gradients' matmuls run on the runtime's side stream (runtime.beside), the chain of
        input gradients waits for one only before it overwrites what that one reads (fc_read etc. below); the
        RMSNorm weights' gradients are summed in two stages, the second once for all norms at the end.
        """
        cfg, a, p, g, rt = self.config, self.acts, self.p, self.g, self.runtime
        L, NH, KV = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads
        accumulate = not first
        if first:
            rt.start_gradients()
        # LM head: dlnf = dlogits @ W, dW += dlogits^T @ lnf (tied: W is wte, and the encoder's gradient adds to it)
        self.matmuls.backward_input(a.dbtc, a.logits, p[self.head])
        with rt.beside():
            self.matmuls.backward_weight(g[self.head], a.logits, a.lnf, accumulate)
        # final RMSNorm: the residual stream's gradient starts here (zeroed, then accumulated)
        # under FP8 each RMSNorm backward also writes the projection below's e5m2 output gradient (fp8_grad)
        N = a.dresidual.shape[0]
        a.dresidual.zero_()
        layernorm.rmsnorm_backward(a.dresidual, None, a.dbtc, a.residual3[L - 1], p["lnfw"], a.lnf_rstd,
                                   self._norm_partials("lnf"), fp8_out=self.matmuls.fp8_grad(p["fcprojw"][L - 1], N))
        dup, dgate = halves(a.dfch)
        fc_read = qkv_read = None  # the layer above's fc and qkv weight gradients, done reading dfch and dqkv
        for l in reversed(range(L)):
            residual = a.encoded if l == 0 else a.residual3[l - 1]
            up, gate = halves(a.fch[l])
            if self.recompute >= 1:  # the recomputed tensors overwrite the buffers the layer above's read
                rt.wait_for_side_stream()
            if self.recompute >= 2:  # the RMSNorm outputs, recomputed (rstd too, to the same bits)
                layernorm.rmsnorm_forward(self._ln1(l), a.ln1_rstd[l], residual, p["ln1w"][l], cfg.norm_eps)
                layernorm.rmsnorm_forward(self._ln2(l), a.ln2_rstd[l], a.residual2[l], p["ln2w"][l], cfg.norm_eps)
            if self.recompute >= 1:
                swiglu.swiglu_forward(self._swiglu(l), gate, up)
            # MLP projection: dresidual flows into it unchanged (residual3 = residual2 + proj)
            self.matmuls.backward_input(a.dswiglu, a.dresidual, p["fcprojw"][l])
            with rt.beside() as fcproj_read:
                self.matmuls.backward_weight(g["fcprojw"][l], a.dresidual, self._swiglu(l), accumulate)
            # SwiGLU, then the up and gate projections: ln2 feeds both, so its gradient is the sum of two matmuls
            rt.wait(fc_read)
            # under FP8 the SwiGLU backward writes the gate and up projections' e5m2 output gradients (fp8_grad)
            swiglu.swiglu_backward(dgate, dup, a.dswiglu, gate, up,
                                   fp8_gate=self.matmuls.fp8_grad(p["fc2w"][l], N),
                                   fp8_up=self.matmuls.fp8_grad(p["fcw"][l], N))
            self.matmuls.backward_input(a.dbtc, dup, p["fcw"][l])
            self.matmuls.backward_input(a.dbtc, dgate, p["fc2w"][l], accumulate=True)
            with rt.beside() as fc_read:
                self.matmuls.backward_weight(g["fcw"][l], dup, self._ln2(l), accumulate)
                self.matmuls.backward_weight(g["fc2w"][l], dgate, self._ln2(l), accumulate)
            rt.wait(fcproj_read)
            layernorm.rmsnorm_backward(a.dresidual, None, a.dbtc, a.residual2[l], p["ln2w"][l], a.ln2_rstd[l],
                                       self._norm_partials(("ln2", l)),
                                       fp8_out=self.matmuls.fp8_grad(p["attprojw"][l], N))
            # attention projection, attention, RoPE (turned back), qkv projection
            self.matmuls.backward_input(a.dbtc, a.dresidual, p["attprojw"][l])
            with rt.beside() as attproj_read:
                self.matmuls.backward_weight(g["attprojw"][l], a.dresidual, a.atty[l], accumulate)
            rt.wait(qkv_read)
            self.attention.backward(l, a.dqkv, a.dbtc, a.qkv[l], a.atty[l])
            rope.rope_backward(self._qkv_rows(a.dqkv), self.rope_cos, self.rope_sin, NH, KV)
            self.matmuls.backward_input(a.dbtc, a.dqkv, p["qkvw"][l])
            with rt.beside() as qkv_read:
                self.matmuls.backward_weight(g["qkvw"][l], a.dqkv, self._ln1(l), accumulate)
            rt.wait(attproj_read)
            layernorm.rmsnorm_backward(a.dresidual, None, a.dbtc, residual, p["ln1w"][l], a.ln1_rstd[l],
                                       self._norm_partials(("ln1", l)),
                                       fp8_out=self.matmuls.fp8_grad(p["fcprojw"][l - 1], N) if l > 0 else None)
        rt.wait_for_side_stream()  # tied: the encoder's gradient adds to the LM head's in wte
        self.encoder_backward(g["wte"], None, a.dresidual)
        self.norm_sums.add_to_targets()

    def _norm_partials(self, key):
        """An RMSNorm's slot of partial sums (__init__): (G, C)."""
        return self.norm_sums.partials[self.norm_slot[key]]


def build(config, B, T, dtype=torch.bfloat16, device="cuda", dist=None, zero_stage=0, cuda_graphs=False,
          deterministic=False, **options):
    """A Llama 3 and the runtime it trains on: the runtime's buffers from Llama 3's table, the model over it.
    options: Llama3's (recompute, attention_impl, precision, fp8_options)."""
    runtime = Runtime(param_table(config), dtype, device, dist, zero_stage, cuda_graphs, deterministic)
    return Llama3(config, B, T, runtime, deterministic=deterministic, **options)
