"""Causal self-attention, forward and backward: from materialised scores to flash attention.

The op. For every batch row b and head h, with q, k, v (T, HS) and scale = 1/sqrt(HS):
    S = scale * q @ k^T      (T, T), S[i, j] = -inf for keys after the query (j > i): causal
    P = softmax(S) by rows   (T, T)
    out = P @ v              (T, HS)
q, k and v are read where the QKV matmul wrote them, qkv (B, T, 3C) with C = NH*HS: head h's query of token t is
qkv[b, t, h*HS : (h+1)*HS], its key C further along the row, its value 2C further (the mainline's layout), and out is
(B, T, C), the heads side by side. lse (B, NH, T) fp32 is each row's log-sum-exp of S, kept for the backward. Backward,
given dout (B, T, C), with delta_i = sum_j P_ij dP_ij:
    dv = P^T @ dout,   dP = dout @ v^T,   dS = P * (dP - delta),   dq = scale * dS @ k,   dk = scale * dS^T @ q
GPT-2 d12: B=64, T=1024, NH=12, HS=64, bf16.

Compute. The forward's two matmuls are 4*T^2*HS flops per head, but causal attention only needs the half at or below
the diagonal: TFLOP/s below count that half, 2*B*NH*T^2*HS for the forward and 4*B*NH*T^2*HS for the backward (its
four matmuls; recomputing S is not counted), the usual convention, so a kernel that computes the masked half too is
charged for it in time. The bytes that must move are only q, k, v, out (and dout, dqkv): O(T*HS) per head. The
T x T matrices are what a naive implementation adds: at T = 1024 an fp32 S is 4 MB per head, 3.2 GB at B=64.

v1, naive, three kernels: a batched matmul writes S (fp32, (B, NH, T, T)) to memory, a row softmax kernel reads it and
writes P (bf16) and lse, and the batched matmul again computes out = P @ v. S and P make the round trip through HBM:
12 bytes per score (S: 4 written, 4 read; P: 2 and 2) against the 4 * HS = 256 flops of useful work per score, so
v1 runs at HBM speed, not tensor-core speed. Backward, same style: recompute S and P, then dv = P^T dout,
dP = dout v^T (fp32, in S's buffer), dS = P (dP - delta) by a row kernel (bf16, in P's buffer), dq = scale dS k and
dk = scale dS^T q, every product one launch of the batched matmul through strided views.
v2, online softmax: one kernel, one program per block of queries of one head, streaming k and v in blocks and keeping
a running row max m, sum l and unnormalised output acc in registers (for each key block: m_new = max(m, rowmax S),
acc = acc * exp(m - m_new) + exp(S - m_new) @ v, l likewise). S and P never leave the chip; HBM traffic drops to
O(T * HS) per head. But v2 still visits every key block and masks the ones above the diagonal: half its work is
thrown away.
v3, flash attention with causal block skipping, the mainline's own kernel (llmpy.kernels.attention, imported; the
trainer uses it with --attention triton, and by default calls cuDNN, the bound below). Key blocks above the diagonal
are never loaded, the blocks fully below it run without mask arithmetic, query blocks run longest first, and exp is
exp2 with the scale folded in. Its backward recomputes P from q, k and lse in registers (FlashAttention-2: one kernel
for dk, dv over key blocks, one for dq over query blocks, no atomics).
The bound: cuDNN's flash attention (what the mainline calls, llmpy.vendor) and torch's FlashAttention-2 (the flash
SDPA backend), both through their aten ops; the faster one is the bound.
Where they stand on the H100 at d12, B=64 (dev/kernels/README.md has the table): forward v1 12% of cuDNN (the bound),
v2 56%, v3 93% (flash SDPA 75%); backward v1 16%, v3 89% (flash SDPA 79%).
"""

# common first: without a GPU it sets TRITON_INTERPRET=1, which must precede importing triton
from common import INTERPRET, Result, assert_close, device, mark_bound, time_ms

import math

import torch
import triton
import triton.language as tl

from llmpy import vendor
from llmpy.vendor import heads
from llmpy.kernels import attention as mainline
from llmpy.kernels.attention import LOG2E  # log2(e), a tl.constexpr: exp(x) = exp2(x * LOG2E)
from llmpy.kernels.rounding import round_to


# v1's batched matmul: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps); small tiles under the interpreter so that T ~ 50
# spans several tiles and K steps.
_BMM_BLOCKS = (16, 16, 16, 4) if INTERPRET else (64, 64, 32, 4)


@triton.jit
def _batched_matmul_kernel(c_ptr, a_ptr, b_ptr, M, N, K, NH, alpha,
                           stride_ab, stride_ah, stride_am, stride_ak,
                           stride_bb, stride_bh, stride_bk, stride_bn,
                           stride_cb, stride_ch, stride_cm, stride_cn,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           UPCAST: tl.constexpr):
    # c[b, h] = alpha * a[b, h] @ b[b, h] for head (b, h) = program_id(1): one (BLOCK_M, BLOCK_N) tile of c per
    # program, every operand addressed through its four strides, so transposes and the heads inside qkv are views.
    tiles_n = tl.cdiv(N, BLOCK_N)
    offs_m = (tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    b = (tl.program_id(1) // NH).to(tl.int64)
    h = tl.program_id(1) % NH
    a_ptrs = a_ptr + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + b * stride_bb + h * stride_bh + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k), other=0.0)
        bb = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k) & (offs_n[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bb = bb.to(tl.float32)
        acc = tl.dot(a, bb, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + b * stride_cb + h * stride_ch + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, round_to(acc * alpha, c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _bmm(c, a, b, alpha=1.0):
    """c (B, NH, M, N) = alpha * a (B, NH, M, K) @ b (B, NH, K, N), all any-strided views; c fp32 or bf16."""
    B, NH, M, K = a.shape
    N = b.shape[3]
    block_m, block_n, block_k, num_warps = _BMM_BLOCKS
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), B * NH)
    # operands in the matmul's dtype: P and dS are bf16, so the products run on bf16 tensor cores; S, dP come out fp32
    _batched_matmul_kernel[grid](c, a, b, M, N, K, NH, alpha, *a.stride(), *b.stride(), *c.stride(),
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=INTERPRET,
                                 num_warps=num_warps, num_stages=3)


@triton.jit
def _causal_softmax_kernel(p_ptr, lse_ptr, s_ptr, T, BLOCK_T: tl.constexpr):
    # One row i of S (T,) fp32 per program (rows of all heads in a row): P[i, j] = exp(S_ij - max) / sum for j <= i,
    # 0 above the diagonal; lse[i] = max + log(sum). The whole row fits in registers (BLOCK_T >= T).
    row = tl.program_id(0).to(tl.int64)
    query = row % T
    cols = tl.arange(0, BLOCK_T)
    s = tl.load(s_ptr + row * T + cols, mask=cols <= query, other=float("-inf"))
    row_max = tl.max(s, axis=0)
    e = tl.exp(s - row_max)
    total = tl.sum(e, axis=0)
    tl.store(p_ptr + row * T + cols, round_to(e / total, p_ptr.dtype.element_ty), mask=cols < T)
    tl.store(lse_ptr + row, row_max + tl.log(total))


@triton.jit
def _softmax_backward_kernel(ds_ptr, p_ptr, dp_ptr, T, BLOCK_T: tl.constexpr):
    # One row per program: dS = P * (dP - sum_j P_j dP_j). ds may be p's buffer: the row is read before it is written.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_T)
    mask = cols < T
    p = tl.load(p_ptr + row * T + cols, mask=mask, other=0.0).to(tl.float32)
    dp = tl.load(dp_ptr + row * T + cols, mask=mask, other=0.0)
    ds = p * (dp - tl.sum(p * dp, axis=0))
    tl.store(ds_ptr + row * T + cols, round_to(ds, ds_ptr.dtype.element_ty), mask=mask)


def _row_launch(T):
    block_t = triton.next_power_of_2(T)
    return dict(BLOCK_T=block_t, num_warps=min(16, max(1, block_t // 256)))


def _scores_and_probabilities(qkv, NH, lse):
    """v1's first two steps: S = scale q k^T (fp32, (B, NH, T, T)), then P = causal softmax(S) (bf16) and lse."""
    B, T, three_c = qkv.shape
    q, k, _ = heads(qkv, NH, 3)
    scores = torch.empty(B, NH, T, T, dtype=torch.float32, device=qkv.device)
    _bmm(scores, q, k.transpose(2, 3), 1.0 / math.sqrt(q.shape[-1]))
    probs = torch.empty(B, NH, T, T, dtype=qkv.dtype, device=qkv.device)
    _causal_softmax_kernel[(B * NH * T,)](probs, lse, scores, T, **_row_launch(T))
    return scores, probs


def v1(out, lse, qkv, NH):
    """Naive: S materialised in fp32 by a batched matmul kernel, a softmax kernel writes P (bf16) and lse, and the
    matmul kernel again computes out = P @ v. 12 bytes of S and P written and read per score (a T x T matrix per
    head): HBM traffic that dwarfs q, k, v.

    out (B, T, C) written; lse (B, NH, T) fp32 written; qkv (B, T, 3C) bf16."""
    _, probs = _scores_and_probabilities(qkv, NH, lse)
    _bmm(heads(out, NH, 1)[0], probs, heads(qkv, NH, 3)[2])


def v1_backward(dqkv, dout, qkv, out, lse, NH):
    """Naive backward: recompute S and P (as the v1 forward), then five batched matmuls and a row kernel, every
    T x T intermediate in memory: dv = P^T dout, dP = dout v^T (fp32, over S), dS = P (dP - rowsum(P dP)) (bf16,
    over P), dq = scale dS k, dk = scale dS^T q.

    dqkv (B, T, 3C) written; dout (B, T, C). out and lse are not read (v1 recomputes P, and delta = rowsum(P dP)):
    they are there for the flash backward's signature."""
    B, T, three_c = qkv.shape
    scale = 1.0 / math.sqrt(three_c // (3 * NH))
    q, k, v = heads(qkv, NH, 3)
    dq, dk, dv = heads(dqkv, NH, 3)
    (dout_heads,) = heads(dout, NH, 1)
    scores, probs = _scores_and_probabilities(qkv, NH, torch.empty_like(lse))
    _bmm(dv, probs.transpose(2, 3), dout_heads)
    dprobs = scores  # S is spent: its fp32 buffer takes dP
    _bmm(dprobs, dout_heads, v.transpose(2, 3))
    dscores = probs  # dS overwrites P, row by row
    _softmax_backward_kernel[(B * NH * T,)](dscores, probs, dprobs, T, **_row_launch(T))
    _bmm(dq, dscores, k, scale)
    _bmm(dk, dscores.transpose(2, 3), q, scale)


# v2's blocks (BLOCK_M queries, BLOCK_N keys, num_warps), as the mainline's forward: on the GPU for HS <= 64 / 128.
_ONLINE_BLOCKS = {64: (128, 64, 4), 128: (128, 64, 8)}
_ONLINE_SMALL_BLOCKS = (32, 16, 4)


@triton.jit
def _online_softmax_kernel(out_ptr, lse_ptr, qkv_ptr, T, NH, C,
                           stride_qkv_b, stride_qkv_t, stride_out_b, stride_out_t, scale_log2,
                           HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    # One program per (block of BLOCK_M queries, head). The scores of the block against each BLOCK_N keys exist only
    # in registers; m_i, l_i (BLOCK_M,) and acc (BLOCK_M, HS) carry the softmax over the key blocks, in log2 units.
    head = tl.program_id(1)
    b = head // NH
    h = head % NH
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HS)
    q_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HS
    k_base = q_base + C
    v_base = q_base + 2 * C
    q = tl.load(q_base + offs_m[:, None] * stride_qkv_t + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, HS], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):  # every key block, also those wholly after the queries (all masked)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = tl.load(k_base + offs_n[None, :] * stride_qkv_t + offs_d[:, None], mask=offs_n[None, :] < T, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_qkv_t + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k_t) * scale_log2  # (BLOCK_M, BLOCK_N)
        s = tl.where((offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < T), s, float("-inf"))
        # key 0 is in the first block and visible to every query, so m_new is finite from the first block on
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        correction = tl.math.exp2(m_i - m_new)
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out_ptrs = out_ptr + b.to(tl.int64) * stride_out_b + h * HS + offs_m[:, None] * stride_out_t + offs_d[None, :]
    tl.store(out_ptrs, round_to(acc / l_i[:, None], out_ptr.dtype.element_ty), mask=offs_m[:, None] < T)
    tl.store(lse_ptr + head.to(tl.int64) * T + offs_m, (m_i + tl.math.log2(l_i)) / LOG2E, mask=offs_m < T)


def v2(out, lse, qkv, NH):
    """Online softmax, one kernel: each program streams k and v past its block of queries with a running max and sum,
    so S and P never touch HBM (traffic O(T * HS) per head instead of O(T^2)). It still computes and masks the key
    blocks above the diagonal, twice the causal work."""
    B, T, three_c = qkv.shape
    C = three_c // 3
    HS = C // NH
    block_m, block_n, num_warps = _ONLINE_SMALL_BLOCKS if INTERPRET else _ONLINE_BLOCKS[max(HS, 64)]
    _online_softmax_kernel[(triton.cdiv(T, block_m), B * NH)](
        out, lse, qkv, T, NH, C, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        LOG2E.value / math.sqrt(HS), HS=HS, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=INTERPRET, num_warps=num_warps)


def v3(out, lse, qkv, NH):
    """Flash attention with causal block skipping, the mainline's kernel (llmpy.kernels.attention.attention_forward):
    key blocks after the query block are skipped (half the work of v2), the blocks below the diagonal run without mask
    arithmetic, and the longest query blocks start first."""
    mainline.attention_forward(out, lse, qkv, NH)


def v3_backward(dqkv, dout, qkv, out, lse, NH):
    """The mainline's flash backward (llmpy.kernels.attention.attention_backward): P recomputed from q, k and lse in
    registers, one kernel over key blocks for dk and dv and one over query blocks for dq, no atomics."""
    delta = torch.empty_like(lse)
    mainline.attention_backward(dqkv, dout, qkv, out, lse, NH, delta)


def cudnn_forward(out, lse, qkv, NH):
    """cuDNN's flash attention as the mainline calls it (llmpy.vendor, through the cuDNN frontend): v3's contract."""
    vendor.cudnn_attention_forward(out, lse, qkv, NH)


def cudnn_backward(dqkv, dout, qkv, out, lse, NH):
    """cuDNN's backward, dq, dk and dv written into their columns of dqkv."""
    vendor.cudnn_attention_backward(dqkv, dout, qkv, out, lse, NH)


def flash_forward(qkv, NH):
    """torch's FlashAttention-2 (the flash SDPA backend) on the heads of qkv: (out (B, NH, T, HS), saved)."""
    q, k, v = heads(qkv, NH, 3)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)
    return res[0], res


def flash_backward(dout, qkv, NH, saved):
    """FlashAttention-2's backward: (dq, dk, dv), each (B, NH, T, HS)."""
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset = saved[:8]
    q, k, v = heads(qkv, NH, 3)
    (dout_heads,) = heads(dout, NH, 1)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout_heads, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset)


def reference(qkv, dout, NH):
    """float64 attention with autograd: out (B, T, C), lse (B, NH, T), dqkv (B, T, 3C)."""
    B, T, three_c = qkv.shape
    qkv64 = qkv.detach().double().requires_grad_(True)
    q, k, v = heads(qkv64, NH, 3)
    scores = q @ k.transpose(2, 3) / math.sqrt(q.shape[-1])
    causal = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, three_c // 3)
    out.backward(dout.double())
    return out.detach(), torch.logsumexp(scores, dim=-1).detach(), qkv64.grad


# Tolerances (||got - ref|| / ||ref|| against float64 on the same bf16 inputs):
# - out, dqkv (bf16): each output is rounded to bf16 (2^-9 relative at most, ~1e-3 in the norm), and P and dS are
#   rounded to bf16 for their matmuls (2^-9 relative each, averaging out over sums of up to T terms): measured
#   ~3e-3; 1e-2 allows that and fails a wrong mask, scale or block (those give errors of order 1).
_TOL_BF16 = 1e-2
# - lse (fp32): scores are exact bf16 x bf16 products summed in fp32, so lse is within ~1e-6 relative.
_TOL_LSE = 1e-4


def _inputs(B, T, NH, HS, dev, seed):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * NH * HS, generator=generator).to(dev, torch.bfloat16)
    dout = torch.randn(B, T, NH * HS, generator=generator).to(dev, torch.bfloat16)
    return qkv, dout


def check(small: bool) -> list[str]:
    """Every forward (out, lse) and backward (dqkv) against float64 autograd, and cuDNN and flash SDPA on the GPU.
    small: B=2, T=50 (not a multiple of any block), NH=2, HS=16; else d12 heads at B=8, T=1024 (8,192 rows)."""
    dev = device()
    B, T, NH, HS = (2, 50, 2, 16) if small else (8, 1024, 12, 64)
    C = NH * HS
    qkv, dout = _inputs(B, T, NH, HS, dev, seed=T)
    ref_out, ref_lse, ref_dqkv = reference(qkv, dout, NH)
    lines = []
    forward_outputs = {}
    for name, forward in [("v1", v1), ("v2", v2), ("v3", v3)]:
        out = torch.full((B, T, C), float("nan"), dtype=qkv.dtype, device=dev)
        lse = torch.full((B, NH, T), float("nan"), dtype=torch.float32, device=dev)
        forward(out, lse, qkv, NH)
        err = assert_close(f"attention {name} out", out, ref_out, _TOL_BF16)
        err_lse = assert_close(f"attention {name} lse", lse, ref_lse, _TOL_LSE)
        lines.append(f"{name} forward (B={B}, T={T}, NH={NH}, HS={HS}): out {err:.1e}, lse {err_lse:.1e}")
        forward_outputs[name] = out, lse
    out, lse = forward_outputs["v3"]  # the backward versions take the mainline forward's out and lse
    for name, backward in [("v1", v1_backward), ("v3", v3_backward)]:
        dqkv = torch.full_like(qkv, float("nan"))
        backward(dqkv, dout, qkv, out, lse, NH)
        lines.append(f"{name} backward: dqkv {assert_close(f'attention {name} dqkv', dqkv, ref_dqkv, _TOL_BF16):.1e}")
    if dev != "cuda":
        return lines + ["cuDNN, flash SDPA: GPU only"]
    out = torch.full((B, T, C), float("nan"), dtype=qkv.dtype, device=dev)
    lse = torch.full((B, NH, T), float("nan"), dtype=torch.float32, device=dev)
    dqkv = torch.full_like(qkv, float("nan"))
    cudnn_forward(out, lse, qkv, NH)
    cudnn_backward(dqkv, dout, qkv, out, lse, NH)
    lines.append(f"cuDNN: out {assert_close('attention cuDNN out', out, ref_out, _TOL_BF16):.1e}, "
                 f"lse {assert_close('attention cuDNN lse', lse, ref_lse, _TOL_LSE):.1e}, "
                 f"dqkv {assert_close('attention cuDNN dqkv', dqkv, ref_dqkv, _TOL_BF16):.1e}")
    flash_out, saved = flash_forward(qkv, NH)
    grads = flash_backward(dout, qkv, NH, saved)
    dqkv = torch.cat([g.transpose(1, 2).reshape(B, T, C) for g in grads], dim=2)
    flash_out = flash_out.transpose(1, 2).reshape(B, T, C)
    lines.append(f"flash SDPA: out {assert_close('attention flash out', flash_out, ref_out, _TOL_BF16):.1e}, "
                 f"dqkv {assert_close('attention flash dqkv', dqkv, ref_dqkv, _TOL_BF16):.1e}")
    return lines


def benchmark() -> list[Result]:
    """d12 attention at B=64, T=1024, NH=12, HS=64, bf16; TFLOP/s of the causal half (see the module docstring)."""
    B, T, NH, HS = 64, 1024, 12, 64
    C = NH * HS
    qkv, dout = _inputs(B, T, NH, HS, "cuda", seed=0)
    out = torch.empty(B, T, C, dtype=qkv.dtype, device="cuda")
    lse = torch.empty(B, NH, T, dtype=torch.float32, device="cuda")
    dqkv = torch.empty_like(qkv)
    flops_forward = 2 * B * NH * T * T * HS
    op = f"attention fwd B={B} T={T} NH={NH} HS={HS}"
    forward = [Result(op, name, time_ms(lambda: fn(out, lse, qkv, NH)), flops=flops_forward,
                      mainline=name.startswith("v3"))
               for name, fn in [("v1 naive, S and P in HBM", v1), ("v2 online softmax", v2),
                                ("v3 flash, causal skipping", v3)]]
    forward += mark_bound([
        Result(op, "cuDNN", time_ms(lambda: cudnn_forward(out, lse, qkv, NH)), flops=flops_forward),
        Result(op, "flash SDPA", time_ms(lambda: flash_forward(qkv, NH)), flops=flops_forward)])
    v3(out, lse, qkv, NH)  # the backward versions read v3's out and lse
    op = f"attention bwd B={B} T={T} NH={NH} HS={HS}"
    flops_backward = 2 * flops_forward
    backward = [Result(op, name, time_ms(lambda: fn(dqkv, dout, qkv, out, lse, NH)), flops=flops_backward,
                       mainline=name.startswith("v3"))
                for name, fn in [("v1 naive, P, dP, dS in HBM", v1_backward), ("v3 flash", v3_backward)]]
    _, flash_saved = flash_forward(qkv, NH)
    backward += mark_bound([
        Result(op, "cuDNN", time_ms(lambda: cudnn_backward(dqkv, dout, qkv, out, lse, NH)), flops=flops_backward),
        Result(op, "flash SDPA", time_ms(lambda: flash_backward(dout, qkv, NH, flash_saved)), flops=flops_backward)])
    return forward + backward


if __name__ == "__main__":
    import run

    raise SystemExit(run.main(["attention"]))
