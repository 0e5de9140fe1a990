"""The GPU check of generation (dev/gpu_check.sh's step `sample`): the KV-cache model (llmpy.inference) at d12 against
the NumPy forward and against the training model's full forward, then its speed. One line per check, then
`overall okay: 1` (exit 0) or `overall okay: 0` (exit 1).

    python train_gpt2_torch.py --model d12 --write_tensors 1      # gpt2_124M.bin, once (GPT-2's random init)
    python dev/sample_check.py -e gpt2_124M.bin [--json FILE]

Checks, after a 15-token prompt ("The quick brown fox jumps over the lazy dog. Once upon a time,"):
1. GPU (KV cache, fp32: IEEE matmuls, no TF32) against sample.py's CPU path (the NumPy forward, a full forward per
   token): greedy, the same tokens for the first 24, and 4 sampled rows (seed 1337), the same tokens; the logits of
   every step within 1e-5 relative (the norm of the difference over the norm, per row and step: fp32 sums in other
   orders measure ~1e-6; test_gpt2.py's fp32 tolerance).
2. GPU KV cache against the training model's full forward on the GPU over the sequences it generated (4 sampled rows,
   64 tokens): fp32, logits within 1e-5 relative and the sampler's choices the same from either; bf16, logits within
   5e-2 relative (test_gpt2.py's bf16 tolerance: the two paths round different sums to bf16), and how many steps
   choose the same tokens is printed, not checked.
Speed, bf16, 256 new tokens, B = 1 and 8 rows: the decode step alone (tokens/s of decode() calls, the logits'
copy to the host included), and whole generation with the sampling (temperature 1, as sample.py prints it); the
full forward per token (no cache, llm.c's way) for comparison at B = 1, over 32 tokens.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmpy.formats import read_model  # noqa: E402 (after the path above)
from llmpy.inference import KVCacheGPT2, full_forward_logits  # noqa: E402
from llmpy.models import gpt2  # noqa: E402
from llmpy.sampling import FullForwardDecoder, Sampler, generate  # noqa: E402
from sample import numpy_decoder  # noqa: E402

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 4874, 2402, 257, 640, 11]
FP32_TOLERANCE, BF16_TOLERANCE = 1e-5, 5e-2
SPEED_TOKENS, SPEED_ROWS, WARMUP_STEPS = 256, (1, 8), 3


def run(decoder, new_tokens, sampler):
    """(tokens (B, N), logits (N, B, V)) of a generation after PROMPT."""
    result = generate(decoder, PROMPT, new_tokens, sampler, keep_logits=True)
    return result.tokens, result.logits


def relative_error(ours, reference):
    """The largest, over steps and rows, of ||ours - reference|| / ||reference|| along the vocabulary."""
    ours, reference = ours.astype(np.float64), reference.astype(np.float64)
    return float((np.linalg.norm(ours - reference, axis=-1) / np.linalg.norm(reference, axis=-1)).max())


def check(results, name, ok, detail):
    results[name] = {"ok": bool(ok), "detail": detail}
    print(f"{name}: {detail}  {'OK' if ok else 'NOT OK'}", flush=True)
    return ok


def against_numpy(config, weights, results):
    """Check 1: the GPU's KV cache in fp32 against the NumPy forward, greedy and sampled."""
    new_tokens = 24
    for name, rows, sampler in (("greedy", 1, lambda: Sampler(0)), ("sampled", 4, lambda: Sampler(seed=1337))):
        gpu = KVCacheGPT2(config, weights, rows, len(PROMPT) + new_tokens, dtype=torch.float32)
        gpu_tokens, gpu_logits = run(gpu, new_tokens, sampler())
        cpu_tokens, cpu_logits = run(numpy_decoder(config, weights, rows, len(PROMPT) + new_tokens), new_tokens,
                                     sampler())
        same = int((gpu_tokens == cpu_tokens).all(axis=0).cumprod().sum())  # leading steps where every row agrees
        error = relative_error(gpu_logits, cpu_logits)
        check(results, f"gpu fp32 vs numpy, {name} ({rows} row(s))", same == new_tokens and error <= FP32_TOLERANCE,
              f"same tokens for {same}/{new_tokens} steps, logits rel err {error:.2e} (tol {FP32_TOLERANCE:.0e})")


def against_full_forward(config, weights, results):
    """Check 2: the KV cache against the training model's full forward over the same sequences, fp32 and bf16."""
    rows, new_tokens = 4, 64
    for dtype, tolerance in ((torch.float32, FP32_TOLERANCE), (torch.bfloat16, BF16_TOLERANCE)):
        model = KVCacheGPT2(config, weights, rows, len(PROMPT) + new_tokens, dtype=dtype)
        tokens, logits = run(model, new_tokens, Sampler(seed=1337))
        full = full_forward_logits(config, weights, PROMPT, tokens, dtype)
        sampler = Sampler(seed=1337)
        same = int((np.stack([sampler(step) for step in full], axis=1) == tokens).all(axis=0).cumprod().sum())
        error = relative_error(logits, full)
        exact = dtype == torch.float32  # in bf16 the choices may part where two tokens are within the rounding
        name = str(dtype).split(".")[1]
        check(results, f"kv cache vs full forward, {name}", error <= tolerance and (same == new_tokens or not exact),
              f"logits rel err {error:.2e} (tol {tolerance:.0e}), the full forward's logits choose the same tokens "
              f"for {same}/{new_tokens} steps" + ("" if exact else " (not checked)"))


def speed(config, weights, results):
    """tokens/s in bf16: the decode steps alone and generation with sampling, with the KV cache; and without it."""
    length = len(PROMPT) + SPEED_TOKENS
    for rows in SPEED_ROWS:
        model = KVCacheGPT2(config, weights, rows, length)
        model.prefill(PROMPT)
        tokens = np.full(rows, PROMPT[-1], dtype=np.int32)
        for _ in range(WARMUP_STEPS):
            model.decode(tokens)
        start = time.perf_counter()
        for _ in range(SPEED_TOKENS - 1 - WARMUP_STEPS):
            model.decode(tokens)
        step = (time.perf_counter() - start) / (SPEED_TOKENS - 1 - WARMUP_STEPS)
        timed = generate(model, PROMPT, SPEED_TOKENS, Sampler(seed=1337)).step_seconds[WARMUP_STEPS:]
        with_sampling = sum(timed) / len(timed)
        results[f"speed B={rows}"] = {"decode_ms": step * 1e3, "decode_tokens_per_s": rows / step,
                                      "generate_ms": with_sampling * 1e3, "generate_tokens_per_s": rows / with_sampling}
        print(f"speed bf16 B={rows}, {SPEED_TOKENS} tokens after {len(PROMPT)}: decode step {step * 1e3:.3f} ms = "
              f"{rows / step:.0f} tokens/s; with sampling {with_sampling * 1e3:.3f} ms = {rows / with_sampling:.0f} "
              "tokens/s", flush=True)
    new_tokens = 32
    full_length = len(PROMPT) + new_tokens
    model = gpt2.build(config, 1, full_length, attention_impl="triton", gelu_fusion=0)
    model.runtime.load_weights(weights)

    def logits_at(tokens, t):
        model.forward(torch.from_numpy(tokens), train=False)
        return model.acts.logits[t:t + 1, :config.vocab_size].float().cpu().numpy()

    decoder = FullForwardDecoder(logits_at, 1, full_length)
    timed = generate(decoder, PROMPT, new_tokens, Sampler(seed=1337)).step_seconds[WARMUP_STEPS:]
    full_step = sum(timed) / len(timed)
    results["speed full forward B=1"] = {"generate_ms": full_step * 1e3, "generate_tokens_per_s": 1 / full_step}
    print(f"speed bf16 B=1 without a cache (a full forward over {full_length} positions per token): "
          f"{full_step * 1e3:.3f} ms = {1 / full_step:.0f} tokens/s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-e", "--model", default="gpt2_124M.bin", help="an llm.c model file (d12: train_gpt2_torch.py "
                    "--model d12 --write_tensors 1)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sample_check.py: needs a GPU")
    config, weights = read_model(args.model)
    torch.set_float32_matmul_precision("highest")  # the fp32 checks: IEEE matmuls (bf16 is unaffected)
    results = {"device": torch.cuda.get_device_name(), "model": args.model}
    against_numpy(config, weights, results)
    against_full_forward(config, weights, results)
    speed(config, weights, results)
    okay = all(r["ok"] for r in results.values() if isinstance(r, dict) and "ok" in r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"overall okay: {int(okay)}")
    sys.exit(0 if okay else 1)


if __name__ == "__main__":
    main()
