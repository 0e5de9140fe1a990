"""An llm.c model file, GPT-2 or Llama 3 -> a Hugging Face folder that transformers and lm-eval-harness load.

    python dev/eval/export_hf.py -i log124M/model_00020000.bin -o gpt2_124M_hf              # bf16 weights
    python dev/eval/export_hf.py -i gpt2_124M.bin -o gpt2_124M_hf --dtype float32 --check 0
    python dev/eval/export_hf.py -i llama3.2_1B.bin -o llama3.2_1B_hf                        # a Llama 3 model file

The family is the file's magic (20240326 GPT-2, 20240803 Llama 3). Writes model.safetensors (the weights, in
--dtype), config.json and the tokenizer's files, made from the tiktoken BPE ranks we encode with: GPT-2's vocab.json
and merges.txt ($LLMPY_TIKTOKEN_FILE or --tokenizer offline), or Llama 3's tokenizer.json (Meta's ranks: --tokenizer,
$LLMPY_LLAMA3_TOKENIZER_FILE or the llama-models package), and for Llama generation_config.json. Then, with
--check 1, loads the folder with transformers' AutoModelForCausalLM and AutoTokenizer and compares its logits on a
sentence with this repo's forward of the same weights (GPT-2: the NumPy trainer's, train_gpt2_cpu.py; Llama 3: the
PyTorch reference's in fp32, train_llama3_torch.py), and greedily continues the sentence.
Upload with `huggingface-cli upload USER/NAME DIR`; evaluate with lm-eval-harness (README, "Hugging Face").
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from llmpy import families, formats, hf  # noqa: E402
from llmpy.configs.gpt2 import GPT2_EOT  # noqa: E402
from llmpy.configs.llama3 import BEGIN_OF_TEXT, END_OF_TEXT, Llama3Config  # noqa: E402
from llmpy.signals import run_quietly  # noqa: E402
from llmpy.tokenizer import TokenizerError, gpt2_encoding, llama3_encode, llama3_encoding  # noqa: E402

CHECK_TEXT = "During photosynthesis in green plants, light energy is captured and used to"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="an llm.c model file, GPT-2 or Llama 3 (fp32 or bf16): -e's "
                                                        "files, checkpoints' model_NNNNNNNN.bin, --write_model's")
    p.add_argument("-o", "--output", required=True, help="the Hugging Face folder to write (made if missing)")
    p.add_argument("-d", "--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="the weights' dtype")
    p.add_argument("--check", type=int, default=1, choices=(0, 1),
                   help="load the folder with transformers, compare its logits with ours and generate a few tokens")
    p.add_argument("--tokenizer", help="the BPE ranks file (tiktoken format) of the model's family: GPT-2's (default "
                                       "$LLMPY_TIKTOKEN_FILE, else tiktoken's download) or Llama 3's tokenizer.model "
                                       "(default $LLMPY_LLAMA3_TOKENIZER_FILE, else the llama-models package's)")
    return p.parse_args(argv)


def gpt2_logits(config, flat, ids):
    """The NumPy trainer's logits (T, V) for one sequence of token ids."""
    from train_gpt2_cpu import GPT2

    model = GPT2(config, flat)
    model.forward(np.array([ids]))
    return model.acts.logits[:, :config.vocab_size]


def llama3_logits(config, flat, ids):
    """The Llama 3 PyTorch reference's logits (T, V), fp32, for one sequence of token ids."""
    import torch
    from train_llama3_torch import model_from_flat

    x = torch.tensor([ids])
    with torch.no_grad():  # given targets (any), the forward returns every position's logits, not only the last's
        return model_from_flat(config, flat)(x, x)[0][0].numpy()


@dataclass(frozen=True)
class Family:
    """What the export needs to know of a model family."""

    name: str
    encoding: object  # the ranks file or None -> its tiktoken encoding (TokenizerError)
    hf_ids: object  # (encoding, text) -> the ids the exported tokenizer must give the text
    logits: object  # (config, flat, ids) -> our forward's logits (T, V)
    forward: str  # that forward, in words
    end_token: int  # what generation pads with


GPT2 = Family("GPT-2", gpt2_encoding, lambda encoding, text: encoding.encode(text), gpt2_logits, "NumPy forward",
              GPT2_EOT)
# Llama 3's tokenizer puts <|begin_of_text|> before a text, as Meta's does; our data has it before every document
LLAMA3 = Family("Llama 3", llama3_encoding,
                lambda encoding, text: [BEGIN_OF_TEXT, *llama3_encode(encoding, text)], llama3_logits,
                "PyTorch reference, fp32", END_OF_TEXT)


def check_export(folder, config, flat, encoding, dtype, family):
    """transformers' logits for CHECK_TEXT (the folder's weights upcast to fp32) against our forward's of the same
    weights; prints the difference and a greedy continuation."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ValueError(f"--check 1 needs torch and transformers ({hf.INSTALL_HINT}), or pass --check 0") from None

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer.encode(CHECK_TEXT)
    if ids != family.hf_ids(encoding, CHECK_TEXT):
        raise ValueError(f"{folder}: the exported tokenizer encodes {CHECK_TEXT!r} differently from tiktoken")
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
        continuation = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                      pad_token_id=family.end_token)[0, len(ids):]
    if dtype == "bfloat16":  # the folder holds the weights rounded to bf16; transformers upcasts them exactly
        flat = formats.bfloat16_bits_to_float32(formats.float32_to_bfloat16_bits(flat))
    ours = family.logits(config, flat, ids)
    diff = np.abs(theirs - ours).max() / np.abs(ours).max()
    # the same weights in fp32 both sides, summed in other orders (BLAS vs torch): ~1e-7 relative, allowed 1e-5
    tolerance = 1e-5
    print(f"transformers' logits vs ours ({family.forward}, the folder's weights): max |diff| / max |logit| = "
          f"{diff:.1e} (allowed {tolerance:g})")
    print(f"greedy continuation: {CHECK_TEXT}|{tokenizer.decode(continuation)}")
    if not diff <= tolerance:
        raise ValueError(f"{folder}: transformers' logits differ from ours by {diff:.1e} (more than {tolerance:g})")


def export(args):
    start = time.time()
    config, flat = families.of_file(args.input).read_model(args.input)
    family = LLAMA3 if isinstance(config, Llama3Config) else GPT2
    encoding = family.encoding(args.tokenizer)
    if config.vocab_size != encoding.n_vocab:
        raise ValueError(f"{args.input}: vocab of {config.vocab_size} tokens, {family.name}'s tokenizer has "
                         f"{encoding.n_vocab}")
    formats.check_output_folder("-o/--output", args.output)
    hf.write_hf_folder(args.output, config, flat, args.dtype, encoding)
    print(f"wrote {args.output}: a {family.name} model, model.safetensors ({args.dtype}), config.json, tokenizer "
          f"files ({time.time() - start:.1f} s)")
    if args.check:
        check_export(args.output, config, flat, encoding, args.dtype, family)


if __name__ == "__main__":
    arguments = parse_args()
    run_quietly(lambda: export(arguments), (formats.FormatError, TokenizerError, ValueError, OSError))
