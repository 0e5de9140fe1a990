"""FineWeb or FineWeb-Edu -> GPT-2 token shards.

Online, loads a sample of the dataset from Hugging Face with the `datasets` package (sample-10BT or sample-100BT);
offline, reads a local sample (--input: a .jsonl file, or a .json list, of records with a "text" field).
Each document becomes <|endoftext|> + its tokens; the tokens are packed into uint16 shards of --shard_size
tokens (100M by default), the first one the validation split, named like llm.c's:
    dev/data/fineweb10B/fineweb_val_000000.bin, fineweb_train_000001.bin, ...
    dev/data/edu_fineweb10B/edu_fineweb_val_000000.bin, ...

    python dev/data/fineweb.py --type edu --version 10B
    python dev/data/fineweb.py --input sample.jsonl --shard_size 1000000 --output_dir /tmp/fineweb
"""

import argparse
import os

from data_common import (TOKENIZER_HELP, DataPrepError, check_no_old_shards, default_processes, gpt2_encoding,
                         positive_int, read_documents, run_script, tokenize_documents, write_shards)

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
DATASETS = {"classic": ("HuggingFaceFW/fineweb", "fineweb"), "edu": ("HuggingFaceFW/fineweb-edu", "edu_fineweb")}


def download_texts(repo, sample):
    """The documents' texts of one sample of a Hugging Face dataset (downloaded and cached by `datasets`), and how
    many there are."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataPrepError("downloading FineWeb needs the datasets package: pip install datasets "
                            "(or pass --input /path/to/sample.jsonl)") from None
    try:
        dataset = load_dataset(repo, name=sample, split="train")
    except Exception as e:  # datasets raises many kinds when offline
        raise DataPrepError(f"could not load {repo} {sample} ({type(e).__name__}): offline? "
                            f"pass --input /path/to/sample.jsonl") from None
    return (record["text"] for record in dataset), len(dataset)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-t", "--type", choices=DATASETS, default="classic",
                        help="FineWeb (classic) or FineWeb-Edu (edu)")
    parser.add_argument("-v", "--version", choices=("10B", "100B"), default="10B", help="sample size in tokens")
    parser.add_argument("--input", help="local .jsonl/.json file of records with a 'text' field; "
                                        "default: download the sample")
    parser.add_argument("--output_dir", help="default: dev/data/fineweb10B, edu_fineweb100B, ...")
    parser.add_argument("-s", "--shard_size", type=positive_int, default=10**8, help="tokens per shard")
    parser.add_argument("--tokenizer", help=TOKENIZER_HELP)
    parser.add_argument("--processes", type=positive_int, default=default_processes(), help="tokenizing processes")
    args = parser.parse_args()

    repo, name = DATASETS[args.type]
    output_dir = args.output_dir or os.path.join(SCRIPT_DIR, f"{name}{args.version}")
    # fail now, not after the download: a missing tokenizer, or shards of an earlier run in the way
    gpt2_encoding(args.tokenizer)
    check_no_old_shards(output_dir, name)
    if args.input:
        texts, count = read_documents(args.input, "text"), None  # unknown until read: the bar shows no end
    else:
        texts, count = download_texts(repo, f"sample-{args.version}T")
    write_shards(tokenize_documents(texts, args.tokenizer, args.processes), output_dir, name, args.shard_size, count)


if __name__ == "__main__":
    run_script(main)
