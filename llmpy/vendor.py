"""The vendor libraries the mainline calls: cuBLAS matmuls and cuDNN flash attention.

These are the two places where an expert library beats anything we would write in a day, so the mainline
calls them directly, as functions, with no autograd: the forward and backward products are spelled out here.
On the GPU every matmul goes to cuBLASLt directly (llmpy.cublaslt), which lets us time its candidate algorithms per
shape instead of taking torch's one (at d36 on the H100, 1.7% of the whole step) and put the MLP's GELU in the fc
matmul's epilogue; attention goes to cuDNN through torch. On the CPU (tests under Triton's interpreter) torch's CPU
matmul stands in for cuBLAS.

Each row-major product below is written as cuBLASLt's column-major product of the transposes (the convention is
explained in llmpy.cublaslt), with the leading dimensions the row strides of the row-major tensors (_ld).
"""

import torch

from . import cublaslt


def _ld(matrix):
    """A row-major matrix's leading dimension as cuBLASLt's column-major one: its row stride (rows contiguous)."""
    assert matrix.stride(1) == 1, "cuBLASLt needs each row contiguous"
    return matrix.stride(0)


def matmul_forward(out, inp, weight, bias=None):
    """out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC,). cuBLASLt adds the bias in its epilogue.

    Column-major, out^T (OC, N) = weight (stored as a (C, OC) matrix, transposed) @ inp^T (stored as (C, N)).
    """
    if out.is_cuda:
        (N, C), OC = inp.shape, weight.shape[0]
        cublaslt.matmul(out, weight, inp, m=OC, n=N, k=C, trans_a=True, trans_b=False, lda=_ld(weight), ldb=_ld(inp),
                        ldd=_ld(out), epilogue="default" if bias is None else "bias", bias=bias)
    elif bias is None:
        torch.mm(inp, weight.t(), out=out)
    else:
        torch.addmm(bias, inp, weight.t(), out=out)


def matmul_gelu_forward(out, pre_gelu, inp, weight, bias):
    """pre_gelu (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC,) and out = gelu(pre_gelu), in one cuBLASLt call.

    Column-major, out^T (OC, N) = weight (stored as a (C, OC) matrix, transposed) @ inp^T (stored as (C, N)).
    """
    (N, C), OC = inp.shape, weight.shape[0]
    cublaslt.matmul(out, weight, inp, m=OC, n=N, k=C, trans_a=True, trans_b=False, lda=_ld(weight), ldb=_ld(inp),
                    ldd=_ld(out), epilogue="gelu_aux_bias", bias=bias, aux=pre_gelu, aux_ld=_ld(pre_gelu))


def matmul_backward_input(dinp, dout, weight):
    """dinp (N, C) = dout (N, OC) @ weight (OC, C). Column-major, dinp^T (C, N) = weight^T (C, OC) @ dout^T (OC, N)."""
    if dinp.is_cuda:
        (N, OC), C = dout.shape, weight.shape[1]
        cublaslt.matmul(dinp, weight, dout, m=C, n=N, k=OC, trans_a=False, trans_b=False, lda=_ld(weight),
                        ldb=_ld(dout), ldd=_ld(dinp))
    else:
        torch.mm(dout, weight, out=dinp)


def matmul_backward_weight(dweight, dout, inp):
    """dweight (OC, C) fp32 += dout (N, OC)^T @ inp (N, C).

    Gradients are fp32 while the operands are bf16: cuBLASLt multiplies bf16 and accumulates into the fp32 gradient
    (beta = 1) in one call, so gradient accumulation over micro-steps never rounds to bf16.
    Column-major, dweight^T (C, OC) += inp^T (C, N) @ dout (N, OC).
    """
    if dweight.is_cuda:
        (N, OC), C = dout.shape, inp.shape[1]
        cublaslt.matmul(dweight, inp, dout, m=C, n=OC, k=N, trans_a=False, trans_b=True, lda=_ld(inp), ldb=_ld(dout),
                        ldd=_ld(dweight), accumulate=True)
    elif dout.dtype == dweight.dtype:
        dweight.addmm_(dout.t(), inp)
    else:  # CPU tests: torch has no mixed-dtype matmul on the CPU
        dweight.addmm_(dout.t().to(dweight.dtype), inp.to(dweight.dtype))


def _heads(qkv, NH):
    """Views q, k, v (B, NH, T, HS) of qkv (B, T, 3C): strided views, no copies."""
    B, T, C3 = qkv.shape
    qkv = qkv.view(B, T, 3, NH, C3 // (3 * NH))
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]


def cudnn_attention_forward(qkv, NH):
    """Causal attention of the heads in qkv (B, T, 3C) with cuDNN's flash attention.

    Returns (out, saved): out is (B, T, C), a view of cuDNN's output, which cuDNN lays out like q, i.e. as
    (B, T, NH, HS), so no copy is needed before the projection matmul; saved holds what the backward needs.
    """
    q, k, v = _heads(qkv, NH)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)
    out, lse, seed, offset = res[0], res[1], res[6], res[7]
    B, _, T, HS = out.shape
    out_btc = out.transpose(1, 2).reshape(B, T, NH * HS)  # a view when cuDNN used q's layout, else a copy
    return out_btc, (out, lse, seed, offset)


def cudnn_attention_backward(dout, qkv, NH, saved):
    """The gradient of causal attention given dout (B, T, C) and the forward's saved tensors: dq, dk, dv, each (N, C).

    cuDNN returns the three gradients as separate tensors laid out like q, i.e. as (B, T, NH, HS), so each is an
    (N, C) matrix as it stands. They are handed on as they are: the model gathers them into one (N, 3C) dqkv with the
    bias gradient's pass over them (llmpy.kernels.bias), where torch's copies cost 4.8 ms of a 127 ms d12 step.
    """
    out, lse, seed, offset = saved
    B, T, C = dout.shape
    q, k, v = _heads(qkv, NH)
    dout_heads = dout.view(B, T, NH, C // NH).transpose(1, 2)
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout_heads, q, k, v, out, lse, seed, offset, None, None, None, T, T, 0.0, True)
    return [g.transpose(1, 2).reshape(B * T, C) for g in grads]  # views when laid out like q, else copies
