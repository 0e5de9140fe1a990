"""The FP8 step's largest non-matmul kernels, each timed alone at a model's training shape: how far from the GPU's
bandwidth are they?

dev/profile_step.py times them inside the step, where the side stream's weight gradients run beside them; here each
runs alone (CUDA events, median of --iters after 3), with and without its fused FP8 output, and its time is set
against the bytes it must move at the device-to-device copy's bandwidth (measured here too):

  gelu_backward       (N, 4C): reads the pre-activation and dout (bf16), writes dinp (bf16: 6 bytes an element) or
                      its e5m2 copy (5), and the fc bias's column partial sums
  layernorm_forward   (N, C): reads inp, writes out (bf16: 4 bytes an element) or its e4m3 copy (3), and the statistics
  layernorm_backward  (N, C): reads dout, inp and dinp, writes dinp (bf16: 8 bytes an element), and the e5m2 copy
                      (9), and the weight and bias partial sums
  classifier          (N, Vp): reads the logits and writes dlogits in place (bf16: 4 bytes an element) or in e5m2
                      (3), counted as if read once; the kernel reads a row twice, the second time from HBM at d12's
                      65,536 rows, not from L2
  transpose           an FP8 copy turned (2 bytes an element): (N, Vp), the LM head's dlogits, and (N, 4C)

With --sweep, the GELU backward (and its e5m2 variant with fewer registers a thread), the LayerNorm forward (bf16
and e4m3) and backward (e5m2) and the classifier (e5m2 and bf16 dlogits) are also timed at other tiles and warps than
the mainline's (gelu: bias.column_tile's (ROWS, BLOCK_OC) and 8 warps; layernorm: _row_tile's ROWS and warps;
classifier: BLOCK_V and NUM_WARPS);
--vocab_size times the classifier at another vocabulary (Llama 3's: 128256).

    python dev/fp8_fused_kernels.py [--model d12] [-b 64] [-t 1024] [--iters 20] [--sweep] [--vocab_size V]
"""

import argparse
import os
import statistics
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmpy.configs import gpt2  # noqa: E402
from llmpy.kernels import bias, classifier, fp8, gelu, layernorm  # noqa: E402


def median_ms(fn, iters):
    for _ in range(3):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="d12", help="a GPT-2 descriptor: d12, d24, d36, ...")
    ap.add_argument("-b", "--batch_size", type=int, default=64)
    ap.add_argument("-t", "--sequence_length", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time the fused kernels' other tiles")
    ap.add_argument("--vocab_size", type=int, help="the classifier's vocabulary (default: the model's), unpadded")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fp8_fused_kernels.py: needs a GPU")
    config = gpt2.config_from_descriptor(args.model)
    N, C, Vp = args.batch_size * args.sequence_length, config.channels, config.padded_vocab_size
    V = config.vocab_size
    if args.vocab_size:
        V = Vp = args.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)

    def fp8_out(shape):  # a fused output's (out8, scale, amax), scaled as a delayed scale would be
        return (torch.empty(shape, dtype=torch.float8_e5m2, device="cuda"),
                torch.full((1,), 2.0 ** 10, device="cuda"), torch.zeros(1, device="cuda"))

    big = torch.empty(N * 4 * C * 4, dtype=torch.uint8, device="cuda")
    copy_gbps = 2 * big.numel() / median_ms(lambda: big.clone(), args.iters) / 1e6
    print(f"{args.model} B={args.batch_size} T={args.sequence_length}: N={N} C={C} Vp={Vp}, "
          f"{torch.cuda.get_device_name()}, device-to-device copy {copy_gbps:.0f} GB/s")

    def report(name, elements, bytes_per_element, fn):
        ms = median_ms(fn, args.iters)
        floor = elements * bytes_per_element / copy_gbps / 1e6
        print(f"  {name:<36} {ms:7.3f} ms   at the copy's bandwidth {floor:6.3f} ms ({100 * floor / ms:3.0f}%)")

    # GELU backward with the fc bias's column partial sums, as the mainline calls it
    x, dout, dinp = randn(N, 4 * C), randn(N, 4 * C), torch.empty(N, 4 * C, dtype=torch.bfloat16, device="cuda")
    scratch = bias.bias_backward_scratch(N, 4 * C, "cuda")
    out8 = fp8_out((N, 4 * C))
    report("gelu_backward bf16", N * 4 * C, 6, lambda: gelu.gelu_backward(dinp, x, dout, scratch=scratch))
    report("gelu_backward e5m2", N * 4 * C, 5, lambda: gelu.gelu_backward(dinp, x, dout, scratch=scratch,
                                                                          fp8_out=out8))
    if args.sweep:  # other tiles, over the mainline's G row groups (scratch's rows)
        pointers, constants = fp8.fused_output(out8, dinp)
        G = scratch.shape[0]
        for rows, block_oc, warps in ((16, 256, 4), (8, 256, 4), (8, 256, 8), (32, 128, 8), (8, 512, 8),
                                      (4, 512, 4), (32, 256, 8)):
            def launch(rows=rows, block_oc=block_oc, warps=warps):
                gelu._gelu_backward_kernel[(G, triton.cdiv(4 * C, block_oc))](
                    dinp, scratch, x, dout, N, 4 * C, triton.cdiv(N, G), *pointers, SUM_COLUMNS=True, ROWS=rows,
                    BLOCK_OC=block_oc, num_warps=warps, **constants)
            report(f"gelu_backward e5m2 ({rows}, {block_oc}) warps={warps}", N * 4 * C, 5, launch)
        # the mainline's tile with fewer registers a thread: the e5m2 variant takes 72 against bf16's 58 (ptxas for
        # sm_90 on Triton 3.8's PTX, compiled on the CPU), 3 programs of 8 warps an SM instead of 4; capped at 64, 4
        # fit (ptxas there: 8 bytes of stack at 64, 80 bytes of spills at 56)
        rows, block_oc = bias.column_tile(4 * C)
        for maxnreg in (64, 56):
            def launch(maxnreg=maxnreg):
                gelu._gelu_backward_kernel[(G, triton.cdiv(4 * C, block_oc))](
                    dinp, scratch, x, dout, N, 4 * C, triton.cdiv(N, G), *pointers, SUM_COLUMNS=True, ROWS=rows,
                    BLOCK_OC=block_oc, num_warps=8, maxnreg=maxnreg, **constants)
            report(f"gelu_backward e5m2 maxnreg={maxnreg}", N * 4 * C, 5, launch)
    del x, dout, dinp, scratch, out8

    # LayerNorm forward, writing bf16 or e4m3 (the next matmul's input)
    inp, dout, dinp = randn(N, C), randn(N, C), randn(N, C)
    w, b = randn(C), randn(C)
    mean, rstd = torch.empty(N, device="cuda"), torch.empty(N, device="cuda")
    in8 = (torch.empty(N, C, dtype=torch.float8_e4m3fn, device="cuda"), torch.ones(1, device="cuda"),
           torch.zeros(1, device="cuda"))
    report("layernorm_forward bf16", N * C, 4, lambda: layernorm.layernorm_forward(dinp, mean, rstd, inp, w, b))
    report("layernorm_forward e4m3", N * C, 3,
           lambda: layernorm.layernorm_forward(dinp, mean, rstd, inp, w, b, fp8_out=in8))
    if args.sweep:  # other row tiles and warps than _row_tile's (4 rows of 1024, 8 warps at C = 768)
        block_c = triton.next_power_of_2(C)
        for fmt, out_bytes in (("bf16", 4), ("e4m3", 3)):
            pointers, constants = fp8.fused_output(in8 if fmt == "e4m3" else None, dinp)
            for rows, warps in ((1, 2), (1, 4), (2, 4), (4, 4), (8, 8), (16, 8)):
                def launch(rows=rows, warps=warps, pointers=pointers, constants=constants):
                    layernorm._layernorm_forward_kernel[(triton.cdiv(N, rows),)](
                        dinp, mean, rstd, inp, w, b, N, C, 1e-5, *pointers, RMS=False, ROWS=rows, BLOCK_C=block_c,
                        num_warps=warps, **constants)
                report(f"layernorm_forward {fmt} ROWS={rows} warps={warps}", N * C, out_bytes, launch)
    del in8

    # LayerNorm backward (stage 1: the partial sums stay in scratch, as in the step)
    mean, rstd = inp.float().mean(1), 1 / inp.float().std(1)
    scratch = layernorm.layernorm_backward_scratch(N, C, "cuda")
    out8 = fp8_out((N, C))
    report("layernorm_backward bf16", N * C, 8,
           lambda: layernorm.layernorm_backward(dinp, None, None, dout, inp, w, mean, rstd, scratch))
    report("layernorm_backward e5m2", N * C, 9,
           lambda: layernorm.layernorm_backward(dinp, None, None, dout, inp, w, mean, rstd, scratch, fp8_out=out8))
    report("cast (N, C) bf16 -> e5m2", N * C, 3, lambda: fp8.cast(out8[0], dinp, out8[1], out8[2]))
    if args.sweep:  # other row tiles and warps, e5m2, over the mainline's G row groups (scratch's)
        pointers, constants = fp8.fused_output(out8, dinp)
        G, block_c = scratch.shape[1], triton.next_power_of_2(C)
        for rows, warps in ((4, 4), (4, 8), (2, 4), (2, 2), (1, 2), (1, 4), (8, 8)):
            def launch(rows=rows, warps=warps):
                layernorm._layernorm_backward_kernel[(G,)](
                    dinp, scratch, dout, inp, w, mean, rstd, N, C, G, triton.cdiv(N, G), *pointers, SUM_DINP=True,
                    RMS=False, ROWS=rows, BLOCK_C=block_c, num_warps=warps, **constants)
            report(f"layernorm_backward e5m2 ROWS={rows} warps={warps}", N * C, 9, launch)
    del inp, dout, dinp, scratch, out8

    # the fused classifier: the bf16 one overwrites its logits, so each call gets the same fresh copy
    logits, losses = randn(N, Vp), torch.empty(N, device="cuda")
    targets = torch.randint(0, V, (N,), generator=g, device="cuda", dtype=torch.int32)
    out8 = fp8_out((N, Vp))
    report("classifier e5m2 dlogits", N * Vp, 3,
           lambda: classifier.fused_classifier(logits, losses, targets, V, 1 / N, fp8_out=out8))
    report("classifier loss only", N * Vp, 2,
           lambda: classifier.fused_classifier(logits, losses, targets, V, 1 / N,
                                               write_dlogits=False))
    if args.sweep:  # bf16 in place: each call works on the last one's dlogits, as fast as on logits
        for fmt in ("e5m2", "bf16"):
            pointers, constants = fp8.fused_output(out8 if fmt == "e5m2" else None, logits)
            for block_v, warps in ((1024, 2), (1024, 4), (2048, 2), (2048, 4), (4096, 4), (4096, 8)):
                def launch(block_v=block_v, warps=warps, pointers=pointers, constants=constants):
                    classifier._fused_classifier_kernel[(N,)](logits, losses, targets, Vp, V, Vp, 1 / N, *pointers,
                                                              BLOCK_V=block_v, WRITE_DLOGITS=True, num_warps=warps,
                                                              **constants)
                report(f"classifier {fmt} BLOCK_V={block_v} warps={warps}", N * Vp, 3 if fmt == "e5m2" else 4,
                       launch)
    report("classifier bf16 dlogits (in place)", N * Vp, 4,
           lambda: classifier.fused_classifier(logits, losses, targets, V, 1 / N))
    del logits

    # the byte transposes
    turned = torch.empty(Vp, N, dtype=torch.float8_e5m2, device="cuda")
    report("transpose (N, Vp)", N * Vp, 2, lambda: fp8.transpose(turned, out8[0]))
    del turned, out8
    x8 = torch.empty(N, 4 * C, dtype=torch.float8_e5m2, device="cuda")
    turned = torch.empty(4 * C, N, dtype=torch.float8_e5m2, device="cuda")
    report("transpose (N, 4C)", N * 4 * C, 2, lambda: fp8.transpose(turned, x8))


if __name__ == "__main__":
    main()
