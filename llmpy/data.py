"""Training batches from token shards, with llm.c's DataLoader semantics. NumPy only."""

import glob
import os

import numpy as np

from .formats import FormatError, read_shard


class DataLoader:
    """Batches (x, y), int32 (B, T), from the token shards matching a glob pattern, read in sorted order.

    Each shard is cut into chunks of B*T tokens. A batch is one chunk and the token after it (B*T+1 tokens):
    x is the first B*T of them and y the last B*T, so y[b, t] is the token that follows x[b, t]. Step s of rank r
    reads chunk s*world_size + r, which starts at token (s*world_size + r)*B*T: the ranks read disjoint chunks
    and together advance B*T*world_size tokens a step. When a shard has no whole step left, every rank moves to
    the next shard, and after the last back to the first (a new epoch).

    With shuffle, the chunks a shard serves are read in a random order: a permutation drawn from
    (seed, epoch, shard index), so it is the same on every rank (the ranks still read disjoint chunks), the
    same after reset(), and different for each pass over the data. Shards keep their sorted order.

    Every shard's size is checked when the loader is made; with vocab_size, a shard's token ids are checked
    against it when the loader opens the shard (one pass over it), before any of its batches is returned.
    """

    def __init__(self, pattern, B, T, rank=0, world_size=1, shuffle=False, seed=0, vocab_size=None):
        if B < 1 or T < 1:
            raise ValueError(f"batch size B={B} and sequence length T={T} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.paths = sorted(glob.glob(os.fspath(pattern)))
        if not self.paths:
            raise FormatError(pattern, "no files match this pattern")
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.shuffle, self.seed, self.vocab_size = shuffle, seed, vocab_size

        tokens_per_step = B * T * world_size
        self.steps_per_shard = []
        for path in self.paths:
            num_tokens = len(read_shard(path))
            if num_tokens < tokens_per_step + 1:
                raise ValueError(f"shard {path} has {num_tokens} tokens, a batch needs {tokens_per_step + 1} "
                                 f"(B*T*world_size + 1 = {B}*{T}*{world_size} + 1): use smaller -b/-t")
            # the last chunk read needs one token after it, for y
            self.steps_per_shard.append((num_tokens - 1) // tokens_per_step)
        self.reset()

    @property
    def num_batches_per_epoch(self):
        """Steps in one pass over all shards (the same for every rank)."""
        return sum(self.steps_per_shard)

    def reset(self):
        """Back to the first batch of the first shard, epoch 0."""
        self.epoch = 0
        self._open_shard(0)

    def _open_shard(self, shard_index):
        self.shard_index = shard_index
        self.tokens = read_shard(self.paths[shard_index], self.vocab_size)  # memory-mapped
        self.step_in_shard = 0
        num_chunks = self.steps_per_shard[shard_index] * self.world_size
        if self.shuffle:
            rng = np.random.default_rng((self.seed, self.epoch, shard_index))
            self.chunk_order = rng.permutation(num_chunks)
        else:
            self.chunk_order = np.arange(num_chunks)

    def next_batch(self):
        """The next (x, y): int32 arrays of shape (B, T), y[b, t] the token after x[b, t]."""
        if self.step_in_shard == self.steps_per_shard[self.shard_index]:
            next_shard = (self.shard_index + 1) % len(self.paths)
            if next_shard == 0:
                self.epoch += 1
            self._open_shard(next_shard)
        B, T = self.B, self.T
        chunk = self.chunk_order[self.step_in_shard * self.world_size + self.rank]
        start = int(chunk) * B * T
        batch = np.array(self.tokens[start: start + B * T + 1], dtype=np.int32)
        self.step_in_shard += 1
        return batch[:-1].reshape(B, T), batch[1:].reshape(B, T)
