"""Training batches from token shards, with llm.c's DataLoader semantics, shuffling included. NumPy only."""

import glob
import os
from dataclasses import dataclass

import numpy as np

from .formats import FormatError, read_shard
from .rand import Mt19937

SHUFFLE_SEED = 42  # llm.c seeds rank r's shuffle with 42 + r, whatever the run's other seeds


@dataclass
class LoaderState:
    """Where a DataLoader is, as llm.c saves it in a checkpoint: the position in the (shuffled) order of the shards,
    the batch within the shard, and with shuffle the two orders and the generator that draws the next ones."""

    shard: int  # llm.c's current_shard_idx: a position in shard_order
    sample: int  # llm.c's current_sample_idx: batches of the shard already read
    shard_order: np.ndarray = None  # int32 (shards,), shuffle only
    sample_order: np.ndarray = None  # int32 (batches in the current shard,), shuffle only
    rng: bytes = None  # llm.c's mt19937_state struct, shuffle only


class DataLoader:
    """Batches (x, y), int32 (B, T), from the token shards matching a glob pattern, in llm.c's order.

    A shard holds (tokens - 1) // (B*T*W) samples of B*T*W + 1 tokens (W ranks): sample i starts at token
    i*B*T*W, and rank r reads the B*T + 1 tokens from i*B*T*W + r*B*T on, so the ranks read disjoint tokens.
    x is the first B*T of them and y the last B*T: y[b, t] is the token after x[b, t].

    Without shuffle: the shards in sorted order, the samples of each in order, then the next shard; after the last,
    the first again (a new epoch). With shuffle (llm.c's default for training), as llm.c's dataloader.h: rank r's
    Mersenne Twister is seeded with 42 + r; each pass over the data (reset) permutes the order of the shards (the
    previous order, not the sorted one), and opening a shard permutes the order of its samples. So the ranks' orders
    differ, each rank still reads every sample of every shard once a pass, and the same seed gives the same batches
    as llm.c. state() and restore() save and resume the position and the orders exactly.

    Every shard's size is checked when the loader is made; with vocab_size, a shard's token ids are checked against
    it when the loader opens the shard (one pass over it), before any of its batches is returned.
    """

    def __init__(self, pattern, B, T, rank=0, world_size=1, shuffle=False, vocab_size=None):
        if B < 1 or T < 1:
            raise ValueError(f"batch size B={B} and sequence length T={T} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.paths = sorted(glob.glob(os.fspath(pattern)))
        if not self.paths:
            raise FormatError(pattern, "no files match this pattern")
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.shuffle, self.vocab_size = shuffle, vocab_size
        tokens_per_sample = B * T * world_size
        self.samples_per_shard = []
        for path in self.paths:
            num_tokens = len(read_shard(path))
            if num_tokens < tokens_per_sample + 1:
                raise ValueError(f"shard {path} has {num_tokens} tokens, a batch needs {tokens_per_sample + 1} "
                                 f"(B*T*world_size + 1 = {B}*{T}*{world_size} + 1): use smaller -b/-t")
            self.samples_per_shard.append((num_tokens - 1) // tokens_per_sample)  # the last y needs one token more
        self.shard_order = np.arange(len(self.paths), dtype=np.int32)
        self.rng = Mt19937(SHUFFLE_SEED + rank) if shuffle else None
        self.epoch = 0  # passes over the data completed, counted by next_batch
        self.reset()

    @property
    def num_batches_per_epoch(self):
        """Batches in one pass over all shards (the same for every rank)."""
        return sum(self.samples_per_shard)

    def reset(self):
        """The start of a pass over the data (llm.c's dataloader_reset): the first shard's first batch; with shuffle,
        a new order of the shards and of the first shard's batches, so the batches differ from the last pass's."""
        if self.shuffle:
            self.rng.permute(self.shard_order)
        self._open_shard(0)

    def _open_shard(self, position, sample_order=None):
        self.shard = position
        self.sample = 0
        shard_index = int(self.shard_order[position])
        self.tokens = read_shard(self.paths[shard_index], self.vocab_size)  # memory-mapped
        if self.shuffle and sample_order is None:
            sample_order = np.arange(self.samples_per_shard[shard_index], dtype=np.int32)
            self.rng.permute(sample_order)
        self.sample_order = sample_order

    @property
    def _samples_here(self):
        return self.samples_per_shard[int(self.shard_order[self.shard])]

    def _advance(self):
        """Moves to the next batch and returns the token where it starts."""
        if self.sample >= self._samples_here:
            if self.shard == len(self.paths) - 1:
                self.epoch += 1
                self.reset()
            else:
                self._open_shard(self.shard + 1)
        index = int(self.sample_order[self.sample]) if self.shuffle else self.sample
        self.sample += 1
        return (index * self.world_size + self.rank) * self.B * self.T

    def next_batch(self):
        """The next (x, y): int32 arrays of shape (B, T), y[b, t] the token after x[b, t]."""
        start = self._advance()
        batch = np.array(self.tokens[start: start + self.B * self.T + 1], dtype=np.int32)
        return batch[:-1].reshape(self.B, self.T), batch[1:].reshape(self.B, self.T)

    def skip(self, num_batches):
        """Moves num_batches batches on without reading them."""
        for _ in range(num_batches):
            self._advance()

    def state(self):
        """This rank's position and orders (llmpy.checkpoint writes them as llm.c does)."""
        if not self.shuffle:
            return LoaderState(self.shard, self.sample)
        return LoaderState(self.shard, self.sample, self.shard_order.copy(), self.sample_order.copy(),
                           self.rng.to_bytes())

    def restore(self, state):
        """Continues from a state() of a loader over the same shards (llm.c's dataloader_resume); ValueError if the
        state cannot be this loader's."""
        if (state.shard_order is not None) != self.shuffle:
            raise ValueError(f"the saved loader was {'' if state.shard_order is not None else 'not '}shuffled")
        if not 0 <= state.shard < len(self.paths):
            raise ValueError(f"the saved loader is at shard {state.shard} of {len(self.paths)}")
        if self.shuffle:
            if sorted(state.shard_order.tolist()) != list(range(len(self.paths))):
                raise ValueError(f"the saved shard order is not a permutation of {len(self.paths)} shards")
            self.shard_order = np.asarray(state.shard_order, dtype=np.int32).copy()
            self.rng = Mt19937.from_bytes(state.rng)
        samples = self.samples_per_shard[int(self.shard_order[state.shard])]
        if self.shuffle and sorted(state.sample_order.tolist()) != list(range(samples)):
            raise ValueError(f"the saved batch order is not a permutation of the shard's {samples} batches")
        if not 0 <= state.sample <= samples:
            raise ValueError(f"the saved loader is at batch {state.sample} of a shard of {samples}")
        self._open_shard(state.shard, None if not self.shuffle else np.asarray(state.sample_order, np.int32).copy())
        self.sample = state.sample
