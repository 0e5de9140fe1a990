"""Should the MLP's GELU run inside the fc matmuls? Three ways side by side, forward and backward, on the GPU.

    python dev/gelu_fusion.py        # the MLP shapes of d12 B=64, d24 B=48 and d36 B=24 (T=1024), bf16

GPT-2's MLP: fch = ln2 @ fcw^T + fcb, fch_gelu = gelu(fch), then fch_gelu @ fcprojw^T. The GELU forward reads fch and
writes fch_gelu, and its backward reads the product dfch' = dresidual @ fcprojw and fch and writes dfch (and sums
dfch's columns, the fc bias gradient): passes over the largest activation, (N, 4C), that a matmul's epilogue could do
while its tile is still in registers. Contenders, for each direction:
  separate  cuBLAS (through torch), then our GELU kernel (llmpy.kernels.gelu): the mainline with -ge 0
  cuBLASLt  its GELU_AUX_BIAS epilogue (writes fch and gelu(fch); llmpy.cublaslt, the mainline's -ge 1 forward) and
            its DGELU_BGRAD epilogue (dfch and its column sums; bf16 sums only: an fp32 bias gradient with bf16 D is
            refused, status 7); the fastest of the heuristic's 8 algorithms
  triton    our own GEMM with GELU in the epilogue: dev/kernels/matmul.py's v3 (persistent, TMA, 128x256x64 tiles,
            4 stages), whose epilogue loads the fch tile and stores dfch and its column sums per tile row
Every result is checked against the separate path (||got - ref|| / ||ref||; the fused paths round once where the
separate one rounds twice, so up to ~3e-3 in bf16) and timed (median of CUDA events, L2 flushed).
The measured answer (BENCHMARKS.md): only cuBLASLt's forward pays; its DGELU runs at a third of the plain GEMM's
speed, and the Triton epilogue, not overlapped with the next tile's main loop, costs more than the pass it saves.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "dev", "kernels")]

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from common import rel_error, time_ms  # noqa: E402
from llmpy import cublaslt, vendor  # noqa: E402
from llmpy.kernels import bias, gelu  # noqa: E402
from llmpy.kernels.gelu import gelu_derivative  # noqa: E402
from matmul import _tile_coordinates  # noqa: E402

SHAPES = [("d12 B=64", 65536, 768), ("d24 B=48", 49152, 1024), ("d36 B=24", 24576, 1280)]
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, NUM_WARPS, NUM_STAGES = 128, 256, 64, 8, 8, 4


@triton.jit
def _matmul_gelu_kernel(out_ptr, pre_ptr, bias_ptr, partials_ptr, a_desc, b_desc, M, N, K,
                        BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    # forward:  pre = a @ b^T + bias (b stored (N, K)), out = gelu(pre)
    # backward: out = (a @ b) * gelu'(pre) (b stored (K, N)), partials[tile row] = out's column sums over the tile
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS, flatten=True):
        tile_m, tile_n = _tile_coordinates(tile, tiles_m, tiles_n, GROUP_M)
        start_m, start_n = tile_m * BLOCK_M, tile_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            b = b_desc.load([k, start_n]) if BACKWARD else b_desc.load([start_n, k]).T
            acc = tl.dot(a_desc.load([start_m, k]), b, acc)
        rows = start_m + tl.arange(0, BLOCK_M)
        columns = start_n + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (columns < N)[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + columns[None, :]
        if BACKWARD:
            pre = tl.load(pre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dinp = (acc * gelu_derivative(pre)).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + offsets, dinp, mask=mask)
            tl.store(partials_ptr + tile_m * N + columns, tl.sum(dinp.to(tl.float32), axis=0), mask=columns < N)
        else:
            acc += tl.load(bias_ptr + columns, mask=columns < N, other=0.0).to(tl.float32)[None, :]
            pre = acc.to(pre_ptr.dtype.element_ty)
            tl.store(pre_ptr + offsets, pre, mask=mask)
            tl.store(out_ptr + offsets, gelu.gelu(pre.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def triton_matmul_gelu(out, pre, bias_or_partials, a, b, backward):
    M, K = a.shape
    N = b.shape[1] if backward else b.shape[0]
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK_M, BLOCK_K])
    b_desc = TensorDescriptor.from_tensor(b, [BLOCK_K, BLOCK_N] if backward else [BLOCK_N, BLOCK_K])
    programs = min(torch.cuda.get_device_properties(0).multi_processor_count,
                   triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N))
    _matmul_gelu_kernel[(programs,)](out, pre, bias_or_partials, bias_or_partials, a_desc, b_desc, M, N, K,
                                     BACKWARD=backward, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                     GROUP_M=GROUP_M, NUM_PROGRAMS=programs, num_warps=NUM_WARPS,
                                     num_stages=NUM_STAGES)


def study(N, C):
    """{(direction, contender): (ms, error vs separate)} for the MLP of width C over N tokens."""
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(dtype=torch.bfloat16, device="cuda")

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device="cuda")).to(torch.bfloat16)

    ln2, dres = randn(N, C), randn(N, C)
    fcw, fcb, projw = randn(4 * C, C, scale=C ** -0.5), randn(4 * C), randn(C, 4 * C, scale=(4 * C) ** -0.5)
    fch, fch_gelu, dfch = (torch.empty(N, 4 * C, **bf) for _ in range(3))
    dfcb = torch.zeros(4 * C, device="cuda")
    scratch = bias.bias_backward_scratch(N, 4 * C, "cuda")
    dfcb_bf16 = torch.empty(4 * C, **bf)
    partials = torch.empty(triton.cdiv(N, BLOCK_M), 4 * C, device="cuda")

    def separate_forward():
        vendor.matmul_forward(fch, ln2, fcw, fcb)
        gelu.gelu_forward(fch_gelu, fch)

    def separate_backward():
        vendor.matmul_backward_input(dfch, dres, projw)
        gelu.gelu_backward(dfch, fch, dfch, dfcb, scratch)

    separate_forward()
    fch_ref, fch_gelu_ref = fch.clone(), fch_gelu.clone()
    separate_backward()
    dfch_ref = dfch.clone()
    out, pre = torch.empty_like(fch), torch.empty_like(fch)
    contenders = {
        ("forward", "separate"): (separate_forward, lambda: (fch, fch_gelu)),
        ("forward", "cuBLASLt"): (lambda: vendor.matmul_gelu_forward(out, pre, ln2, fcw, fcb), lambda: (pre, out)),
        ("forward", "triton"): (lambda: triton_matmul_gelu(out, pre, fcb, ln2, fcw, backward=False),
                                lambda: (pre, out)),
        ("backward", "separate"): (separate_backward, lambda: (dfch,)),
        ("backward", "cuBLASLt"): (lambda: cublaslt.matmul(out, projw, dres, m=4 * C, n=N, k=C, trans_a=False,
                                                           trans_b=False, lda=4 * C, ldb=C, ldd=4 * C,
                                                           epilogue="dgelu_bgrad", bias=dfcb_bf16, aux=fch_ref,
                                                           aux_ld=4 * C), lambda: (out,)),
        ("backward", "triton"): (lambda: (triton_matmul_gelu(out, fch_ref, partials, dres, projw, backward=True),
                                          bias.sum_partials(dfcb, partials)), lambda: (out,)),
    }
    results = {}
    for (direction, name), (run, outputs) in contenders.items():
        fch.copy_(fch_ref)
        run()
        refs = (fch_ref, fch_gelu_ref) if direction == "forward" else (dfch_ref,)
        error = max(rel_error(got, ref) for got, ref in zip(outputs(), refs))
        results[direction, name] = (time_ms(run), error)
    return results


def main():
    if not torch.cuda.is_available():
        sys.exit("gelu_fusion.py: needs a GPU (cuBLASLt, TMA)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          "ms per call (error vs separate)")
    print(f"{'shape':10s} {'direction':9s} {'separate':>18s} {'cuBLASLt':>18s} {'triton':>18s}")
    for label, N, C in SHAPES:
        results = study(N, C)
        for direction in ("forward", "backward"):
            cells = [f"{results[direction, name][0]:7.3f} ({results[direction, name][1]:.0e})"
                     for name in ("separate", "cuBLASLt", "triton")]
            print(f"{label:10s} {direction:9s} " + " ".join(f"{cell:>18s}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
