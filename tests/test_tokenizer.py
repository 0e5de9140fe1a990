"""GPT-2's tokenizer (llmpy/tokenizer.py).

Encoding from the local ranks file must be GPT-2's: it gives GPT-2's published ids for known text, and the same
ids as tiktoken's own r50k_base encoding (loaded offline from the same file) on varied and random text.
Decoding from llm.c's tokenizer file must give the same text as tiktoken's decode, exactly.
"""

import hashlib
import random
import re
import shutil
import subprocess
import sys

import pytest

from llmpy.formats import write_tokenizer
from llmpy.tokenizer import Tokenizer, TokenizerError, gpt2_encoding, token_bytes

# tiktoken's download URL for r50k_base; offline, tiktoken reads it from TIKTOKEN_CACHE_DIR/sha1(url)
R50K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"

SAMPLE_TEXTS = [
    "Hello world",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n",
    "I'll say they're here, she's gone, we've won, I'd know, I'm sure, it'S odd",
    "  leading spaces,   runs of   spaces, trailing spaces   ",
    "tabs\tand\r\nwindows line ends\n\n\n\nand blank lines\n",
    "numbers 3.14159, 1,000,000 and 2024-05-20; code: x+=1 // ok?!",
    "naïve café, Straße, 日本語のテキスト, Ελληνικά, emoji 🙂👍🏽",
    "<|endoftext|> as plain text",
]


def random_text(rng, length):
    """Text from a mix of ASCII letters, digits, punctuation, whitespace runs, accents, CJK and emoji."""
    pieces = ["the", " and", "Hello", "'s", "'ll", " ", "  ", "\n", "\n\n", "\t", "123", "4", ".", ",!?", "--",
              "é", "ü", "中文", "🙂", "\u200b", "<|endoftext|>", "A", "zz", "'", "\r\n"]
    return "".join(rng.choice(pieces) for _ in range(length))


@pytest.fixture(scope="module")
def encoding(tiktoken_file):
    return gpt2_encoding(tiktoken_file)


@pytest.fixture(scope="module")
def r50k_base(tiktoken_file, tmp_path_factory):
    """tiktoken's own r50k_base (GPT-2's BPE), read offline from a cache holding the local ranks file."""
    import tiktoken

    cache_dir = tmp_path_factory.mktemp("tiktoken_cache")
    shutil.copy(tiktoken_file, cache_dir / hashlib.sha1(R50K_BASE_URL.encode()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))
        try:
            return tiktoken.get_encoding("r50k_base")
        except Exception as e:
            pytest.skip(f"tiktoken cannot load r50k_base from the local cache ({type(e).__name__}: {e})")


def test_encoding_gives_gpt2s_published_ids(encoding):
    assert encoding.encode_ordinary("Hello world") == [15496, 995]
    assert encoding.encode_ordinary("Hello, world!") == [15496, 11, 995, 0]
    assert encoding.encode_ordinary(" the") == [262]
    assert encoding.encode_ordinary("\n") == [198]
    assert encoding.encode_ordinary("\n\n") == [628]
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert encoding.eot_token == 50256
    assert encoding.n_vocab == 50257


def test_encoding_matches_tiktoken_r50k_base(encoding, r50k_base, tinyshakespeare_file):
    rng = random.Random(1234)
    texts = SAMPLE_TEXTS + [random_text(rng, 300) for _ in range(50)]
    texts.append(tinyshakespeare_file.read_text(encoding="utf-8")[:20000])
    for text in texts:
        assert encoding.encode_ordinary(text) == r50k_base.encode_ordinary(text), repr(text[:80])
        assert encoding.encode(text, allowed_special="all") == r50k_base.encode(text, allowed_special="all")
        assert encoding.decode(encoding.encode_ordinary(text)) == text


def test_ranks_file_problems_are_one_line_errors(tmp_path):
    missing = tmp_path / "missing.tiktoken"
    with pytest.raises(TokenizerError, match=f"^{re.escape(str(missing))}: GPT-2 BPE ranks file not found$"):
        gpt2_encoding(missing)

    not_ranks = tmp_path / "not_ranks.tiktoken"
    not_ranks.write_text("this is not\na ranks file at all\n")
    with pytest.raises(TokenizerError, match=f"^{re.escape(str(not_ranks))}: not a tiktoken BPE ranks file"):
        gpt2_encoding(not_ranks)

    too_few = tmp_path / "too_few.tiktoken"
    too_few.write_text("IQ== 0\nIg== 1\n")  # "!" and '"': a valid file with 2 ranks
    with pytest.raises(TokenizerError, match=f"^{re.escape(str(too_few))}: has 2 ranks, GPT-2's BPE has ranks 0..50255$"):
        gpt2_encoding(too_few)


def test_ranks_file_comes_from_the_environment(encoding, tiktoken_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPY_TIKTOKEN_FILE", str(tiktoken_file))
    assert gpt2_encoding().encode_ordinary(SAMPLE_TEXTS[1]) == encoding.encode_ordinary(SAMPLE_TEXTS[1])
    monkeypatch.setenv("LLMPY_TIKTOKEN_FILE", str(tmp_path / "nowhere.tiktoken"))
    with pytest.raises(TokenizerError, match="nowhere.tiktoken: GPT-2 BPE ranks file not found"):
        gpt2_encoding()


def test_offline_without_a_ranks_file_says_how_to_fix_it(monkeypatch):
    import tiktoken

    def no_network(name):
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("LLMPY_TIKTOKEN_FILE", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(TokenizerError) as error:
        gpt2_encoding()
    message = str(error.value)
    assert "\n" not in message and "offline?" in message
    assert "LLMPY_TIKTOKEN_FILE" in message and "--tokenizer" in message


def test_importing_the_tokenizer_loads_neither_tiktoken_nor_torch():
    code = "import sys, llmpy.tokenizer; print(sorted({'tiktoken', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def tokenizer_file(encoding, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "gpt2_tokenizer.bin"
    write_tokenizer(path, token_bytes(encoding), encoding.eot_token)
    return path


def test_token_bytes_are_every_tokens_bytes_in_id_order(encoding):
    every = token_bytes(encoding)
    assert len(every) == 50257
    assert every[15496] == b"Hello" and every[995] == b" world" and every[628] == b"\n\n"
    assert every[50256] == b"<|endoftext|>"


def test_tokenizer_file_decodes_like_tiktoken(encoding, tokenizer_file):
    tokenizer = Tokenizer(tokenizer_file)
    assert tokenizer.eot == 50256 and tokenizer.vocab_size == 50257
    for text in SAMPLE_TEXTS:
        assert tokenizer.decode(encoding.encode(text, allowed_special="all")) == text
    # random ids split multi-byte characters: both must replace the broken UTF-8 the same way
    rng = random.Random(99)
    for _ in range(50):
        ids = [rng.randrange(50257) for _ in range(rng.randrange(1, 40))]
        assert tokenizer.decode(ids) == encoding.decode(ids)


def test_tokenizer_decodes_half_a_character_as_the_replacement_character(encoding, tokenizer_file):
    tokenizer = Tokenizer(tokenizer_file)
    first_byte_of_e_acute = encoding.encode_single_token(b"\xc3")  # é is c3 a9 in UTF-8
    second_byte = encoding.encode_single_token(b"\xa9")
    assert tokenizer.decode([first_byte_of_e_acute]) == "\ufffd"
    assert tokenizer.decode([first_byte_of_e_acute, second_byte]) == "é"


def test_tokenizer_rejects_ids_outside_the_vocab(tokenizer_file):
    tokenizer = Tokenizer(tokenizer_file)
    for bad in (50257, -1):
        with pytest.raises(ValueError, match=f"token id {bad} out of range for a tokenizer of 50257 tokens"):
            tokenizer.decode([15496, bad])
