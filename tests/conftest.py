"""Shared test setup.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter. TRITON_INTERPRET must be set
before triton is first imported anywhere, so it is set here, in the first conftest pytest loads.

The offline inputs (DESIGN.md §3) live in ../shared next to the repository: GPT-2's BPE ranks, which the
tokenizer finds through $LLMPY_TIKTOKEN_FILE (set here when unset and the file is there), and the tiny
Shakespeare text ($LLMPY_TINYSHAKESPEARE_FILE overrides). Llama 3's tokenizer.model comes from
$LLMPY_LLAMA3_TOKENIZER_FILE or the llama-models package (the test extra installs it). Tests that need one of
them skip without it.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
_SHARED_RANKS_FILE = SHARED_DIR / "tokenizer" / "gpt2.tiktoken"
_SHARED_SHAKESPEARE_FILE = SHARED_DIR / "data" / "tinyshakespeare" / "input.txt"

if not os.environ.get("LLMPY_TIKTOKEN_FILE") and _SHARED_RANKS_FILE.is_file():
    os.environ["LLMPY_TIKTOKEN_FILE"] = str(_SHARED_RANKS_FILE)


@pytest.fixture(scope="session")
def tiktoken_file():
    """GPT-2's BPE ranks file (tiktoken format), from $LLMPY_TIKTOKEN_FILE."""
    path = os.environ.get("LLMPY_TIKTOKEN_FILE")
    if not path or not os.path.isfile(path):
        pytest.skip(f"no GPT-2 BPE ranks file at {path or _SHARED_RANKS_FILE}: set LLMPY_TIKTOKEN_FILE")
    return Path(path)


@pytest.fixture(scope="session")
def tinyshakespeare_file():
    """The tiny Shakespeare text (1,115,394 bytes)."""
    path = Path(os.environ.get("LLMPY_TINYSHAKESPEARE_FILE") or _SHARED_SHAKESPEARE_FILE)
    if not path.is_file():
        pytest.skip(f"no tiny Shakespeare text: set LLMPY_TINYSHAKESPEARE_FILE or put it at {_SHARED_SHAKESPEARE_FILE}")
    return path


@pytest.fixture(scope="session")
def llama3_tokenizer_file():
    """Llama 3's BPE ranks (Meta's tokenizer.model, tiktoken format), where llmpy.tokenizer.llama3_encoding finds it."""
    from llmpy.tokenizer import LLAMA3_TOKENIZER_FILE_ENV, packaged_llama3_ranks

    path = os.environ.get(LLAMA3_TOKENIZER_FILE_ENV) or packaged_llama3_ranks()
    if not path or not os.path.isfile(path):
        pytest.skip(f"no Llama 3 tokenizer: pip install llama-models or set {LLAMA3_TOKENIZER_FILE_ENV}")
    return Path(path)
