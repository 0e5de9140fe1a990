"""Tiny Shakespeare -> GPT-2 or Llama 3 token shards, llm.c's split.

The text's blank-line-separated sections are the documents: each gets a delimiter before it (GPT-2's <|endoftext|>,
Llama 3's <|begin_of_text|>) and keeps its trailing "\\n\\n" (the last section has none). The first 32,768 tokens
are the validation split, the rest the training split: 305,260 GPT-2 tokens (uint16) in
    dev/data/tinyshakespeare/tiny_shakespeare_val.bin, tiny_shakespeare_train.bin
or 276,224 Llama 3 tokens (uint32) in
    dev/data/tinyshakespeare/tiny_shakespeare_llama3_val.bin, tiny_shakespeare_llama3_train.bin

    python dev/data/tinyshakespeare.py                          # downloads the text (online)
    LLMPY_TINYSHAKESPEARE_FILE=input.txt python dev/data/tinyshakespeare.py   # or a local copy, offline
    python dev/data/tinyshakespeare.py --input /path/to/input.txt --tokenizer /path/to/gpt2.tiktoken
    python dev/data/tinyshakespeare.py -m llama-3               # Llama 3's tokenizer (pip install llama-models)
"""

import argparse
import os

import numpy as np

from data_common import (MODEL_TOKENS, DataPrepError, download, progress, read_utf8_text, run_script,
                         tokenize_documents, write_shard)

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
VAL_TOKENS = 32768
SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=os.environ.get("LLMPY_TINYSHAKESPEARE_FILE"),
                        help="the tiny Shakespeare text (default: $LLMPY_TINYSHAKESPEARE_FILE, else download it into "
                             "--output_dir)")
    parser.add_argument("--output_dir", default=os.path.join(SCRIPT_DIR, "tinyshakespeare"))
    parser.add_argument("-m", "--model_desc", default="gpt-2", choices=tuple(MODEL_TOKENS),
                        help="whose tokenizer and shard format, as llm.c's flag (default: gpt-2)")
    parser.add_argument("--tokenizer", help="the BPE ranks file (tiktoken format): GPT-2's (default: "
                                            "$LLMPY_TIKTOKEN_FILE, else tiktoken's download) or Llama 3's "
                                            "tokenizer.model (default: $LLMPY_LLAMA3_TOKENIZER_FILE, else the "
                                            "llama-models package's)")
    args = parser.parse_args()

    MODEL_TOKENS[args.model_desc].encoding(args.tokenizer)  # a missing tokenizer fails now, not after the download
    text_path = args.input
    if text_path is None:
        text_path = os.path.join(args.output_dir, "input.txt")
        if not os.path.exists(text_path):
            download(URL, text_path, hint="pass --input /path/to/input.txt")
    if not os.path.isfile(text_path):
        raise DataPrepError(f"{text_path}: file not found")
    text = read_utf8_text(text_path)
    print(f"tokenizing {text_path}: {len(text):,} characters")

    sections = text.split("\n\n")
    documents = [s + "\n\n" if i < len(sections) - 1 else s for i, s in enumerate(sections)]
    with progress(tokenize_documents(documents, args.tokenizer, model_desc=args.model_desc), total=len(documents),
                  unit=" documents", desc="tokenizing") as bar:
        tokens = np.concatenate(list(bar))
    if len(tokens) <= VAL_TOKENS:
        raise DataPrepError(f"{text_path}: only {len(tokens)} tokens, the val split alone takes {VAL_TOKENS}")

    os.makedirs(args.output_dir, exist_ok=True)
    stem = "tiny_shakespeare_llama3" if args.model_desc == "llama-3" else "tiny_shakespeare"
    for split, split_tokens in (("val", tokens[:VAL_TOKENS]), ("train", tokens[VAL_TOKENS:])):
        path = os.path.join(args.output_dir, f"{stem}_{split}.bin")
        write_shard(path, split_tokens, dtype=split_tokens.dtype)
        print(f"wrote {path}: {len(split_tokens):,} tokens")


if __name__ == "__main__":
    run_script(main)
