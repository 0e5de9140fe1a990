"""What the dataset scripts share: downloading, reading local documents, tokenizing, writing token shards.

Every document becomes a delimiter token followed by its tokens, so the model sees where documents start, as in
llm.c's data: GPT-2's <|endoftext|> and uint16 shards, or Llama 3's <|begin_of_text|> and uint32 shards.

The long jobs (downloading, unpacking, tokenizing) show a progress bar on stderr when it is a terminal.
"""

import argparse
import collections
import itertools
import json
import multiprocessing
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for llmpy when run as a script
from llmpy.configs.gpt2 import GPT2_EOT  # noqa: E402
from llmpy.formats import FormatError, write_shard  # noqa: E402
from llmpy.configs.llama3 import BEGIN_OF_TEXT  # noqa: E402
from llmpy.progress import progress  # noqa: E402
from llmpy.signals import ignore_interrupts, run_quietly  # noqa: E402
from llmpy.tokenizer import TokenizerError, gpt2_encoding, llama3_encode, llama3_encoding  # noqa: E402


TOKENIZER_HELP = "GPT-2's BPE ranks file (tiktoken format); default: $LLMPY_TIKTOKEN_FILE, else tiktoken's download"


@dataclass(frozen=True)
class ModelTokens:
    """How a model family's shards are made (llm.c's --model_desc): its tokenizer, the token before every document,
    and the shards' token type."""

    encoding: object  # ranks_file or None -> tiktoken.Encoding
    encode: object  # (encoding, text) -> token ids, special tokens' text as ordinary text
    delimiter: int
    dtype: type


MODEL_TOKENS = {
    "gpt-2": ModelTokens(gpt2_encoding, lambda encoding, text: encoding.encode_ordinary(text), GPT2_EOT, np.uint16),
    "llama-3": ModelTokens(llama3_encoding, llama3_encode, BEGIN_OF_TEXT, np.uint32),
}


class DataPrepError(Exception):
    """A problem the user can fix (missing input, no network, ...). str() is one line."""


def run_script(main):
    """Runs main(); a problem with the inputs ends the script with one line on stderr and exit status 1, Ctrl-C or
    SIGTERM with one line and 130 or 143 (a shard being written is removed: write_shard writes atomically)."""
    run_quietly(main, (DataPrepError, TokenizerError, FormatError, OSError))


def download(url, path, hint):
    """Downloads url to path (via a temporary file, so an interrupted download leaves nothing at path)."""
    print(f"downloading {url} to {path}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f, \
                progress(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                         unit_divisor=1024, desc="downloading") as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        os.replace(tmp, path)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataPrepError(f"could not download {url} ({getattr(e, 'reason', e)}): offline? {hint}") from None


def read_documents(path, field):
    """The `field` strings of the records of a local .jsonl (one JSON object a line) or .json (a list of objects)
    file, as an iterator. The path is checked now, the records as they are read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataPrepError(f"{path}: file not found")
    if path.endswith(".jsonl"):
        return _with_some_text(path, field, _jsonl_documents(path, field))
    if path.endswith(".json"):
        return _with_some_text(path, field, _json_documents(path, field))
    raise DataPrepError(f"{path}: expected a .jsonl or .json file of records with a {field!r} field")


def _with_some_text(path, field, texts):
    """The texts, then an error if not one of them had anything but whitespace: such an input would make shards of
    nothing but <|endoftext|> tokens, or none at all, and the script would seem to have succeeded."""
    count, any_text = 0, False
    for text in texts:
        count += 1
        any_text = any_text or bool(text.strip())
        yield text
    if not any_text:
        what = f"the {field!r} of all {count} records is empty or blank" if count else "it holds no records"
        raise DataPrepError(f"{path}: no text to tokenize: {what}")


def _jsonl_documents(path, field):
    for line_number, record in read_jsonl_records(path):
        yield _document_text(path, f"line {line_number}", record, field)


def read_jsonl_records(path):
    """(line number, parsed JSON value) of each non-blank line of a local .jsonl file, as an iterator; a line
    that is not JSON, or a file that is not UTF-8, is a DataPrepError naming the file (and the line)."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(_utf8_lines(path, f), 1):
            if line.strip():
                yield line_number, _parse_json(path, line, line_number)


def _json_documents(path, field):
    records = _parse_json(path, read_utf8_text(path), None)
    if not isinstance(records, list):
        raise DataPrepError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    for index, record in enumerate(records):
        yield _document_text(path, f"record {index}", record, field)


def read_utf8_text(path):
    with open(path, encoding="utf-8") as f:
        return "".join(_utf8_lines(path, f))


def _utf8_lines(path, file):
    try:
        yield from file
    except UnicodeDecodeError as e:
        raise DataPrepError(f"{path}: not UTF-8 text ({e.reason})") from None


def _parse_json(path, text, line_number):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {line_number}" if line_number else f"line {e.lineno}"
        raise DataPrepError(f"{path}: {where}: invalid JSON ({e.msg})") from None


def _document_text(path, where, record, field):
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise DataPrepError(f"{path}: {where}: expected an object with a string {field!r} field")
    return record[field]


def document_tokens(encoding, text, model_desc="gpt-2"):
    """One document -> its shard tokens: the delimiter, then the text's BPE tokens (special tokens not parsed), as
    uint16 (GPT-2's 50,257 ids) or uint32 (Llama 3's 128,256)."""
    kind = MODEL_TOKENS[model_desc]
    ids = kind.encode(encoding, text)
    tokens = np.empty(len(ids) + 1, dtype=kind.dtype)
    tokens[0] = kind.delimiter
    tokens[1:] = ids
    return tokens


def tokenize_documents(texts, ranks_file=None, processes=1, model_desc="gpt-2"):
    """Yields each text's tokens (delimiter first), in order; with processes > 1 tokenizes in worker processes."""
    # a missing tokenizer fails here, before any document is read
    encoding = MODEL_TOKENS[model_desc].encoding(ranks_file)
    if processes <= 1:
        yield from (document_tokens(encoding, text, model_desc) for text in texts)
    else:
        yield from _tokenize_in_processes(texts, ranks_file, processes, model_desc)


BATCH = 32  # documents a worker process tokenizes per message


def _tokenizing_process(connection, ranks_file, model_desc):
    """A worker: receives batches of texts, sends back their tokens (or the exception), until it receives None."""
    ignore_interrupts()  # only the parent reports Ctrl-C or SIGTERM, and ends the workers
    encoding = MODEL_TOKENS[model_desc].encoding(ranks_file)
    for texts in iter(connection.recv, None):
        try:
            connection.send([document_tokens(encoding, text, model_desc) for text in texts])
        except Exception as e:
            connection.send(e)


def _tokenize_in_processes(texts, ranks_file, processes, model_desc):
    """tokenize_documents over `processes` workers. Each worker has a pipe of its own and one batch at a time; the
    batches go round the workers and their results are read back in the same order, so the tokens come out in the
    documents' order. A worker gets its next batch as soon as its result is read, so it is always idle (reading)
    when sent to: no send waits on a send the other way. None tells a worker to end.

    Not a multiprocessing.Pool: its workers share locks with each other and the pool's threads, and a pool ended
    while its workers are busy (Ctrl-C) can wait forever for a lock a worker holds. Here no lock is shared and the
    workers are simply killed, on an error or a signal."""
    batches = iter(lambda: list(itertools.islice(texts, BATCH)), [])
    workers, pending = [], collections.deque()  # pending: (worker, its pipe) in the order their results are due
    try:
        for _ in range(processes):
            ours, theirs = multiprocessing.Pipe()
            worker = multiprocessing.Process(target=_tokenizing_process, args=(theirs, ranks_file, model_desc),
                                             daemon=True)
            worker.start()
            theirs.close()
            workers.append((worker, ours))
        for worker, pipe in workers:
            batch = next(batches, None)
            if batch is not None:
                pipe.send(batch)
                pending.append((worker, pipe))
        while pending:
            worker, pipe = pending.popleft()
            try:
                tokens = pipe.recv()
            except EOFError:
                raise DataPrepError(f"a tokenizing process ended unexpectedly (exit code {worker.exitcode})") from None
            if isinstance(tokens, Exception):
                raise tokens
            batch = next(batches, None)
            if batch is not None:
                pipe.send(batch)
                pending.append((worker, pipe))
            yield from tokens
    finally:
        for worker, pipe in workers:
            if pending:  # ended early (an error, a signal): a worker may be busy
                worker.kill()
            else:  # all idle
                pipe.send(None)
        for worker, pipe in workers:
            worker.join()
            pipe.close()


def check_no_old_shards(output_dir, name):
    """Refuses to write next to shards of an earlier run: a smaller rerun would leave stale train shards behind
    for the training glob to pick up."""
    old = sorted(Path(output_dir).glob(f"{name}_*_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
    if old:
        raise DataPrepError(f"{output_dir} already has {len(old)} {name} shards ({old[0].name}, ...): "
                            f"remove them or pass another --output_dir")


def _fill_shards(doc_tokens, shard_size):
    """Packs the documents' tokens into shards of exactly shard_size tokens (a document may span two or more),
    the last one shorter. Yields one reused buffer: use each shard before asking for the next."""
    buffer = np.empty(shard_size, dtype=np.uint16)
    fill = 0
    for tokens in doc_tokens:
        while len(tokens):
            take = min(len(tokens), shard_size - fill)
            buffer[fill: fill + take] = tokens[:take]
            fill += take
            tokens = tokens[take:]
            if fill == shard_size:
                yield buffer
                fill = 0
    if fill:
        yield buffer[:fill]


def write_shards(doc_tokens, output_dir, name, shard_size, documents=None):
    """Writes the documents' tokens as uint16 shards {name}_val_000000.bin, {name}_train_000001.bin, ...:
    the first shard is the validation split, the rest train. documents: how many there are, if known, for the
    progress bar's end and time left. Returns [(path, number of tokens)]."""
    os.makedirs(output_dir, exist_ok=True)
    check_no_old_shards(output_dir, name)
    written = []
    with progress(doc_tokens, total=documents, unit=" documents", desc="tokenizing") as bar:
        for index, shard in enumerate(_fill_shards(bar, shard_size)):
            split = "val" if index == 0 else "train"
            path = os.path.join(output_dir, f"{name}_{split}_{index:06d}.bin")
            write_shard(path, shard)
            bar.write(f"wrote {path}: {len(shard):,} tokens", file=sys.stdout)  # above the bar, not through it
            written.append((path, len(shard)))
    if len(written) < 2:
        print(f"warning: all {sum(n for _, n in written):,} tokens went to the val shard and there is no train "
              f"shard: use a smaller --shard_size", file=sys.stderr)
    return written


def positive_int(text):
    """argparse type for sizes and counts."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def default_processes():
    return max(1, (os.cpu_count() or 2) // 2)
