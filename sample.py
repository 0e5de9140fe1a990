"""Text generation from a GPT-2 model: the mainline's kernels with a KV cache on the GPU, the NumPy forward on the CPU.

    python sample.py -e gpt2_124M.bin --prompt "The meaning of life is"
    python sample.py -e gpt2_124M.bin --num_samples 4 --temperature 0.8 --top_k 50 --top_p 0.95 --seed 7
    python sample.py -e gpt2_124M.bin --temperature 0             # greedy
    python sample.py -e gpt2_124M.bin --device cpu                # NumPy, no GPU needed

The prompt is encoded with GPT-2's BPE (tiktoken; offline, LLMPY_TIKTOKEN_FILE names the ranks file); an empty prompt
starts from <|endoftext|>, as llm.c's samples do. The samples all continue the prompt; each is printed, prompt
included, then the speed in tokens/s.
- --device cuda: llmpy.inference, the prompt in one prefill, then one decode step per token over a KV cache, replayed
  from a CUDA graph; bf16 (--dtype float32 for checks: fp32 without TF32).
- --device cpu: train_gpt2_cpu.py's NumPy forward in fp32, a full forward of the whole sequence per new token (no
  cache: the reference the cache is checked against, and the forward llm.c samples with).
The tokens are chosen on the host by llmpy.sampling, the same code for both: from the same logits and seed the same
tokens.
"""

import argparse
import os
import sys

from llmpy.cli import OneLineArgumentParser
from llmpy.configs.gpt2 import GPT2_EOT, GPT2_VOCAB_SIZE
from llmpy.formats import FormatError
from llmpy.hf import load_weights
from llmpy.sampling import FullForwardDecoder, Sampler, generate
from llmpy.signals import exit_quietly
from llmpy.tokenizer import TokenizerError, gpt2_encoding

PROG = os.path.basename(sys.argv[0])
WARMUP_STEPS = 2  # left out of tokens/s: the GPU's first step compiles the kernels, its second captures the graph


def parse_args(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("-e", "--model", default="gpt2_124M.bin", help="an llm.c model file (fp32 or bf16), or a Hugging Face "
        "GPT-2: gpt2|gpt2-medium|gpt2-large|gpt2-xl (downloaded once) or a folder")
    add("--prompt", default="", help="the text to continue; empty: start from <|endoftext|>")
    add("--max_new_tokens", type=int, default=64, help="tokens generated per sample")
    add("--num_samples", type=int, default=1, help="samples, generated together (one row each)")
    add("--temperature", type=float, default=1.0, help="divides the logits; 0: greedy (the most probable token)")
    add("--top_k", type=int, default=0, help="sample from the k most probable tokens only; 0: all")
    add("--top_p", type=float, default=1.0,
        help="sample from the smallest set of most probable tokens whose probability reaches p; 1: all")
    add("--seed", type=int, default=1337, help="of the sampling's random numbers (llm.c's xorshift)")
    add("--device", default="cuda", choices=("cuda", "cpu"),
        help="cuda: the mainline's kernels with a KV cache; cpu: the NumPy forward")
    add("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="--device cuda: the model's dtype")
    return p.parse_args(argv)


def encode_prompt(encoding, text):
    """The prompt's token ids (<|endoftext|> written in it is that token); an empty prompt is <|endoftext|> alone,
    which is how llm.c starts its samples."""
    return encoding.encode(text, allowed_special="all") or [GPT2_EOT]


def numpy_decoder(config, weights, rows, length):
    """--device cpu: train_gpt2_cpu.py's NumPy GPT-2, a full forward over (rows, length) tokens per new token."""
    from train_gpt2_cpu import GPT2  # NumPy only: the CPU path runs without torch

    model = GPT2(config, weights)
    V, Vp = config.vocab_size, config.padded_vocab_size

    def logits_at(tokens, t):
        model.forward(tokens)
        return model.acts.logits.reshape(rows, length, Vp)[:, t, :V].copy()  # the next forward overwrites them

    return FullForwardDecoder(logits_at, rows, length)


def gpu_decoder(config, weights, rows, length, dtype_name):
    """--device cuda: the mainline's kernels with a KV cache of rows x length positions (llmpy.inference)."""
    import torch

    from llmpy.inference import KVCacheGPT2

    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available (--device cpu runs the NumPy forward)")
    dtype = getattr(torch, dtype_name)
    if dtype == torch.float32:  # fp32 is for checks against the NumPy forward: IEEE matmuls, not TF32
        torch.set_float32_matmul_precision("highest")
    try:
        return KVCacheGPT2(config, weights, rows, length, dtype=dtype, device="cuda")
    except torch.cuda.OutOfMemoryError:
        raise ValueError(f"CUDA out of memory for a KV cache of {rows} samples x {length} positions: use fewer "
                         "--num_samples or --max_new_tokens") from None


def run(args):
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)  # checks the sampling flags
    for flag in ("max_new_tokens", "num_samples"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    config, weights = load_weights(args.model)
    if config.vocab_size != GPT2_VOCAB_SIZE:
        raise ValueError(f"-e {args.model}: a vocabulary of {config.vocab_size} tokens, not GPT-2's "
                         f"{GPT2_VOCAB_SIZE}: sample.py reads and writes text with GPT-2's tokenizer")
    encoding = gpt2_encoding()
    prompt = encode_prompt(encoding, args.prompt)
    length = len(prompt) + args.max_new_tokens
    if length > config.max_seq_len:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens}: with the prompt's {len(prompt)} tokens that is "
                         f"{length}, more than the model's max_seq_len {config.max_seq_len}")
    B, N = args.num_samples, args.max_new_tokens
    if args.device == "cpu":
        decoder, where = numpy_decoder(config, weights, B, length), "cpu (NumPy, fp32, full forward per token)"
    else:
        decoder, where = gpu_decoder(config, weights, B, length, args.dtype), f"cuda ({args.dtype}, KV cache)"
    print(f"model {args.model}: {config.num_layers} layers, {config.num_heads} heads, {config.channels} channels, "
          f"max_seq_len {config.max_seq_len}; {where}")
    print(f"prompt {len(prompt)} tokens; {B} sample(s) x {N} tokens; temperature {args.temperature}, top_k "
          f"{args.top_k}, top_p {args.top_p}, seed {args.seed}")
    result = generate(decoder, prompt, N, sampler)
    shown = prompt if args.prompt else []  # llm.c's samples leave out the <|endoftext|> they start from
    for i, row in enumerate(result.tokens):
        print(f"--- sample {i + 1}/{B} ---")
        print(encoding.decode(shown + row.tolist()))
    print("---")
    timed = result.step_seconds[WARMUP_STEPS:] or result.step_seconds
    step_ms = sum(timed) / len(timed) * 1e3
    print(f"prefill {len(prompt)} tokens: {result.prefill_seconds * 1e3:.1f} ms; generation {B * 1e3 / step_ms:.1f} "
          f"tokens/s ({step_ms:.2f} ms a step of {B} token(s), sampling included"
          + (f"; steps after the first {WARMUP_STEPS}" if len(timed) < N else "") + ")")


def main(argv=None):
    with exit_quietly(PROG):
        args = parse_args(argv)
        try:
            run(args)
        except (FormatError, TokenizerError, ValueError, OSError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
