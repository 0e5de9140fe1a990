"""Causal self-attention in the training step, for every family: cuDNN's flash attention or ours (Triton: any GPU, or
the CPU under the interpreter), multi-head or grouped-query (KV key/value heads, each read by NH / KV query heads).

Both read q, k and v where the qkv matmul wrote them, qkv (B, T, (NH + 2 KV) * hs), write the heads' outputs side by
side into atty (B, T, C), and keep each query's softmax log-sum-exp, lse (B, NH, T), for the backward, which writes
dq, dk and dv into dqkv (B, T, (NH + 2 KV) * hs). A family with a qkv bias (GPT-2) extends Attention with how it gets
that bias's gradient (llmpy/models/gpt2.py).
"""

import torch

from .. import vendor
from ..kernels import attention


def choose_attention(config, T, attention_impl, dtype, device):
    """The attention that will run, "cudnn" or "triton" (cuDNN's flash attention is bf16 on the GPU only: elsewhere
    ours runs), once the model is checked to fit it: T within the model's positions, a head size it supports.
    config: any family's (max_seq_len, channels, num_heads). ValueError, one line. Cheap: call it before allocating
    anything."""
    if T > config.max_seq_len:
        raise ValueError(f"-t {T} is longer than the model's max_seq_len {config.max_seq_len}")
    if attention_impl not in ("cudnn", "triton"):
        raise ValueError(f"--attention must be cudnn or triton, not {attention_impl!r}")
    if attention_impl == "cudnn" and (dtype != torch.bfloat16 or torch.device(device).type != "cuda"):
        attention_impl = "triton"
    head_size = config.channels // config.num_heads
    if attention_impl == "triton" and head_size not in attention.SUPPORTED_HEAD_SIZES:
        raise ValueError(f"our attention (--attention triton, and every run not in bf16 on the GPU) takes head sizes "
                         f"{', '.join(map(str, attention.SUPPORTED_HEAD_SIZES))}; this model's is {head_size}: "
                         f"run it in bf16 on the GPU with --attention cudnn")
    if attention_impl == "cudnn":
        vendor.cudnn_frontend()  # now, not at the first step: says what to install where it is missing
    return attention_impl


class Attention:
    """The attention of every layer of one model: impl "cudnn" or "triton" (choose_attention), L layers, micro-batches
    of (B, T), NH query heads and KV key/value heads (KV = NH: multi-head)."""

    def __init__(self, impl, L, B, T, NH, KV, device):
        f32 = dict(dtype=torch.float32, device=device)
        self.impl, self.B, self.T, self.NH, self.KV = impl, B, T, NH, KV
        self.lse = torch.empty(L, B, NH, T, **f32)  # each query's softmax log-sum-exp, for the backward
        self.delta = torch.empty(B, NH, T, **f32) if impl != "cudnn" else None  # ours: rowsum(dout * out) per head

    def forward(self, l, qkv, atty):
        """Layer l: atty (N, C) from qkv (N, (NH + 2 KV) hs), and the layer's lse."""
        B, T = self.B, self.T
        forward = vendor.cudnn_attention_forward if self.impl == "cudnn" else attention.attention_forward
        forward(atty.view(B, T, -1), self.lse[l], qkv.view(B, T, -1), self.NH, KV=self.KV)

    def backward(self, l, dqkv, datty, qkv, atty, dbias=None, bias_scratch=None):
        """Layer l: writes dqkv (N, (NH + 2 KV) hs) from datty (N, C) and the forward's qkv and atty. Ours can also add
        the qkv bias's gradient (dqkv's column sums) into dbias (attention.attention_backward)."""
        B, T = self.B, self.T
        dqkv, datty, qkv, atty = (x.view(B, T, -1) for x in (dqkv, datty, qkv, atty))
        if self.impl == "cudnn":
            vendor.cudnn_attention_backward(dqkv, datty, qkv, atty, self.lse[l], self.NH, KV=self.KV)
        else:
            attention.attention_backward(dqkv, datty, qkv, atty, self.lse[l], self.NH, self.delta, dbias,
                                         bias_scratch, KV=self.KV)
