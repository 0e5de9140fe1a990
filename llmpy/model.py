"""GPT-2 on the GPU: parameters, activations, and the forward and backward pass written out layer by layer.

Everything the model holds lives in a few flat buffers, allocated once:
  params (P,)   the weights in the run's dtype (bf16, or fp32 for tests), llm.c's order, a view per tensor
  master (P,)   fp32 master weights that AdamW updates (bf16 runs only; in fp32 runs params are the master)
  grads (P,)    fp32 gradients: a step's first backward writes them (zero_grad), later micro-steps accumulate
  m, v (P,)     fp32 AdamW moments
and the activations for one (B, T) micro-batch. The step allocates nothing (cuDNN's attention workspace is
allocated once, at its first call). Matmuls go to cuBLASLt and attention to cuDNN (llmpy.vendor) or our own flash
attention; every other op is one of our Triton kernels (llmpy.kernels), except the forward's GELU, which with
gelu_fusion runs in the fc matmul's cuBLASLt epilogue. A training micro-batch, forward and backward, can be replayed
from a CUDA graph (train_micro_batch).

Notation: B batch, T sequence length, C channels, NH heads, L layers, V vocab, Vp padded vocab, N = B*T rows.
"""

import contextlib
from typing import NamedTuple

import numpy as np
import torch

from . import vendor
from .config import gpt2_init, num_parameters, param_table, split_params
from .distributed import Dist
from .kernels import adamw, attention, bias, classifier, encoder, gelu, layernorm, norm, reduce


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


def layer_forward(p, l, residual, acts, attend, gelu_fusion):
    """Layer l of GPT-2 on N rows of the residual stream, residual (N, C): writes every tensor of acts
    (LayerActivations), the layer's output last, into acts.residual3 (which may be residual itself: residual is last
    read before it is written). p: the parameter views (llmpy.config.split_params). attend(l, acts): the causal
    self-attention, from acts.qkv to acts.atty. gelu_fusion: GELU in the fc matmul's cuBLASLt epilogue (GPU only)."""
    # attention: layernorm, qkv projection, causal self-attention, output projection joining the residual
    layernorm.layernorm_forward(acts.ln1, acts.ln1_mean, acts.ln1_rstd, residual, p["ln1w"][l], p["ln1b"][l])
    vendor.matmul_forward(acts.qkv, acts.ln1, p["qkvw"][l], p["qkvb"][l])
    attend(l, acts)
    vendor.matmul_forward(acts.residual2, acts.atty, p["attprojw"][l], p["attprojb"][l], residual=residual)
    # MLP: layernorm, fc, GELU, projection joining the residual
    layernorm.layernorm_forward(acts.ln2, acts.ln2_mean, acts.ln2_rstd, acts.residual2, p["ln2w"][l], p["ln2b"][l])
    if gelu_fusion:  # one cuBLASLt call writes fch and gelu(fch)
        vendor.matmul_gelu_forward(acts.fch_gelu, acts.fch, acts.ln2, p["fcw"][l], p["fcb"][l])
    else:
        vendor.matmul_forward(acts.fch, acts.ln2, p["fcw"][l], p["fcb"][l])
        gelu.gelu_forward(acts.fch_gelu, acts.fch)
    vendor.matmul_forward(acts.residual3, acts.fch_gelu, p["fcprojw"][l], p["fcprojb"][l], residual=acts.residual2)


class Activations:
    """The forward's saved tensors for one micro-batch, and the backward's scratch.

    recompute 0 keeps everything; 1 drops the GELU output (recomputed from fch in the backward);
    2 also drops the layernorm outputs (recomputed from the residual stream and the saved mean/rstd).
    """

    def __init__(self, config, B, T, dtype, device, recompute, attention_impl):
        L, C, NH, Vp = config.num_layers, config.channels, config.num_heads, config.padded_vocab_size
        N = B * T
        act = dict(dtype=dtype, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.encoded = torch.empty(N, C, **act)  # wte[tokens] + wpe: the residual stream entering layer 0
        self.ln1 = torch.empty(1 if recompute >= 2 else L, N, C, **act)
        self.ln1_mean, self.ln1_rstd = torch.empty(L, N, **f32), torch.empty(L, N, **f32)
        self.qkv = torch.empty(L, N, 3 * C, **act)
        self.atty = torch.empty(L, N, C, **act)  # attention output (N, C), heads side by side
        self.att_lse = torch.empty(L, B, NH, T, **f32)  # each query's softmax log-sum-exp, for the backward
        self.residual2 = torch.empty(L, N, C, **act)  # residual + attention projection
        self.ln2 = torch.empty(1 if recompute >= 2 else L, N, C, **act)
        self.ln2_mean, self.ln2_rstd = torch.empty(L, N, **f32), torch.empty(L, N, **f32)
        self.fch = torch.empty(L, N, 4 * C, **act)  # MLP hidden, before GELU
        self.fch_gelu = torch.empty(1 if recompute >= 1 else L, N, 4 * C, **act)
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
        self.att_delta = torch.empty(B, NH, T, **f32) if attention_impl == "triton" else None


class GPT2:
    def __init__(self, config, B, T, dtype=torch.bfloat16, device="cuda", recompute=0, attention_impl="cudnn",
                 dist=None, zero_stage=0, cuda_graphs=False, gelu_fusion=0, deterministic=False):
        if T > config.max_seq_len:
            raise ValueError(f"-t {T} is longer than the model's max_seq_len {config.max_seq_len}")
        if attention_impl not in ("cudnn", "triton"):
            raise ValueError(f"--attention must be cudnn or triton, not {attention_impl!r}")
        if attention_impl == "cudnn" and (dtype != torch.bfloat16 or not torch.device(device).type == "cuda"):
            attention_impl = "triton"  # cuDNN's flash attention is bf16 on the GPU only
        if attention_impl == "cudnn":
            vendor.cudnn_frontend()  # now, not at the first step: says what to install where it is missing
        self.config, self.B, self.T = config, B, T
        self.dtype, self.device = dtype, torch.device(device)
        # deterministic: results that do not change run to run. The GPU's vendor choices (vendor.set_deterministic)
        # and the embedding's backward, which sums each token's rows in an order fixed by the tokens, from tables
        # _load_batch prepares on the host, instead of with float atomics (ordered_encoder_backward, below)
        if self.device.type == "cuda":
            vendor.set_deterministic(deterministic)
        self.recompute, self.attention_impl = recompute, attention_impl
        if zero_stage not in (0, 1):
            raise ValueError(f"-z/--zero_stage must be 0 or 1, not {zero_stage}")
        self.dist, self.zero_stage = dist if dist is not None else Dist(), zero_stage  # Dist(): one plain process
        P = num_parameters(config)
        # Data parallel: every rank holds all parameters and gradients. -z 0: every rank also holds all master weights
        # and moments and updates everything. -z 1 (ZeRO stage 1): params and grads are padded to P_pad, a multiple
        # of the world size (the padding's gradient is zero, so it stays zero), and this rank updates only its shard,
        # [shard.start, shard.stop) of P_pad, holding the master weights and moments of that shard only.
        world, rank = (self.dist.world_size, self.dist.rank) if zero_stage == 1 else (1, 0)
        P_pad = -(-P // world) * world
        shard_size = P_pad // world
        self.shard = slice(rank * shard_size, (rank + 1) * shard_size)
        f32 = dict(dtype=torch.float32, device=device)
        self.params = torch.zeros(P_pad, dtype=dtype, device=device)
        self.master = torch.zeros(shard_size, **f32) if dtype != torch.float32 else None
        self.grads = torch.zeros(P_pad, **f32)
        self.m, self.v = torch.zeros(shard_size, **f32), torch.zeros(shard_size, **f32)
        self.p = split_params(config, self.params[:P])  # name -> view, e.g. self.p["qkvw"] is (L, 3C, C)
        self.g = split_params(config, self.grads[:P])
        self.acts = Activations(config, B, T, dtype, device, recompute, attention_impl)
        C, N, L, g = config.channels, B * T, config.num_layers, self.g
        self.ordered_encoder_backward = (encoder.DeterministicEncoderBackward(B, T, C, self.device) if deterministic
                                         else None)
        # The bias and layernorm gradients are column sums, taken in two stages (llmpy.kernels.bias): stage 1 in the
        # kernel that writes the summed gradient, into partial sums of its own per layer, and stage 2 once, at the
        # end of backward, for all of them (bias.PartialSums). Layernorm i (ln1 of layer l is 2l, ln2 2l + 1, lnf
        # 2L) has slots 3i..3i+2: its weight, its bias, and the projection bias whose gradient is the residual
        # gradient it writes (ln1: the layer below's MLP projection, none for layer 0; ln2: the attention projection)
        layernorm_targets = []
        for l in range(L):
            layernorm_targets += [g["ln1w"][l], g["ln1b"][l], g["fcprojb"][l - 1] if l > 0 else None,
                                  g["ln2w"][l], g["ln2b"][l], g["attprojb"][l]]
        layernorm_targets += [g["lnfw"], g["lnfb"], g["fcprojb"][L - 1]]
        self.partial_sums = {
            "layernorm": bias.PartialSums(self.grads, layernorm_targets, layernorm.layernorm_backward_groups(N, C), C),
            "fc bias": bias.PartialSums(self.grads, list(g["fcb"]), bias.bias_backward_groups(N, 4 * C), 4 * C)}
        if attention_impl == "cudnn":  # the query bias's (see _attention_backward)
            self.partial_sums["query bias"] = bias.PartialSums(self.grads, [qkvb[:C] for qkvb in g["qkvb"]],
                                                               bias.bias_backward_groups(N, C), C)
        else:  # our attention backward sums the qkv bias gradient itself, per block of tokens
            self.qkv_bias_scratch = attention.backward_bias_scratch(B, T, C, config.num_heads, dtype, self.device)
        self.norm_scratch = norm.global_norm_scratch(shard_size, self.device)
        self.grad_norm_sq = torch.zeros(1, **f32)
        self.grad_scale = torch.ones(1, **f32)
        self.hparams = torch.zeros(3, **f32)  # [lr, 1 - beta1^t, 1 - beta2^t]: read by the AdamW kernel on the device
        self.hparams_staging = torch.zeros(3).pin_memory() if self.device.type == "cuda" else None
        self.decay_segments = adamw.decay_segments(config, self.device, self.shard.start, self.shard.stop)
        self.inputs = torch.zeros(B, T, dtype=torch.int32, device=device)
        self.targets = torch.zeros(B, T, dtype=torch.int32, device=device)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        if gelu_fusion not in (-1, 0, 1):
            raise ValueError(f"-ge/--gelu_fusion must be -1, 0 or 1, not {gelu_fusion}")
        # 1: the forward's GELU in the fc matmul's cuBLASLt epilogue (GPU only); -1: 1 on Hopper and newer, where it
        # was measured faster, 0 on older GPUs, where llm.c found cuBLASLt's GELU epilogues slower
        if gelu_fusion == -1:
            gelu_fusion = int(self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)[0] >= 9)
        self.gelu_fusion = gelu_fusion if self.device.type == "cuda" else 0
        # zero_grad zeroes these; the matmul weights' gradients (over 99% of the buffer) are written, not
        # accumulated, by the backward that follows it
        self._zeroed_grads = [self.g[spec.name] for spec in param_table(config) if not spec.matmul_grad]
        self._write_weight_grads = False  # True from zero_grad to the next backward
        self.weight_grad_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._graphs = {}  # train_micro_batch's CUDA graphs by what they were captured for (None: not yet captured)

    def load_weights(self, flat):
        """Sets the weights from a flat fp32 array (llm.c's order), e.g. from llmpy.formats.read_model."""
        flat = torch.as_tensor(np.asarray(flat, dtype=np.float32))
        P = num_parameters(self.config)
        if flat.shape != (P,):
            raise ValueError(f"weights have {flat.numel()} values, the model needs {P}")
        self.params[:P].copy_(flat)  # rounds to nearest in bf16
        if self.master is not None:  # this rank's shard (all of them under -z 0); the padding past P stays zero
            in_range = flat[self.shard.start:self.shard.stop]
            self.master[:in_range.numel()].copy_(in_range)

    def init_weights(self, seed):
        """GPT-2's seeded random initialisation (llmpy.config.gpt2_init)."""
        self.load_weights(gpt2_init(self.config, seed))

    def weights_fp32(self):
        """The fp32 weights as a flat numpy array, for writing an llm.c model file.

        Under -z 1 with master weights each rank holds a shard of them, gathered here: every rank must call this.
        """
        P = num_parameters(self.config)
        if self.master is None:
            return self.params[:P].float().cpu().numpy()
        if self.zero_stage == 0:
            return self.master.cpu().numpy()
        gathered = torch.zeros(self.params.numel(), dtype=torch.float32, device=self.device)
        gathered[self.shard] = self.master
        self.dist.all_gather_(gathered, "the master weights")
        return gathered[:P].cpu().numpy()

    # ------------------------------------------------------------------------- forward

    def forward(self, inputs, targets=None, dloss=None, train=True):
        """inputs, targets: (B, T) integer tensors (host or device). Fills acts.logits (N, Vp) and, given targets,
        acts.losses (N,) and overwrites the logits with dlogits scaled by dloss (default 1/N), ready for backward.
        train=False (validation) computes the losses only and leaves the logits as they are.
        """
        self._load_batch(inputs, targets, backward=train and targets is not None)
        dloss = 1.0 / (self.B * self.T) if dloss is None else dloss
        self._forward(targets is not None, dloss, train)

    def _load_batch(self, inputs, targets, backward):
        """Copies the batch into the device buffers the step reads (and a graph replays); a batch a backward will
        follow also gets the deterministic embedding backward's tables, made on the host from the host's tokens."""
        self.inputs.copy_(inputs, non_blocking=True)
        if targets is not None:
            self.targets.copy_(targets, non_blocking=True)
        if backward and self.ordered_encoder_backward is not None:
            self.ordered_encoder_backward.prepare(inputs)

    def _forward(self, has_targets, dloss, train):
        """The forward of the batch in self.inputs (and self.targets): no host work but launches."""
        cfg, a, p = self.config, self.acts, self.p
        B, T, C, L = self.B, self.T, cfg.channels, cfg.num_layers
        encoder.encoder_forward(a.encoded.view(B, T, C), self.inputs, p["wte"], p["wpe"])
        for l in range(L):
            residual = a.encoded if l == 0 else a.residual3[l - 1]
            layer_forward(p, l, residual, self._layer_acts(l), self._attention_forward, self.gelu_fusion)
        layernorm.layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, a.residual3[L - 1], p["lnfw"], p["lnfb"])
        vendor.matmul_forward(a.logits, a.lnf, p["wte"])  # LM head, tied to wte: (N, C) @ (C, Vp)
        if has_targets:
            classifier.fused_classifier(a.logits, a.losses, self.targets.view(-1), cfg.vocab_size, dloss,
                                        write_dlogits=train)

    def train_micro_batch(self, inputs, targets, dloss, loss_sum):
        """One micro-batch of a training step: forward with targets (dlogits scaled by dloss), loss_sum (fp32 (1,))
        += dloss * the sum of the losses, then backward (the gradients accumulate, or start over after zero_grad).

        With cuda_graphs, the first call for a given (dloss, loss_sum, first after zero_grad or not) runs eagerly: it
        compiles the kernels and lets cuBLAS and cuDNN choose their plans, which a capture cannot. The second captures
        the whole micro-batch, about 30 launches a layer, into one CUDA graph and replays it, and every later call
        only copies the batch into the input buffers and replays: the GPU no longer waits for Python between kernels.
        A graph replays the same kernels on the same buffers with the same arguments, which is why the step reads
        everything that changes (tokens, learning rate, step count) from device memory, and why a step's first
        micro-batch, which writes the weight gradients rather than adding to them, has a graph of its own.
        """
        self._load_batch(inputs, targets, backward=True)
        key = (dloss, loss_sum.data_ptr(), self._write_weight_grads)
        if not self.cuda_graphs or key not in self._graphs:
            self._micro_batch(dloss, loss_sum)
            self._graphs[key] = None
            return
        if self._graphs[key] is None:
            self._graphs[key] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graphs[key]):
                self._micro_batch(dloss, loss_sum)
        self._graphs[key].replay()
        self._write_weight_grads = False

    def _micro_batch(self, dloss, loss_sum):
        self._forward(True, dloss, train=True)
        reduce.sum_into(loss_sum, self.acts.losses, scale=dloss)
        self.backward()

    def _ln1(self, l):
        return self.acts.ln1[0 if self.recompute >= 2 else l]

    def _ln2(self, l):
        return self.acts.ln2[0 if self.recompute >= 2 else l]

    def _fch_gelu(self, l):
        return self.acts.fch_gelu[0 if self.recompute >= 1 else l]

    def _layer_acts(self, l):
        """Layer l's slices of the activations (one shared slot for the ones recomputed in the backward)."""
        a = self.acts
        return LayerActivations(self._ln1(l), a.ln1_mean[l], a.ln1_rstd[l], a.qkv[l], a.atty[l], a.residual2[l],
                                self._ln2(l), a.ln2_mean[l], a.ln2_rstd[l], a.fch[l], self._fch_gelu(l), a.residual3[l])

    def _attention_forward(self, l, acts):
        B, T = self.B, self.T
        forward = vendor.cudnn_attention_forward if self.attention_impl == "cudnn" else attention.attention_forward
        forward(acts.atty.view(B, T, -1), self.acts.att_lse[l], acts.qkv.view(B, T, -1), self.config.num_heads)

    # ------------------------------------------------------------------------- backward

    def backward(self):
        """Backpropagates the dlogits left in acts.logits by forward(targets=...), accumulating into grads.

        The bias gradients (column sums of an output gradient) are summed by the kernel that writes that gradient:
        a projection's output gradient is the residual stream's gradient, written by the next layernorm's backward;
        fc's is written by the GELU backward; qkv's by the attention backward (ours), or from dq and the attention
        projection's bias gradient (cuDNN). Those kernels leave partial sums, which, with the layernorms' own, are
        added up for all layers at once at the end (partial_sums, __init__).

        On the GPU the weight gradients' matmuls (and the query bias's sums) run on a second stream (_beside): the
        chain of input gradients, layer after layer, never waits for them, so they fill the SMs the chain leaves
        idle, such as a matmul's last, partly filled wave of tiles. The chain waits for one only before it
        overwrites what that one reads (fc_read etc. below). At d36 B=30 on the H100 this took the step from 299-302
        to 294-296 ms (207-211 to 202-207 J); at d12 and d24 the change was within run-to-run noise (BENCHMARKS.md).
        """
        cfg, a, p, g = self.config, self.acts, self.p, self.g
        B, T, L, C = self.B, self.T, cfg.num_layers, cfg.channels
        accumulate, self._write_weight_grads = not self._write_weight_grads, False
        # LM head: dlnf = dlogits @ wte, dwte += dlogits^T @ lnf (the encoder's gradient is added to it below)
        vendor.matmul_backward_input(a.dbtc, a.logits, p["wte"])
        with self._beside():
            vendor.matmul_backward_weight(g["wte"], a.logits, a.lnf, accumulate)
        # final layernorm: the residual stream's gradient starts here (zeroed, then accumulated)
        a.dresidual.zero_()
        layernorm.layernorm_backward(a.dresidual, None, None, a.dbtc, a.residual3[L - 1], p["lnfw"], a.lnf_mean,
                                     a.lnf_rstd, self._layernorm_partials(2 * L))
        fc_read = qkv_read = None  # the layer above's fc and qkv weight gradients, done reading dfch and dqkv
        for l in reversed(range(L)):
            residual = a.encoded if l == 0 else a.residual3[l - 1]
            if self.recompute >= 1:  # the recomputed tensors overwrite the buffers the layer above's read
                self._wait_for_weight_gradients()
            if self.recompute >= 2:  # the layernorm outputs are recomputed from the saved statistics
                layernorm.layernorm_forward(self._ln1(l), a.ln1_mean[l], a.ln1_rstd[l], residual,
                                            p["ln1w"][l], p["ln1b"][l])
                layernorm.layernorm_forward(self._ln2(l), a.ln2_mean[l], a.ln2_rstd[l], a.residual2[l],
                                            p["ln2w"][l], p["ln2b"][l])
            if self.recompute >= 1:
                gelu.gelu_forward(self._fch_gelu(l), a.fch[l])
            # MLP projection: dresidual flows into it unchanged (residual3 = residual2 + proj)
            self._wait(fc_read)
            vendor.matmul_backward_input(a.dfch, a.dresidual, p["fcprojw"][l])
            with self._beside() as fcproj_read:
                vendor.matmul_backward_weight(g["fcprojw"][l], a.dresidual, self._fch_gelu(l), accumulate)
            gelu.gelu_backward(a.dfch, a.fch[l], a.dfch, scratch=self.partial_sums["fc bias"].partials[l])
            vendor.matmul_backward_input(a.dbtc, a.dfch, p["fcw"][l])
            with self._beside() as fc_read:
                vendor.matmul_backward_weight(g["fcw"][l], a.dfch, self._ln2(l), accumulate)
            self._wait(fcproj_read)
            layernorm.layernorm_backward(a.dresidual, None, None, a.dbtc, a.residual2[l], p["ln2w"][l],
                                         a.ln2_mean[l], a.ln2_rstd[l], self._layernorm_partials(2 * l + 1))
            # attention projection, attention, qkv projection
            vendor.matmul_backward_input(a.dbtc, a.dresidual, p["attprojw"][l])
            with self._beside() as attproj_read:
                vendor.matmul_backward_weight(g["attprojw"][l], a.dresidual, a.atty[l], accumulate)
            self._wait(qkv_read)
            self._attention_backward(l, a.dbtc)
            vendor.matmul_backward_input(a.dbtc, a.dqkv, p["qkvw"][l])
            with self._beside() as qkv_read:
                vendor.matmul_backward_weight(g["qkvw"][l], a.dqkv, self._ln1(l), accumulate)
                if self.attention_impl == "cudnn":  # the query bias's gradient (_attention_backward on the others)
                    bias.bias_backward(None, a.dqkv[:, :C], self.partial_sums["query bias"].partials[l])
            self._wait(attproj_read)
            layernorm.layernorm_backward(a.dresidual, None, None, a.dbtc, residual, p["ln1w"][l], a.ln1_mean[l],
                                         a.ln1_rstd[l], self._layernorm_partials(2 * l))
        self._wait_for_weight_gradients()  # the encoder's gradient adds to wte's
        if self.ordered_encoder_backward is not None:
            self.ordered_encoder_backward(g["wte"], g["wpe"], a.dresidual.view(B, T, -1))
        else:
            encoder.encoder_backward(g["wte"], g["wpe"], a.dresidual.view(B, T, -1), self.inputs)
        for sums in self.partial_sums.values():  # stage 2 of every bias and layernorm gradient (__init__)
            sums.add_to_targets()
        if self.attention_impl == "cudnn":  # the value bias's gradient, for all layers (_attention_backward)
            bias.value_bias_backward(g["qkvb"][:, 2 * C:], g["attprojb"], p["attprojw"])

    def _layernorm_partials(self, i):
        """Layernorm i's slots of partial sums (__init__): (3, G, C), or (2, G, C) for layer 0's ln1, whose input
        gradient is the encoder's and feeds no bias."""
        return self.partial_sums["layernorm"].partials[3 * i:3 * i + (2 if i == 0 else 3)]

    @contextlib.contextmanager
    def _beside(self):
        """Runs the block's launches on the weight-gradient stream, after everything launched so far on the current
        stream, and yields the event that marks their end (None without the stream: they run in line). Nothing in the
        backward waits for a weight gradient, so these matmuls run beside the chain of input gradients and fill what
        it leaves idle; the chain waits on the event only before it overwrites what they read.
        """
        stream = self.weight_grad_stream
        if stream is None:
            yield None
            return
        done = torch.cuda.Event()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield done
        done.record(stream)

    @staticmethod
    def _wait(event):
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def _wait_for_weight_gradients(self):
        if self.weight_grad_stream is not None:
            torch.cuda.current_stream().wait_stream(self.weight_grad_stream)

    def _attention_backward(self, l, datty):
        """Writes dqkv (N, 3C) from datty (N, C). Our kernels also add the qkv bias gradient (dqkv's column sums);
        under cuDNN, backward() does."""
        a, NH, B, T = self.acts, self.config.num_heads, self.B, self.T
        qkv, atty = a.qkv[l].view(B, T, -1), a.atty[l].view(B, T, -1)
        if self.attention_impl == "cudnn":
            # Of dqkv's three column blocks only dq's is summed, by backward(). Keys: a bias b on every key adds
            # q_i . b to all of query i's scores, which the softmax ignores, so the key bias's gradient is exactly
            # zero (it stays as zero_grad left it). Values: sum_j dv_j = sum_j sum_i P_ij datty_i = sum_i datty_i, as
            # every row of P sums to 1, and datty's column sums are the attention projection's bias gradient times
            # its weight: backward() computes them at its end from that gradient, for all layers at once.
            vendor.cudnn_attention_backward(a.dqkv.view(B, T, -1), datty.view(B, T, -1), qkv, atty, a.att_lse[l], NH)
        else:
            attention.attention_backward(a.dqkv.view(B, T, -1), datty.view(B, T, -1), qkv, atty, a.att_lse[l], NH,
                                         a.att_delta, self.g["qkvb"][l], self.qkv_bias_scratch)

    # ------------------------------------------------------------------------- update

    def zero_grad(self):
        """Starts the gradients of a step from zero: the next backward writes the matmul weights' gradients (cuBLASLt
        with beta = 0), so only the others are zeroed here, and the 3 GB of zeros a d36 step would write and read
        back are never written."""
        for grad in self._zeroed_grads:
            grad.zero_()
        self._write_weight_grads = True

    def clip_and_update(self, lr, step, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0):
        """reduce_gradients, then update: the step's optimizer work, all on the device."""
        self.reduce_gradients()
        self.update(lr, step, beta1, beta2, eps, weight_decay, grad_clip)

    def reduce_gradients(self):
        """Sums the gradients over the ranks and leaves the squared global gradient norm (before clipping) in
        grad_norm_sq, on the device: nothing here waits for the GPU (NCCL's collectives are queued on the stream like
        kernels). Every micro-batch's dloss is 1 / (the step's tokens over all ranks), so the sum over ranks is the
        gradient of the step's mean loss (a sum, not torch's AVG: gloo has no AVG)."""
        grads = self._reduce_gradients()
        norm.global_norm_squared(self.grad_norm_sq, grads, self.norm_scratch)
        if self.zero_stage == 1:  # each rank summed the squares of its shard; the padding adds zeros
            self.dist.all_reduce_sum_(self.grad_norm_sq, "the gradient norm")

    def update(self, lr, step, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0):
        """After reduce_gradients: the clipping scale and AdamW over this rank's shard (step counts from 1), then
        under -z 1 every rank's updated parameters to every rank. A step whose update is skipped (the outlier
        guard) just does not call this."""
        norm.clip_scale(self.grad_scale, self.grad_norm_sq, grad_clip)
        adamw.set_adamw_hparams(self.hparams, lr, step, beta1, beta2, self.hparams_staging)
        adamw.adamw_update(self.params[self.shard], self.master, self.grads[self.shard], self.m, self.v, self.hparams,
                           self.grad_scale, beta1, beta2, eps, weight_decay, self.decay_segments)
        if self.zero_stage == 1:  # every rank's updated parameters (bf16, or fp32 in fp32 runs) to every rank
            self.dist.all_gather_(self.params, "the updated parameters")

    def optimizer_state(self):
        """This rank's shard of the AdamW state, device fp32 tensors: {"m", "v", "master"} (master None in fp32 runs,
        where the parameters are the master weights)."""
        return {"m": self.m, "v": self.v, "master": self.master}

    def load_optimizer_state(self, m, v, master=None):
        """Sets this rank's shard of the AdamW state from host fp32 arrays (a checkpoint), after load_weights.
        master None keeps the master weights load_weights took from the weights; in an fp32 run, given master
        weights become the parameters (the checkpoint's weights file may be their bf16 rounding)."""
        for target, source in ((self.m, m), (self.v, v)):
            target.copy_(torch.from_numpy(np.asarray(source, dtype=np.float32)))
        if master is None:
            return
        master = torch.from_numpy(np.asarray(master, dtype=np.float32))
        if self.master is not None:
            self.master.copy_(master)
            return
        self.params[self.shard].copy_(master)
        if self.zero_stage == 1:
            self.dist.all_gather_(self.params, "the restored parameters")

    def _reduce_gradients(self):
        """The gradients this rank updates with: all of them summed over the ranks (-z 0), or its shard (-z 1).

        -z 0 is one all-reduce of the whole fp32 buffer after the last micro-batch's backward. NCCL pipelines a
        buffer this large in chunks of its own, so splitting it into buckets only pays if the buckets' all-reduces
        overlap the backward; whether that wins over the launches and the contention it adds is to be measured on
        multi-GPU machines first.
        """
        if self.zero_stage == 1:
            return self.dist.reduce_scatter_sum_(self.grads, "the gradients")
        self.dist.all_reduce_sum_(self.grads, "the gradients")
        return self.grads
