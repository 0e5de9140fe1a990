"""HellaSwag -> llm.c's eval file, for train_gpt2.py -h 1 and dev/eval/hellaswag.py.

Reads rowanz's HellaSwag .jsonl (the val split: 10,042 examples, one JSON object a line with the context "ctx",
4 "endings" and the right one's index "label"), tokenizes each example as llm.c's dev/data/hellaswag.py does
(the context's GPT-2 tokens; each completion the tokens of " " + ending, the space that joins it to the context)
and writes them as an llm.c eval file (llmpy/formats.py), numbered by their position in the file (llm.c's loader
reads them numbered 0, 1, 2, ...; the records' own "ind" is not used):
    dev/data/hellaswag/hellaswag_val.bin

    python dev/data/hellaswag.py                                       # downloads the val split (online)
    python dev/data/hellaswag.py --input hellaswag_val.jsonl -o /tmp/hellaswag_val.bin   # a local copy, offline
"""

import argparse
import os


from data_common import (TOKENIZER_HELP, DataPrepError, download, gpt2_encoding, progress, read_jsonl_records,
                         run_script)
from llmpy.evals import COMPLETIONS
from llmpy.formats import EvalExample, write_eval_file

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))


def read_hellaswag(path):
    """Each record's (ctx, endings, label), all checked before any is tokenized, so that a bad line fails at once,
    with one line naming it."""
    if not os.path.isfile(path):
        raise DataPrepError(f"{path}: file not found")
    examples = []
    for line_number, record in read_jsonl_records(path):
        where = f"{path}: line {line_number}"
        if not isinstance(record, dict):
            raise DataPrepError(f"{where}: expected a JSON object, got a {type(record).__name__}")
        ctx, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
        if not isinstance(ctx, str) or not ctx:
            raise DataPrepError(f"{where}: expected a non-empty string 'ctx'")
        if not (isinstance(endings, list) and len(endings) == COMPLETIONS and all(isinstance(e, str) for e in endings)):
            raise DataPrepError(f"{where}: expected 'endings' to be a list of {COMPLETIONS} strings")
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataPrepError(f"{where}: expected an integer 'label'")
        if not 0 <= label < COMPLETIONS:
            raise DataPrepError(f"{where}: label {label} out of range [0, {COMPLETIONS})")
        examples.append((ctx, endings, label))
    if not examples:
        raise DataPrepError(f"{path}: holds no examples")
    return examples


def tokenize(examples, encoding):
    """(ctx, endings, label) -> EvalExample, with a progress bar. encode_ordinary: text that spells a special
    token (<|endoftext|>) is tokenized as text (llm.c's tiktoken encode would refuse it)."""
    return [EvalExample(index=position, label=label, context=encoding.encode_ordinary(ctx),
                        completions=[encoding.encode_ordinary(" " + ending) for ending in endings])
            for position, (ctx, endings, label) in enumerate(progress(examples, desc="tokenizing", unit=" examples"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a local HellaSwag .jsonl file (rowanz's format); default: download the val "
                                        "split into the output's folder, unless it is already there")
    parser.add_argument("-o", "--output", default=os.path.join(SCRIPT_DIR, "hellaswag", "hellaswag_val.bin"),
                        help="the eval file to write")
    parser.add_argument("--tokenizer", help=TOKENIZER_HELP)
    args = parser.parse_args()

    encoding = gpt2_encoding(args.tokenizer)  # a missing tokenizer fails now, not after the download
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    jsonl = args.input
    if jsonl is None:
        jsonl = os.path.join(os.path.dirname(os.path.abspath(args.output)), "hellaswag_val.jsonl")
        if not os.path.exists(jsonl):
            download(URL, jsonl, hint="pass --input /path/to/hellaswag_val.jsonl")
    examples = tokenize(read_hellaswag(jsonl), encoding)
    try:
        write_eval_file(args.output, examples)
    except ValueError as e:  # an example too large for the format's uint16 sizes
        raise DataPrepError(str(e)) from None
    print(f"wrote {args.output}: {len(examples):,} examples")


if __name__ == "__main__":
    run_script(main)
