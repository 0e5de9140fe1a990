"""Multiple-choice evals (HellaSwag) scored as llm.c's train_gpt2.cu scores them with -h 1 (its EvalLoader in
llmc/dataloader.h). NumPy only, so that any forward can use it: the mainline's, or the NumPy trainer's.

The rule. Each example has a context and 4 candidate completions. Row i of the batch holds context + completion i;
the model's loss of predicting each completion token (from the token before it) is read from the forward's
per-token losses, and the completion's score is the mean of those losses over its tokens (llm.c's acc_norm: the
mean, so a long completion is not penalised for its length). The prediction is the completion with the lowest
mean loss, the first one on a tie; the accuracy is the fraction of examples predicted right.

The batches. An example takes 4 rows of a (B, T) batch, so B must be a multiple of 4 and a batch holds B / 4
examples. In row i, inputs[:n] = context + completion i (n tokens), targets[t] = inputs[t + 1] and mask[t] = 1 for
the completion's tokens: t = len(context) - 1 .. n - 2. Positions past n are padding: causal attention keeps them
from changing the losses at the masked positions, so their values do not matter (zeros here, stale values in
llm.c). An example must fit: llm.c asserts context + completion < T (strictly, one position to spare), and a
longer example is an error here too, found before any forward, never truncated.

Several processes: as llm.c, rank r scores examples [r * E, (r + 1) * E) with E = ceil(N / world_size), the last
rank fewer, and the ranks sum their correct counts.
"""

from dataclasses import dataclass

import numpy as np

from .formats import FormatError, read_eval_file

COMPLETIONS = 4  # llm.c's ASSUMED_NUM_COMPLETIONS: HellaSwag's endings


def read_examples(path, vocab_size):
    """An llm.c eval file's examples, checked for what llm.c's EvalLoader asserts: examples numbered 0, 1, 2, ...
    in order, 4 completions each, a non-empty context and completions, token ids below vocab_size."""
    examples = read_eval_file(path, vocab_size)
    if not examples:
        raise FormatError(path, "holds no examples")
    for position, ex in enumerate(examples):
        if ex.index != position:
            raise FormatError(path, f"example {position} is numbered {ex.index}: llm.c reads them numbered 0, 1, 2, ...")
        if len(ex.completions) != COMPLETIONS:
            raise FormatError(path, f"example {position} has {len(ex.completions)} completions, llm.c's evals have "
                                    f"{COMPLETIONS}")
        if not ex.context or not all(ex.completions):
            raise FormatError(path, f"example {position} has an empty context or completion")
    return examples


def length_needed(example):
    """The shortest T that fits the example: context + its longest completion + 1 (llm.c's strict bound)."""
    return len(example.context) + max(len(c) for c in example.completions) + 1


@dataclass
class EvalBatch:
    inputs: np.ndarray  # int32 (B, T)
    targets: np.ndarray  # int32 (B, T)
    mask: np.ndarray  # bool (B, T): the positions whose losses score a completion
    examples: list  # the EvalExamples in rows 0..4E-1, E <= B / 4 (a rank's last batch may have fewer)


@dataclass
class Scores:
    """E scored examples."""

    indices: np.ndarray  # int (E,) the examples' indices in the file
    labels: np.ndarray  # int (E,) the right completion
    mean_losses: np.ndarray  # float64 (E, 4) each completion's mean loss over its tokens
    predictions: np.ndarray  # int (E,) the completion of lowest mean loss, the first on a tie (llm.c's strict <)

    @classmethod
    def of(cls, examples, mean_losses):
        return cls(indices=np.array([ex.index for ex in examples], dtype=np.int64),
                   labels=np.array([ex.label for ex in examples], dtype=np.int64),
                   mean_losses=mean_losses, predictions=mean_losses.argmin(axis=1))

    @property
    def correct(self):
        return int(np.count_nonzero(self.predictions == self.labels))


class EvalLoader:
    """This rank's share of the examples, in batches of B / 4 examples of length T."""

    def __init__(self, examples, B, T, rank=0, world_size=1):
        if B % COMPLETIONS:
            raise ValueError(f"B={B} is not a multiple of {COMPLETIONS}: an example's completions take "
                             f"{COMPLETIONS} rows of a batch")
        longest = max(examples, key=length_needed)
        if length_needed(longest) > T:
            completion = length_needed(longest) - 1 - len(longest.context)
            raise ValueError(f"example {longest.index} needs T >= {length_needed(longest)} (a context of "
                             f"{len(longest.context)} tokens and a completion of {completion}: llm.c needs context + "
                             f"completion < T), T is {T}")
        self.B, self.T = B, T
        self.num_examples = len(examples)  # over all ranks
        per_rank = -(-len(examples) // world_size)
        self.examples = examples[rank * per_rank: (rank + 1) * per_rank]

    def batches(self):
        per_batch = self.B // COMPLETIONS
        for start in range(0, len(self.examples), per_batch):
            yield self._batch(self.examples[start: start + per_batch])

    def _batch(self, examples):
        inputs = np.zeros((self.B, self.T), dtype=np.int32)
        targets = np.zeros((self.B, self.T), dtype=np.int32)
        mask = np.zeros((self.B, self.T), dtype=bool)
        for e, ex in enumerate(examples):
            c = len(ex.context)
            for i, completion in enumerate(ex.completions):
                row, n = COMPLETIONS * e + i, c + len(completion)
                inputs[row, :n] = ex.context + completion
                targets[row, :n - 1] = inputs[row, 1:n]
                mask[row, c - 1:n - 1] = True  # the last context token predicts the first completion token
        return EvalBatch(inputs, targets, mask, examples)


def mean_completion_losses(losses, batch):
    """losses: the forward's per-token losses (B, T) of the batch -> each completion's mean loss (E, 4), float64,
    for the batch's E examples (the rows past 4E are empty)."""
    rows = slice(0, COMPLETIONS * len(batch.examples))
    mask = batch.mask[rows]
    sums = np.where(mask, losses[rows], 0.0).sum(axis=1, dtype=np.float64)
    return (sums / mask.sum(axis=1)).reshape(-1, COMPLETIONS)


def evaluate(loader, token_losses, on_batch=None):
    """Scores this rank's examples. token_losses(inputs, targets) runs a forward on one batch and returns its
    per-token losses (B, T); on_batch(number of examples), if given, is called after each batch (a progress bar)."""
    mean_losses = np.zeros((len(loader.examples), COMPLETIONS))
    done = 0
    for batch in loader.batches():
        losses = np.asarray(token_losses(batch.inputs, batch.targets)).reshape(loader.B, loader.T)
        mean_losses[done: done + len(batch.examples)] = mean_completion_losses(losses, batch)
        done += len(batch.examples)
        if on_batch:
            on_batch(len(batch.examples))
    return Scores.of(loader.examples, mean_losses)
