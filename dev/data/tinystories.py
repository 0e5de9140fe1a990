"""TinyStories -> GPT-2 token shards.

Online, downloads the dataset's tarball of 50 JSON files (lists of records whose "story" is the text), as llm.c
does; offline, reads a local sample (--input: a .json list of records or a .jsonl file, with a "story" field).
Each story, stripped of surrounding whitespace, becomes <|endoftext|> + its tokens; the tokens are packed into
uint16 shards of --shard_size tokens, the first one the validation split:
    dev/data/tinystories/TinyStories_val_000000.bin, TinyStories_train_000001.bin, ...
The default shard size of 20M tokens makes the val split about the size of llm.c's (its first JSON file, ~19M).

    python dev/data/tinystories.py
    python dev/data/tinystories.py --input sample.jsonl --shard_size 100000 --output_dir /tmp/tinystories
"""

import argparse
import glob
import itertools
import os
import shutil
import tarfile

from data_common import (TOKENIZER_HELP, DataPrepError, check_no_old_shards, default_processes, download,
                         gpt2_encoding, positive_int, progress, read_documents, run_script, tokenize_documents,
                         write_shards)

URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))


def downloaded_json_files(output_dir):
    """The dataset's JSON files, downloading and unpacking the tarball into output_dir unless already there."""
    unpacked = os.path.join(output_dir, "TinyStories_all_data")
    json_files = sorted(glob.glob(os.path.join(unpacked, "*.json")))
    if json_files:
        return json_files
    tarball = os.path.join(output_dir, "TinyStories_all_data.tar.gz")
    if not os.path.exists(tarball):
        download(URL, tarball, hint="pass --input /path/to/stories.jsonl")
    print(f"unpacking {tarball}")
    partial = f"{unpacked}.part"  # renamed when complete, so an interrupted unpacking is not mistaken for data
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tarfile.open(tarball) as tar, progress(tar, unit=" files", desc="unpacking") as members:
            tar.extractall(partial, members=members, filter="data")
    except tarfile.TarError as e:
        raise DataPrepError(f"{tarball}: cannot unpack ({e}): delete it to download it again") from None
    shutil.rmtree(unpacked, ignore_errors=True)
    os.replace(partial, unpacked)
    return sorted(glob.glob(os.path.join(unpacked, "*.json")))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="local .json/.jsonl file of records with a 'story' field; "
                                        "default: download the dataset")
    parser.add_argument("--output_dir", default=os.path.join(SCRIPT_DIR, "tinystories"))
    parser.add_argument("-s", "--shard_size", type=positive_int, default=20_000_000, help="tokens per shard")
    parser.add_argument("--tokenizer", help=TOKENIZER_HELP)
    parser.add_argument("--processes", type=positive_int, default=default_processes(), help="tokenizing processes")
    args = parser.parse_args()

    # fail now, not after the download: a missing tokenizer, or shards of an earlier run in the way
    gpt2_encoding(args.tokenizer)
    check_no_old_shards(args.output_dir, "TinyStories")
    json_files = [args.input] if args.input else downloaded_json_files(args.output_dir)
    stories = itertools.chain.from_iterable([read_documents(path, "story") for path in json_files])
    texts = (story.strip() for story in stories)
    doc_tokens = tokenize_documents(texts, args.tokenizer, args.processes)
    write_shards(doc_tokens, args.output_dir, "TinyStories", args.shard_size)


if __name__ == "__main__":
    run_script(main)
