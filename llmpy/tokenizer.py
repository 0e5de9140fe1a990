"""GPT-2's tokenizer: BPE encoding through tiktoken, and decoding from llm.c's tokenizer file.

Encoding (the data scripts, the PyTorch reference) needs tiktoken; it is imported inside gpt2_encoding only,
so the NumPy-only CPU trainer can import this module and decode its samples with `Tokenizer` alone.

Offline machines load GPT-2's BPE ranks from a local file in tiktoken's format (one "base64(token) rank" per
line, identical to tiktoken's r50k_base): pass it, or set LLMPY_TIKTOKEN_FILE. Online, tiktoken downloads them.
"""

import os

from .config import GPT2_EOT, GPT2_VOCAB_SIZE
from .formats import read_tokenizer

TIKTOKEN_FILE_ENV = "LLMPY_TIKTOKEN_FILE"
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
    import tiktoken.load

    ranks_file = ranks_file or os.environ.get(TIKTOKEN_FILE_ENV)
    if not ranks_file:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise TokenizerError(f"could not get GPT-2's BPE ranks from tiktoken ({type(e).__name__}): offline? "
                                 f"set {TIKTOKEN_FILE_ENV} or pass --tokenizer /path/to/gpt2.tiktoken") from None
    ranks_file = os.fspath(ranks_file)
    if not os.path.isfile(ranks_file):
        raise TokenizerError(f"{ranks_file}: GPT-2 BPE ranks file not found")
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(ranks_file)
    except ValueError:
        raise TokenizerError(f"{ranks_file}: not a tiktoken BPE ranks file (lines of 'base64-token rank')") from None
    if len(ranks) != GPT2_EOT or sorted(ranks.values()) != list(range(GPT2_EOT)):
        raise TokenizerError(f"{ranks_file}: has {len(ranks)} ranks, GPT-2's BPE has ranks 0..{GPT2_EOT - 1}")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={GPT2_EOT_TEXT: GPT2_EOT},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def gpt2_token_bytes(encoding):
    """Every token's bytes, in id order (50,257 entries): the contents of llm.c's tokenizer file."""
    return [encoding.decode_single_token_bytes(i) for i in range(encoding.n_vocab)]


class Tokenizer:
    """Decodes token ids with llm.c's tokenizer file (gpt2_tokenizer.bin). NumPy/pure Python: no tiktoken."""

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
