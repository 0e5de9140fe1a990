"""An llm.c model file -> a Hugging Face GPT-2 folder that transformers and lm-eval-harness load.

    python dev/eval/export_hf.py -i log124M/model_00020000.bin -o gpt2_124M_hf              # bf16 weights
    python dev/eval/export_hf.py -i gpt2_124M.bin -o gpt2_124M_hf --dtype float32 --check 0

Writes model.safetensors (the weights, in --dtype), config.json and GPT-2's tokenizer files (vocab.json, merges.txt,
made from the tiktoken BPE ranks we encode with: $LLMPY_TIKTOKEN_FILE or --tokenizer offline). Then, with --check 1,
loads the folder with transformers' AutoModelForCausalLM and AutoTokenizer and compares its logits on a sentence
with this repo's NumPy forward (train_gpt2_cpu.py) of the same weights, and greedily continues the sentence.
Upload with `huggingface-cli upload USER/NAME DIR`; evaluate with lm-eval-harness (README, "Hugging Face").
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from llmpy import formats, hf  # noqa: E402
from llmpy.signals import run_quietly  # noqa: E402
from llmpy.tokenizer import TokenizerError, gpt2_encoding  # noqa: E402

CHECK_TEXT = "During photosynthesis in green plants, light energy is captured and used to"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="an llm.c model file (fp32 or bf16): -e's files, checkpoints' "
                                                        "model_NNNNNNNN.bin, --write_model's")
    p.add_argument("-o", "--output", required=True, help="the Hugging Face folder to write (made if missing)")
    p.add_argument("-d", "--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="the weights' dtype")
    p.add_argument("--check", type=int, default=1, choices=(0, 1),
                   help="load the folder with transformers, compare its logits with ours and generate a few tokens")
    p.add_argument("--tokenizer", help="GPT-2 BPE ranks file (tiktoken format); default $LLMPY_TIKTOKEN_FILE, else "
                                       "tiktoken's download")
    return p.parse_args(argv)


def check_export(folder, config, flat, encoding, dtype):
    """transformers' logits for CHECK_TEXT (the folder's weights upcast to fp32) against our NumPy forward's of the
    same weights; prints the difference and a greedy continuation."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ValueError(f"--check 1 needs torch and transformers ({hf.INSTALL_HINT}), or pass --check 0") from None
    from train_gpt2_cpu import GPT2

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer.encode(CHECK_TEXT)
    if ids != encoding.encode(CHECK_TEXT):
        raise ValueError(f"{folder}: the exported tokenizer encodes {CHECK_TEXT!r} differently from tiktoken")
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
        continuation = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                      pad_token_id=encoding.eot_token)[0, len(ids):]
    if dtype == "bfloat16":  # the folder holds the weights rounded to bf16; transformers upcasts them exactly
        flat = formats.bfloat16_bits_to_float32(formats.float32_to_bfloat16_bits(flat))
    ours_model = GPT2(config, flat)
    ours_model.forward(np.array([ids]))
    ours = ours_model.acts.logits[:, :config.vocab_size]
    diff = np.abs(theirs - ours).max() / np.abs(ours).max()
    # the same weights in fp32 both sides, summed in other orders (BLAS vs torch): ~1e-7 relative, allowed 1e-5
    tolerance = 1e-5
    print(f"transformers' logits vs ours (NumPy forward, the folder's weights): max |diff| / max |logit| = {diff:.1e} "
          f"(allowed {tolerance:g})")
    print(f"greedy continuation: {CHECK_TEXT}|{tokenizer.decode(continuation)}")
    if not diff <= tolerance:
        raise ValueError(f"{folder}: transformers' logits differ from ours by {diff:.1e} (more than {tolerance:g})")


def export(args):
    start = time.time()
    config, flat = formats.read_model(args.input)
    encoding = gpt2_encoding(args.tokenizer)
    if config.vocab_size != encoding.n_vocab:
        raise ValueError(f"{args.input}: vocab of {config.vocab_size} tokens, GPT-2's tokenizer has {encoding.n_vocab}")
    formats.check_output_folder("-o/--output", args.output)
    hf.write_hf_folder(args.output, config, flat, args.dtype, encoding)
    print(f"wrote {args.output}: model.safetensors ({args.dtype}), config.json, tokenizer files "
          f"({time.time() - start:.1f} s)")
    if args.check:
        check_export(args.output, config, flat, encoding, args.dtype)


if __name__ == "__main__":
    arguments = parse_args()
    run_quietly(lambda: export(arguments), (formats.FormatError, TokenizerError, ValueError, OSError))
