"""Generating tokens from a model: choosing each one from the logits (greedy, temperature, top-k, top-p), and the loop.
NumPy only, on the host.

sample.py generates on the GPU (llmpy.inference, a KV cache) or the CPU (train_gpt2_cpu.py's NumPy forward). Each is a
*decoder*, B rows (samples) that continue one prompt:
    prefill(prompt) -> logits   the model has read the prompt (a list of token ids); the next token's logits,
                                (B, V) float32, one row per sample (all equal)
    decode(tokens)  -> logits   the model has read one more token per row, tokens (B,); the logits after it
and generate() alternates a decoder with a Sampler. FullForwardDecoder makes a decoder of any full forward pass.

Why the sampling runs on the host, in NumPy: the same code serves both paths, so the same logits and seed give the
same tokens on the GPU and the CPU, and the CPU path needs no torch; each step's logits must reach the host anyway,
since the next step's input depends on them (a (V,) row a sample, 200 KB in fp32); and the model's device code
stays free of sampling. The price is host time at every step: the rows are sampled one after the other on one core
(top-p without top-k costs the most: it sorts the whole vocabulary; greedy is an argmax), which at many samples is of
the order of the GPU's decode step (BENCHMARKS.md, "GPU: generation" and "Design measurements quoted from the code").

The coins are llm.c's: one float in [0, 1) a row and step from its xorshift generator (llmpy.rand.Xorshift), turned
into a token by inverse transform sampling over the distribution in id order, as llm.c's sample_softmax. So with
temperature 1 and no top-k or top-p, a seed draws what llm.c draws from the same logits (up to rounding at the edges of
the intervals: llm.c sums in fp32).
"""

import math
import time
from typing import NamedTuple

import numpy as np

from .configs.gpt2 import GPT2_EOT
from .rand import Xorshift

_PICK_BLOCK = 1024  # probabilities per block of pick's running sums


def distribution(logits, temperature, top_k=0, top_p=1.0):
    """The distribution the next token is drawn from, given its logits (V,): (ids, probs), probs float64 summing to 1.

    softmax(logits / temperature) (temperature > 0), kept to the top_k most probable tokens (0: all), then to the
    smallest set of the most probable ones whose probability reaches top_p (1: all), renormalised. Unfiltered, ids are
    0..V-1 in order; filtered, in order of decreasing probability.
    """
    V = len(logits)
    ids, z = np.arange(V), logits
    if 0 < top_k < V:
        ids = np.argpartition(logits, V - top_k)[V - top_k:]  # the top_k largest, in no particular order
    if len(ids) < V or top_p < 1:
        ids = ids[np.argsort(-logits[ids])]
        z = logits[ids]
    z = z / np.float32(temperature)
    weights = np.exp(z - z.max())  # fp32: a third of fp64's time over 50,257 values, and as exact as the logits
    probs = weights / weights.sum(dtype=np.float64)
    if top_p < 1:
        n = nucleus_size(probs, top_p)
        ids, probs = ids[:n], probs[:n] / probs[:n].sum()
    return ids, probs


def nucleus_size(probs, top_p):
    """How many tokens top-p keeps of probs (sorted in decreasing order, summing to 1): the smallest n whose first n
    probabilities add up to at least top_p (all of them if rounding keeps the total just below it)."""
    return min(int(np.searchsorted(np.cumsum(probs), top_p)) + 1, len(probs))


def pick(ids, probs, coin):
    """The token of ids whose interval of the cumulative distribution holds coin, a float in [0, 1): the first i with
    coin < probs[0] + ... + probs[i] (inverse transform sampling, as llm.c's sample_softmax).

    The running sums are taken a block at a time: the block's sums first, then within the block that holds coin (a
    running sum over all of GPT-2's 50,257 probabilities, which NumPy does one value after the other, took longer
    than the rest of the sampling together)."""
    starts = np.arange(0, len(probs), _PICK_BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(probs, starts))
    target = coin * block_cdf[-1]
    block = min(int(np.searchsorted(block_cdf, target, side="right")), len(starts) - 1)
    cdf = (block_cdf[block - 1] if block else 0.0) + np.cumsum(probs[starts[block]:starts[block] + _PICK_BLOCK])
    return int(ids[starts[block] + min(int(np.searchsorted(cdf, target, side="right")), len(cdf) - 1)])


class Sampler:
    """Chooses one token per row of logits (B, V): the most probable (temperature 0: greedy, no coin drawn), or one
    drawn from distribution() with a coin from the generator seeded with seed. Reproducible: the same seed and
    logits give the same tokens."""

    def __init__(self, temperature=1.0, top_k=0, top_p=1.0, seed=1337):
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"--temperature must be >= 0 and finite (0: greedy), got {temperature}")
        if top_k < 0:
            raise ValueError(f"--top_k must be >= 0 (0: no limit), got {top_k}")
        if not 0 < top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1] (1: no limit), got {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = Xorshift(seed)

    def __call__(self, logits):
        """(B,) int32 token ids, one per row of logits (B, V)."""
        if self.temperature == 0:
            return logits.argmax(axis=1).astype(np.int32)
        return np.array([pick(*distribution(row, self.temperature, self.top_k, self.top_p), self.rng.random_f32())
                         for row in logits], dtype=np.int32)


class FullForwardDecoder:
    """A decoder without a cache: every step runs a full forward over the rows' whole (B, length) token buffer and
    reads the logits at the newest position. The positions not reached yet hold <|endoftext|>, as in llm.c's
    sampling: causal attention keeps later positions from changing earlier ones, so the filler changes nothing.
    A step costs a forward over length positions where a KV cache computes one: the NumPy path and the cache's checks.

    logits_at(tokens, t): the logits at position t of every row of tokens (B, length) int32, (B, V) float32."""

    def __init__(self, logits_at, rows, length):
        self.logits_at = logits_at
        self.tokens = np.full((rows, length), GPT2_EOT, dtype=np.int32)
        self.position = 0  # tokens read

    def prefill(self, prompt):
        self.tokens[:, :len(prompt)] = prompt
        self.position = len(prompt)
        return self.logits_at(self.tokens, self.position - 1)

    def decode(self, tokens):
        self.tokens[:, self.position] = tokens
        self.position += 1
        return self.logits_at(self.tokens, self.position - 1)


class Generation(NamedTuple):
    tokens: np.ndarray  # (B, max_new_tokens) int32: each row's new tokens
    prefill_seconds: float
    step_seconds: list  # a time per new token: choosing it, then (but for the last) the model reading it
    logits: np.ndarray  # (max_new_tokens, B, V): those each token was chosen from (keep_logits), else None


def generate(decoder, prompt, max_new_tokens, sampler, keep_logits=False):
    """max_new_tokens tokens for each of the decoder's rows after prompt (token ids)."""
    start = time.perf_counter()
    logits = decoder.prefill(prompt)
    prefill_seconds = time.perf_counter() - start
    tokens = np.empty((len(logits), max_new_tokens), dtype=np.int32)
    step_seconds, kept = [], []
    for i in range(max_new_tokens):
        start = time.perf_counter()
        if keep_logits:
            kept.append(logits.copy())
        tokens[:, i] = sampler(logits)
        if i + 1 < max_new_tokens:
            logits = decoder.decode(tokens[:, i])
        step_seconds.append(time.perf_counter() - start)
    return Generation(tokens, prefill_seconds, step_seconds, np.stack(kept) if keep_logits else None)
