"""Checkpoint files (llmpy/checkpoint.py): llm.c's state-file layout byte for byte, files llm.c writes read back,
optimizer shards re-assembled for any number of ranks, the -nk/-nm policy, and the clean-up of a killed run.

The layout is checked against llm.c's save_state (train_gpt2.cu) written out here as offsets: header ints, then m, v
and the master weights as float32, then the shuffle block; comparisons are exact (the file's bytes). Sharding is
checked against the whole flat arrays the shards were cut from: exact.
"""

import json
import os

import numpy as np
import pytest
import torch

from llmpy import checkpoint, formats
from llmpy.configs.gpt2 import GPT2Config, num_parameters
from llmpy.data import LoaderState
from llmpy.distributed import Dist
from llmpy.rand import Mt19937

CONFIG = GPT2Config(max_seq_len=16, vocab_size=100, padded_vocab_size=128, num_layers=2, num_heads=2, channels=8)
P = num_parameters(CONFIG)  # 2,912: wte 1,024 + wpe 128 + 2 layers of 872 + lnf 16


def shuffled_loader_state(rng):
    return LoaderState(shard=1, sample=3, shard_order=np.array([2, 0, 1], np.int32),
                       sample_order=rng.permutation(7).astype(np.int32), rng=Mt19937(43).to_bytes())


def test_the_state_file_is_llmcs_save_state_then_our_extension(tmp_path):
    rng = np.random.default_rng(0)
    m, v, master = (rng.standard_normal(P).astype(np.float32) for _ in range(3))
    loader = shuffled_loader_state(rng)
    extension = {"zero_stage": 0, "shard": [0, P], "note": "anything JSON"}
    path = tmp_path / "state_00000012_00001.bin"
    formats.write_file_atomic(path, checkpoint.state_chunks(4, 1, 12, 0x1234567890ABCDEF, loader, m, v, master,
                                                            extension))
    data = path.read_bytes()
    header = np.frombuffer(data, "<i4", 256)
    assert header[:6].tolist() == [20240527, 1, 4, 1, 1, 1] and header[10] == 12
    assert np.frombuffer(data, "<u8", 1, 80)[0] == 0x1234567890ABCDEF  # [20:22]
    assert np.frombuffer(data, "<u8", 2, 120).tolist() == [1, 3]  # [30:32] shard, [32:34] sample
    assert not header[6:10].any() and not header[11:20].any() and not header[24:30].any() and not header[34:].any()
    offset = 1024
    for array in (m, v, master):
        np.testing.assert_array_equal(np.frombuffer(data, "<f4", P, offset), array)
        offset += 4 * P
    assert np.frombuffer(data, "<u8", 1, offset)[0] == 3
    assert np.frombuffer(data, "<i4", 3, offset + 8).tolist() == [2, 0, 1]
    offset += 8 + 12
    assert np.frombuffer(data, "<u8", 1, offset)[0] == 7
    assert np.frombuffer(data, "<i4", 7, offset + 8).tolist() == loader.sample_order.tolist()
    offset += 8 + 28
    assert data[offset:offset + 2520] == loader.rng
    offset += 2520
    length, version, magic = np.frombuffer(data[-16:], dtype=[("l", "<u8"), ("v", "<i4"), ("m", "<i4")])[0]
    assert (magic, version, offset + length + 16) == (20261203, 1, len(data))
    assert json.loads(data[offset:offset + length]) == extension

    state = checkpoint.read_state(path, [P])
    assert (state.world_size, state.rank, state.step, state.rng) == (4, 1, 12, 0x1234567890ABCDEF)
    assert state.extension == extension
    np.testing.assert_array_equal(state.master, master)
    assert (state.loader.shard, state.loader.sample, state.loader.rng) == (1, 3, loader.rng)
    np.testing.assert_array_equal(state.loader.sample_order, loader.sample_order)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("master", [False, True])
def test_a_state_file_llmc_wrote_reads_back(tmp_path, shuffle, master):
    """llm.c's files have no extension: the arrays' length is found among the candidates the model allows."""
    rng = np.random.default_rng(1)
    n = P // 2  # a -z 1 shard of 2 ranks
    arrays = [rng.standard_normal(n).astype(np.float32) for _ in range(3 if master else 2)]
    header = np.zeros(256, "<i4")
    header[:6] = 20240527, 1, 2, 0, master, shuffle
    header[10] = 40
    header.view("<u8")[[10, 11, 15, 16]] = 99, 98, 0, 5
    chunks = [header, *arrays]
    loader = shuffled_loader_state(rng)
    if shuffle:
        chunks += [np.array([3], "<u8"), loader.shard_order, np.array([7], "<u8"), loader.sample_order, loader.rng]
    path = tmp_path / "state.bin"
    formats.write_file_atomic(path, chunks)
    state = checkpoint.read_state(path, [P, P // 2])
    assert state.extension is None and (state.world_size, state.step, state.rng) == (2, 40, 99)
    assert len(state.m) == n and (state.master is not None) == master
    np.testing.assert_array_equal(state.v, arrays[1])
    assert (state.loader.shard_order is not None) == shuffle and state.loader.sample == 5
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(formats.FormatError, match=f"not a state of this model's {P:,} parameters"):
        checkpoint.read_state(path, [P, P // 2])


def write_states(folder, step, config, full, world_size, layout):
    """Cuts the flat arrays full = (m, v, master) into world_size state files of `layout`: "ours" (contiguous
    shards of the padded buffer, with our extension), "llmc_z1" (llm.c's per-tensor shards) or "llmc_z0"."""
    P = num_parameters(config)
    padded = -(-P // world_size) * world_size
    loader = LoaderState(0, 0)
    for rank in range(world_size):
        if layout == "ours":
            size = padded // world_size
            piece = [np.pad(a, (0, padded - P))[rank * size:(rank + 1) * size] for a in full]
            extension = {"shard": [rank * size, (rank + 1) * size]}
        elif layout == "llmc_z1":
            piece = [np.concatenate([a[start + rank * size // world_size: start + (rank + 1) * size // world_size]
                                     for start, size in checkpoint.llmc_zero_blocks(config)]) for a in full]
            extension = None
        else:
            piece, extension = list(full), None
        chunks = checkpoint.state_chunks(world_size, rank, step, 7, loader, *piece, extension)
        if extension is None:
            chunks = chunks[:-2]  # llm.c writes no extension
        formats.write_file_atomic(checkpoint.state_path(folder, step, rank), chunks)
    formats.write_model(checkpoint.model_path(folder, step), config, full[2])
    formats.write_file_atomic(checkpoint.done_path(folder, step), [b""])


@pytest.mark.parametrize("old", [("ours", 1), ("ours", 2), ("ours", 3), ("llmc_z1", 2), ("llmc_z1", 4),
                                 ("llmc_z0", 2)])
@pytest.mark.parametrize("new_world", [1, 2, 3, 5])
def test_any_shards_reassemble_into_any_others(tmp_path, old, new_world):
    layout, old_world = old
    rng = np.random.default_rng(2)
    full = [rng.standard_normal(P).astype(np.float32) for _ in range(3)]
    write_states(tmp_path, 10, CONFIG, full, old_world, layout)
    found = checkpoint.latest_checkpoint(tmp_path)
    assert found.step == 10 and len(found.states) == old_world and found.config == CONFIG
    padded = -(-P // new_world) * new_world
    size = padded // new_world
    for rank in range(new_world):
        m, v, master = checkpoint.assemble_shard(found.states, CONFIG, rank * size, (rank + 1) * size)
        for got, whole in zip((m, v, master), full):
            np.testing.assert_array_equal(got, np.pad(whole, (0, padded - P))[rank * size:(rank + 1) * size])


def test_llmcs_zero_blocks_are_each_layer_of_each_tensor():
    blocks = checkpoint.llmc_zero_blocks(CONFIG)
    assert len(blocks) == 2 + 12 * 2 + 2  # wte, wpe, 12 tensors x 2 layers, lnfw, lnfb
    assert blocks[:3] == [(0, 128 * 8), (1024, 16 * 8), (1152, 8)]  # wte, wpe, ln1w of layer 0
    starts = [start for start, _ in blocks]
    assert starts == sorted(starts) and blocks[-1][0] + blocks[-1][1] == P
    assert all(a[0] + a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # they tile the buffer


def test_a_broken_newest_checkpoint_is_passed_over_for_the_one_before(tmp_path):
    rng = np.random.default_rng(3)
    full = [rng.standard_normal(P).astype(np.float32) for _ in range(3)]
    for step in (4, 8):
        write_states(tmp_path, step, CONFIG, full, 2, "ours")
    state = tmp_path / "state_00000008_00001.bin"
    state.write_bytes(state.read_bytes()[:-100])  # the extension's end: its trailer no longer found
    notes = []
    assert checkpoint.latest_checkpoint(tmp_path, notes.append).step == 4
    assert len(notes) == 1 and "checkpoint 8 is not usable" in notes[0] and "state_00000008_00001.bin" in notes[0]
    os.remove(tmp_path / "state_00000004_00000.bin")
    assert checkpoint.latest_checkpoint(tmp_path, notes.append) is None
    assert "missing" in notes[-1]


def test_a_killed_runs_leftovers_are_removed_and_complete_checkpoints_kept(tmp_path):
    rng = np.random.default_rng(4)
    full = [rng.standard_normal(P).astype(np.float32) for _ in range(3)]
    write_states(tmp_path, 4, CONFIG, full, 2, "ours")
    write_states(tmp_path, 8, CONFIG, full, 2, "ours")
    os.remove(tmp_path / "DONE_00000008")  # killed while writing checkpoint 8's marker
    for name in ("model_00000012.bin.tmp123", "state_00000012_00001.bin.tmp77", "state_00000012_00000.bin.tmp8",
                 "main.log", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    checkpoint.remove_incomplete(tmp_path, rank=1, world_size=2, keep_steps=[4])
    left = sorted(os.listdir(tmp_path))
    assert "state_00000008_00001.bin" not in left and "state_00000012_00001.bin.tmp77" not in left
    assert "state_00000008_00000.bin" in left and "model_00000008.bin" in left  # rank 0's to remove
    checkpoint.remove_incomplete(tmp_path, rank=0, world_size=1, keep_steps=[4])  # rank 0 of a 1-rank run: all
    assert sorted(os.listdir(tmp_path)) == ["DONE_00000004", "main.log", "model_00000004.bin", "notes.txt",
                                            "state_00000004_00000.bin", "state_00000004_00001.bin"]


@pytest.mark.parametrize("keep, major, expected", [(0, 0, [2, 4, 6, 8, 10, 12]), (2, 0, [10, 12]),
                                                   (2, 4, [4, 8, 10, 12]), (1, 6, [6, 12])])
def test_checkpoints_keep_the_newest_and_the_major_ones(tmp_path, keep, major, expected):
    writer = checkpoint.CheckpointWriter(str(tmp_path), Dist(), keep=keep, major=major, say=lambda *_: None)
    params = torch.randn(P)
    arrays = {"m": torch.randn(P), "v": torch.rand(P), "master": None}
    for step in range(2, 13, 2):
        writer.save(step, CONFIG, params, arrays, (1, 0, 5, LoaderState(0, step), {"shard": [0, P]}))
        writer.poll()  # may or may not be done: the next save waits for it
    writer.finish()
    writer.close()
    assert checkpoint.complete_steps(tmp_path) == expected
    assert sorted(os.listdir(tmp_path)) == sorted(f for s in expected for f in (
        f"DONE_{s:08d}", f"model_{s:08d}.bin", f"state_{s:08d}_00000.bin"))
    newest = checkpoint.open_checkpoint(tmp_path, 12)
    np.testing.assert_array_equal(newest.states[0].m, arrays["m"].numpy())
    assert newest.states[0].master is None and newest.states[0].loader.sample == 12
    np.testing.assert_array_equal(formats.read_model(newest.model_path)[1], params.numpy())
