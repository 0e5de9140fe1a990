"""What every family's mainline model does alike around its own forward and backward: the device buffers of a
micro-batch's tokens, the forward with or without the backward's dlogits, a training micro-batch replayed from a
CUDA graph, and the embedding's backward (float atomics, or the deterministic order). A family (gpt2.py, llama3.py)
subclasses Model and writes _forward, backward and init_weights.
"""

import torch

from .. import precision as precisions
from ..kernels import classifier, encoder, reduce


class Model:
    LINEAR = ()  # a family's per-layer linear weights (L, OC, K): FP8 under --precision fp8
    FP8_LM_HEAD = False  # fp8_options lm_head's default: the LM head in FP8 too, where its loss was measured to allow

    def __init__(self, config, B, T, runtime, deterministic, precision="bf16", fp8_options=None):
        """For micro-batches of (B, T) tokens on runtime's buffers. deterministic: the embedding's backward sums each
        token's rows in an order fixed by the tokens (encoder.DeterministicEncoderBackward, from tables made on the
        host) instead of with float atomics. precision "bf16" or "fp8", fp8_options (llmpy.precision.FP8's, and
        lm_head: True, the LM head's three products in FP8 too; "gradients", its two backward products in FP8 and
        its forward (the logits, the loss) in bf16; False, all three in bf16; the family's FP8_LM_HEAD by default):
        the matmuls the family's forward and backward call, self.matmuls; FP8 for the LINEAR weights (and the
        head's)."""
        device = runtime.device
        self.config, self.B, self.T, self.runtime = config, B, T, runtime
        self.p, self.g = runtime.p, runtime.g
        self.precision = precision
        # a group a kind of linear layer: its weight in every layer
        linear = [[(self.p[name][l], self.g[name][l]) for l in range(config.num_layers)] for name in self.LINEAR]
        fp8_options = dict(fp8_options or {})
        lm_head = fp8_options.pop("lm_head", self.FP8_LM_HEAD)
        if lm_head not in (False, True, "gradients"):
            raise ValueError(f"fp8_options lm_head must be False, True or 'gradients', not {lm_head!r}")
        self.fp8_lm_head = lm_head if precision == "fp8" else False
        if lm_head:
            linear.append([(self.p[self.head_name(config)], self.g[self.head_name(config)])])
            if lm_head == "gradients":
                fp8_options["bf16_forward"] = [len(linear) - 1]
        self.matmuls = precisions.matmuls(precision, linear, B * T, runtime.dtype, device, **fp8_options)
        self.inputs = torch.zeros(B, T, dtype=torch.int32, device=device)
        self.targets = torch.zeros(B, T, dtype=torch.int32, device=device)
        self.ordered_encoder_backward = (encoder.DeterministicEncoderBackward(B, T, config.channels, device)
                                         if deterministic else None)

    def _saved_activations(self, recompute):
        """(what the backward recomputes, its Activations' shared) under -r recompute: as asked, unless the matmuls
        keep the linear layers' inputs themselves (FP8: matmuls.keeps_inputs); then the bf16 ones are scratch, one
        slot for all layers (shared 2), and nothing is recomputed."""
        return (0, 2) if self.matmuls.keeps_inputs else (recompute, recompute)

    def _head(self, has_targets, dloss, train):
        """The LM head, acts.lnf (N, C) @ W^T into acts.logits (N, Vp), and with targets the fused classifier: the
        losses, and dlogits (scaled by dloss) for training, in place or, where the head's gradients run in FP8, in
        e5m2 written by the classifier itself (matmuls.fp8_grad)."""
        a, head, N = self.acts, self.p[self.head_name(self.config)], self.B * self.T
        self.matmuls.forward(a.logits, a.lnf, head)
        if has_targets:
            classifier.fused_classifier(a.logits, a.losses, self.targets.view(-1), self.config.vocab_size, dloss,
                                        write_dlogits=train, fp8_out=self.matmuls.fp8_grad(head, N) if train else None)

    @staticmethod
    def head_name(config):
        """The LM head's weight: wte, tied (a family with an untied head says otherwise)."""
        return "wte"

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

    def train_micro_batch(self, inputs, targets, dloss, loss_sum, first):
        """One micro-batch of a training step: forward with targets (dlogits scaled by dloss), loss_sum (fp32 (1,))
        += dloss * the sum of the losses, then backward. first: the step's first micro-batch, whose backward starts
        the gradients; the others add to them.

        Under cuda_graphs the micro-batch, some 30 launches a layer, is replayed from a CUDA graph (runtime.replay):
        one graph for each (dloss, loss_sum, first), as the first micro-batch launches differently (it zeroes
        gradients and writes the matmul weights' rather than adding to them).
        """
        self._load_batch(inputs, targets, backward=True)
        self.runtime.replay((dloss, loss_sum.data_ptr(), first), lambda: self._micro_batch(dloss, loss_sum, first))

    def _micro_batch(self, dloss, loss_sum, first):
        self._forward(True, dloss, train=True)
        reduce.sum_into(loss_sum, self.acts.losses, scale=dloss)
        self.backward(first)

    def encoder_backward(self, dwte, dwpe, dresidual):
        """The embedding's gradients from the residual stream's, dresidual (N, C): dwte += per-token sums, dwpe (None
        without a position embedding) += per-position sums; in the deterministic order if the model was built so."""
        dresidual = dresidual.view(self.B, self.T, -1)
        if self.ordered_encoder_backward is not None:
            self.ordered_encoder_backward(dwte, dwpe, dresidual)
        else:
            encoder.encoder_backward(dwte, dwpe, dresidual, self.inputs)
