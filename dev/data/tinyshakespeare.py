"""Tiny Shakespeare -> GPT-2 token shards, llm.c's split.

The text's blank-line-separated sections are the documents: each gets an <|endoftext|> before it and keeps its
trailing "\\n\\n" (the last section has none). The first 32,768 tokens are the validation split, the remaining
305,260 the training split:
    dev/data/tinyshakespeare/tiny_shakespeare_val.bin, tiny_shakespeare_train.bin

    python dev/data/tinyshakespeare.py                          # downloads the text (online)
    LLMPY_TINYSHAKESPEARE_FILE=input.txt python dev/data/tinyshakespeare.py   # or a local copy, offline
    python dev/data/tinyshakespeare.py --input /path/to/input.txt --tokenizer /path/to/gpt2.tiktoken
"""

import argparse
import os

import numpy as np

from data_common import (TOKENIZER_HELP, DataPrepError, download, gpt2_encoding, progress, read_utf8_text,
                         run_script, tokenize_documents, write_shard)

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
VAL_TOKENS = 32768
SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=os.environ.get("LLMPY_TINYSHAKESPEARE_FILE"),
                        help="the tiny Shakespeare text (default: $LLMPY_TINYSHAKESPEARE_FILE, else download it into "
                             "--output_dir)")
    parser.add_argument("--output_dir", default=os.path.join(SCRIPT_DIR, "tinyshakespeare"))
    parser.add_argument("--tokenizer", help=TOKENIZER_HELP)
    args = parser.parse_args()

    gpt2_encoding(args.tokenizer)  # a missing tokenizer fails now, not after the download
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
    with progress(tokenize_documents(documents, args.tokenizer), total=len(documents), unit=" documents",
                  desc="tokenizing") as bar:
        tokens = np.concatenate(list(bar))
    if len(tokens) <= VAL_TOKENS:
        raise DataPrepError(f"{text_path}: only {len(tokens)} tokens, the val split alone takes {VAL_TOKENS}")

    os.makedirs(args.output_dir, exist_ok=True)
    for split, split_tokens in (("val", tokens[:VAL_TOKENS]), ("train", tokens[VAL_TOKENS:])):
        path = os.path.join(args.output_dir, f"tiny_shakespeare_{split}.bin")
        write_shard(path, split_tokens)
        print(f"wrote {path}: {len(split_tokens):,} tokens")


if __name__ == "__main__":
    run_script(main)
