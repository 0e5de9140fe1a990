"""Causal self-attention, forward and backward: our own flash attention (FlashAttention-2).

The op. For every batch row b and head h, with q, k, v of shape (T, HS) and scale = 1/sqrt(HS):
    S = scale * q @ k^T          (T, T), entries above the diagonal (key after query) masked out
    P = softmax(S) row by row    (T, T)
    out = P @ v                  (T, HS)
q, k and v are read straight out of the QKV matmul's output qkv (B, T, 3C), C = NH*HS: head h's query vector for
token t is qkv[b, t, h*HS : (h+1)*HS], its key C further along the row and its value 2C further. No permute copies:
the kernels address them through strides. out is written as (B, T, NH, HS) = (B, T, C), the layout the attention
projection matmul reads.

Grouped-query attention (GQA, Llama 3). NH query heads share KV key/value heads (NH % KV == 0): qkv is
(B, T, (NH + 2 KV) * HS) = [NH query heads | KV key heads | KV value heads], and query head h reads key/value head
h // GROUP, GROUP = NH / KV, so each group of GROUP consecutive query heads attends to the same k and v
(train_llama3_torch.py's CausalSelfAttention repeats them with repeat_interleave). Head h's key for token t is at
column C + (h // GROUP)*HS, its value KV*HS further. out, lse and delta stay per query head: (B, T, C), (B, NH, T).
Multi-head attention (GPT-2) is KV = NH, GROUP = 1. GROUP is a compile-time constant of every kernel, and for
GROUP = 1 the kernels keep the address arithmetic and statement order they had before GQA (the group loop below is
a single pass that the compiler removes), so GPT-2's kernels compile to the same code as without GQA (the same
PTX for sm_90, debug line numbers aside).

Forward (one program per block of BLOCK_M queries of one (b, h), h a query head; with GQA the GROUP programs of a
group stream the same k and v blocks, mostly from L2). S and P are never written to memory: the program
keeps its q block in registers and streams k and v in blocks of BLOCK_N keys, keeping for each query row i a running
max m_i, a running sum of exponentials l_i and an unnormalised output acc_i. For each key block:
    m_new = max(m_i, max_j S_ij)
    P_ij  = exp(S_ij - m_new)
    l_i   = exp(m_i - m_new) * l_i + sum_j P_ij
    acc_i = exp(m_i - m_new) * acc_i + P @ v_block
    m_i   = m_new
(the "online softmax": rescaling by exp(m_old - m_new) keeps every exponent <= 0, so nothing overflows, and the
result is exact: after the last block acc_i / l_i = softmax(S_i) @ v). The exponentials are taken base 2 (exp2 is
the hardware instruction) with the scale folded in: S * log2(e). The program also saves the row's log-sum-exp
lse_i = m_i + log(l_i) (natural log, fp32, (B, NH, T)), so the backward pass can recompute any P_ij = exp(S_ij -
lse_i) from q and k alone, without storing P (T*T per head) or redoing the max/sum sweep.

Causal mask. Query block [start_m, start_m + BLOCK_M) only needs keys < start_m + BLOCK_M. Key blocks that lie
entirely below the diagonal (keys < start_m) need no mask at all; only the blocks that overlap the diagonal get the
`key <= query` mask, and the blocks above it are never loaded: that halves the work. The two kinds of key block run
as two loops over the same inner function with a constexpr DIAGONAL flag, so the unmasked loop carries no mask math.
The queries at the end of the sequence do the most work, so programs take query blocks in reverse order: the long
ones start first and the short ones fill the tail of the launch.

Backward. With dP = dout @ v^T and delta_i = sum_j P_ij dP_ij = sum_d dout_id out_id (a rowwise dot product, since
out = P v), the softmax backward is dS_ij = P_ij (dP_ij - delta_i), and
    dv = P^T @ dout,    dk = scale * dS^T @ q,    dq = scale * dS @ k.
Three kernels, no atomics, so the result is bit-for-bit deterministic:
1. preprocess: delta = rowsum(dout * out), fp32 (B, NH, T) into a scratch buffer.
2. dk/dv: one program per block of BLOCK_N keys of one key/value head; it holds k, v and the dk, dv accumulators
   in registers and loops over the query blocks that can see these keys (from the diagonal to T), recomputing P^T
   from q and the saved lse. Each key block's dk, dv are summed by one program, so no two programs write the same
   element. With GQA a key/value head's dk, dv are the sums over its GROUP query heads: the program loops over
   them, one after another, adding into the same accumulators, and rounds once at the end: a fixed order, so still
   deterministic. One program per query head instead would need float atomics on dk, dv (sums in whatever order
   the programs run) or a GROUP times larger fp32 scratch and a pass to reduce it; the loop also loads each k, v
   block once per group, not once per query head. The price: GROUP times fewer programs, each GROUP times longer,
   so a small B * KV * T / BLOCK_N fills fewer of the GPU's multiprocessors.
3. dq: one program per block of BLOCK_M queries of one query head; it holds q, dout, lse, delta and dq and loops
   over the key blocks (of its key/value head) up to the diagonal, recomputing P and dP.
Both loops split off the diagonal blocks as the forward does. Splitting dq from dk/dv costs recomputing S once more,
and buys that every gradient is a register accumulator owned by one program (FlashAttention-2's scheme).
The qkv projection's bias gradient is dqkv's column sums. Rather than read dqkv back for them, each program of 2. and
3. sums the columns of the block it has just written (R tokens: the dk/dv kernel's key block is as long as the dq
kernel's query block) into row (b, block) of a (B * T/R, 3C) fp32 scratch, and llmpy.kernels.bias's stage 2 adds
the rows up in a fixed order. Multi-head attention only: Llama 3 has no biases.

Precision. On the GPU the tl.dot operands are the activation dtype (bf16: tensor cores, fp32 accumulation; fp32:
exact IEEE products, not TF32) and P, dS are cast to that dtype for their matmuls; every softmax statistic is fp32.
Under Triton's interpreter bf16 dots are wrong, so the operands are upcast to fp32 there.

Bytes moved: q, k, v, out and dout are read once per block pair that needs them, from L2 for most blocks; HBM
traffic is O(T * HS) per head instead of the O(T^2) of materialising S and P.
"""

import math

import torch
import triton
import triton.language as tl

from llmpy.kernels import INTERPRET
from llmpy.kernels.bias import sum_partials
from llmpy.kernels.rounding import round_to

SUPPORTED_HEAD_SIZES = (16, 32, 64, 128)
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)

# Block sizes and warps per kernel: (query block, key block, num_warps). Big query blocks amortise each k/v load over
# many queries (forward, dq); big key blocks amortise each q/dout load over many keys (dk/dv); the other side stays
# small so the S tile, the accumulators and the operands fit in registers. The bf16 choices compile for sm_90
# without register spills (checked with ptxas); HS=128 needs smaller tiles or more warps than HS<=64.
# fp32 runs (reference checks, debugging) use IEEE fp32 dots, which are CUDA-core FMAs, not tensor cores: small
# tiles keep them out of local memory and within shared memory. The interpreter uses the same small tiles, so that
# tests at T ~ 50 cross several blocks, split the diagonal into sub-blocks, and end with a partial block.
_TENSOR_CORE_BLOCKS = {
    "forward": {64: (128, 64, 4), 128: (128, 64, 8)},
    "dkdv": {64: (32, 128, 8), 128: (32, 64, 8)},
    "dq": {64: (128, 32, 8), 128: (64, 32, 8)},
}
_SMALL_BLOCKS = {"forward": (32, 16, 4), "dkdv": (16, 32, 4), "dq": (32, 16, 4)}


@triton.jit
def _load_tokens(base, tokens, stride_t, T, HS: tl.constexpr, TRANSPOSED: tl.constexpr, MASKED: tl.constexpr,
                 UPCAST: tl.constexpr):
    # The rows `tokens` of one head's (T, HS) matrix (q, k, v, out or dout), token t at base + t * stride_t: as
    # (len(tokens), HS), or (HS, len(tokens)) if TRANSPOSED. MASKED: tokens past T read as 0 (only blocks that can run
    # past T pay for the mask). UPCAST: as fp32 (the interpreter's bf16 dots are wrong).
    offs_d = tl.arange(0, HS)
    if TRANSPOSED:
        pointers, in_range = base + tokens[None, :] * stride_t + offs_d[:, None], (tokens < T)[None, :]
    else:
        pointers, in_range = base + tokens[:, None] * stride_t + offs_d[None, :], (tokens < T)[:, None]
    tile = tl.load(pointers, mask=in_range, other=0.0) if MASKED else tl.load(pointers)
    return tile.to(tl.float32) if UPCAST else tile


@triton.jit
def _store_column_sums(partials_ptr, group, C, column, tile, in_range, HS: tl.constexpr):
    # partials (G, 3C) fp32 [group, column : column + HS] = tile's (tokens, HS) columns summed over its tokens in range:
    # this block's share of the qkv bias gradient, in the stored (rounded) values, as a sum over dqkv would see them
    sums = tl.sum(tl.where(in_range[:, None], tile.to(tl.float32), 0.0), axis=0)
    tl.store(partials_ptr + group.to(tl.int64) * 3 * C + column + tl.arange(0, HS), sums)


@triton.jit
def _kv_base(row_base, kv_head, NH, C, HS: tl.constexpr, GROUP: tl.constexpr, VALUE: tl.constexpr):
    # Where key/value head kv_head's k (or v, if VALUE) starts in token 0's row of qkv (row_base), C = NH*HS, with
    # GROUP = NH // KV query heads per key/value head. MHA (GROUP 1): head h's k and v are C and 2C after its q, the
    # address arithmetic GPT-2's kernels always had. GQA: [NH query heads | KV key heads | KV value heads], k at
    # C + kv_head*HS and v KV*HS further, written as a multiple of HS so the compiler still sees 16-byte aligned rows
    # (C // GROUP would be known divisible by 16 / GROUP only, and the v loads would narrow).
    if GROUP == 1:
        q_base = row_base + kv_head * HS
        if VALUE:
            base = q_base + 2 * C
        else:
            base = q_base + C
    else:
        base = row_base + C + kv_head * HS
        if VALUE:
            base += (NH // GROUP) * HS
    return base


@triton.jit
def _forward_key_blocks(acc, m_i, l_i, q, k_base, v_base, stride_t, offs_m, key_start, key_stop, T,
                        scale_log2,
                        HS: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr,
                        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One query block's online softmax over keys [key_start, key_stop), BLOCK_N at a time.
    # acc (BLOCK_M, HS) fp32, m_i and l_i (BLOCK_M,) fp32 in log2 units; q (BLOCK_M, HS).
    for start_n in range(key_start, key_stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # the diagonal blocks are the only ones that can run past T
        k_t = _load_tokens(k_base, offs_n, stride_t, T, HS, True, DIAGONAL, UPCAST)  # (HS, BLOCK_N)
        v = _load_tokens(v_base, offs_n, stride_t, T, HS, False, DIAGONAL, UPCAST)  # (BLOCK_N, HS)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        if DIAGONAL:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        # every row has seen key 0 <= query before or in this block, so m_new is finite and nothing is NaN
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        correction = tl.math.exp2(m_i - m_new)
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_forward_kernel(out_ptr, lse_ptr, qkv_ptr,
                              T, NH, C,
                              stride_qkv_b, stride_qkv_t, stride_out_b, stride_out_t,
                              scale_log2,
                              HS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    # longest query blocks (end of the sequence) first
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)  # b * NH + h
    b = head // NH
    h = head % NH
    start_m = block_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HS)
    row_mask = offs_m < T

    # this head's q in qkv[b] at column h*HS, k and v those of its key/value head h // GROUP (_kv_base);
    # token t is t * stride_qkv_t further
    q_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HS
    k_base = _kv_base(qkv_ptr + b.to(tl.int64) * stride_qkv_b, h // GROUP, NH, C, HS, GROUP, False)
    v_base = _kv_base(qkv_ptr + b.to(tl.int64) * stride_qkv_b, h // GROUP, NH, C, HS, GROUP, True)
    q = _load_tokens(q_base, offs_m, stride_qkv_t, T, HS, False, True, UPCAST)

    acc = tl.zeros([BLOCK_M, HS], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # keys [0, start_m): all before every query of the block, no mask
    acc, m_i, l_i = _forward_key_blocks(acc, m_i, l_i, q, k_base, v_base, stride_qkv_t, offs_m, 0, start_m, T,
                                        scale_log2, HS, BLOCK_N, False, UPCAST, DOT_PRECISION)
    # keys [start_m, start_m + BLOCK_M) that exist: the diagonal, masked
    acc, m_i, l_i = _forward_key_blocks(acc, m_i, l_i, q, k_base, v_base, stride_qkv_t, offs_m, start_m,
                                        tl.minimum(start_m + BLOCK_M, T), T,
                                        scale_log2, HS, BLOCK_N, True, UPCAST, DOT_PRECISION)

    out = acc / l_i[:, None]
    out_ptrs = out_ptr + b.to(tl.int64) * stride_out_b + h * HS + offs_m[:, None] * stride_out_t + offs_d[None, :]
    tl.store(out_ptrs, round_to(out, out_ptr.dtype.element_ty), mask=row_mask[:, None])
    lse = (m_i + tl.math.log2(l_i)) / LOG2E  # back from log2 to natural units
    tl.store(lse_ptr + head.to(tl.int64) * T + offs_m, lse, mask=row_mask)


@triton.jit
def _attention_delta_kernel(delta_ptr, out_ptr, dout_ptr,
                            T, NH,
                            stride_out_b, stride_out_t, stride_dout_b, stride_dout_t,
                            HS: tl.constexpr, BLOCK_T: tl.constexpr):
    # delta[b, h, t] = sum_d dout[b, t, h, d] * out[b, t, h, d]: BLOCK_T tokens of one head per program
    head = tl.program_id(1)
    b = head // NH
    h = head % NH
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    out = _load_tokens(out_ptr + b.to(tl.int64) * stride_out_b + h * HS, offs_t, stride_out_t, T, HS, False, True,
                       True)
    dout = _load_tokens(dout_ptr + b.to(tl.int64) * stride_dout_b + h * HS, offs_t, stride_dout_t, T, HS, False, True,
                        True)
    tl.store(delta_ptr + head.to(tl.int64) * T + offs_t, tl.sum(out * dout, axis=1), mask=offs_t < T)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, q_base, dout_base, lse_ptr, delta_ptr, stride_q_t, stride_dout_t, offs_n,
                       query_start, query_stop, T, scale_log2,
                       HS: tl.constexpr, BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One key block's dk, dv (BLOCK_N, HS) fp32, summed over queries [query_start, query_stop), BLOCK_M at a time.
    # Everything is computed transposed (keys on axis 0) so no (BLOCK_M, BLOCK_N) tile needs a transpose.
    for start_m in range(query_start, query_stop, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        query_mask = offs_m < T
        q_t = _load_tokens(q_base, offs_m, stride_q_t, T, HS, True, True, UPCAST)  # (HS, BLOCK_M)
        dout = _load_tokens(dout_base, offs_m, stride_dout_t, T, HS, False, True, UPCAST)  # (BLOCK_M, HS)
        # queries past T get lse = +inf, so their P is exactly 0 and they add nothing
        lse_log2 = tl.load(lse_ptr + offs_m, mask=query_mask, other=float("inf")) * LOG2E
        delta = tl.load(delta_ptr + offs_m, mask=query_mask, other=0.0)
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse_log2[None, :])
        if DIAGONAL:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(dout.dtype), dout, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(dout), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attention_dkdv_kernel(dqkv_ptr, dout_ptr, qkv_ptr, lse_ptr, delta_ptr, partials_ptr,
                           T, NH, C,
                           stride_qkv_b, stride_qkv_t, stride_dqkv_b, stride_dqkv_t,
                           stride_dout_b, stride_dout_t,
                           scale, scale_log2,
                           HS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           SUM_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    tl.static_assert(GROUP == 1 or not SUM_BIAS)  # the bias partial sums are laid out for MHA only
    # the first key blocks are seen by the most queries, and the program ids start there
    block_n = tl.program_id(0)
    head = tl.program_id(1)  # b * KV + key/value head, KV = NH // GROUP (b * NH + h for MHA)
    KV = NH // GROUP
    b = head // KV
    kv_head = head % KV
    start_n = block_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HS)
    key_mask = offs_n < T

    qkv_row = qkv_ptr + b.to(tl.int64) * stride_qkv_b
    k = _load_tokens(_kv_base(qkv_row, kv_head, NH, C, HS, GROUP, False), offs_n, stride_qkv_t, T, HS, False, True,
                     UPCAST)
    v = _load_tokens(_kv_base(qkv_row, kv_head, NH, C, HS, GROUP, True), offs_n, stride_qkv_t, T, HS, False, True,
                     UPCAST)

    dk = tl.zeros([BLOCK_N, HS], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HS], dtype=tl.float32)
    # the GROUP query heads kv_head * GROUP + g that read this key/value head, one after another into the same
    # registers (a single pass for MHA): dk and dv are their sum, in a fixed order, without atomics
    for g in range(GROUP):
        h = kv_head * GROUP + g
        q_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HS
        dout_base = dout_ptr + b.to(tl.int64) * stride_dout_b + h * HS
        lse_head = lse_ptr + (head * GROUP + g).to(tl.int64) * T  # query head (b, h) of (B, NH, T)
        delta_head = delta_ptr + (head * GROUP + g).to(tl.int64) * T
        # queries [start_n, start_n + BLOCK_N): the diagonal, masked
        dk, dv = _dkdv_query_blocks(dk, dv, k, v, q_base, dout_base, lse_head, delta_head, stride_qkv_t,
                                    stride_dout_t, offs_n, start_n, tl.minimum(start_n + BLOCK_N, T), T, scale_log2,
                                    HS, BLOCK_M, True, UPCAST, DOT_PRECISION)
        # queries [start_n + BLOCK_N, T): after every key of the block, no causal mask
        dk, dv = _dkdv_query_blocks(dk, dv, k, v, q_base, dout_base, lse_head, delta_head, stride_qkv_t,
                                    stride_dout_t, offs_n, start_n + BLOCK_N, T, T, scale_log2,
                                    HS, BLOCK_M, False, UPCAST, DOT_PRECISION)

    # dk and dv go to the k and v columns of dqkv, same layout as qkv: v's are KV*HS after k's (C for MHA)
    dk_ptrs = (dqkv_ptr + b.to(tl.int64) * stride_dqkv_b + C + kv_head * HS + offs_n[:, None] * stride_dqkv_t
               + offs_d[None, :])
    dtype = dqkv_ptr.dtype.element_ty
    dk, dv = round_to(dk * scale, dtype), round_to(dv, dtype)
    tl.store(dk_ptrs, dk, mask=key_mask[:, None])
    if GROUP == 1:
        tl.store(dk_ptrs + C, dv, mask=key_mask[:, None])
    else:
        tl.store(dk_ptrs + KV * HS, dv, mask=key_mask[:, None])
    if SUM_BIAS:  # row group (b, block_n) of the bias partial sums
        group = b * tl.num_programs(0) + block_n
        _store_column_sums(partials_ptr, group, C, C + kv_head * HS, dk, key_mask, HS)
        _store_column_sums(partials_ptr, group, C, 2 * C + kv_head * HS, dv, key_mask, HS)


@triton.jit
def _dq_key_blocks(dq, q, dout, lse_log2, delta, k_base, v_base, stride_t, offs_m, key_start, key_stop, T,
                   scale_log2,
                   HS: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One query block's dq (BLOCK_M, HS) fp32, summed over keys [key_start, key_stop), BLOCK_N at a time.
    for start_n in range(key_start, key_stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = _load_tokens(k_base, offs_n, stride_t, T, HS, True, DIAGONAL, UPCAST)  # (HS, BLOCK_N)
        v_t = _load_tokens(v_base, offs_n, stride_t, T, HS, True, DIAGONAL, UPCAST)  # (HS, BLOCK_N)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse_log2[:, None])
        if DIAGONAL:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(dout, v_t, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_dq_kernel(dqkv_ptr, dout_ptr, qkv_ptr, lse_ptr, delta_ptr, partials_ptr,
                         T, NH, C,
                         stride_qkv_b, stride_qkv_t, stride_dqkv_b, stride_dqkv_t,
                         stride_dout_b, stride_dout_t,
                         scale, scale_log2,
                         HS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         SUM_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    tl.static_assert(GROUP == 1 or not SUM_BIAS)
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest first, as in the forward
    head = tl.program_id(1)
    b = head // NH
    h = head % NH
    start_m = block_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HS)
    row_mask = offs_m < T

    q_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HS
    q = _load_tokens(q_base, offs_m, stride_qkv_t, T, HS, False, True, UPCAST)
    dout = _load_tokens(dout_ptr + b.to(tl.int64) * stride_dout_b + h * HS, offs_m, stride_dout_t, T, HS, False, True,
                        UPCAST)
    lse_log2 = tl.load(lse_ptr + head.to(tl.int64) * T + offs_m, mask=row_mask, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + head.to(tl.int64) * T + offs_m, mask=row_mask, other=0.0)

    k_base = _kv_base(qkv_ptr + b.to(tl.int64) * stride_qkv_b, h // GROUP, NH, C, HS, GROUP, False)
    v_base = _kv_base(qkv_ptr + b.to(tl.int64) * stride_qkv_b, h // GROUP, NH, C, HS, GROUP, True)

    dq = tl.zeros([BLOCK_M, HS], dtype=tl.float32)
    # keys [0, start_m): before every query of the block, no mask
    dq = _dq_key_blocks(dq, q, dout, lse_log2, delta, k_base, v_base, stride_qkv_t, offs_m, 0, start_m,
                        T, scale_log2, HS, BLOCK_N, False, UPCAST, DOT_PRECISION)
    # keys [start_m, start_m + BLOCK_M) that exist: the diagonal, masked
    dq = _dq_key_blocks(dq, q, dout, lse_log2, delta, k_base, v_base, stride_qkv_t, offs_m, start_m,
                        tl.minimum(start_m + BLOCK_M, T), T, scale_log2, HS, BLOCK_N, True, UPCAST, DOT_PRECISION)

    dq_ptrs = dqkv_ptr + b.to(tl.int64) * stride_dqkv_b + h * HS + offs_m[:, None] * stride_dqkv_t + offs_d[None, :]
    dq = round_to(dq * scale, dqkv_ptr.dtype.element_ty)
    tl.store(dq_ptrs, dq, mask=row_mask[:, None])
    if SUM_BIAS:  # row group (b, block_m): the same groups as the dk/dv kernel's, whose key blocks are as long
        _store_column_sums(partials_ptr, b * tl.num_programs(0) + block_m, C, h * HS, dq, row_mask, HS)


def _check_rows(name, tensor, B, T, width, dtype):
    # (B, T, width) in the activation dtype, any batch/time strides, unit stride along the channels
    if tensor.shape != (B, T, width) or tensor.dtype != dtype or tensor.stride(2) != 1:
        raise ValueError(f"attention: {name} must be ({B}, {T}, {width}) {dtype} with unit channel stride, "
                         f"got {tuple(tensor.shape)} {tensor.dtype} strides {tensor.stride()}")


def _check_stats(name, tensor, B, NH, T):
    if tensor.shape != (B, NH, T) or tensor.dtype != torch.float32 or not tensor.is_contiguous():
        raise ValueError(f"attention: {name} must be contiguous ({B}, {NH}, {T}) float32, "
                         f"got {tuple(tensor.shape)} {tensor.dtype}")


def _head_layout(qkv, NH, KV):
    """(B, T, C, HS, KV) of qkv (B, T, (NH + 2 KV) * HS), C = NH*HS the query (and out) width; KV None means NH."""
    KV = NH if KV is None else KV
    if not 1 <= KV <= NH or NH % KV:
        raise ValueError(f"attention: the key/value heads KV={KV} must divide the query heads NH={NH}")
    B, T, width = qkv.shape
    HS = width // (NH + 2 * KV)
    if width % (NH + 2 * KV) or HS not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"attention: qkv's last dim {width} must be (NH + 2*KV)*HS with NH={NH}, KV={KV} and HS in "
                         f"{SUPPORTED_HEAD_SIZES}")
    return B, T, NH * HS, HS, KV


def _launch_config(kernel, dtype, HS):
    """(BLOCK_M, BLOCK_N, launch options) for kernel "forward", "dkdv" or "dq" on activations of dtype."""
    tensor_cores = dtype != torch.float32 and not INTERPRET
    block_m, block_n, num_warps = _TENSOR_CORE_BLOCKS[kernel][max(HS, 64)] if tensor_cores else _SMALL_BLOCKS[kernel]
    options = dict(UPCAST=INTERPRET, DOT_PRECISION="tf32" if tensor_cores else "ieee",
                   num_warps=num_warps, num_stages=3 if tensor_cores else 2)
    return block_m, block_n, options


def attention_forward(out, lse, qkv, NH, KV=None):
    """Causal self-attention forward: out = softmax(q k^T / sqrt(HS), causal) v for every query head.

    out: (B, T, C) written, C = NH*HS, in qkv's dtype (token t's heads side by side, as (B, T, NH, HS)).
    lse: (B, NH, T) fp32 written: each query row's natural-log log-sum-exp of its scaled scores (for the backward).
    qkv: (B, T, (NH + 2 KV) * HS) bf16 or fp32, the QKV matmul's output: [q | k | v] along the last dim, q (NH, HS),
        k and v (KV, HS) each; query head h reads key/value head h // (NH / KV).
    KV: key/value heads, a divisor of NH; None (or NH) is multi-head attention, qkv (B, T, 3C).
    HS in (16, 32, 64, 128); any T >= 1.
    """
    B, T, C, HS, KV = _head_layout(qkv, NH, KV)
    _check_rows("out", out, B, T, C, qkv.dtype)
    _check_stats("lse", lse, B, NH, T)
    scale = 1.0 / math.sqrt(HS)
    block_m, block_n, options = _launch_config("forward", qkv.dtype, HS)
    _attention_forward_kernel[(triton.cdiv(T, block_m), B * NH)](
        out, lse, qkv, T, NH, C, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), scale * LOG2E.value,
        HS=HS, GROUP=NH // KV, BLOCK_M=block_m, BLOCK_N=block_n, **options)


def backward_token_block(dtype, HS):
    """R, the tokens of a key block in the dk/dv kernel and of a query block in the dq kernel (the same)."""
    (_, key_block, _), (query_block, _, _) = _launch_config("dkdv", dtype, HS), _launch_config("dq", dtype, HS)
    assert key_block == query_block
    return key_block


def backward_bias_scratch(B, T, C, NH, dtype, device):
    """fp32 (G, 3C) partial sums for attention_backward's qkv bias gradient: G = B * ceil(T / R) groups of R tokens."""
    return torch.empty(B * triton.cdiv(T, backward_token_block(dtype, C // NH)), 3 * C, dtype=torch.float32,
                       device=device)


def attention_backward(dqkv, dout, qkv, out, lse, NH, delta, dbias=None, bias_scratch=None, KV=None):
    """Causal self-attention backward: the gradient with respect to q, k and v, written into dqkv.

    dqkv: (B, T, (NH + 2 KV) * HS) written (not accumulated), same layout and dtype as qkv: [dq | dk | dv]; with
        KV < NH each key/value head's dk, dv is the sum over the NH / KV query heads that read it.
    dout: (B, T, C) the gradient of the loss with respect to out, qkv's dtype.
    qkv, out, lse: the forward's input and outputs (lse (B, NH, T) fp32).
    delta: (B, NH, T) fp32 scratch, overwritten with rowsum(dout * out) per head.
    dbias: optional (3C,) fp32, += dqkv's column sums (the qkv bias gradient), deterministic: each program sums the
        block of dq, dk or dv it writes into bias_scratch (backward_bias_scratch), and bias.sum_partials adds the
        blocks up in a fixed order. No pass over dqkv of its own. Multi-head attention only (GPT-2's qkv bias).
    KV: key/value heads, as for attention_forward.
    """
    B, T, C, HS, KV = _head_layout(qkv, NH, KV)
    if dbias is not None and KV != NH:
        raise ValueError(f"attention: dbias (the qkv bias gradient) needs KV == NH, got KV={KV}, NH={NH}")
    _check_rows("dqkv", dqkv, B, T, qkv.shape[2], qkv.dtype)
    _check_rows("dout", dout, B, T, C, qkv.dtype)
    _check_rows("out", out, B, T, C, qkv.dtype)
    _check_stats("lse", lse, B, NH, T)
    _check_stats("delta", delta, B, NH, T)
    scale = 1.0 / math.sqrt(HS)

    block_t = 16 if INTERPRET else 4096 // HS  # 4096 elements of out and of dout per program
    _attention_delta_kernel[(triton.cdiv(T, block_t), B * NH)](
        delta, out, dout, T, NH, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        HS=HS, BLOCK_T=block_t, num_warps=4)
    sum_bias = dbias is not None
    if sum_bias:
        expected = (B * triton.cdiv(T, backward_token_block(qkv.dtype, HS)), 3 * C)
        if dbias.shape != (3 * C,) or bias_scratch is None or bias_scratch.shape != expected:
            raise ValueError(f"attention: dbias must be ({3 * C},) with a {expected} bias_scratch "
                             f"(backward_bias_scratch)")
    partials = bias_scratch if sum_bias else delta  # delta: an unused pointer
    strides = (qkv.stride(0), qkv.stride(1), dqkv.stride(0), dqkv.stride(1), dout.stride(0), dout.stride(1))
    block_m, block_n, options = _launch_config("dkdv", qkv.dtype, HS)
    _attention_dkdv_kernel[(triton.cdiv(T, block_n), B * KV)](  # one program per key block of a key/value head
        dqkv, dout, qkv, lse, delta, partials, T, NH, C, *strides, scale, scale * LOG2E.value,
        HS=HS, GROUP=NH // KV, BLOCK_M=block_m, BLOCK_N=block_n, SUM_BIAS=sum_bias, **options)
    block_m, block_n, options = _launch_config("dq", qkv.dtype, HS)
    _attention_dq_kernel[(triton.cdiv(T, block_m), B * NH)](
        dqkv, dout, qkv, lse, delta, partials, T, NH, C, *strides, scale, scale * LOG2E.value,
        HS=HS, GROUP=NH // KV, BLOCK_M=block_m, BLOCK_N=block_n, SUM_BIAS=sum_bias, **options)
    if sum_bias:
        sum_partials(dbias, bias_scratch)
