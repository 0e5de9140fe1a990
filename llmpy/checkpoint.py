"""Checkpoints in llm.c's layout: written beside training, read back for an exact resume. NumPy (torch only to copy
device tensors to host memory).

A checkpoint of step S (S optimizer updates done) is three kinds of files in the run's folder (-o):
    model_%08d.bin        the weights: an llm.c model file in the run's precision (fp32, or bf16 with master weights)
    state_%08d_%05d.bin   one per rank: the AdamW moments (and master weights) of its shard and its data loader's place
    DONE_%08d             written last, once every rank's files are complete: a checkpoint without it is never read
Every file is written to a temporary name, flushed to the disk and renamed (llmpy.formats.write_file_atomic), so a
kill at any moment leaves whole files or temporaries, never a torn file under a real name.

State file, llm.c's save_state byte for byte, then an extension of ours that llm.c never reads:
    header, 256 int32: [0] 20240527  [1] 1  [2] processes  [3] rank  [4] 1 if master weights follow  [5] 1 if the
        loader shuffles  [10] step  [20:22] uint64 the sampling RNG (llm.c: its stochastic-rounding RNG)
        [22:24] uint64 the same (llm.c: that RNG before the last update)  [30:32] uint64 the loader's shard position
        [32:34] uint64 the batches it has read of that shard
    float32 m, float32 v, then float32 master weights if [4], each over this rank's shard of the parameters
    if [5]: uint64 shards, int32 shard order, uint64 batches in the current shard, int32 their order, then the
        loader's Mersenne Twister as llm.c's mt19937_state struct (llmpy.rand)
    extension: UTF-8 JSON, then uint64 its length in bytes, int32 version (1), int32 magic 20261203. At the file's
        end, so a reader finds it from there; llm.c stops reading before it. The JSON holds what llm.c does not
        save: the ZeRO stage and which range of the (padded) flat parameter buffer the shard covers, the run's
        flags (to say what changed on a resume), the loader's epoch, the outlier guard's windows and, under
        --precision fp8, the delayed scales' amax histories (llmpy.precision.FP8.state).

Shards. -z 0: every rank holds all parameters (its file is the whole state). -z 1 here: rank r holds the r-th
contiguous 1/W of the flat buffer, padded to a multiple of W. llm.c's own -z 1 shards differently, the r-th 1/W of
every tensor of every layer; we read that layout too (from the arrays' length, when there is no extension), so any
run resumes on any number of ranks: each rank assembles its new shard from the pieces of the old files.
"""

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import families, formats
from .params import param_shapes
from .data import LoaderState
from .rand import MT_STATE_BYTES

STATE_MAGIC, STATE_VERSION = 20240527, 1
EXTENSION_MAGIC, EXTENSION_VERSION = 20261203, 1
_TRAILER = np.dtype([("length", "<u8"), ("version", "<i4"), ("magic", "<i4")])
_FILE = re.compile(r"^(?:model_(\d{8})\.bin|state_(\d{8})_(\d{5})\.bin|DONE_(\d{8}))(\.tmp\d+)?$")
# seconds to sleep after writing each file of a checkpoint: lets the fault-injection tests kill a process inside
# a checkpoint write reliably (tests/test_long_runs.py); 0 in real runs
_SLOW_WRITE_S = float(os.environ.get("LLMPY_CHECKPOINT_SLOW_WRITE_S", "0"))


def model_path(folder, step):
    return os.path.join(folder, f"model_{step:08d}.bin")


def state_path(folder, step, rank):
    return os.path.join(folder, f"state_{step:08d}_{rank:05d}.bin")


def done_path(folder, step):
    return os.path.join(folder, f"DONE_{step:08d}")


# ----------------------------------------------------------------------------- state files


@dataclass
class State:
    """One rank's state file, read: the header's fields, the arrays (memory-mapped) and our extension (None in a
    file llm.c wrote)."""

    path: str
    world_size: int
    rank: int
    step: int
    rng: int
    loader: LoaderState
    m: np.ndarray
    v: np.ndarray
    master: np.ndarray  # None without master weights
    extension: dict


def state_chunks(world_size, rank, step, rng, loader, m, v, master, extension):
    """The pieces of a state file, in order (arrays float32, host memory), for formats.write_file_atomic."""
    header = np.zeros(formats.HEADER_INTS, dtype="<i4")
    header[:6] = STATE_MAGIC, STATE_VERSION, world_size, rank, master is not None, loader.shard_order is not None
    header[10] = step
    words = header.view("<u8")  # [20:22] is uint64 word 10, [22:24] 11, [30:32] 15, [32:34] 16
    words[10] = words[11] = rng
    words[15], words[16] = loader.shard, loader.sample
    chunks = [header, m, v] + ([master] if master is not None else [])
    if loader.shard_order is not None:
        chunks += [np.array([len(loader.shard_order)], "<u8"), loader.shard_order.astype("<i4"),
                   np.array([len(loader.sample_order)], "<u8"), loader.sample_order.astype("<i4"), loader.rng]
    text = json.dumps(extension).encode()
    trailer = np.array([(len(text), EXTENSION_VERSION, EXTENSION_MAGIC)], dtype=_TRAILER)
    return chunks + [text, trailer]


def read_state(path, shard_sizes):
    """A state file -> State. shard_sizes: the lengths its arrays may have (the caller knows the model's size and the
    layouts); the file's own extension, when it has one, says which. Raises FormatError naming the file."""
    size = _file_size(path)
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(formats.HEADER_BYTES), dtype="<i4")
        if len(header) < formats.HEADER_INTS or header[0] != STATE_MAGIC:
            raise formats.FormatError(path, f"not an llm.c state file (magic {header[0] if len(header) else None}, "
                                            f"expected {STATE_MAGIC})")
        if header[1] != STATE_VERSION:
            raise formats.FormatError(path, f"state file version {header[1]}, expected {STATE_VERSION}")
        extension, end = None, size
        if size >= formats.HEADER_BYTES + _TRAILER.itemsize:
            f.seek(size - _TRAILER.itemsize)
            trailer = np.frombuffer(f.read(_TRAILER.itemsize), dtype=_TRAILER)[0]
            if trailer["magic"] == EXTENSION_MAGIC:
                end = size - _TRAILER.itemsize - int(trailer["length"])
                f.seek(end)
                try:
                    extension = json.loads(f.read(int(trailer["length"])))
                except ValueError:
                    raise formats.FormatError(path, "its llm.py extension is not valid JSON (corrupt)") from None
                shard_sizes = [extension["shard"][1] - extension["shard"][0]]
        words = header.view("<u8")
        master, shuffle = bool(header[4]), bool(header[5])
        for n in shard_sizes:  # the one whose arrays and loader block end exactly where the file (or extension) does
            offset = formats.HEADER_BYTES + 4 * n * (3 if master else 2)
            loader = LoaderState(int(words[15]), int(words[16]))
            if shuffle:
                f.seek(offset)
                loader, offset = _read_loader_block(f, offset, end, loader)
                if loader is None:
                    continue
            if offset == end:
                break
        else:
            raise formats.FormatError(path, f"{size} bytes: not a state of this model's {shard_sizes[0]:,} "
                                            "parameters (other model, or truncated)")
    arrays = [np.memmap(path, dtype="<f4", mode="r", offset=formats.HEADER_BYTES + 4 * n * i, shape=(n,))
              for i in range(3 if master else 2)]
    return State(path, int(header[2]), int(header[3]), int(header[10]), int(words[10]), loader, arrays[0],
                 arrays[1], arrays[2] if master else None, extension)


def _read_loader_block(f, offset, end, loader):
    """The shuffle block at offset -> (LoaderState, the offset after it), or (None, None) if it does not fit."""
    def take(dtype, count):
        nonlocal offset
        size = np.dtype(dtype).itemsize * count
        if offset + size > end:
            raise EOFError
        offset += size
        return np.frombuffer(f.read(size), dtype=dtype, count=count)
    try:
        shard_order = take("<i4", int(take("<u8", 1)[0])).copy()
        sample_order = take("<i4", int(take("<u8", 1)[0])).copy()
        rng = bytes(take("u1", MT_STATE_BYTES))
    except (EOFError, ValueError, OverflowError):
        return None, None
    return LoaderState(loader.shard, loader.sample, shard_order, sample_order, rng), offset


def _file_size(path):
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise formats.FormatError(path, e.strerror) from None


# ----------------------------------------------------------------------------- shards of the flat buffer


_WHOLE_MODEL_TENSORS = ("wte", "wpe", "lnfw", "lnfb", "lmhead")  # llm.c's tensors with no layer axis


def llmc_zero_blocks(config):
    """llm.c's ZeRO-1 unit: each layer of each per-layer tensor, and each whole-model tensor, as (start, size) in the
    flat buffer, in order. Rank r's shard is the r-th 1/W of every block, the blocks' pieces one after another."""
    blocks, offset = [], 0
    for name, shape in param_shapes(families.of_config(config).param_table(config)).items():
        per_layer = name not in _WHOLE_MODEL_TENSORS
        count, size = (shape[0], int(np.prod(shape[1:]))) if per_layer else (1, int(np.prod(shape)))
        blocks += [(offset + i * size, size) for i in range(count)]
        offset += count * size
    return blocks


def _coverage(state, config, world_size):
    """[(flat start, flat stop, offset in the file's arrays)] that a state file's arrays cover."""
    P = families.of_config(config).num_parameters(config)
    n = len(state.m)
    if state.extension is not None:
        start, stop = state.extension["shard"]
        return [(start, min(stop, P), 0)] if start < P else []
    if n == P:
        return [(0, P, 0)]
    runs, offset = [], 0  # llm.c's -z 1
    for start, size in llmc_zero_blocks(config):
        piece = size // world_size
        runs.append((start + state.rank * piece, start + (state.rank + 1) * piece, offset))
        offset += piece
    return runs


def assemble_shard(states, config, start, stop):
    """This rank's new shard [start, stop) of the padded flat buffer, as (m, v, master or None) float32 arrays,
    from the pieces of the old ranks' state files (any ZeRO stage, any number of ranks). Past the parameters (the
    padding) it is zero. Reads only the pieces it needs."""
    P = families.of_config(config).num_parameters(config)
    has_master = states[0].master is not None
    out = [np.zeros(stop - start, dtype=np.float32) for _ in range(3 if has_master else 2)]
    covered = np.zeros(stop - start, dtype=bool)
    world_size = states[0].world_size
    for state in states:
        arrays = [state.m, state.v] + ([state.master] if has_master else [])
        for lo, hi, offset in _coverage(state, config, world_size):
            a, b = max(lo, start), min(hi, stop)
            if a >= b or covered[a - start:b - start].all():
                continue
            for target, source in zip(out, arrays):
                target[a - start:b - start] = source[offset + a - lo:offset + b - lo]
            covered[a - start:b - start] = True
        if covered[:max(0, min(stop, P) - start)].all():
            break
    if not covered[:max(0, min(stop, P) - start)].all():
        raise ValueError(f"the state files do not cover parameters [{start}, {min(stop, P)})")
    return tuple(out) if has_master else (out[0], out[1], None)


# ----------------------------------------------------------------------------- the folder


def complete_steps(folder):
    """Steps with a DONE marker in folder, oldest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(4)) for m in map(_FILE.match, names) if m and m.group(4) and not m.group(5))


@dataclass
class Checkpoint:
    """A complete checkpoint found in a folder: its step, model file, and the state files of its ranks."""

    step: int
    model_path: str
    config: object
    states: list  # State of rank 0 .. W-1


def open_checkpoint(folder, step):
    """The checkpoint of step in folder, checked whole (the model file's header and length, every rank's state file
    there and consistent); raises FormatError naming the file that is wrong."""
    path = model_path(folder, step)
    family = families.of_file(path)
    config, _ = family.read_model_header(path)
    P = family.num_parameters(config)
    first = state_path(folder, step, 0)
    if not os.path.exists(first):
        raise formats.FormatError(first, "missing (the checkpoint's DONE marker is there, its rank 0 state is not)")
    header = np.fromfile(first, dtype="<i4", count=formats.HEADER_INTS)
    world_size = int(header[2]) if len(header) > 2 else 0
    if world_size < 1:
        raise formats.FormatError(first, f"nonsense number of processes {world_size}")
    sizes = [P] + ([P // world_size] if P % world_size == 0 and world_size > 1 else [])
    states = []
    for rank in range(world_size):
        path_r = state_path(folder, step, rank)
        if not os.path.exists(path_r):
            raise formats.FormatError(path_r, f"missing: the checkpoint was written by {world_size} processes")
        state = read_state(path_r, sizes)
        if (state.world_size, state.rank, state.step) != (world_size, rank, step):
            raise formats.FormatError(path_r, f"says processes {state.world_size}, rank {state.rank}, step "
                                              f"{state.step}; expected {world_size}, {rank}, {step}")
        states.append(state)
    return Checkpoint(step, path, config, states)


def latest_checkpoint(folder, say=print):
    """The newest complete checkpoint in folder that reads back whole, or None. A DONE marker whose files do not
    read back (removed by hand, a disk error) is passed over with a note."""
    for step in reversed(complete_steps(folder)):
        try:
            return open_checkpoint(folder, step)
        except formats.FormatError as e:
            say(f"note: checkpoint {step} is not usable ({e}); trying an older one")
    return None


def remove_incomplete(folder, rank, world_size, keep_steps):
    """Removes what a killed run left: temporaries, and checkpoint files of steps without a DONE marker or newer than
    the checkpoint resumed from (keep_steps: the complete checkpoints to keep). Rank 0 removes model files, DONE
    markers and the state files of ranks this run does not have; every rank its own state files."""
    keep = set(keep_steps)
    for name in os.listdir(folder):
        m = _FILE.match(name)
        if not m:
            continue
        step = int(m.group(1) or m.group(2) or m.group(4))
        owner = int(m.group(3)) if m.group(3) else 0
        mine = owner == rank or (rank == 0 and owner >= world_size)
        if mine and (m.group(5) or step not in keep):
            _remove(os.path.join(folder, name))


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------- writing beside training


class CheckpointWriter:
    """Writes checkpoints from a background thread, so training goes on while the disk works.

    save() copies the device tensors into pinned host buffers (allocated once, at the first save: the only part
    training waits for) and returns; a thread then writes this rank's files. poll(), called once a step, notices
    when every rank's files are written (on several ranks, through one small all-reduce a step while a write is
    under way), then rank 0 writes the DONE marker and every rank removes the checkpoints -nk/-nm no longer keep.
    finish() waits for the write under way (the end of training, a stop).
    """

    def __init__(self, folder, dist, keep=0, major=0, complete=(), say=print):
        self.folder, self.dist, self.keep, self.major, self.say = folder, dist, keep, major, say
        self.complete = list(complete)  # steps of the complete checkpoints in the folder, oldest first
        self._host = {}  # name -> host tensor (pinned on a GPU run)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = None  # (step, Future) of the write under way
        self.stall_s = []  # per save, the seconds training waited (the copies, and a previous write unfinished)

    def save(self, step, config, params, arrays, state_fields):
        """Starts writing the checkpoint of step. params: the flat parameters (device, the run's dtype: written by
        rank 0 as the model file); arrays: {"m", "v", "master"} of this rank's shard (device fp32; master None in
        fp32 runs); state_fields: (world_size, rank, rng, LoaderState, extension) for state_chunks. Training waits
        for the copies to host memory, and for the previous checkpoint's write if it is still going."""
        start = time.perf_counter()
        self.finish()  # one write at a time: the buffers are reused
        host = self.reserve(params, arrays)
        for name, t in self._tensors(params, arrays).items():
            host[name].copy_(t, non_blocking=True)
        if params.is_cuda:
            torch.cuda.current_stream().synchronize()
        self.stall_s.append(time.perf_counter() - start)
        # bf16 has no NumPy dtype: its bits as uint16, which the model file's bf16 payload is
        as_numpy = {name: t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
                    for name, t in host.items()}
        self._pending = (step, self._pool.submit(self._write, step, config, as_numpy, state_fields))

    def reserve(self, params, arrays):
        """The host buffers save() copies into (pinned for a GPU's tensors), allocated at the first call: call it
        before training, so that allocating gigabytes of pinned memory does not stall the first checkpoint."""
        for name, t in self._tensors(params, arrays).items():
            buffer = self._host.get(name)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
                self._host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        return self._host

    def _tensors(self, params, arrays):
        tensors = {name: t for name, t in arrays.items() if t is not None}
        if self.dist.is_main:
            tensors["params"] = params
        return tensors

    def _write(self, step, config, host, state_fields):
        start = time.perf_counter()
        written = 0
        if "params" in host:
            params = host["params"]
            formats.write_file_atomic(model_path(self.folder, step), families.of_config(config).model_file_chunks(
                config, params, "bfloat16" if params.dtype == np.uint16 else "float32"))
            written += params.nbytes
            time.sleep(_SLOW_WRITE_S)
        world_size, rank, rng, loader, extension = state_fields
        chunks = state_chunks(world_size, rank, step, rng, loader, host["m"], host["v"], host.get("master"), extension)
        formats.write_file_atomic(state_path(self.folder, step, rank), chunks)
        written += sum(c.nbytes if isinstance(c, np.ndarray) else len(c) for c in chunks)
        time.sleep(_SLOW_WRITE_S)
        return written, time.perf_counter() - start

    def poll(self):
        """Finishes the write under way if every rank's files are on disk; nothing to wait for otherwise."""
        if self._pending is None:
            return
        done = self._pending[1].done()
        if self.dist.world_size > 1:
            done = self.dist.all_agree(done, "whether the checkpoint files are written")
        if done:
            self.finish()

    def finish(self):
        """Waits for the write under way (every rank's), then marks it complete and prunes. Raises the write's
        OSError, naming the file."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        written, seconds = future.result()
        if self.dist.world_size > 1:
            self.dist.all_agree(True, "the end of the checkpoint write")  # every rank's files are there
        if self.dist.is_main:
            formats.write_file_atomic(done_path(self.folder, step), [b""])
            time.sleep(_SLOW_WRITE_S)
        self.say(f"checkpoint {step} written to {self.folder} ({written / 2**20:.1f} MiB from this process in "
                 f"{seconds:.2f} s, {written / 2**20 / max(seconds, 1e-9):.0f} MiB/s; training waited "
                 f"{1000 * self.stall_s[-1]:.0f} ms)")
        self.complete.append(step)
        self._prune()

    def _prune(self):
        """-nk: keep the newest `keep` complete checkpoints; -nm: and every step that is a multiple of `major`.
        The DONE marker goes first, so a checkpoint half removed is never resumed from."""
        if self.keep <= 0:
            return
        doomed = [s for s in self.complete[:-self.keep] if not (self.major > 0 and s % self.major == 0)]
        for step in doomed:
            if self.dist.is_main:
                _remove(done_path(self.folder, step))
                _remove(model_path(self.folder, step))
            _remove(state_path(self.folder, step, self.dist.rank))
            self.complete.remove(step)
        if doomed:
            self.say(f"removed checkpoint{'s' if len(doomed) > 1 else ''} {', '.join(map(str, doomed))} (-nk "
                     f"{self.keep}{f', -nm {self.major}' if self.major else ''})")

    def close(self):
        self._pool.shutdown(wait=True)
