"""GPT-2's and Llama 3's tokenizers: BPE encoding through tiktoken, and decoding from llm.c's tokenizer file.

Encoding (the data scripts, the PyTorch references) needs tiktoken; it is imported inside the encoding functions
only, so the NumPy-only CPU trainer can import this module and decode its samples with `Tokenizer` alone.

Both take their BPE ranks from a local file in tiktoken's format (one "base64(token) rank" per line):
- GPT-2's (identical to tiktoken's r50k_base): pass it, or set LLMPY_TIKTOKEN_FILE; online, tiktoken downloads it.
- Llama 3's (Meta's tokenizer.model): pass it, or set LLMPY_LLAMA3_TOKENIZER_FILE; else the copy Meta's
  `llama-models` package ships (pip install llama-models), found through importlib.resources.
"""

import base64
import binascii
import importlib.resources
import os
import re

from .configs.gpt2 import GPT2_EOT, GPT2_VOCAB_SIZE
from .formats import read_tokenizer
from .configs.llama3 import BEGIN_OF_TEXT, LLAMA3_VOCAB_SIZE

TIKTOKEN_FILE_ENV = "LLMPY_TIKTOKEN_FILE"
LLAMA3_TOKENIZER_FILE_ENV = "LLMPY_LLAMA3_TOKENIZER_FILE"
GPT2_EOT_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, punctuation runs (each with one optional leading
# space), then whitespace. A run of spaces before a word leaves its last space to the word. This is the regex of
# GPT-2's encoder.py with tiktoken's possessive quantifiers (same splits, no backtracking on long runs).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerError(Exception):
    """The BPE ranks cannot be had: a missing or malformed ranks file, or no network. str() is one line."""


def gpt2_encoding(ranks_file=None):
    """GPT-2's BPE as a tiktoken.Encoding: 50,256 ranked byte sequences plus <|endoftext|> = 50256.

    The ranks come from ranks_file, else from the file named by $LLMPY_TIKTOKEN_FILE, else from tiktoken's own
    "gpt2" encoding (downloaded and cached by tiktoken).
    """
    import tiktoken

    ranks_file = ranks_file or os.environ.get(TIKTOKEN_FILE_ENV)
    if not ranks_file:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise TokenizerError(f"could not get GPT-2's BPE ranks from tiktoken ({type(e).__name__}): offline? "
                                 f"set {TIKTOKEN_FILE_ENV} or pass --tokenizer /path/to/gpt2.tiktoken") from None
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=load_ranks(ranks_file, "GPT-2 BPE ranks file", "GPT-2's BPE", GPT2_EOT),
        special_tokens={GPT2_EOT_TEXT: GPT2_EOT},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def load_ranks(path, what, whose, count):
    """A tiktoken ranks file -> {token bytes: rank}, which must be ranks 0..count-1; TokenizerError naming the file
    otherwise. Read directly, not through tiktoken's loader, which keeps a copy of a local file in a cache keyed by
    its path and would go on serving that copy after the file changed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: {what} not found")
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                if line.strip():
                    raise TokenizerError(f"{path}: not a tiktoken BPE ranks file (lines of 'base64-token rank')") \
                        from None
    if len(ranks) != count or sorted(ranks.values()) != list(range(count)):
        raise TokenizerError(f"{path}: has {len(ranks)} ranks, {whose} has ranks 0..{count - 1}")
    return ranks


# Llama 3's pre-tokenizer (Meta's, also OpenAI's cl100k_base): 's 't 're 've 'm 'll 'd in either case; a letter run
# with at most one other character before it (not a digit or newline: the space of " word", the quote of "'word");
# digit runs of 1 to 3; a punctuation run with an optional leading space and the newlines after it; newlines with
# the whitespace before them; whitespace not followed by a non-space (a run before a word leaves it its last space);
# any other whitespace.
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_BPE_TOKENS = 128000  # the special tokens follow, from id 128000 on
# llm.c's tokenizer file has one slot for a special token, [3], GPT-2's <|endoftext|>: the token its data puts before
# every document and its samplers start from. In Llama 3's data that token is <|begin_of_text|>.
LLAMA3_TOKENIZER_FILE_EOT = BEGIN_OF_TEXT
# Meta's special tokens by their names, in id order (llama_models/llama3/tokenizer.py); the rest of the 256 are
# reserved, named <|reserved_special_token_N|> with N counting on from 2
_LLAMA3_NAMED_SPECIALS = ("begin_of_text", "end_of_text", "reserved_special_token_0", "reserved_special_token_1",
                          "finetune_right_pad_id", "step_id", "start_header_id", "end_header_id", "eom_id", "eot_id",
                          "python_tag", "image")
# Meta's Tokenizer.encode cuts its input before tiktoken sees it: into pieces of 400,000 characters, and those again
# at every 25,000th character of a run of whitespace or of non-whitespace, as tiktoken's regex engine overflows its
# stack on long runs (tiktoken 0.14 panics on 1,000,000 spaces). A cut can change the tokens around it, so encoding
# as Meta does means cutting where it cuts.
LLAMA3_MAX_PIECE = 400_000
LLAMA3_MAX_RUN = 25_000
_RUNS = re.compile(r"\s+|\S+")  # Python's \s is str.isspace(), Meta's test for whitespace


def llama3_special_tokens():
    """Llama 3's 256 special tokens, text -> id: <|begin_of_text|> 128000, <|end_of_text|> 128001, ..."""
    names = list(_LLAMA3_NAMED_SPECIALS)
    names += [f"reserved_special_token_{n}" for n in range(2, 2 + LLAMA3_VOCAB_SIZE - LLAMA3_BPE_TOKENS - len(names))]
    return {f"<|{name}|>": LLAMA3_BPE_TOKENS + i for i, name in enumerate(names)}


def llama3_encoding(ranks_file=None):
    """Llama 3's BPE as a tiktoken.Encoding: 128,000 ranked byte sequences plus the 256 special tokens.

    The ranks come from ranks_file, else from the file named by $LLMPY_LLAMA3_TOKENIZER_FILE, else from the
    tokenizer.model of the installed `llama-models` package. Encode documents with llama3_encode, which cuts long
    texts as Meta's tokenizer does.
    """
    import tiktoken

    ranks_file = ranks_file or os.environ.get(LLAMA3_TOKENIZER_FILE_ENV) or packaged_llama3_ranks()
    if not ranks_file:
        raise TokenizerError(f"no Llama 3 tokenizer: pip install llama-models (it ships llama_models/llama3/"
                             f"tokenizer.model), or set {LLAMA3_TOKENIZER_FILE_ENV} or pass --tokenizer "
                             f"/path/to/tokenizer.model")
    return tiktoken.Encoding(
        name="llama3",
        pat_str=LLAMA3_SPLIT_PATTERN,
        mergeable_ranks=load_ranks(ranks_file, "Llama 3 tokenizer file", "Llama 3's BPE", LLAMA3_BPE_TOKENS),
        special_tokens=llama3_special_tokens(),
        explicit_n_vocab=LLAMA3_VOCAB_SIZE,
    )


def packaged_llama3_ranks():
    """The path of llama_models/llama3/tokenizer.model if the llama-models package is installed, else None."""
    try:
        path = importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"
    except ModuleNotFoundError:
        return None
    return str(path) if path.is_file() else None


def llama3_encode(encoding, text):
    """A document's token ids as Meta's Tokenizer.encode(text, bos=False, eos=False) gives them: special tokens'
    text is encoded as ordinary text, and long texts are cut where Meta cuts them."""
    ids = []
    for start in range(0, len(text), LLAMA3_MAX_PIECE):
        piece = text[start: start + LLAMA3_MAX_PIECE]
        cuts = [0]
        for run in _RUNS.finditer(piece):
            cuts.extend(range(run.start() + LLAMA3_MAX_RUN, run.end(), LLAMA3_MAX_RUN))
        cuts.append(len(piece))
        for a, b in zip(cuts, cuts[1:]):
            ids.extend(encoding.encode_ordinary(piece[a:b]))
    return ids


def token_bytes(encoding):
    """Every token's bytes, in id order (GPT-2's 50,257, Llama 3's 128,256): the contents of llm.c's tokenizer file.
    A special token's bytes are its text."""
    return [encoding.decode_single_token_bytes(i) for i in range(encoding.n_vocab)]


class Tokenizer:
    """Decodes token ids with llm.c's tokenizer file (gpt2_tokenizer.bin, llama3_tokenizer.bin). NumPy/pure Python:
    no tiktoken."""

    def __init__(self, path):
        self.token_bytes, self.eot = read_tokenizer(path)
        self.vocab_size = len(self.token_bytes)

    def decode(self, ids):
        """Token ids -> text. A multi-byte character split across tokens decodes only when all its bytes are
        present; incomplete or invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range for a tokenizer of {self.vocab_size} tokens")
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")
