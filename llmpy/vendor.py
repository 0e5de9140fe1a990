"""The vendor libraries the mainline calls: cuBLAS matmuls and cuDNN flash attention.

These are the two places where an expert library beats anything we would write in a day, so the mainline
calls them directly, as functions, with no autograd: the forward and backward products are spelled out here.
On the GPU every matmul goes to cuBLASLt directly (llmpy.cublaslt), which lets us time its candidate algorithms per
shape instead of taking torch's one (faster at d36: BENCHMARKS.md, fourth session) and put the MLP's GELU in the fc
matmul's epilogue. Attention goes to cuDNN through NVIDIA's cuDNN frontend (pip package nvidia-cudnn-frontend),
which, unlike torch's cuDNN op, writes dq, dk and dv straight into the one dqkv the qkv matmul's backward reads. On
the CPU (tests under Triton's interpreter) torch's CPU matmul stands in for cuBLAS.

Each row-major product below is written as cuBLASLt's column-major product of the transposes (the convention is
explained in llmpy.cublaslt), with the leading dimensions the row strides of the row-major tensors (_ld).
"""

import math

import torch

from . import cublaslt


def _ld(matrix):
    """A row-major matrix's leading dimension as cuBLASLt's column-major one: its row stride (rows contiguous)."""
    assert matrix.stride(1) == 1, "cuBLASLt needs each row contiguous"
    return matrix.stride(0)


def matmul_forward(out, inp, weight, bias=None, residual=None):
    """out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC,), plus residual (N, OC) if given: a projection joining
    the residual stream. cuBLASLt adds the bias and the residual (as its C matrix) before it rounds to out's dtype.

    Column-major, out^T (OC, N) = weight (stored as a (C, OC) matrix, transposed) @ inp^T (stored as (C, N)).
    """
    if out.is_cuda:
        (N, C), OC = inp.shape, weight.shape[0]
        assert residual is None or residual.stride() == out.stride()
        cublaslt.matmul(out, weight, inp, m=OC, n=N, k=C, trans_a=True, trans_b=False, lda=_ld(weight), ldb=_ld(inp),
                        ldd=_ld(out), epilogue="default" if bias is None else "bias", bias=bias, c=residual)
        return
    if bias is None:
        torch.mm(inp, weight.t(), out=out)
    else:
        torch.addmm(bias, inp, weight.t(), out=out)
    if residual is not None:
        out += residual


def matmul_gelu_forward(out, pre_gelu, inp, weight, bias):
    """pre_gelu (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC,) and out = gelu(pre_gelu), in one cuBLASLt call.

    Column-major, out^T (OC, N) = weight (stored as a (C, OC) matrix, transposed) @ inp^T (stored as (C, N)).
    """
    (N, C), OC = inp.shape, weight.shape[0]
    cublaslt.matmul(out, weight, inp, m=OC, n=N, k=C, trans_a=True, trans_b=False, lda=_ld(weight), ldb=_ld(inp),
                    ldd=_ld(out), epilogue="gelu_aux_bias", bias=bias, aux=pre_gelu, aux_ld=_ld(pre_gelu))


def matmul_backward_input(dinp, dout, weight, accumulate=False):
    """dinp (N, C) = dout (N, OC) @ weight (OC, C), or += with accumulate (an input read by two matmuls: Llama's
    SwiGLU gate and up). Column-major, dinp^T (C, N) = weight^T (C, OC) @ dout^T (OC, N)."""
    if dinp.is_cuda:
        (N, OC), C = dout.shape, weight.shape[1]
        cublaslt.matmul(dinp, weight, dout, m=C, n=N, k=OC, trans_a=False, trans_b=False, lda=_ld(weight),
                        ldb=_ld(dout), ldd=_ld(dinp), c=dinp if accumulate else None)
    elif accumulate:
        dinp.addmm_(dout, weight)
    else:
        torch.mm(dout, weight, out=dinp)


def matmul_backward_weight(dweight, dout, inp, accumulate=True):
    """dweight (OC, C) fp32 += dout (N, OC)^T @ inp (N, C), or = with accumulate=False.

    Gradients are fp32 while the operands are bf16: cuBLASLt multiplies bf16 and accumulates into the fp32 gradient
    (beta = 1) in one call, so gradient accumulation over micro-steps never rounds to bf16. A step's first
    micro-batch writes the gradient instead (beta = 0), which spares zeroing it and reading the zeros back.
    Column-major, dweight^T (C, OC) += inp^T (C, N) @ dout (N, OC).
    """
    if dweight.is_cuda:
        (N, OC), C = dout.shape, inp.shape[1]
        cublaslt.matmul(dweight, inp, dout, m=C, n=OC, k=N, trans_a=False, trans_b=True, lda=_ld(inp), ldb=_ld(dout),
                        ldd=_ld(dweight), c=dweight if accumulate else None)
        return
    if not accumulate:
        dweight.zero_()
    # CPU tests: torch has no mixed-dtype matmul on the CPU
    dweight.addmm_(dout.t().to(dweight.dtype), inp.to(dweight.dtype))


def matmul_fp8(out, a, a_scale, b, b_scale, bias=None, c=None, pre_gelu=None, fast_accum=False):
    """out (M, N) = (a (M, K) @ b (N, K)^T) * a_scale * b_scale, plus bias (N,) and C (M, N, laid out as out; C = out
    accumulates) if given; with pre_gelu (M, N), pre_gelu = that and out = gelu(pre_gelu) (bias required).

    a and b are FP8 (float8_e4m3fn or float8_e5m2, llmpy.kernels.fp8), both K-major: every FP8 matmul of training is
    this one product (a linear layer's forward: inp @ W^T; its input gradient: dout @ (W^T)^T; its weight gradient:
    dout^T @ (inp^T)^T). a_scale, b_scale: fp32 (1,) on the device, the inverses of the scales the casts multiplied
    by, each aligned as an allocation is (cuBLASLt refuses a view a few bytes into a tensor). out bf16, or fp32 (a weight gradient). fast_accum: cuBLASLt's FP8 fast accumulation (llmpy.cublaslt).

    Column-major, out^T (N, M) = b (stored as a (K, N) matrix, transposed) @ a^T (stored as (K, M)). On the CPU (tests)
    the FP8 values are multiplied in fp32 by torch (each product exact, as in the tensor cores), then scaled.
    """
    (M, K), N = a.shape, b.shape[0]
    if out.is_cuda:
        epilogue = "gelu_aux_bias" if pre_gelu is not None else "default" if bias is None else "bias"
        cublaslt.matmul(out, b, a, m=N, n=M, k=K, trans_a=True, trans_b=False, lda=_ld(b), ldb=_ld(a), ldd=_ld(out),
                        epilogue=epilogue, bias=bias, aux=pre_gelu, aux_ld=0 if pre_gelu is None else _ld(pre_gelu),
                        c=c, a_scale=b_scale, b_scale=a_scale, fast_accum=fast_accum)
        return
    assert pre_gelu is None, "the GELU epilogue is cuBLASLt's: GPU only"
    product = (a.float() @ b.float().t()) * (a_scale * b_scale)
    if bias is not None:
        product += bias.float()
    if c is not None:
        product += c.float()
    out.copy_(product)


def heads(x, NH, K):
    """Views (B, NH, T, HS) of the K blocks of C columns of x (B, T, K*C): q, k and v of qkv (K = 3), or the heads of
    the attention output or its gradient (K = 1). Strided views, no copies."""
    B, T, KC = x.shape
    x = x.view(B, T, K, NH, KC // (K * NH))
    return [x[:, :, i].transpose(1, 2) for i in range(K)]


def qkv_heads(qkv, NH, KV):
    """Views of q (B, NH, T, HS), k and v (B, KV, T, HS) in qkv (B, T, (NH + 2 KV) * HS): NH query heads, then KV key
    heads, then KV value heads (grouped-query attention; KV = NH is heads(qkv, NH, 3)). Strided views, no copies."""
    B, T, W = qkv.shape
    x = qkv.view(B, T, NH + 2 * KV, W // (NH + 2 * KV))
    return [x[:, :, start:stop].transpose(1, 2) for start, stop in ((0, NH), (NH, NH + KV), (NH + KV, NH + 2 * KV))]


_cudnn = {}  # the cuDNN frontend module and a handle, set up on first use
_attention_graphs = {}  # (direction, determinism, every tensor's shape and strides) -> (graph, its tensors, workspace)
_deterministic = False  # set_deterministic


def set_deterministic(flag):
    """--deterministic 1: results that do not change from run to run (or process to process). cuBLASLt takes its
    heuristic's first algorithm instead of the fastest it times, and cuDNN's attention backward its deterministic
    algorithm (its default sums dq with float atomics, in whatever order the GPU runs them)."""
    global _deterministic
    _deterministic = bool(flag)
    cublaslt.TIME_ALGORITHMS = not flag


def cudnn_frontend():
    """NVIDIA's cuDNN frontend (pip package nvidia-cudnn-frontend, module cudnn) and a cuDNN handle on the current
    GPU. Raises ValueError, saying what to do, where the package is missing."""
    if not _cudnn:
        try:
            import cudnn
        except (ImportError, OSError) as e:
            raise ValueError(f"--attention cudnn needs NVIDIA's cuDNN frontend ({e}): pip install "
                             "nvidia-cudnn-frontend, or run with --attention triton") from None
        _cudnn.update(module=cudnn, handle=cudnn.create_handle())
    return _cudnn["module"], _cudnn["handle"]


def _cudnn_attention(backward, inputs, outputs):
    """cuDNN's causal flash attention, forward (inputs q, k, v; outputs out, lse) or backward (inputs q, k, v, out,
    dout, lse; outputs dq, dk, dv). Every tensor is a (B, NH, T, HS) view of our buffers, lse (B, NH, T, 1) fp32,
    except k, v, dk and dv, (B, KV, T, HS) with grouped-query attention (cuDNN lets query head h read key and value
    head h // (NH / KV) when the key and value tensors have fewer heads, and sums dk and dv over each group).

    cuDNN takes each tensor's strides, so it reads q, k and v where the qkv matmul wrote them and writes out, dq, dk
    and dv straight into our (B, T, C) and (B, T, 3C) buffers: no copies around attention. The graph for a layout is
    built once, when cuDNN also picks its kernel, and serves every layer; a call only binds the layer's tensors.
    """
    cudnn, handle = cudnn_frontend()
    deterministic = _deterministic
    key = (backward, deterministic) + tuple((tuple(t.shape), t.stride()) for t in inputs + outputs)
    if key not in _attention_graphs:
        graph, nodes = attention_graph(backward, inputs, outputs, deterministic)
        graph.build_plans()
        workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=inputs[0].device)
        _attention_graphs[key] = graph, nodes, workspace
    graph, nodes, workspace = _attention_graphs[key]
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    graph.execute(dict(zip(nodes, inputs + outputs)), workspace, handle=handle)


def attention_graph(backward, inputs, outputs, deterministic=False, heuristics=("A", "FALLBACK")):
    """The cuDNN graph of _cudnn_attention for these tensors' shapes and strides, with its execution plans ranked by
    cuDNN's heuristics (the modes named) but not built, and its nodes in the order of inputs + outputs. For
    _cudnn_attention, and for dev/attention_plans.py, which builds and times every plan."""
    cudnn, handle = cudnn_frontend()
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    nodes = [graph.tensor_like(t) for t in inputs]
    scale = 1.0 / math.sqrt(inputs[0].shape[-1])
    if backward:
        q, k, v, out, dout, lse = nodes
        results = graph.sdpa_backward(name="attention_backward", q=q, k=k, v=v, o=out, dO=dout, stats=lse,
                                      attn_scale=scale, use_causal_mask=True,
                                      use_deterministic_algorithm=deterministic)
    else:
        q, k, v = nodes
        results = graph.sdpa(name="attention", q=q, k=k, v=v, is_inference=False, attn_scale=scale,
                             use_causal_mask=True)
    for node, t in zip(results, outputs):
        node.set_output(True).set_dim(list(t.shape)).set_stride(list(t.stride()))
        node.set_data_type(cudnn.data_type.FLOAT if t.dtype == torch.float32 else cudnn.data_type.BFLOAT16)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([getattr(cudnn.heur_mode, mode) for mode in heuristics])
    graph.check_support()
    return graph, nodes + list(results)


def cudnn_attention_forward(out, lse, qkv, NH, KV=None):
    """out (B, T, C) = causal self-attention of the heads in qkv (B, T, (NH + 2 KV) * HS; KV None: NH, so 3C), and
    lse (B, NH, T) fp32, each query's softmax log-sum-exp, for the backward: cuDNN's flash attention with the
    contract of our own (llmpy.kernels.attention.attention_forward)."""
    KV = NH if KV is None else KV
    _cudnn_attention(False, qkv_heads(qkv, NH, KV), heads(out, NH, 1) + [lse.unsqueeze(-1)])


def cudnn_attention_backward(dqkv, dout, qkv, out, lse, NH, KV=None):
    """dqkv (B, T, (NH + 2 KV) * HS) = the gradient of causal self-attention given dout (B, T, C) and the forward's
    qkv, out and lse: cuDNN's flash attention backward, writing dq, dk and dv into their columns of dqkv."""
    KV = NH if KV is None else KV
    _cudnn_attention(True, qkv_heads(qkv, NH, KV) + heads(out, NH, 1) + heads(dout, NH, 1) + [lse.unsqueeze(-1)],
                     qkv_heads(dqkv, NH, KV))
