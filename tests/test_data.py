"""Token shards: the training DataLoader (llmpy/data.py) and the dataset scripts (dev/data/*.py).

The DataLoader is compared batch by batch, over more than one epoch, with llm.c's rule written out here: in each
shard, step after step at position 0, B*T*W, 2*B*T*W, ... while the step's B*T*W + 1 tokens fit, rank r reads the
B*T + 1 tokens at position + r*B*T; then the next shard, and after the last the first. Shards hold seeded random
token ids. Comparisons are exact (integers).

The scripts run as subprocesses on local inputs, offline; their shards are read back and compared exactly with
<|endoftext|> + the tokens of each document, encoded here with the same GPT-2 encoding.
"""

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from llmpy.configs.gpt2 import GPT2_EOT
from llmpy.data import DataLoader
from llmpy.formats import FormatError, read_shard, write_shard
from llmpy.rand import Mt19937
from llmpy.tokenizer import gpt2_encoding

DATA_SCRIPTS = Path(__file__).resolve().parents[1] / "dev" / "data"
GPT2_VOCAB = 50257


def random_shards(tmp_path, sizes, seed=0, dtype=np.uint16, vocab=GPT2_VOCAB):
    """Writes shards of random token ids, shard_000.bin, shard_001.bin, ...; returns their glob and tokens."""
    rng = np.random.default_rng(seed)
    shards = []
    for i, size in enumerate(sizes):
        tokens = rng.integers(0, vocab, size=size).astype(dtype)
        write_shard(tmp_path / f"shard_{i:03d}.bin", tokens, dtype=dtype)
        shards.append(tokens)
    return str(tmp_path / "shard_*.bin"), shards


def llmc_batches(shards, B, T, rank, world_size, num_steps):
    """The first num_steps (x, y) of rank `rank` by llm.c's rule (see the module docstring)."""
    batches = []
    while len(batches) < num_steps:
        for tokens in shards:
            position = 0
            while position + B * T * world_size + 1 <= len(tokens):
                start = position + rank * B * T
                piece = tokens[start: start + B * T + 1].astype(np.int32)
                batches.append((piece[:-1].reshape(B, T), piece[1:].reshape(B, T)))
                position += B * T * world_size
    return batches[:num_steps]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_batches_follow_llmc_across_ranks_shards_and_epochs(tmp_path, world_size):
    B, T = 2, 4
    step = B * T * world_size
    # the second shard holds exactly two steps and the one token the last y needs; the others have leftovers
    pattern, shards = random_shards(tmp_path, [3 * step + 5, 2 * step + 1, 2 * step + step - 1])
    steps_per_epoch = 3 + 2 + 2
    for rank in range(world_size):
        loader = DataLoader(pattern, B, T, rank=rank, world_size=world_size)
        assert loader.num_batches_per_epoch == steps_per_epoch
        expected = llmc_batches(shards, B, T, rank, world_size, 2 * steps_per_epoch + 3)
        for i, (expected_x, expected_y) in enumerate(expected):
            x, y = loader.next_batch()
            assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == (B, T) and y.shape == (B, T)
            np.testing.assert_array_equal(x, expected_x, err_msg=f"x of step {i}, rank {rank}")
            np.testing.assert_array_equal(y, expected_y, err_msg=f"y of step {i}, rank {rank}")
        assert loader.epoch == 2


def test_y_is_x_shifted_by_one_token(tmp_path):
    pattern, (tokens,) = random_shards(tmp_path, [100])
    x, y = DataLoader(pattern, 3, 5).next_batch()
    np.testing.assert_array_equal(x.ravel(), tokens[:15])
    np.testing.assert_array_equal(y.ravel(), tokens[1:16])


def test_reset_starts_again_from_the_first_batch(tmp_path):
    pattern, _ = random_shards(tmp_path, [40, 30])
    loader = DataLoader(pattern, 2, 4)
    first = [loader.next_batch() for _ in range(6)]  # runs into the second shard and back
    loader.reset()
    assert loader.epoch == 0
    for expected_x, expected_y in first:
        x, y = loader.next_batch()
        np.testing.assert_array_equal(x, expected_x)
        np.testing.assert_array_equal(y, expected_y)


def test_llama3_uint32_shards_load_ids_beyond_uint16(tmp_path):
    pattern, shards = random_shards(tmp_path, [65, 50], dtype=np.uint32, vocab=128256)
    loader = DataLoader(pattern, 2, 8, vocab_size=128256)
    for expected_x, expected_y in llmc_batches(shards, 2, 8, 0, 1, 8):
        x, y = loader.next_batch()
        np.testing.assert_array_equal(x, expected_x)
        np.testing.assert_array_equal(y, expected_y)
    assert max(s.max() for s in shards) > 65535


class LlmcMt19937:
    """llm.c's Mersenne Twister (llmc/rand.h: manual_seed, next_state, randint32), transcribed in plain Python as an
    independent reference for llmpy.rand, which draws from NumPy's MT19937."""

    def __init__(self, seed):
        self.state = [seed & 0xFFFFFFFF]
        for j in range(1, 624):
            self.state.append((1812433253 * (self.state[-1] ^ (self.state[-1] >> 30)) + j) & 0xFFFFFFFF)
        self.left, self.next = 1, 0

    def _twist(self):
        s, mag = self.state, (0, 0x9908B0DF)
        for j in range(624):
            y = (s[j] & 0x80000000) | (s[(j + 1) % 624] & 0x7FFFFFFF)
            s[j] = s[(j + 397) % 624] ^ (y >> 1) ^ mag[y & 1]
        self.left, self.next = 624, 0

    def randint32(self):
        self.left -= 1
        if self.left <= 0:
            self._twist()
        y = self.state[self.next]
        self.next += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)

    def permute(self, values):  # random_permutation
        for i in range(len(values) - 1, 0, -1):
            j = self.randint32() % (i + 1)
            values[i], values[j] = values[j], values[i]


def llmc_shuffled_starts(shard_sizes, B, T, rank, world_size, count):
    """The token where each of rank's first count batches starts, as (shard, token), by llm.c's shuffling
    DataLoader (llmc/dataloader.h: dataloader_init, _reset, _advance_, _next_batch) written out."""
    rng = LlmcMt19937(42 + rank)
    samples = [(n - 1) // (B * T * world_size) for n in shard_sizes]
    shard_order = list(range(len(shard_sizes)))
    position = sample = 0
    sample_order = []

    def open_shard(p):
        nonlocal position, sample, sample_order
        position, sample = p, 0
        sample_order = list(range(samples[shard_order[p]]))
        rng.permute(sample_order)

    def reset():
        rng.permute(shard_order)
        open_shard(0)

    reset()
    starts = []
    while len(starts) < count:
        if sample >= samples[shard_order[position]]:
            reset() if position == len(shard_sizes) - 1 else open_shard(position + 1)
        starts.append((shard_order[position], (sample_order[sample] * world_size + rank) * B * T))
        sample += 1
    return starts


def test_mersenne_twister_is_llmcs_and_torchs():
    # llmc/rand.h's example: manual_seed(137) then randint32() five times, the same numbers as torch.randint
    assert [LlmcMt19937(137).randint32() for _ in range(1)] == [4053805790]
    reference = LlmcMt19937(137)
    expected = [reference.randint32() for _ in range(2000)]  # across two twists
    assert expected[:5] == [4053805790, 2173880614, 380293709, 1237255315, 2986595568]
    assert Mt19937(137).randint32(2000).tolist() == expected


def test_permutations_and_saved_states_are_llmcs():
    ours, reference = Mt19937(43), LlmcMt19937(43)
    for n in (1, 2, 7, 700, 3):  # 700 draws cross a twist
        values = np.arange(n, dtype=np.int32)
        ours.permute(values)
        expected = list(range(n))
        reference.permute(expected)
        assert values.tolist() == expected
    # llm.c's struct: seed_ u64, left_ i32, next_ u32, state_[624] u32, MATRIX_A[2] u32, 2,520 bytes
    data = ours.to_bytes()
    assert len(data) == 2520
    assert np.frombuffer(data, "<u4", 624, offset=16).tolist() == reference.state
    assert (np.frombuffer(data, "<i4", 1, 8)[0], np.frombuffer(data, "<u4", 1, 12)[0]) == (reference.left, reference.next)
    assert np.frombuffer(data, "<u4", 2, 2512).tolist() == [0, 0x9908B0DF]
    restored = Mt19937.from_bytes(data)
    assert restored.randint32(1000).tolist() == [reference.randint32() for _ in range(1000)]
    fresh, reference = Mt19937.from_bytes(Mt19937(5).to_bytes()), LlmcMt19937(5)  # left_ 1, next_ 0: twist next
    assert fresh.randint32(3).tolist() == [reference.randint32() for _ in range(3)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shuffled_batches_are_llmcs_across_ranks_shards_and_epochs(tmp_path, world_size):
    B, T = 2, 4
    sizes = [25 * B * T * world_size + 3, 9 * B * T * world_size + 1, 4 * B * T * world_size + 5]
    pattern, shards = random_shards(tmp_path, sizes)
    for rank in range(world_size):
        loader = DataLoader(pattern, B, T, rank, world_size, shuffle=True)
        count = 2 * loader.num_batches_per_epoch + 5
        for i, (shard, start) in enumerate(llmc_shuffled_starts(sizes, B, T, rank, world_size, count)):
            x, y = loader.next_batch()
            piece = shards[shard][start: start + B * T + 1].astype(np.int32)
            np.testing.assert_array_equal(x.ravel(), piece[:-1], err_msg=f"x of batch {i}, rank {rank}")
            np.testing.assert_array_equal(y.ravel(), piece[1:], err_msg=f"y of batch {i}, rank {rank}")
        assert loader.epoch == 2


def test_shuffle_reads_every_batch_once_a_pass_and_the_ranks_read_disjoint_tokens(tmp_path):
    B, T, world_size = 2, 4, 2
    pattern, shards = random_shards(tmp_path, [401, 161])  # 25 and 10 samples of 16 tokens
    loaders = [DataLoader(pattern, B, T, rank, world_size, shuffle=True) for rank in range(world_size)]
    passes = []
    for _ in range(2):
        read = []  # (shard, token) where each batch of the pass starts, every rank
        for loader in loaders:
            for _ in range(loader.num_batches_per_epoch):
                loader.next_batch()
                read.append((int(loader.shard_order[loader.shard]), int(loader.sample_order[loader.sample - 1]) *
                             B * T * world_size + loader.rank * B * T))
        passes.append(read)
        every_batch = [(s, i * B * T) for s, n in enumerate((50, 20)) for i in range(n)]
        assert sorted(read) == every_batch  # every B*T chunk of every shard exactly once, over the ranks
        assert read != sorted(read), "shuffled order should differ from the file order"
    assert passes[0] != passes[1], "each pass draws new orders"


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_restored_state_continues_exactly(tmp_path, shuffle):
    pattern, _ = random_shards(tmp_path, [161, 401, 97])
    for stop in (0, 3, 10, 35, 41, 45):  # 10 + 25 + 6 = 41 batches a pass: inside, at the ends of shards and passes
        resumed = DataLoader(pattern, 2, 4, rank=1, world_size=2, shuffle=shuffle)
        fresh = DataLoader(pattern, 2, 4, rank=1, world_size=2, shuffle=shuffle)
        fresh.skip(stop)
        resumed.restore(fresh.state())
        for i in range(50):
            x, y = fresh.next_batch()
            x2, y2 = resumed.next_batch()
            np.testing.assert_array_equal(x, x2, err_msg=f"batch {i} after {stop}")
            np.testing.assert_array_equal(y, y2)


def test_a_state_of_other_shards_is_refused(tmp_path):
    pattern, _ = random_shards(tmp_path, [161, 401])
    state = DataLoader(pattern, 2, 4, shuffle=True).state()
    with pytest.raises(ValueError, match="not shuffled|was shuffled"):
        DataLoader(pattern, 2, 4, shuffle=False).restore(state)
    (tmp_path / "shard_002.bin").write_bytes((tmp_path / "shard_000.bin").read_bytes())
    with pytest.raises(ValueError, match="not a permutation of 3 shards"):
        DataLoader(pattern, 2, 4, shuffle=True).restore(state)


def test_no_matching_shard_is_an_error_naming_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing_*.bin")
    with pytest.raises(FormatError, match=f"^{re.escape(pattern)}: no files match this pattern$"):
        DataLoader(pattern, 2, 4)


def test_a_shard_too_small_for_one_step_is_an_error_naming_it(tmp_path):
    B, T, world_size = 2, 4, 2  # a step needs 2*4*2 + 1 = 17 tokens
    random_shards(tmp_path, [17, 16, 40])
    DataLoader(str(tmp_path / "shard_000.bin"), B, T, world_size=world_size)  # exactly enough
    small = tmp_path / "shard_001.bin"
    with pytest.raises(ValueError, match=f"^shard {re.escape(str(small))} has 16 tokens, a batch needs 17 .*use smaller -b/-t$"):
        DataLoader(str(tmp_path / "shard_*.bin"), B, T, world_size=world_size)


def test_token_ids_beyond_the_vocab_are_an_error_naming_the_shard(tmp_path):
    good = np.arange(40, dtype=np.uint16)
    bad = good.copy()
    bad[7] = 50257
    write_shard(tmp_path / "a_good.bin", good)
    write_shard(tmp_path / "b_bad.bin", bad)
    DataLoader(str(tmp_path / "b_bad.bin"), 2, 4)  # no vocab given, no check
    with pytest.raises(FormatError, match="b_bad.bin: token id 50257 out of range for a vocab of 50257"):
        DataLoader(str(tmp_path / "b_bad.bin"), 2, 4, vocab_size=GPT2_VOCAB)
    loader = DataLoader(str(tmp_path / "*.bin"), 2, 4, vocab_size=GPT2_VOCAB)
    for _ in range(4):  # the good shard's (40 - 1) // 8 steps
        loader.next_batch()
    with pytest.raises(FormatError, match="b_bad.bin: token id 50257 out of range"):
        loader.next_batch()  # opening the second shard


@pytest.mark.parametrize("B, T, rank, world_size, problem", [
    (0, 4, 0, 1, "must be positive"),
    (2, -1, 0, 1, "must be positive"),
    (2, 4, 2, 2, r"rank 2 is not in \[0, world_size=2\)"),
])
def test_nonsense_batch_settings_are_errors(tmp_path, B, T, rank, world_size, problem):
    pattern, _ = random_shards(tmp_path, [100])
    with pytest.raises(ValueError, match=problem):
        DataLoader(pattern, B, T, rank=rank, world_size=world_size)


def run_data_script(script, *args, offline=False, python_path=None):
    """Runs dev/data/<script> with the test session's environment; offline sends all HTTP(S) to a dead proxy."""
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join([str(python_path), env.get("PYTHONPATH", "")])
    if offline:
        dead_proxy = "http://127.0.0.1:9"
        env.update(http_proxy=dead_proxy, https_proxy=dead_proxy, HTTP_PROXY=dead_proxy, HTTPS_PROXY=dead_proxy,
                   no_proxy="", NO_PROXY="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, str(DATA_SCRIPTS / script), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def assert_fails_with_one_line(result, *fragments):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def encoding(tiktoken_file):
    return gpt2_encoding(tiktoken_file)


def test_tinyshakespeare_gives_llmcs_split(tmp_path, tinyshakespeare_file, encoding):
    result = run_data_script("tinyshakespeare.py", "--input", tinyshakespeare_file, "--output_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    val = read_shard(tmp_path / "tiny_shakespeare_val.bin", GPT2_VOCAB)
    train = read_shard(tmp_path / "tiny_shakespeare_train.bin", GPT2_VOCAB)
    assert (len(val), len(train)) == (32768, 305260)
    assert "32,768 tokens" in result.stdout and "305,260 tokens" in result.stdout
    # every blank-line-separated section starts with <|endoftext|>; without them the tokens spell the text
    tokens = np.concatenate([val, train])
    text = tinyshakespeare_file.read_text(encoding="utf-8")
    assert tokens[0] == GPT2_EOT and np.count_nonzero(tokens == GPT2_EOT) == len(text.split("\n\n"))
    assert encoding.decode(tokens[tokens != GPT2_EOT].tolist()) == text


@pytest.mark.usefixtures("tiktoken_file")
def test_tinyshakespeare_uses_the_cached_download(tmp_path, tinyshakespeare_file):
    (tmp_path / "input.txt").write_bytes(tinyshakespeare_file.read_bytes())
    result = run_data_script("tinyshakespeare.py", "--output_dir", tmp_path, offline=True)
    assert result.returncode == 0, result.stderr
    assert len(read_shard(tmp_path / "tiny_shakespeare_train.bin")) == 305260


@pytest.mark.usefixtures("tiktoken_file")
def test_tinyshakespeare_offline_without_input_says_how_to_fix_it(tmp_path):
    result = run_data_script("tinyshakespeare.py", "--output_dir", tmp_path, offline=True)
    assert_fails_with_one_line(result, "could not download https://raw.githubusercontent.com/karpathy/char-rnn/",
                               "offline? pass --input /path/to/input.txt")
    assert not (tmp_path / "input.txt").exists() and not list(tmp_path.glob("*.part"))


@pytest.mark.usefixtures("tiktoken_file")
def test_tinyshakespeare_missing_input_is_one_line(tmp_path):
    missing = tmp_path / "nowhere.txt"
    assert_fails_with_one_line(run_data_script("tinyshakespeare.py", "--input", missing), f"{missing}: file not found")


def random_documents(seed, count):
    """Seeded text documents of varied length: words, numbers, punctuation, whitespace, accents, CJK, emoji;
    one long enough to span several 1000-token shards."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "Hello", "world", "I'll", "they're", "3.14", "2024", ",", ".", "!?", "café",
             "naïve", "日本語", "🙂", "<|endoftext|>", "\n", "\n\n", "  ", "\t"]
    lengths = [rng.randrange(1, 300) for _ in range(count - 1)] + [2500]
    rng.shuffle(lengths)
    return [" ".join(rng.choice(words) for _ in range(n)) for n in lengths]


def expected_tokens(encoding, documents):
    return np.concatenate([[GPT2_EOT] + encoding.encode_ordinary(d) for d in documents]).astype(np.uint16)


def read_shards(output_dir, name):
    """The shards' names (in file order) and their tokens."""
    paths = sorted(Path(output_dir).glob(f"{name}_*.bin"), key=lambda p: p.name.rsplit("_", 1)[1])
    return [p.name for p in paths], [np.asarray(read_shard(p, GPT2_VOCAB)) for p in paths]


def check_shards(names, shards, name, shard_size, expected):
    assert names == [f"{name}_{'val' if i == 0 else 'train'}_{i:06d}.bin" for i in range(len(shards))]
    assert all(len(s) == shard_size for s in shards[:-1]) and 0 < len(shards[-1]) <= shard_size
    np.testing.assert_array_equal(np.concatenate(shards), expected)


@pytest.mark.parametrize("dataset_type, name", [("classic", "fineweb"), ("edu", "edu_fineweb")])
def test_fineweb_local_sample_is_eot_prefixed_documents_in_shards(tmp_path, encoding, dataset_type, name):
    documents = random_documents(seed=1, count=200)  # batches of 32 go round both workers three times or more
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)))
    out = tmp_path / "shards"
    result = run_data_script("fineweb.py", "--type", dataset_type, "--input", sample, "--output_dir", out,
                             "--shard_size", 1000, "--processes", 2)
    assert result.returncode == 0, result.stderr
    names, shards = read_shards(out, name)
    assert len(shards) > 5
    check_shards(names, shards, name, 1000, expected_tokens(encoding, documents))


def test_tinystories_local_sample_is_eot_prefixed_stripped_stories_in_shards(tmp_path, encoding):
    stories = random_documents(seed=2, count=40)
    sample = tmp_path / "stories.json"  # the dataset's format: a JSON list of records
    sample.write_text(json.dumps([{"story": f"  {s}\n", "summary": "unused"} for s in stories]))
    out = tmp_path / "shards"
    result = run_data_script("tinystories.py", "--input", sample, "--output_dir", out, "--shard_size", 1000,
                             "--processes", 1)
    assert result.returncode == 0, result.stderr
    names, shards = read_shards(out, "TinyStories")
    check_shards(names, shards, "TinyStories", 1000, expected_tokens(encoding, [s.strip() for s in stories]))


def test_python_sources_are_distinct_utf8_py_files_in_content_hash_order(tmp_path, encoding):
    """dev/data/python_sources.py: every distinct UTF-8 .py file under --roots, EOT-prefixed, in the order of the
    SHA-256 of its bytes; a copy of a file, a non-.py file, a file that is not UTF-8, one over --max_file_bytes and
    one of whitespace only left out; the first --val_tokens tokens the val split, the next --train_tokens the train split."""
    # the one long document (12.6 KB) is over the limit, as big.py below
    documents = [d for d in random_documents(seed=3, count=30) if d.strip() and len(d.encode()) <= 10000]
    root = tmp_path / "site-packages"
    for i, text in enumerate(random_documents(seed=3, count=30)):
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"module{i}.py").write_text(text, encoding="utf-8")
    (root / "pkg0" / "copy.py").write_text(documents[0], encoding="utf-8")
    (root / "pkg1" / "notes.txt").write_text("not a .py file")
    (root / "pkg2" / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (root / "pkg2" / "big.py").write_text("x = 1\n" * 2000)
    (root / "pkg2" / "blank.py").write_text(" \n\n")
    ordered = sorted(documents, key=lambda d: hashlib.sha256(d.encode("utf-8")).hexdigest())
    everything = expected_tokens(encoding, ordered)
    val_tokens, train_tokens = 300, len(everything) - 300 - 50  # the last 50 tokens are not wanted
    out = tmp_path / "shards"
    result = run_data_script("python_sources.py", "--roots", root, "--output_dir", out, "--val_tokens", val_tokens,
                             "--train_tokens", train_tokens, "--max_file_bytes", 10000, "--processes", 1)
    assert result.returncode == 0, result.stderr
    assert f"{len(documents)} distinct .py files" in result.stdout
    val = read_shard(out / "python_sources_val.bin", GPT2_VOCAB)
    train = read_shard(out / "python_sources_train.bin", GPT2_VOCAB)
    np.testing.assert_array_equal(val, everything[:val_tokens])
    np.testing.assert_array_equal(train, everything[val_tokens:val_tokens + train_tokens])


def test_python_sources_refuse_a_missing_root_and_too_little_text(tmp_path):
    assert_fails_with_one_line(run_data_script("python_sources.py", "--roots", tmp_path / "nope"),
                               f"--roots: {tmp_path / 'nope'}: not a folder")
    (tmp_path / "a.py").write_text("x = 1\n")
    assert_fails_with_one_line(run_data_script("python_sources.py", "--roots", tmp_path, "--output_dir", tmp_path,
                                               "--processes", 1), "tokens under --roots, the val split alone")


def test_tinystories_online_path_unpacks_the_downloaded_tarball(tmp_path, encoding):
    # the tarball as if downloaded: JSON files of records, the stories read in file-name order
    files = {f"data{i:02d}.json": random_documents(seed=10 + i, count=15) for i in (1, 0)}
    for name, stories in files.items():
        (tmp_path / name).write_text(json.dumps([{"story": s, "source": "GPT-4"} for s in stories]))
    with tarfile.open(tmp_path / "TinyStories_all_data.tar.gz", "w:gz") as tar:
        for name in files:
            tar.add(tmp_path / name, arcname=name)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "TinyStories_all_data.tar.gz").rename(out / "TinyStories_all_data.tar.gz")
    result = run_data_script("tinystories.py", "--output_dir", out, "--shard_size", 2000, offline=True)
    assert result.returncode == 0, result.stderr
    names, shards = read_shards(out, "TinyStories")
    stories = [s.strip() for s in files["data00.json"] + files["data01.json"]]
    check_shards(names, shards, "TinyStories", 2000, expected_tokens(encoding, stories))


FAKE_DATASETS = """
import json, os
def load_dataset(repo, name, split):
    with open(os.environ["FAKE_DATASETS_LOG"], "w") as f:
        json.dump([repo, name, split], f)
    return [{"text": text, "id": i} for i, text in enumerate(json.loads(os.environ["FAKE_DATASETS_TEXTS"]))]
"""


@pytest.mark.parametrize("args, repo, sample, name", [
    ([], "HuggingFaceFW/fineweb", "sample-10BT", "fineweb"),
    (["--type", "edu", "--version", "100B"], "HuggingFaceFW/fineweb-edu", "sample-100BT", "edu_fineweb"),
])
def test_fineweb_online_path_loads_the_sample_with_datasets(tmp_path, monkeypatch, encoding, args, repo, sample, name):
    # a stand-in `datasets` package records what was asked for and serves a few documents
    (tmp_path / "fake" / "datasets").mkdir(parents=True)
    (tmp_path / "fake" / "datasets" / "__init__.py").write_text(FAKE_DATASETS)
    documents = random_documents(seed=3, count=20)
    monkeypatch.setenv("FAKE_DATASETS_LOG", str(tmp_path / "log.json"))
    monkeypatch.setenv("FAKE_DATASETS_TEXTS", json.dumps(documents))
    output_dir = tmp_path / "shards"
    result = run_data_script("fineweb.py", *args, "--output_dir", output_dir, "-s", 1000, python_path=tmp_path / "fake")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "log.json").read_text()) == [repo, sample, "train"]
    names, shards = read_shards(output_dir, name)
    check_shards(names, shards, name, 1000, expected_tokens(encoding, documents))


@pytest.mark.usefixtures("tiktoken_file")
def test_a_rerun_refuses_to_mix_with_old_shards(tmp_path):
    sample = tmp_path / "sample.jsonl"
    sample.write_text(json.dumps({"text": "a short document " * 100}) + "\n")
    assert run_data_script("fineweb.py", "--input", sample, "--output_dir", tmp_path, "-s", 100).returncode == 0
    result = run_data_script("fineweb.py", "--input", sample, "--output_dir", tmp_path, "-s", 1000)
    assert_fails_with_one_line(result, f"{tmp_path} already has", "fineweb shards", "remove them")


@pytest.mark.usefixtures("tiktoken_file")
@pytest.mark.parametrize("script", ["fineweb.py", "tinystories.py"])
def test_bad_local_samples_are_one_line_errors(tmp_path, script):
    field = "text" if script == "fineweb.py" else "story"
    missing = tmp_path / "missing.jsonl"
    assert_fails_with_one_line(run_data_script(script, "--input", missing, "--output_dir", tmp_path),
                               f"{missing}: file not found")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({field: "fine"}) + "\n\n{not json\n")
    assert_fails_with_one_line(run_data_script(script, "--input", broken, "--output_dir", tmp_path),
                               f"{broken}: line 3: invalid JSON")
    no_field = tmp_path / "no_field.jsonl"
    no_field.write_text(json.dumps({field: "fine"}) + "\n" + json.dumps({"title": "no text"}) + "\n")
    assert_fails_with_one_line(run_data_script(script, "--input", no_field, "--output_dir", tmp_path),
                               f"{no_field}: line 2: expected an object with a string '{field}' field")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(f'{{"{field}": "fine"}}\n{{"{field}": "café"}}\n'.encode("latin-1"))  # é is one byte, e9
    assert_fails_with_one_line(run_data_script(script, "--input", latin1, "--output_dir", tmp_path),
                               f"{latin1}: not UTF-8 text")
    csv = tmp_path / "sample.csv"
    csv.write_text("text\nhello\n")
    assert_fails_with_one_line(run_data_script(script, "--input", csv, "--output_dir", tmp_path),
                               f"{csv}: expected a .jsonl or .json file")


@pytest.mark.usefixtures("tiktoken_file")
@pytest.mark.parametrize("script", ["fineweb.py", "tinystories.py"])
def test_a_local_sample_without_text_is_an_error_naming_it(tmp_path, script):
    """Only <|endoftext|> tokens, or no shard at all, must not pass for a prepared dataset."""
    field = "text" if script == "fineweb.py" else "story"
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({field: text}) + "\n" for text in ("", "  ", "\n\t\n")))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    cases = ((blank, f"the '{field}' of all 3 records is empty or blank"), (empty, "it holds no records"))
    for sample, problem in cases:
        result = run_data_script(script, "--input", sample, "--output_dir", tmp_path / "shards", "--processes", 2)
        assert_fails_with_one_line(result, f"{sample}: no text to tokenize: {problem}")
        assert not list(tmp_path.glob("shards/*")), "no shard may be written"


@pytest.mark.usefixtures("tiktoken_file")
def test_offline_downloads_fail_with_one_line(tmp_path):
    assert_fails_with_one_line(run_data_script("tinystories.py", "--output_dir", tmp_path, offline=True),
                               "could not download https://huggingface.co/", "offline? pass --input")
    result = run_data_script("fineweb.py", "--output_dir", tmp_path, offline=True)
    assert_fails_with_one_line(result)
    assert "pip install datasets" in result.stderr or "offline? pass --input" in result.stderr


def test_a_missing_tokenizer_fails_before_any_download(tmp_path):
    missing = tmp_path / "gpt2.tiktoken"
    for script in ("tinyshakespeare.py", "tinystories.py", "fineweb.py"):
        result = run_data_script(script, "--tokenizer", missing, "--output_dir", tmp_path, offline=True)
        assert_fails_with_one_line(result, f"{missing}: GPT-2 BPE ranks file not found")
