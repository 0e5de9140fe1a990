"""llm.c's binary formats: every writer's output reads back exactly, the bytes are llm.c's layout, and every
kind of damage (missing, truncated, wrong magic or version, ids out of range) is one FormatError naming the file."""

import numpy as np
import pytest

from llmpy import formats
from llmpy.configs.gpt2 import config_from_descriptor, num_parameters, split_params
from llmpy.formats import FormatError

CONFIG = config_from_descriptor("d2c64h4")


def random_params(seed=0):
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal(num_parameters(CONFIG)).astype(np.float32)
    split_params(CONFIG, flat)["wte"][CONFIG.vocab_size:] = 0  # padding rows are zero, as llm.c writes them
    return flat


def test_model_fp32_roundtrip_and_header(tmp_path):
    flat = random_params()
    path = tmp_path / "m.bin"
    formats.write_model(path, CONFIG, flat)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:8]) == [20240326, 3, 1024, 50257, 2, 4, 64, 50304]
    assert not header[8:].any()
    assert path.stat().st_size == 1024 + 4 * num_parameters(CONFIG)
    config, back = formats.read_model(path)
    assert config == CONFIG
    np.testing.assert_array_equal(back, flat)  # fp32 is stored exactly


def test_model_bf16_rounds_to_nearest_even(tmp_path):
    flat = random_params(1)
    path = tmp_path / "m_bf16.bin"
    formats.write_model(path, CONFIG, flat, dtype="bfloat16")
    assert np.fromfile(path, dtype="<i4", count=2)[1] == 5
    assert path.stat().st_size == 1024 + 2 * num_parameters(CONFIG)
    _, back = formats.read_model(path)
    # bf16 keeps 8 significant bits (7 stored): round-to-nearest errs by at most half a unit in the last place,
    # 2^-8 of the value's power of two, so at most 2^-8 relative
    assert np.all(np.abs(back - flat) <= np.abs(flat) * 2.0**-8)
    assert np.abs(back - flat).max() > 0  # and it did round
    # ties go to even: 1 + 2^-8 sits halfway between 1 and 1 + 2^-7
    halfway = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8], dtype=np.float32)
    np.testing.assert_array_equal(formats.bfloat16_bits_to_float32(formats.float32_to_bfloat16_bits(halfway)),
                                  [1.0, 1 + 2 * 2.0**-7])


def test_bfloat16_rounding_of_the_edge_values():
    """Against torch's float32 -> bfloat16 conversion (round to nearest even), bit for bit: signed zeros, the smallest
    subnormals, values past bf16's largest (to inf), infinities, and NaNs, the quiet one and ones whose payload
    rounding would carry into the exponent (they must stay NaN), with 10,000 random bit patterns of every kind."""
    import torch

    special = np.array([0x00000000, 0x80000000, 0x00000001, 0x00008000, 0x00018000, 0x7F7FFFFF, 0xFF7FFFFF,
                        0x7F7F8000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF,
                        0xFFFF8000], dtype=np.uint32)
    random_bits = np.random.default_rng(4).integers(0, 2**32, 10_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([special, random_bits]).view(np.float32)
    ours = formats.float32_to_bfloat16_bits(x)
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert nan.sum() > 5 and np.isnan(formats.bfloat16_bits_to_float32(ours[nan])).all()
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])


def test_debug_state_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    B, T = 2, 5
    x = rng.integers(0, CONFIG.vocab_size, (B, T), dtype=np.int32)
    y = rng.integers(0, CONFIG.vocab_size, (B, T), dtype=np.int32)
    logits = rng.standard_normal((B, T, CONFIG.vocab_size)).astype(np.float32)
    grads = random_params(3)
    path = tmp_path / "state.bin"
    formats.write_debug_state(path, CONFIG, x, y, logits, 3.25, grads)
    assert list(np.fromfile(path, dtype="<i4", count=4)) == [20240327, 2, B, T]
    state = formats.read_debug_state(path, CONFIG)
    np.testing.assert_array_equal(state.x, x)
    np.testing.assert_array_equal(state.y, y)
    np.testing.assert_array_equal(state.logits, logits)
    np.testing.assert_array_equal(state.grads, grads)
    assert state.loss == 3.25


def test_tokenizer_roundtrip(tmp_path):
    tokens = [bytes([i]) for i in range(256)] + [b"hello", b" world", "\u00e9t\u00e9".encode(), b"x" * 255]
    path = tmp_path / "tok.bin"
    formats.write_tokenizer(path, tokens, eot=257)
    assert list(np.fromfile(path, dtype="<i4", count=4)) == [20240328, 2, len(tokens), 257]
    back, eot = formats.read_tokenizer(path)
    assert back == tokens and eot == 257


@pytest.mark.parametrize("dtype, magic, version", [(np.uint16, 20240520, 1), (np.uint32, 20240801, 7)])
def test_shard_roundtrip(tmp_path, dtype, magic, version):
    tokens = np.random.default_rng(4).integers(0, np.iinfo(dtype).max, 1000).astype(dtype)
    path = tmp_path / "shard.bin"
    formats.write_shard(path, tokens, dtype=dtype)
    assert list(np.fromfile(path, dtype="<i4", count=3)) == [magic, version, 1000]
    back = formats.read_shard(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, tokens)


def test_eval_file_roundtrip_matches_llmc_stream(tmp_path):
    examples = [formats.EvalExample(index=0, label=2, context=[10, 11, 12], completions=[[1], [2, 3], [4, 5, 6], [7]]),
                formats.EvalExample(index=1, label=0, context=[99], completions=[[5, 6], [7, 8]])]
    path = tmp_path / "eval.bin"
    formats.write_eval_file(path, examples)
    header = np.fromfile(path, dtype="<i4", count=4)
    stream = np.fromfile(path, dtype="<u2", offset=1024)
    first = [65535, 0, 0, 2, 4, 3, 10, 11, 12, 1, 1, 2, 2, 3, 3, 4, 5, 6, 1, 7]
    first[1] = 2 * len(first)  # the example's size in bytes, marker included
    assert list(stream[: len(first)]) == first
    assert list(header) == [20240522, 1, 2, 2 * len(first)]
    assert formats.read_eval_file(path) == examples


def _write_all(tmp_path):
    """One valid file of each kind, with the reader that loads it."""
    paths = {}
    paths["model"] = tmp_path / "m.bin"
    formats.write_model(paths["model"], CONFIG, random_params())
    paths["state"] = tmp_path / "s.bin"
    rng = np.random.default_rng(5)
    x = rng.integers(0, 100, (1, 4), dtype=np.int32)
    formats.write_debug_state(paths["state"], CONFIG, x, x, np.zeros((1, 4, CONFIG.vocab_size), np.float32) + 1,
                              1.0, random_params(6))
    paths["tokenizer"] = tmp_path / "t.bin"
    formats.write_tokenizer(paths["tokenizer"], [b"a", b"bc", b"d"], 2)
    paths["shard"] = tmp_path / "sh.bin"
    formats.write_shard(paths["shard"], np.arange(1, 50, dtype=np.uint16))
    paths["eval"] = tmp_path / "e.bin"
    formats.write_eval_file(paths["eval"], [formats.EvalExample(0, 1, [1, 2], [[3], [4]])])
    readers = {"model": formats.read_model, "state": lambda p: formats.read_debug_state(p, CONFIG),
               "tokenizer": formats.read_tokenizer, "shard": formats.read_shard, "eval": formats.read_eval_file}
    return paths, readers


KINDS = ["model", "state", "tokenizer", "shard", "eval"]


@pytest.mark.parametrize("kind", KINDS)
def test_missing_file(tmp_path, kind):
    _, readers = _write_all(tmp_path)
    with pytest.raises(FormatError, match="nope.bin: file not found"):
        readers[kind](tmp_path / "nope.bin")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [100, -1])  # inside the header; one byte short of the whole file
def test_truncated_file(tmp_path, kind, keep):
    paths, readers = _write_all(tmp_path)
    data = paths[kind].read_bytes()
    paths[kind].write_bytes(data[:keep])
    with pytest.raises(FormatError, match=r"truncated|corrupt") as err:
        readers[kind](paths[kind])
    assert str(paths[kind]) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_magic_and_version(tmp_path, kind):
    paths, readers = _write_all(tmp_path)
    data = bytearray(paths[kind].read_bytes())
    bad_magic = bytearray(data)
    bad_magic[0:4] = (12345).to_bytes(4, "little")
    paths[kind].write_bytes(bad_magic)
    with pytest.raises(FormatError, match="magic"):
        readers[kind](paths[kind])
    bad_version = bytearray(data)
    bad_version[4:8] = (99).to_bytes(4, "little")
    paths[kind].write_bytes(bad_version)
    with pytest.raises(FormatError, match="version 99"):
        readers[kind](paths[kind])


def test_token_ids_out_of_range(tmp_path):
    path = tmp_path / "shard.bin"
    formats.write_shard(path, np.array([1, 2, 50257, 3], dtype=np.uint16))
    formats.read_shard(path)  # no vocab given: no check
    with pytest.raises(FormatError, match="token id 50257 out of range for a vocab of 50257"):
        formats.read_shard(path, vocab_size=50257)


def test_debug_state_ids_out_of_range(tmp_path):
    paths, readers = _write_all(tmp_path)
    data = bytearray(paths["state"].read_bytes())
    data[1024:1028] = (60000).to_bytes(4, "little")  # x[0, 0]
    paths["state"].write_bytes(data)
    with pytest.raises(FormatError, match="out of range"):
        readers["state"](paths["state"])


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "m.bin"
    with pytest.raises(ValueError):
        formats.write_model(path, CONFIG, np.zeros(10, np.float32))
    with pytest.raises(ValueError):
        formats.write_model(path, CONFIG, random_params(), dtype="float16")
    assert list(tmp_path.iterdir()) == []
