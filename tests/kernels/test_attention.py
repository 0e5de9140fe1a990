"""Causal flash attention, ours (llmpy/kernels/attention.py) and cuDNN's as the mainline calls it (llmpy.vendor, GPU
only), against attention written out in float64 with autograd.

The reference takes the same qkv (upcast to float64), splits it into q, k, v (B, NH, T, HS), computes
softmax(q k^T / sqrt(HS) + causal mask) v, the per-row logsumexp of the masked scaled scores, and the gradients of
<out, dout> with respect to q, k and v by autograd. With grouped-query attention (KV < NH key/value heads, Llama 3)
it repeats each key/value head for the NH / KV query heads that read it, as train_llama3_torch.py does, so autograd
sums their dk and dv. The kernels are compared on everything they write: out, lse and dqkv = [dq | dk | dv].

Tolerances:
- float32 inputs: the kernels compute in fp32 with exact (IEEE) fp32 dots, so they differ from float64 only by fp32
  rounding over sums of at most T terms: elementwise rtol = atol = 1e-5 for out and lse (values O(1)), 3e-5 for the
  gradients (two more matmuls and the delta subtraction on the way).
- bfloat16 inputs: the reference sees the same bf16 values, so the difference is the rounding of the outputs to
  bf16 (relative 2^-9 = 2e-3 per element) and, on the GPU, of P and dS to bf16 for their matmuls (each 2^-9
  relative, averaging out over the sums): ||got - ref|| / ||ref|| <= 1e-2 for out, dq, dk, dv. lse stays fp32
  (scores are bf16 x bf16 products accumulated in fp32), so it keeps an absolute 1e-4.
Sizes: T = 37, 50, 77 are not multiples of any block size the kernels use (16 and 32 in fp32 and under the
interpreter), so there are full blocks below the diagonal, diagonal blocks split into several sub-blocks, and a
partial last block. The bf16 cases T = 300 and 150 do the same for the GPU's bf16 blocks (32 to 128).
"""

import math
import sys

import pytest
import torch

from llmpy import vendor
from llmpy.kernels.attention import attention_backward, attention_forward, backward_bias_scratch
from llmpy.kernels.bias import bias_backward, bias_backward_scratch, value_bias_backward

torch.backends.cuda.matmul.allow_tf32 = False  # the GPU reference must be true fp32 matmuls too


def reference_attention(qkv, dout, NH, KV=None):
    """float64 causal attention on qkv (B, T, (NH + 2 KV) * HS): out (B, T, C), lse (B, NH, T), dqkv like qkv.
    KV < NH key/value heads (grouped-query attention) as train_llama3_torch.py's CausalSelfAttention: qkv is
    [q (NH heads) | k (KV heads) | v (KV heads)] and each key/value head is repeated for the NH / KV consecutive query
    heads that read it (repeat_interleave), so autograd sums their gradients. KV None means NH, qkv (B, T, 3C)."""
    KV = NH if KV is None else KV
    B, T, width = qkv.shape
    HS = width // (NH + 2 * KV)
    C = NH * HS
    qkv64 = qkv.detach().to(torch.float64).requires_grad_(True)
    q, k, v = qkv64.split((C, KV * HS, KV * HS), dim=2)
    q, k, v = q.view(B, T, NH, HS), k.view(B, T, KV, HS), v.view(B, T, KV, HS)
    k, v = (t.repeat_interleave(NH // KV, dim=2) for t in (k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, NH, T, HS)
    scores = q @ k.transpose(-2, -1) / math.sqrt(HS)  # (B, NH, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, NH, T)
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    out.backward(dout.to(torch.float64))
    return out.detach(), lse.detach(), qkv64.grad


def make_inputs(B, T, NH, HS, dtype, device, seed, channel_padding=0, KV=None):
    """Seeded random qkv (B, T, (NH + 2 KV) * HS; KV None means NH: 3C) and dout (B, T, C). With channel_padding > 0
    both are views into wider buffers (row stride + padding), which proves the kernels address q, k, v and dout
    through strides."""
    generator = torch.Generator().manual_seed(seed)
    C = NH * HS
    width = (NH + 2 * (NH if KV is None else KV)) * HS
    qkv_buffer = torch.randn(B, T, width + channel_padding, generator=generator)
    dout_buffer = torch.randn(B, T, C + channel_padding, generator=generator)
    qkv = qkv_buffer.to(dtype=dtype, device=device)[:, :, :width]
    dout = dout_buffer.to(dtype=dtype, device=device)[:, :, :C]
    return qkv, dout


def run_kernels(qkv, dout, NH, cudnn=False, KV=None):
    """Forward then backward, ours or cuDNN's, every output poisoned with NaN first so an element left unwritten
    fails."""
    B, T, width = qkv.shape
    C = dout.shape[2]
    out = torch.full((B, T, C), float("nan"), dtype=qkv.dtype, device=qkv.device)
    lse = torch.full((B, NH, T), float("nan"), dtype=torch.float32, device=qkv.device)
    dqkv = torch.full_like(out.new_empty(B, T, width), float("nan"))
    if cudnn:
        vendor.cudnn_attention_forward(out, lse, qkv, NH, KV=KV)
        vendor.cudnn_attention_backward(dqkv, dout, qkv, out, lse, NH, KV=KV)
    else:
        attention_forward(out, lse, qkv, NH, KV=KV)
        attention_backward(dqkv, dout, qkv, out, lse, NH, torch.full_like(lse, float("nan")), KV=KV)
    return out, lse, dqkv


def relative_error(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("B,T,NH,HS", [(2, 50, 2, 16), (1, 77, 3, 32), (1, 50, 1, 64), (1, 40, 1, 128)])
def test_float32_matches_float64_reference(device, B, T, NH, HS):
    qkv, dout = make_inputs(B, T, NH, HS, torch.float32, device, seed=T + HS)
    out, lse, dqkv = run_kernels(qkv, dout, NH)
    ref_out, ref_lse, ref_dqkv = reference_attention(qkv, dout, NH)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    C = NH * HS
    for name, part in zip(("dq", "dk", "dv"), range(3)):
        columns = slice(part * C, (part + 1) * C)
        torch.testing.assert_close(dqkv[..., columns].double(), ref_dqkv[..., columns], rtol=3e-5, atol=3e-5,
                                   msg=lambda m: f"{name}: {m}")


def cudnn_or_skip(device):
    if device != "cuda":
        pytest.skip("cuDNN's attention runs on the GPU only")
    pytest.importorskip("cudnn", reason="needs the cuDNN frontend (pip install nvidia-cudnn-frontend)")


@pytest.mark.parametrize("cudnn", [False, True], ids=["ours", "cudnn"])
@pytest.mark.parametrize("B,T,NH,HS", [(2, 50, 2, 16), (1, 77, 2, 64), (1, 300, 1, 64), (1, 150, 1, 128)])
def test_bfloat16_matches_float64_reference(device, B, T, NH, HS, cudnn):
    if cudnn:
        cudnn_or_skip(device)
    qkv, dout = make_inputs(B, T, NH, HS, torch.bfloat16, device, seed=1000 + T)
    out, lse, dqkv = run_kernels(qkv, dout, NH, cudnn)
    ref_out, ref_lse, ref_dqkv = reference_attention(qkv, dout, NH)
    assert out.dtype == torch.bfloat16 and dqkv.dtype == torch.bfloat16
    assert relative_error(out, ref_out) <= 1e-2
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-4)
    C = NH * HS
    for name, part in zip(("dq", "dk", "dv"), range(3)):
        columns = slice(part * C, (part + 1) * C)
        error = relative_error(dqkv[..., columns], ref_dqkv[..., columns])
        assert error <= 1e-2, f"{name}: relative error {error:.2e}"


def test_strided_views_of_wider_buffers(device):
    """qkv and dout as views with row strides 3C+5 and C+5: the kernels must follow the strides, not assume 3C."""
    NH, HS = 2, 16
    qkv, dout = make_inputs(2, 37, NH, HS, torch.float32, device, seed=7, channel_padding=5)
    assert not qkv.is_contiguous() and not dout.is_contiguous()
    out, lse, dqkv = run_kernels(qkv, dout, NH)
    ref_out, ref_lse, ref_dqkv = reference_attention(qkv, dout, NH)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dqkv.double(), ref_dqkv, rtol=3e-5, atol=3e-5)


def gradient_parts(dqkv, NH, KV, HS):
    """dq, dk, dv: the column blocks of dqkv (NH, KV and KV heads of HS)."""
    return dqkv.split((NH * HS, KV * HS, KV * HS), dim=2)


@pytest.mark.parametrize("cudnn", [False, True], ids=["ours", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,HS", [(2, 67, 16), (2, 45, 32)])
@pytest.mark.parametrize("NH,KV", [(4, 2), (4, 1), (4, 4)])
def test_grouped_query_attention_matches_float64_reference(device, NH, KV, B, T, HS, dtype, cudnn):
    """Grouped-query attention (Llama 3): qkv (B, T, (NH + 2 KV) * HS) = [NH query heads | KV key heads | KV value
    heads], query head h reading key/value head h // (NH / KV). Against reference_attention's float64 autograd with
    k and v repeated for each group's query heads (train_llama3_torch.py's CausalSelfAttention), on out, lse, dq and
    dk, dv, which are sums over the NH / KV query heads of a group (the kernel adds them up in fp32 registers).
    KV = NH is multi-head attention through the same argument. Tolerances as for multi-head attention (module
    docstring): fp32 rtol = atol = 1e-5 for out and lse and 3e-5 for the gradients (dk and dv sum NH / KV times as
    many terms, at most 4 * 67 here: under the interpreter the worst element of any output uses under 4% of its
    tolerance); bf16 1e-2 relative in the norm for out, dq, dk, dv (about 2e-3 under the interpreter, where only the
    outputs are rounded) and absolute 1e-4 for lse. T = 45, 67 are not multiples of the blocks (16, 32), B = 2 puts the
    key/value heads of a second batch row behind the first, and qkv and dout are views with 3 spare columns per row,
    so the k and v columns must come from the head layout and the row strides. cuDNN's (bf16, GPU) takes the same
    views of qkv and dqkv (vendor.qkv_heads) and the bf16 tolerances; its rows must start 16 bytes apart, so its
    spare columns are 8."""
    if cudnn:
        cudnn_or_skip(device)
        if dtype == torch.float32:
            pytest.skip("cuDNN's flash attention is bf16")
    padding = 8 if cudnn else 3
    qkv, dout = make_inputs(B, T, NH, HS, dtype, device, seed=100 * KV + T, channel_padding=padding, KV=KV)
    out, lse, dqkv = run_kernels(qkv, dout, NH, cudnn, KV=KV)
    ref_out, ref_lse, ref_dqkv = reference_attention(qkv, dout, NH, KV)
    parts = zip(("dq", "dk", "dv"), gradient_parts(dqkv, NH, KV, HS), gradient_parts(ref_dqkv, NH, KV, HS))
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
        for name, got, ref in parts:
            torch.testing.assert_close(got.double(), ref, rtol=3e-5, atol=3e-5, msg=lambda m: f"{name}: {m}")
    else:
        assert out.dtype == torch.bfloat16 and dqkv.dtype == torch.bfloat16
        assert relative_error(out, ref_out) <= 1e-2
        torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-4)
        for name, got, ref in parts:
            error = relative_error(got, ref)
            assert error <= 1e-2, f"{name}: relative error {error:.2e}"


def test_grouped_query_attention_rejects_bad_layouts(device):
    """One-line ValueErrors: KV that does not divide NH, a qkv width that is not (NH + 2 KV) * HS, and the qkv bias
    gradient (dbias, GPT-2's) with KV != NH, which Llama 3 has no use for."""
    NH, KV, HS, T = 4, 2, 16, 8
    qkv, dout = make_inputs(1, T, NH, HS, torch.float32, device, seed=5, KV=KV)
    out = torch.empty(1, T, NH * HS, device=device)
    lse = torch.empty(1, NH, T, device=device)
    with pytest.raises(ValueError, match="must divide the query heads"):
        attention_forward(out, lse, qkv, NH, KV=3)
    with pytest.raises(ValueError, match=r"\(NH \+ 2\*KV\)\*HS"):
        attention_forward(out, lse, qkv[:, :, :-HS], NH, KV=KV)
    attention_forward(out, lse, qkv, NH, KV=KV)
    scratch = backward_bias_scratch(1, T, NH * HS, NH, torch.float32, device)
    with pytest.raises(ValueError, match="needs KV == NH"):
        attention_backward(torch.empty_like(qkv), dout, qkv, out, lse, NH, torch.empty_like(lse),
                           dbias=torch.zeros(3 * NH * HS, device=device), bias_scratch=scratch, KV=KV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_sums_the_qkv_bias_gradient(device, dtype):
    """With dbias, the backward also adds dqkv's column sums to it (the qkv bias gradient), from per-block partial
    sums of the values it stores: against the column sums of the dqkv it wrote, in float64, within fp32 summation
    error (rtol = atol = 1e-5, sums of B*T = 2*150 values of size ~1), and dqkv itself unchanged by the option.
    T = 150 ends in a partial block, whose tokens past T must add nothing."""
    B, T, NH, HS = 2, 150, 2, 32
    qkv, dout = make_inputs(B, T, NH, HS, dtype, device, seed=11)
    out, lse, plain_dqkv = run_kernels(qkv, dout, NH)
    C = NH * HS
    dbias = torch.randn(3 * C, generator=torch.Generator().manual_seed(12)).to(device)
    expected = dbias.double() + plain_dqkv.double().sum(dim=(0, 1))
    dqkv = torch.full_like(plain_dqkv, float("nan"))
    scratch = torch.full_like(backward_bias_scratch(B, T, C, NH, dtype, device), float("nan"))
    attention_backward(dqkv, dout, qkv, out, lse, NH, torch.empty_like(lse), dbias=dbias, bias_scratch=scratch)
    assert torch.equal(dqkv, plain_dqkv)
    torch.testing.assert_close(dbias.double(), expected, rtol=1e-5, atol=1e-5)


def test_qkv_bias_gradient_needs_only_dq_and_dout():
    """What the mainline's cuDNN path relies on (llmpy.models.gpt2.Attention): in float64, the key bias gradient (dk's column sums) is
    zero, since the softmax ignores a shift of all of a query's scores, and the value bias gradient (dv's column
    sums) equals dout's column sums, since every row of P sums to 1; to float64 rounding (1e-12 of the sums' size)."""
    B, T, NH, HS = 2, 50, 2, 16
    C = NH * HS
    qkv, dout = make_inputs(B, T, NH, HS, torch.float64, "cpu", seed=21)
    _, _, dqkv = reference_attention(qkv, dout, NH)
    column_sums = dqkv.sum(dim=(0, 1))
    scale = dqkv.abs().sum(dim=(0, 1)).max().item()
    torch.testing.assert_close(column_sums[C:2 * C], torch.zeros(C, dtype=torch.float64), rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(column_sums[2 * C:], dout.sum(dim=(0, 1)), rtol=0, atol=1e-12 * scale)


def test_cudnn_qkv_bias_gradient(device):
    """The mainline's qkv bias gradient under cuDNN: the query part from bias_backward over dq, the key part zero, the
    value part from value_bias_backward, the attention projection's bias gradient (dproj's column sums) times its
    weight W, where dout = dproj @ W. Against the column sums of float64 autograd's dqkv, within the bf16 tolerance
    of the gradients themselves (1e-2 relative)."""
    cudnn_or_skip(device)
    B, T, NH, HS = 2, 150, 2, 64
    C = NH * HS
    qkv, _ = make_inputs(B, T, NH, HS, torch.bfloat16, device, seed=22)
    generator = torch.Generator().manual_seed(23)
    dproj = torch.randn(B * T, C, generator=generator).to(device=device, dtype=torch.bfloat16)
    weight = (torch.randn(C, C, generator=generator) / math.sqrt(C)).to(device=device, dtype=torch.bfloat16)
    dout = (dproj.float() @ weight.float()).to(torch.bfloat16).view(B, T, C)
    _, _, dqkv = run_kernels(qkv, dout, NH, cudnn=True)
    _, _, ref_dqkv = reference_attention(qkv, dout, NH)
    dbias = torch.zeros(1, 3 * C, device=device)
    scratch = bias_backward_scratch(B * T, C, device).fill_(float("nan"))
    bias_backward(dbias[0, :C], dqkv.view(B * T, 3 * C)[:, :C], scratch)
    value_bias_backward(dbias[:, 2 * C:], dproj.float().sum(0)[None], weight[None])
    error = relative_error(dbias[0], ref_dqkv.sum(dim=(0, 1)))
    assert error <= 1e-2, f"qkv bias gradient: relative error {error:.2e}"


def test_missing_cudnn_frontend_says_what_to_install(monkeypatch):
    """Without the cudnn package, asking for cuDNN's attention is a ValueError naming the package and the way out."""
    monkeypatch.setattr(vendor, "_cudnn", {})
    monkeypatch.setitem(sys.modules, "cudnn", None)  # makes `import cudnn` raise ImportError
    with pytest.raises(ValueError, match="pip install nvidia-cudnn-frontend, or run with --attention triton"):
        vendor.cudnn_frontend()


@pytest.mark.parametrize("NH,KV", [(2, 2), (4, 2), (4, 1)])
def test_backward_is_deterministic(device, NH, KV):
    """No atomics: two backward passes on the same inputs agree bit for bit, also with grouped-query attention, whose
    dk and dv sum several query heads (in a fixed order, inside one program per key block)."""
    qkv, dout = make_inputs(1, 50, NH, 32, torch.bfloat16, device, seed=3, KV=KV)
    _, _, first = run_kernels(qkv, dout, NH, KV=KV)
    _, _, second = run_kernels(qkv, dout, NH, KV=KV)
    assert torch.equal(first, second)


def test_rejects_unsupported_head_size(device):
    qkv = torch.randn(1, 8, 3 * 24, device=device)  # NH=1 -> HS=24
    out = torch.empty(1, 8, 24, device=device)
    lse = torch.empty(1, 1, 8, device=device)
    with pytest.raises(ValueError, match="HS in"):
        attention_forward(out, lse, qkv, 1)
