"""The Python source files installed on this machine -> GPT-2 token shards: text that does not repeat, offline.

Tiny Shakespeare's 300K tokens are gone through ~50 times in 1,000 steps of B=16 T=1024, so a loss comparison run on
it measures how fast a model memorises them. Where no download is possible, the .py files of the Python installation
(the standard library and site-packages: some 10^8 tokens where PyTorch is installed) are a corpus that 1,000 such
steps see once. Code, not prose, and it depends on what is installed: the script prints the tokens' fingerprint so
that two runs can tell whether they read the same data. Online, dev/data/fineweb.py is the real thing.

Each file is a document (<|endoftext|> + its tokens); identical files count once; files that are not UTF-8 or over
--max_file_bytes are left out. The documents go in the order of their contents' SHA-256 (a fixed shuffle that
does not depend on where the files are), the first --val_tokens tokens to the validation split, the next up to
--train_tokens to the training split:
    dev/data/python_sources/python_sources_val.bin, python_sources_train.bin

    python dev/data/python_sources.py                       # 262,144 val and 20M train tokens
    python dev/data/python_sources.py --roots /usr/lib/python3.12 --train_tokens 1000000
"""

import argparse
import hashlib
import os
import sysconfig
from contextlib import closing

import numpy as np

from data_common import (TOKENIZER_HELP, DataPrepError, default_processes, positive_int, progress, run_script,
                         tokenize_documents, write_shard)

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))


def source_files(roots, max_bytes):
    """{SHA-256 of the contents: text} of every .py file under roots, UTF-8 and at most max_bytes."""
    texts = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                if not name.endswith(".py") or not os.path.isfile(path) or os.path.getsize(path) > max_bytes:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if text.strip():  # not whitespace only
                    texts[hashlib.sha256(data).hexdigest()] = text
    return texts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    paths = sysconfig.get_paths()
    parser.add_argument("--roots", nargs="+", default=sorted({paths["stdlib"], paths["purelib"], paths["platlib"]}),
                        help="the folders whose .py files make the corpus (default: this Python's standard library "
                             "and site-packages)")
    parser.add_argument("--output_dir", default=os.path.join(SCRIPT_DIR, "python_sources"))
    parser.add_argument("--val_tokens", type=positive_int, default=262144)
    parser.add_argument("-t", "--train_tokens", type=positive_int, default=20_000_000)
    parser.add_argument("--max_file_bytes", type=positive_int, default=1_000_000,
                        help="leave out larger files (generated tables, vendored bundles)")
    parser.add_argument("--tokenizer", help=TOKENIZER_HELP)
    parser.add_argument("--processes", type=positive_int, default=default_processes(),
                        help="tokenizing processes (default: half the CPUs)")
    args = parser.parse_args()

    for root in args.roots:
        if not os.path.isdir(root):
            raise DataPrepError(f"--roots: {root}: not a folder")
    texts = source_files(args.roots, args.max_file_bytes)
    print(f"{len(texts):,} distinct .py files under {', '.join(args.roots)}")
    documents = [texts[digest] for digest in sorted(texts)]
    wanted = args.val_tokens + args.train_tokens
    chunks, count = [], 0
    documents_tokens = tokenize_documents(documents, args.tokenizer, processes=args.processes)
    with closing(documents_tokens), progress(total=wanted, unit=" tokens", desc="tokenizing") as bar:
        for tokens in documents_tokens:  # until there are enough; closing() then ends the tokenizing processes
            chunks.append(tokens)
            count += len(tokens)
            bar.update(len(tokens))
            if count >= wanted:
                break
    tokens = np.concatenate(chunks)[:wanted]
    if len(tokens) <= args.val_tokens:
        raise DataPrepError(f"only {len(tokens):,} tokens under --roots, the val split alone takes {args.val_tokens:,}")
    os.makedirs(args.output_dir, exist_ok=True)
    for split, split_tokens in (("val", tokens[:args.val_tokens]), ("train", tokens[args.val_tokens:])):
        path = os.path.join(args.output_dir, f"python_sources_{split}.bin")
        write_shard(path, split_tokens)
        print(f"wrote {path}: {len(split_tokens):,} tokens")
    print(f"fingerprint (SHA-256 of the tokens): {hashlib.sha256(tokens.astype('<u2').tobytes()).hexdigest()[:16]}")


if __name__ == "__main__":
    run_script(main)
