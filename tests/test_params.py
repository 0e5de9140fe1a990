"""The parameter tables (llmpy/params.py) and what derives from them, against the layouts written out by hand.

GPT-2's table must give llm.c's file order and shapes, weight decay on exactly the 2-D tensors, the matmul-written
gradients the backward relies on, and the init the trainers have always used; the derived runs of decayed ranges must
tile the buffer. The named sizes (descriptors) give llm.c's shapes.
"""

import dataclasses
import math

import numpy as np
import pytest

from llmpy import params
from llmpy.configs.gpt2 import (GPT2Config, config_from_descriptor, descriptor_of, file_prefix, gpt2_init,
                                num_parameters, param_table)
from llmpy.configs import llama3
from llmpy.params import ParamSpec


def test_gpt2_table_is_llmc_layout_with_decay_on_the_2d_tensors():
    config = GPT2Config(num_layers=3, num_heads=2, channels=8, max_seq_len=16, vocab_size=50, padded_vocab_size=64)
    table = param_table(config)
    L, C = 3, 8
    assert [(s.name, s.shape) for s in table] == [
        ("wte", (64, C)), ("wpe", (16, C)), ("ln1w", (L, C)), ("ln1b", (L, C)), ("qkvw", (L, 3 * C, C)),
        ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)), ("ln2w", (L, C)), ("ln2b", (L, C)),
        ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)), ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
        ("lnfw", (C,)), ("lnfb", (C,))]
    assert [s.name for s in table if s.decay] == ["wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"]
    # wpe's gradient comes from the encoder's backward (added), the others' from a matmul (written)
    assert [s.name for s in table if s.matmul_grad] == ["wte", "qkvw", "attprojw", "fcw", "fcprojw"]
    assert num_parameters(GPT2Config()) == 124_475_904


def test_decay_runs_tile_the_buffer_and_merge_neighbours():
    table = [ParamSpec("a", (2, 3), True, 0.1), ParamSpec("b", (4,), True, 0.1), ParamSpec("c", (5,), False, 0.0),
             ParamSpec("d", (1, 2), True, 0.1)]
    assert params.decay_runs(table) == [(0, 10, True), (10, 15, False), (15, 17, True)]
    config = GPT2Config()
    runs = params.decay_runs(param_table(config))
    assert runs[0][0] == 0 and runs[-1][1] == num_parameters(config)
    assert all(a[1] == b[0] and a[2] != b[2] for a, b in zip(runs, runs[1:]))
    assert sum(end - start for start, end, decay in runs if decay) == sum(
        math.prod(s.shape) for s in param_table(config) if s.decay)


def test_gpt2_init_draws_the_decayed_tensors_in_order_and_sets_the_rest():
    """The init written out: N(0, 0.02) for wte, wpe, qkvw, fcw and N(0, 0.02/sqrt(2L)) for the residual projections,
    drawn from one generator in file order; layernorm gains 1, biases 0, wte's padding rows 0."""
    config = GPT2Config(num_layers=2, num_heads=2, channels=8, max_seq_len=16, vocab_size=50, padded_vocab_size=64)
    rng = np.random.default_rng(11)
    expected = {}
    for spec in param_table(config):
        if spec.name in ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"):
            std = 0.02 / math.sqrt(4) if spec.name in ("attprojw", "fcprojw") else 0.02
            expected[spec.name] = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(std)
        else:
            expected[spec.name] = np.full(spec.shape, 1.0 if spec.name in ("ln1w", "ln2w", "lnfw") else 0.0,
                                          np.float32)
    expected["wte"][50:] = 0
    np.testing.assert_array_equal(gpt2_init(config, seed=11), np.concatenate([t.ravel() for t in expected.values()]))


def test_llama3_norm_gains_start_at_one():
    flat = llama3.init_params(llama3.DESCRIPTORS["tiny"], seed=1)
    views = llama3.split_params(llama3.DESCRIPTORS["tiny"], flat)
    for name in ("ln1w", "ln2w", "lnfw"):
        assert np.all(views[name] == 1.0), name
    assert np.std(views["qkvw"]) > 0.01


@pytest.mark.parametrize("tied", [True, False])
def test_llama3_gradients_written_by_a_matmul(tied):
    """The matrices' gradients are written by the backward's matmuls; wte's only when it is the LM head too (untied,
    the encoder's backward adds to it, so the step zeroes it first); the RMSNorm gains' never."""
    config = dataclasses.replace(llama3.DESCRIPTORS["tiny"], tied_embeddings=tied)
    written = [spec.name for spec in llama3.param_table(config) if spec.matmul_grad]
    matrices = ["qkvw", "attprojw", "fcw", "fc2w", "fcprojw"]
    assert written == (["wte"] + matrices if tied else matrices + ["lmhead"])


# llm.c's gpt3_set_hyperparameters (train_gpt2.cu), written out: channels -> (layers, head size); every one 2048
# positions. Its c5140 (13B) fails llm.c's own divisibility check and is not taken here either.
LLMC_GPT3 = {384: (6, 64), 768: (12, 64), 1024: (24, 64), 1536: (24, 96), 2048: (24, 128), 2560: (32, 80),
             4096: (32, 128), 12288: (96, 128)}
# the GPT-3 paper's parameter counts (Table 2.1); ours differ by the padded vocab, tied embeddings and biases
GPT3_PAPER = {768: 125e6, 1024: 350e6, 1536: 760e6, 2048: 1.3e9, 2560: 2.7e9, 4096: 6.7e9, 12288: 175e9}


@pytest.mark.parametrize("channels", list(LLMC_GPT3))
def test_gpt3_descriptors_are_llmcs_sizes(channels):
    layers, head_size = LLMC_GPT3[channels]
    config = config_from_descriptor(f"gpt3:c{channels}")
    assert config == GPT2Config(max_seq_len=2048, num_layers=layers, num_heads=channels // head_size,
                                channels=channels)
    assert descriptor_of(config) == f"gpt3:c{channels}" and file_prefix(f"gpt3:c{channels}") == f"gpt3_c{channels}"
    if channels in GPT3_PAPER:
        assert abs(num_parameters(config) / GPT3_PAPER[channels] - 1) < 0.02
    assert num_parameters(config_from_descriptor("gpt3:c768")) == 125_262_336  # d12's 124,475,904 + 1024 positions


def test_gpt2_descriptors_also_take_llmcs_explicit_form_and_bad_ones_say_what_exists():
    assert config_from_descriptor("gpt2:d24") == config_from_descriptor("d24")
    assert descriptor_of(config_from_descriptor("d36")) == "d36" and file_prefix("gpt2:d12") == "gpt2_124M"
    with pytest.raises(ValueError, match=r"'gpt3:c5140': GPT-3's sizes are gpt3:c384, gpt3:c768, .*gpt3:c12288$"):
        config_from_descriptor("gpt3:c5140")
    with pytest.raises(ValueError, match=r"unknown model descriptor 'gpt4:c1': use d12, .* gpt3:c768"):
        config_from_descriptor("gpt4:c1")
