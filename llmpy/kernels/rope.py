"""Rotary position embedding (RoPE) of Llama 3's queries and keys, forward and backward, in place.

The op. Within each head of hs channels, pair i = channels (2i, 2i+1) (adjacent pairs: Meta's and llm.c's
convention, not Hugging Face's i, i + hs/2) of the token at position t turns by the angle whose cosine and sine are
cos[t, i] and sin[t, i], the tables of llmpy.configs.llama3.rope_tables (fp32 (T_max, hs/2)):
    (even, odd) -> (even * cos - odd * sin,  even * sin + odd * cos)
in fp32, rounded once to the activation dtype (llmpy.kernels.rounding.round_to), as train_llama3_torch.rotate does.
The query and key heads are turned alike; the value heads are not turned at all.

Layout. The operand is the qkv matmul's output qkv (B, T, (NH + 2 KV) hs): along the last dim the NH query heads,
then the KV key heads, then the KV value heads (grouped-query attention, llmpy/configs/llama3.py). The heads to turn
are the first NH + KV, one contiguous span of (NH + KV) hs channels per token; the value heads after them are never
read or written. Any batch and time strides, unit stride along the channels.

In place. The attention reads the turned q and k straight out of qkv (through strides, as it reads GPT-2's), and
nothing later needs the unturned ones: the qkv matmul's weight gradient needs that matmul's input, not its output.
So the forward overwrites q and k, and there is no second (B, T, (NH + KV) hs) buffer. The same holds backward:
the attention's backward writes dq, dk, dv into dqkv, and the qkv matmul's backward needs the gradient of its
output, the unturned q and k's, which rope_backward leaves in dqkv's place.

Backward. The rotation is linear, y = R x with R the 2x2 block [[cos, -sin], [sin, cos]] per pair, so the gradient
of its input is R^T dy: the turn with sin negated, by the opposite angle. One kernel does both directions, a
constexpr INVERSE negating the sine it loads (exact: the same table values, opposite sign). R^T is the transpose of
the table's R exactly, whether or not cos^2 + sin^2 is 1 to the last bit, so the backward is the true gradient of
the forward as computed (tests/kernels/test_rope.py checks <R x, dy> = <x, R^T dy>).

Kernel design: one program per (block of BLOCK_T tokens, batch row), looping over the NH + KV heads to turn. It
loads its tokens' rows of cos and sin once (BLOCK_T x hs/2 each) and keeps them in registers for every head: every
head of a token turns by the same angles. Each head is one (BLOCK_T, hs/2, 2) tile: one contiguous load of hs
channels per token (16-byte vectors, no strided gathers), split into the even and odd channels (tl.split), turned,
interleaved back (tl.join) and stored over itself. hs/2 is padded to a power of two with the tail masked, so any
even hs works (Llama's 64 and 128, small test sizes); tokens past T are masked. BLOCK_T fills a tile of ~1024
values (8 tokens at hs = 128, 16 at 64): 8 values a thread with 4 warps. Each element is read and written by one
program, in one iteration, so in place is safe and the result does not depend on the launch.

Bytes moved: q and k read once and written once, 2 * B * T * (NH + KV) * hs elements; the tables, T * hs * 4
bytes from memory (each program reads its own rows, B times over, from L2). Llama 3.1 8B (NH 32, KV 8, hs 128) at
B * T = 8192 tokens in bf16: 84 MB read and 84 MB written, ~35 us at the H200's 4.8 TB/s, for 0.13 GFLOP (6 a
pair): memory-bound, the arithmetic hides under the loads. On the GPU the compiler may fuse even * cos - odd * sin
into an FMA (one rounding fewer than PyTorch's), so results can differ from train_llama3_torch.rotate's in the last
fp32 bit.
"""

import torch
import triton
import triton.language as tl

from .rounding import round_to

_TILE_VALUES = 1024  # values of one head's (BLOCK_T, BLOCK_HALF, 2) tile: 8 a thread with 4 warps
_DTYPES = (torch.bfloat16, torch.float32)


@triton.jit
def _rope_kernel(
    qkv_ptr,  # (B, T, (NH + 2 KV) hs), unit channel stride: heads 0 .. heads-1 turned in place
    cos_ptr,  # fp32 (T_max >= T, HALF), unit column stride
    sin_ptr,  # fp32 (T_max >= T, HALF), unit column stride
    T,
    heads,  # NH + KV: the query and key heads, the first heads * 2 * HALF channels of each token
    stride_b,
    stride_t,
    stride_cos,  # cos's row stride
    stride_sin,  # sin's row stride
    HALF: tl.constexpr,  # hs / 2, the pairs of a head
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    INVERSE: tl.constexpr,  # turn by the opposite angle (the backward): sin negated
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    pairs = tl.arange(0, BLOCK_HALF)
    table_mask = (tokens < T)[:, None] & (pairs < HALF)[None, :]  # (BLOCK_T, BLOCK_HALF)
    cos = tl.load(cos_ptr + tokens[:, None] * stride_cos + pairs[None, :], mask=table_mask, other=0.0)
    sin = tl.load(sin_ptr + tokens[:, None] * stride_sin + pairs[None, :], mask=table_mask, other=0.0)
    if INVERSE:
        sin = -sin
    # a head's (BLOCK_T, BLOCK_HALF, 2) tile: [t, i, 0] is channel 2i of token t, [t, i, 1] channel 2i + 1
    channels = 2 * pairs[None, :, None] + tl.arange(0, 2)[None, None, :]
    offsets = tokens[:, None, None] * stride_t + channels
    mask = table_mask[:, :, None] & (channels < 2 * HALF)
    row_ptr = qkv_ptr + tl.program_id(1).to(tl.int64) * stride_b
    for head in range(heads):
        ptrs = row_ptr + head * (2 * HALF) + offsets
        even, odd = tl.split(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32))
        turned = tl.join(even * cos - odd * sin, even * sin + odd * cos)
        tl.store(ptrs, round_to(turned, qkv_ptr.dtype.element_ty), mask=mask)


def _rope(name, qkv, cos, sin, NH, KV, inverse):
    if qkv.dim() != 3 or qkv.dtype not in _DTYPES or qkv.stride(2) != 1:
        raise ValueError(f"{name}: qkv must be (B, T, (NH + 2*KV) * hs) bfloat16 or float32 with unit channel "
                         f"stride, got {tuple(qkv.shape)} {qkv.dtype} strides {qkv.stride()}")
    B, T, width = qkv.shape
    for table_name, table in (("cos", cos), ("sin", sin)):
        if (table.dim() != 2 or table.shape != cos.shape or table.dtype != torch.float32 or table.stride(1) != 1
                or table.device != qkv.device):
            raise ValueError(f"{name}: {table_name} must be float32 (T_max, hs/2) as the other table, with unit "
                             f"column stride, on {qkv.device}; got {tuple(table.shape)} {table.dtype} strides "
                             f"{table.stride()} on {table.device}")
    T_max, half = cos.shape
    if T_max < T:
        raise ValueError(f"{name}: the tables have {T_max} rows (positions), fewer than T={T}")
    if not (isinstance(NH, int) and isinstance(KV, int) and NH >= 1 and KV >= 1) or width != (NH + 2 * KV) * 2 * half:
        raise ValueError(f"{name}: qkv's last dim {width} must be (NH + 2*KV) * hs with NH={NH}, KV={KV} positive "
                         f"ints and hs={2 * half} (the tables' columns times 2)")
    if B * T * half == 0:
        return
    block_half = triton.next_power_of_2(half)
    block_t = max(1, _TILE_VALUES // (2 * block_half))
    _rope_kernel[(triton.cdiv(T, block_t), B)](
        qkv, cos, sin, T, NH + KV, qkv.stride(0), qkv.stride(1), cos.stride(0), sin.stride(0),
        HALF=half, BLOCK_T=block_t, BLOCK_HALF=block_half, INVERSE=inverse, num_warps=4,
    )


def rope_forward(qkv, cos, sin, NH, KV):
    """Turns qkv's NH query heads and KV key heads in place by their positions' angles; the value heads stay.

    qkv: (B, T, (NH + 2*KV) * hs) bf16 or fp32, unit channel stride (any batch and time strides): the qkv matmul's
        output, query heads then key heads then value heads along the last dim.
    cos, sin: fp32 (T_max, hs/2) on qkv's device, unit column stride, T_max >= T (rows T and on are not read):
        llmpy.configs.llama3.rope_tables. Pair (2i, 2i+1) of position t turns by (cos[t, i], sin[t, i]).
    """
    _rope("rope_forward", qkv, cos, sin, NH, KV, inverse=False)


def rope_backward(dqkv, cos, sin, NH, KV):
    """The gradient through rope_forward, in place: dqkv's query and key heads (the gradients of the turned q and k)
    turned back by the opposite angles, into the gradients of the unturned ones; the value heads' stay.
    Arguments as rope_forward's."""
    _rope("rope_backward", dqkv, cos, sin, NH, KV, inverse=True)
