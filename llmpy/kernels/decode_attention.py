"""Decode attention: one new token per row attends over the keys and values of the tokens before it, kept in a KV cache.

Generation runs the model once over the prompt (the prefill, llmpy.kernels.attention's flash attention), then one
token at a time. At a decode step each of the B rows brings one new token, whose query must see every earlier key of
its row and its own. Those earlier keys and values do not change from step to step, so instead of recomputing them
(a full forward per new token) the model keeps them in a cache, one per layer:
    k_cache, v_cache (B, NH, maxT, HS): positions [0, t) hold the keys and values of the t tokens seen so far
and the step computes, for every row b and head h, with q, k_new, v_new the new token's (HS,) vectors from the qkv
projection's output (B, 3C) (same layout as in training: [q | k | v], each NH heads of HS):
    s_j = q . k_j / sqrt(HS)   for the cached keys j < t, and s_t = q . k_new
    out = sum_j softmax(s)_j v_j   (with v_t = v_new)
then writes k_new and v_new into the cache at position t, for the steps after it.

The kernel. One program per (row, head): B * NH programs. With a single query there is no matrix product (a tl.dot
needs at least 16 rows): the scores of a block of BLOCK_N keys are a (BLOCK_N, HS) tile times q, summed along HS,
and the output a sum of the value tile's rows weighted by the probabilities. The keys are streamed in blocks with the
online softmax of FlashAttention (llmpy.kernels.attention explains it): a running max m, a running sum of
exponentials l and an unnormalised output acc, all fp32, rescaled by exp(m_old - m_new) when a block raises the max,
so one pass over the cache is enough and the T scores are never stored. The state starts from the new token itself
(m = s_t, l = 1, acc = v_new): it is always attended (the causal mask keeps the diagonal), so m is finite from the
start and t = 0 needs no special case. The new key and value come from registers and are stored into the cache at
the end, so the program never reads a position it writes. Exponentials are base 2, with log2(e) folded into the scale.

The cache length t is read from device memory, not passed as an argument: the decode step is then the same launches
with the same arguments at every position, which a CUDA graph can replay (llmpy.inference). All rows share t: they
continue one prompt. The caller keeps t < maxT.

Cost. The step reads each row's cache once: 2 * t * C values per row and layer (k and v), plus q, k_new, v_new; at
B = 1, d12, t = 1024 that is 3 MB a layer in bf16, against 14 MB of the layer's weights, so at long contexts and
many rows the cache, not the weights, is what a step reads. Each program streams its (t, HS) slices in contiguous
blocks of BLOCK_N * HS values, loads pipelined 3 deep (tl.range's num_stages). Only B * NH programs run: at B = 1
that is 12 of an H200's 132 SMs for d12, which is enough at short contexts; splitting each row's keys over several
programs and merging their (m, l, acc) (flash-decoding) would use the rest at long ones, and is not done here.

Precision: loads in the cache's dtype (bf16 or fp32), every product, sum and exponential in fp32, the output rounded
once to out's dtype. The cache holds k and v exactly as the qkv projection wrote them, as the prefill copies them.
"""

import math

import torch
import triton
import triton.language as tl

from llmpy.kernels import INTERPRET
from llmpy.kernels.attention import LOG2E, SUPPORTED_HEAD_SIZES
from llmpy.kernels.rounding import round_to

# Keys per block: a (BLOCK_N, HS) tile of 4096 values (32 a thread at 4 warps) on the GPU; 16 under the interpreter,
# so that tests with a few dozen cached tokens cross several blocks and end in a partial one.
_TILE_VALUES = 4096
_INTERPRETER_BLOCK_N = 16


@triton.jit
def _decode_attention_kernel(out_ptr, qkv_ptr, k_cache_ptr, v_cache_ptr, length_ptr,
                             NH, C, stride_qkv, stride_out, stride_cache_b, stride_cache_h, scale_log2,
                             HS: tl.constexpr, BLOCK_N: tl.constexpr):
    head = tl.program_id(0)  # b * NH + h
    b = head // NH
    h = head % NH
    t = tl.load(length_ptr)  # cached positions: the new token is position t
    offs_d = tl.arange(0, HS)

    # the new token's q, k, v: columns h*HS, C + h*HS, 2C + h*HS of row b of qkv
    new = qkv_ptr + b.to(tl.int64) * stride_qkv + h * HS + offs_d
    q = tl.load(new).to(tl.float32)
    k_new = tl.load(new + C)
    v_new = tl.load(new + 2 * C)
    # (b, h)'s cache: position j's HS values at cache + j * HS
    cache = b.to(tl.int64) * stride_cache_b + h * stride_cache_h

    # the online softmax's state (log2 units), started from the new token's own score
    m = tl.sum(q * k_new.to(tl.float32), axis=0) * scale_log2
    l = tl.full([], 1.0, dtype=tl.float32)
    acc = v_new.to(tl.float32)
    for start in tl.range(0, t, BLOCK_N, num_stages=3):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < t
        tile = cache + offs_n[:, None] * HS + offs_d[None, :]  # (BLOCK_N, HS) offsets
        k = tl.load(k_cache_ptr + tile, mask=in_range[:, None], other=0.0).to(tl.float32)
        s = tl.where(in_range, tl.sum(k * q[None, :], axis=1) * scale_log2, float("-inf"))  # (BLOCK_N,)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.math.exp2(s - m_new)  # 0 for the keys past t
        correction = tl.math.exp2(m - m_new)
        v = tl.load(v_cache_ptr + tile, mask=in_range[:, None], other=0.0).to(tl.float32)
        l = l * correction + tl.sum(p, axis=0)
        acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
        m = m_new

    tl.store(out_ptr + b.to(tl.int64) * stride_out + h * HS + offs_d, round_to(acc / l, out_ptr.dtype.element_ty))
    tl.store(k_cache_ptr + cache + t * HS + offs_d, k_new)
    tl.store(v_cache_ptr + cache + t * HS + offs_d, v_new)


def decode_attention(out, qkv, k_cache, v_cache, length, NH):
    """One decode step's causal self-attention: each row's new token over its cached tokens and itself.

    out: (B, C) written, qkv's dtype, C = NH*HS: the heads side by side, as the attention projection reads them.
    qkv: (B, 3C) bf16 or fp32, the qkv projection of the B new tokens: [q | k | v] along the last dim.
    k_cache, v_cache: (B, NH, maxT, HS) in qkv's dtype, each (maxT, HS) slice contiguous: positions [0, t) are read,
        position t is written with the new token's key and value.
    length: int32 (1,) on the device, holding t (0 <= t < maxT, the same for every row).
    HS in (16, 32, 64, 128).
    """
    B, three_C = qkv.shape
    C = three_C // 3
    HS = C // NH if C % NH == 0 else 0
    if three_C % 3 or HS not in SUPPORTED_HEAD_SIZES or qkv.stride(1) != 1:
        raise ValueError(f"decode_attention: qkv must be (B, 3*NH*HS) with unit column stride, NH={NH} and HS in "
                         f"{SUPPORTED_HEAD_SIZES}, got {tuple(qkv.shape)} strides {qkv.stride()}")
    if out.shape != (B, C) or out.dtype != qkv.dtype or out.stride(1) != 1:
        raise ValueError(f"decode_attention: out must be ({B}, {C}) {qkv.dtype} with unit column stride, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (cache.dim() != 4 or cache.shape[:2] != (B, NH) or cache.shape[3] != HS or cache.dtype != qkv.dtype
                or cache.stride()[2:] != (HS, 1) or cache.stride() != k_cache.stride()):
            raise ValueError(f"decode_attention: {name} must be ({B}, {NH}, maxT, {HS}) {qkv.dtype}, each (maxT, HS) "
                             f"contiguous, as the other cache; got {tuple(cache.shape)} {cache.dtype} strides "
                             f"{cache.stride()}")
    if length.dtype != torch.int32 or length.numel() != 1:
        raise ValueError(f"decode_attention: length must be one int32, got {tuple(length.shape)} {length.dtype}")
    block_n = _INTERPRETER_BLOCK_N if INTERPRET else _TILE_VALUES // HS
    _decode_attention_kernel[(B * NH,)](
        out, qkv, k_cache, v_cache, length, NH, C, qkv.stride(0), out.stride(0), k_cache.stride(0),
        k_cache.stride(1), LOG2E.value / math.sqrt(HS), HS=HS, BLOCK_N=block_n, num_warps=4)
