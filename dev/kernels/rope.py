"""RoPE, the rotary position embedding of Llama 3's queries and keys, forward and backward, in place on qkv: from a
program per (token, head) to the mainline's.

The op. qkv (B, T, (NH + 2 KV) hs) is the qkv matmul's output: along the last dim NH query heads, then KV key heads,
then KV value heads (grouped-query attention). In each of the first NH + KV heads, pair i = channels (2i, 2i+1) of
the token at position t turns by the angle whose cosine and sine are cos[t, i] and sin[t, i], fp32 (T, hs/2) tables
from llmpy.configs.llama3.rope_tables:
    (even, odd) -> (even * cos - odd * sin,  even * sin + odd * cos)
in fp32, rounded once to the activation dtype. The value heads are neither read nor written. In place: the attention
reads the turned q and k out of qkv and nothing needs the unturned ones (llmpy/kernels/rope.py says why). Backward:
the turn is linear, a 2x2 rotation R per pair, so the gradient of its input is R^T dout, the turn by the opposite
angle (sin negated), done in place on dqkv.

Bytes the op must move: q and k read once and written once, 2 * B*T*(NH + KV)*hs*es, plus the tables, T * hs * 4 bytes
(cos and sin; every batch row reads the same ones, from L2 after the first). At the benchmark's size, Llama 3.2 1B's
(NH 32, KV 8, hs 64) at B = 4, T = 2048 in bf16, that is 42 MB read and 42 MB written, for 6 flops a pair:
memory-bound.

The path, each step a function below (timed by `benchmark`, explained in dev/kernels/README.md):
v1  one program per (token, head): the head's even and odd channels as two stride-2 gathers.
v2  the mainline (llmpy.kernels.rope.rope_forward and rope_backward): one program per (block of tokens, batch row)
    walking all the heads, contiguous loads split into even and odd in registers.
The bound: torch has no fused RoPE kernel; the torch code (`torch_forward`, `torch_backward`: the turn of a view of q
and k in fp32, copied back into qkv) eager, a chain of elementwise kernels, and under torch.compile; the faster.
"""

from common import Result, compare, compiled, device, mark_bound, precisions, timed

import dataclasses

import torch
import triton
import triton.language as tl

from llmpy.configs import llama3
from llmpy.kernels import rope as mainline
from llmpy.kernels.rounding import round_to


def turn(x, cos, sin, inverse=False):
    """x (B, T, heads * hs) with pair (2i, 2i+1) of every head at position t turned by (cos[t, i], sin[t, i]), or by
    the opposite angle if inverse; computed in x's dtype (float64 for the reference), a new tensor. cos, sin fp32
    (T_max >= T, hs/2)."""
    T, half = x.shape[1], cos.shape[1]
    pairs = x.unflatten(-1, (-1, half, 2))  # (B, T, heads, hs/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = (table[:T, None, :].to(x.dtype) for table in (cos, sin))  # (T, 1, hs/2): every head turns alike
    if inverse:
        s = -s
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-3)


def reference(qkv, cos, sin, NH, KV, inverse=False):
    """qkv in float64 with its NH + KV query and key heads turned (a new tensor; the value heads as they were)."""
    out = qkv.double()
    turned = (NH + KV) * 2 * cos.shape[1]
    return torch.cat((turn(out[..., :turned], cos, sin, inverse), out[..., turned:]), dim=-1)


@triton.jit
def _rope_head_kernel(qkv_ptr, cos_ptr, sin_ptr, T, width, half, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    token = tl.program_id(0)  # b * T + t, a row of the contiguous (B * T, width) qkv
    head = tl.program_id(1)
    pairs = tl.arange(0, BLOCK_HALF)  # hs/2 padded to a power of two, the tail masked
    mask = pairs < half
    table_offsets = (token % T) * half + pairs  # the token's position's row of the (T_max, hs/2) tables
    cos = tl.load(cos_ptr + table_offsets, mask=mask)
    sin = tl.load(sin_ptr + table_offsets, mask=mask)
    if INVERSE:
        sin = -sin
    even_ptrs = qkv_ptr + token.to(tl.int64) * width + head * 2 * half + 2 * pairs  # channels 2i; odd: 2i + 1
    even = tl.load(even_ptrs, mask=mask).to(tl.float32)
    odd = tl.load(even_ptrs + 1, mask=mask).to(tl.float32)
    tl.store(even_ptrs, round_to(even * cos - odd * sin, qkv_ptr.dtype.element_ty), mask=mask)
    tl.store(even_ptrs + 1, round_to(even * sin + odd * cos, qkv_ptr.dtype.element_ty), mask=mask)


def _rope_v1(qkv, cos, sin, NH, KV, inverse):
    assert qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
    B, T, width = qkv.shape
    half = cos.shape[1]
    _rope_head_kernel[(B * T, NH + KV)](qkv, cos, sin, T, width, half, BLOCK_HALF=triton.next_power_of_2(half),
                                        INVERSE=inverse, num_warps=1)


def forward_v1(qkv, cos, sin, NH, KV):
    """One program per (token, head) of the NH + KV heads to turn, one warp each: the token's row of cos and sin, the
    head's even channels and its odd channels as two stride-2 loads, the turn, two stride-2 stores. qkv and the
    tables contiguous.

    Every element is read and written once, but in 2-byte pieces: channels 2i and 2i + 1 are 2 bytes apart, so no
    thread can issue a wide vector access, and each load instruction fetches whole sectors of which it uses every
    other element. The programs are tiny (a head of hs = 64 is 128 bytes of bf16; B*T*(NH + KV) = 327,680 programs
    at the benchmark's size), and each reloads its token's cos and sin rows (from L2): NH + KV = 40 times a token.
    """
    _rope_v1(qkv, cos, sin, NH, KV, inverse=False)


def backward_v1(dqkv, cos, sin, NH, KV):
    """forward_v1's kernel turning by the opposite angle (its constexpr INVERSE negates the sine it loads)."""
    _rope_v1(dqkv, cos, sin, NH, KV, inverse=True)


def forward_v2(qkv, cos, sin, NH, KV):
    """The mainline, llmpy.kernels.rope.rope_forward: one program per (block of BLOCK_T tokens, batch row), 4 warps,
    looping over the NH + KV heads (512 programs of 40 heads at the benchmark's size). It loads its tokens' cos and
    sin once and keeps them in registers for every head (the heads of a token turn alike). Each head is a
    (BLOCK_T, hs/2, 2) tile (16 tokens at hs = 64: 1024 values, 8 a thread) loaded as contiguous rows of hs channels,
    16-byte vectors, split into even and odd channels in registers (tl.split), turned, joined back (tl.join) and
    stored over itself. The same bytes as v1 in wide accesses, and the tables read once a token block instead of once
    a head."""
    mainline.rope_forward(qkv, cos, sin, NH, KV)


def backward_v2(dqkv, cos, sin, NH, KV):
    """The mainline, llmpy.kernels.rope.rope_backward: forward_v2's kernel with its constexpr INVERSE (sin negated)."""
    mainline.rope_backward(dqkv, cos, sin, NH, KV)


def _torch_rope(qkv, cos, sin, NH, KV, inverse):
    turned = (NH + KV) * 2 * cos.shape[1]
    qk = qkv[..., :turned]  # a view: the copy writes the turned heads back into qkv
    qk.copy_(turn(qk.float(), cos, sin, inverse))


def torch_forward(qkv, cos, sin, NH, KV):
    """The turn in torch, in fp32, in place on qkv's query and key heads: eager, a chain of elementwise kernels (the
    upcast, the products, the stack, the copy back); what torch.compile fuses."""
    _torch_rope(qkv, cos, sin, NH, KV, inverse=False)


def torch_backward(dqkv, cos, sin, NH, KV):
    """torch_forward by the opposite angle: R^T dout, what autograd through torch_forward computes, in fewer kernels."""
    _torch_rope(dqkv, cos, sin, NH, KV, inverse=True)


# Tolerances (relative: error norm / reference norm, against float64 on the same rounded inputs and table values):
# - fp32: 1e-6. Each output is two products and a difference (or an FMA and a product) in fp32, off by at most
#   2^-23 of its pair's norm: about 1e-7 in norm. A wrong sign, pair, head or table row is off by O(1).
# - bf16: 4e-3. One rounding of the fp32 result to bf16: about 1.6e-3 in norm (layernorm.py), whatever the size.
# The value heads must come back bit for bit: no version may touch them.
FP32_TOL, BF16_TOL = 1e-6, 4e-3


def _case(config, B, T, dtype, dev, seed):
    """(qkv, dqkv) seeded N(0, 1) (B, T, (NH + 2 KV) hs) in dtype, and the fp32 cos, sin tables of config."""
    g = torch.Generator().manual_seed(seed)
    qkv, dqkv = (torch.randn(B, T, config.qkv_channels, generator=g).to(dev, dtype) for _ in range(2))
    cos, sin = (torch.from_numpy(table).to(dev) for table in llama3.rope_tables(config, T))
    return qkv, dqkv, cos, sin


def check(small: bool) -> list[str]:
    """Every version, and the bounds, against float64, in place on qkv. small: B = 2, T = 37 tokens (not a multiple of
    the mainline's 32-token block at this head size), NH = 2 query heads sharing KV = 1 key and value head, hs = 24
    (12 pairs: padded to 16, masked), the tiny Llama's RoPE frequencies; else the benchmark's shape."""
    dev = device()
    if small:
        tiny = llama3.DESCRIPTORS["tiny"]
        config, B, T = dataclasses.replace(tiny, num_heads=2, num_kv_heads=1, channels=48), 2, 37  # hs 24
    else:
        config, B, T = llama3.DESCRIPTORS["llama3.2-1b"], 4, 2048
    NH, KV = config.num_heads, config.num_kv_heads
    turned = (NH + KV) * config.head_size
    lines = []
    for dtype, tag, tol in precisions(FP32_TOL, BF16_TOL):
        qkv0, dqkv0, cos, sin = _case(config, B, T, dtype, dev, seed=T)
        forwards = {"v1": forward_v1, "v2 mainline": forward_v2, "torch eager": torch_forward}
        backwards = {"v1": backward_v1, "v2 mainline": backward_v2, "torch eager": torch_backward}
        if dev == "cuda" and dtype == torch.bfloat16:
            forwards["torch.compile"] = compiled(torch_forward)
            backwards["torch.compile"] = compiled(torch_backward)
        for direction, fns, x0 in (("forward", forwards, qkv0), ("backward", backwards, dqkv0)):
            expected = reference(x0, cos, sin, NH, KV, inverse=direction == "backward")
            for name, fn in fns.items():
                x = x0.clone()
                fn(x, cos, sin, NH, KV)
                what = f"{direction} {name} {tag}"
                if not torch.equal(x[..., turned:], x0[..., turned:]):
                    raise AssertionError(f"{what}: the value heads changed")
                lines.append(compare(what, q_and_k=(x[..., :turned], expected[..., :turned], tol)))
    return lines


def benchmark() -> list[Result]:
    config, B, T = llama3.DESCRIPTORS["llama3.2-1b"], 4, 2048
    NH, KV = config.num_heads, config.num_kv_heads
    qkv, dqkv, cos, sin = _case(config, B, T, torch.bfloat16, "cuda", seed=0)
    # each call turns its operand again in place: a turn keeps every pair's norm, so the values stay as they are
    moved = 2 * B * T * (NH + KV) * config.head_size * qkv.element_size() + T * config.head_size * 4
    results = []
    for op, operand, ours, torch_code in [("rope_forward", qkv, (forward_v1, forward_v2), torch_forward),
                                          ("rope_backward", dqkv, (backward_v1, backward_v2), torch_backward)]:
        args = (operand, cos, sin, NH, KV)
        results += [timed(op, "v1 program per head", ours[0], args, moved),
                    timed(op, "v2 token blocks, all heads", ours[1], args, moved, mainline=True)]
        results += mark_bound([timed(op, "torch eager", torch_code, args, moved),
                               timed(op, "torch.compile", compiled(torch_code), args, moved)])
    return results


if __name__ == "__main__":
    import sys

    import run

    sys.exit(run.main(["rope"]))
