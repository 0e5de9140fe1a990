"""train_llama3_torch.py, the Llama 3 PyTorch reference, with its files and its tokenizer.

- The model is Llama 3: it computes what transformers' LlamaForCausalLM computes with the same weights (logits,
  loss, every gradient), with grouped-query attention, with and without Llama 3.1's RoPE scaling, tied or not.
- Its parameters are llm.c's: names, shapes and order of llm.c's train_llama3.py, Meta's sizes for the named models.
- Its files are llm.c's byte for byte: a model file and a debug state written here the way llm.c's train_llama3.py
  writes them (write_model, write_state) equal ours in every byte llm.c writes; what llm.c's int32 header loses we
  keep in slots it leaves zero, and llm.c's own files are read through the known sizes.
- Its tokenizer is Meta's: the same ids as the llama-models package's Tokenizer, the same 256 special tokens.
- Tiny Shakespeare becomes llm.c's Llama 3 shards; the trainer writes its reference files, trains, and fails on bad
  input with one line.
"""

import dataclasses
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_llama3_torch as ref
from llmpy import formats
from llmpy.configs.gpt2 import config_from_descriptor as gpt2_config_from_descriptor
from llmpy.configs.gpt2 import gpt2_init
from llmpy.params import split_flat
from llmpy.configs import llama3
from llmpy.configs.llama3 import Llama3Config
from llmpy.tokenizer import (LLAMA3_TOKENIZER_FILE_ENV, Tokenizer, TokenizerError, llama3_encode, llama3_encoding,
                             llama3_special_tokens, token_bytes)
from train_gpt2_torch import configure_optimizer, grads_to_flat, llmc_parameters, model_to_flat, train_step

REPO = Path(__file__).resolve().parents[1]
# small enough for milliseconds: 2 query heads per KV head, a head size of 8 (RoPE's four frequencies fall in each
# of Llama 3.1's three bands), a SwiGLU width rounded up (int(1.3 * 85) = 110 -> 112), a vocab of 300
SMALL = Llama3Config(num_layers=2, num_heads=4, num_kv_heads=2, channels=32, max_seq_len=64, vocab_size=300,
                     ffn_dim_multiplier=1.3, multiple_of=16)
TINY = llama3.DESCRIPTORS["tiny"]


def random_flat(config, seed):
    """Flat parameters, every tensor random: matrices N(0, 0.1), RMSNorm gains 1 + N(0, 0.2)."""
    rng = np.random.default_rng(seed)
    flat = rng.normal(0.0, 0.1, llama3.num_parameters(config)).astype(np.float32)
    views = llama3.split_params(config, flat)
    for name in ("ln1w", "ln2w", "lnfw"):
        views[name][...] = 1.0 + rng.normal(0.0, 0.2, views[name].shape)
    return flat


def random_tokens(config, shape, seed):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, config.vocab_size, shape))


def variant(config, **changes):
    return dataclasses.replace(config, **changes)


# ----------------------------------------------------------------------------- the parameters


def llmc_file_tensors(L):
    """The module tensors in the order llm.c's train_llama3.py's write_tensors writes them."""
    per_layer = ["ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight",
                 "mlp.c_fc2.weight", "mlp.c_proj.weight"]
    return (["transformer.wte.weight"] + [f"transformer.h.{l}.{t}" for t in per_layer for l in range(L)]
            + ["transformer.ln_f.weight", "lm_head.weight"])


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_table_is_llmcs_order_with_decay_and_init(tied):
    config = variant(SMALL, tied_embeddings=tied)
    L, C, V, hs = 2, 32, 300, 8
    expected = [("wte", (V, C), True, 0.02), ("ln1w", (L, C), False, 0.0),
                ("qkvw", (L, (4 + 2 * 2) * hs, C), True, 0.02), ("attprojw", (L, C, C), True, 0.01),
                ("ln2w", (L, C), False, 0.0), ("fcw", (L, 112, C), True, 0.02), ("fc2w", (L, 112, C), True, 0.02),
                ("fcprojw", (L, C, 112), True, 0.01), ("lnfw", (C,), False, 0.0), ("lmhead", (V, C), True, 0.02)]
    expected = expected[:-1] if tied else expected
    table = llama3.param_table(config)
    assert [(s.name, s.shape, s.decay) for s in table] == [(name, shape, decay) for name, shape, decay, _ in expected]
    assert [s.init_std for s in table] == pytest.approx([std for *_, std in expected])  # 0.01 = 0.02 / sqrt(2L)
    untied = variant(config, tied_embeddings=False)
    assert list(llama3.file_shapes(config)) == [s.name for s in llama3.param_table(untied)]  # files: lmhead always
    # the module's tensors, named as llm.c names them, in llm.c's order
    model = ref.Llama(config)
    params = dict(model.named_parameters())
    flat_order = [p for tensors in llmc_parameters(model).values() for p in tensors]
    file_order = [params[name] for name in llmc_file_tensors(L) if name in params]  # tied: lm_head is wte
    assert [id(p) for p in flat_order] == [id(p) for p in file_order] and len(flat_order) == len(params)


@pytest.mark.parametrize("descriptor, layers, channels, heads, kv_heads, hidden, tied, count", [
    ("tiny", 2, 64, 4, 2, 224, False, 16_527_680),
    ("llama3.2-1b", 16, 2048, 32, 8, 8192, True, 1_235_814_400),  # Meta's published sizes
    ("llama3.1-8b", 32, 4096, 32, 8, 14336, False, 8_030_261_248),
])
def test_descriptors_are_metas_shapes(descriptor, layers, channels, heads, kv_heads, hidden, tied, count):
    config = llama3.config_from_descriptor(descriptor)
    assert (config.num_layers, config.channels, config.num_heads, config.num_kv_heads, config.ffn_hidden,
            config.tied_embeddings) == (layers, channels, heads, kv_heads, hidden, tied)
    assert (config.vocab_size, config.norm_eps, config.rope_theta, config.use_scaled_rope) == (128256, 1e-5, 5e5, True)
    assert llama3.num_parameters(config) == count
    with torch.device("meta"):  # shapes only, no memory
        model = ref.Llama(config)
    assert sum(p.numel() for p in model.parameters()) == count
    with pytest.raises(ValueError, match="^unknown model descriptor 'llama2': use tiny, llama3.2-1b, llama3.1-8b$"):
        llama3.config_from_descriptor("llama2")


@pytest.mark.parametrize("tied", [False, True])
def test_flat_round_trip_is_exact(tied):
    config = variant(SMALL, tied_embeddings=tied)
    flat = random_flat(config, seed=1)
    model = ref.model_from_flat(config, flat)
    np.testing.assert_array_equal(model_to_flat(model), flat)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    views = llama3.split_params(config, flat)
    np.testing.assert_array_equal(views["qkvw"][1], model.transformer.h[1].attn.c_attn.weight.detach())
    np.testing.assert_array_equal(views["fc2w"][0], model.transformer.h[0].mlp.c_fc2.weight.detach())


def test_init_follows_the_table_and_the_seed():
    flat = llama3.init_params(TINY, seed=42)  # the trainer's init_weights loads this (see the reference files' test)
    views = llama3.split_params(TINY, flat)
    for spec in llama3.param_table(TINY):
        tensor = views[spec.name]
        if spec.init_std:  # >= 8192 samples each: the sample std is within ~1% of the true one; allow 5%
            assert abs(tensor.std() / spec.init_std - 1) < 0.05 and abs(tensor.mean()) < 0.1 * spec.init_std, spec
        else:
            assert np.all(tensor == 1), spec
    np.testing.assert_array_equal(llama3.init_params(TINY, seed=42), flat)
    assert not np.array_equal(llama3.init_params(TINY, seed=43)[:1000], flat[:1000])


def test_weight_decay_goes_to_exactly_the_tables_decayed_tensors():
    model = ref.Llama(SMALL)
    optimizer = configure_optimizer(model, 1e-4, 0.1)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    by_name = llmc_parameters(model)
    assert decayed == {id(p) for spec in llama3.param_table(SMALL) if spec.decay for p in by_name[spec.name]}


# ----------------------------------------------------------------------------- against transformers


def hf_llama_config(config):
    """transformers' LlamaConfig of the same shape, eager attention (float32 all through)."""
    transformers = pytest.importorskip("transformers")
    rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.channels, intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rms_norm_eps=config.norm_eps, max_position_embeddings=131072,
        tie_word_embeddings=config.tied_embeddings, rope_theta=config.rope_theta,
        rope_scaling=rope_scaling if config.use_scaled_rope else None, attn_implementation="eager")


def to_hf_rows(w, heads):
    """Meta's q or k rows, whose RoPE pairs a head's channels (2i, 2i+1), as Hugging Face's, pairing (i, i + hs/2)."""
    return w.view(heads, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def from_hf_rows(w, heads):
    return w.view(heads, 2, -1, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def hf_llama(config, flat):
    """transformers' LlamaForCausalLM holding the flat parameters."""
    model = pytest.importorskip("transformers").LlamaForCausalLM(hf_llama_config(config))
    t = {name: torch.from_numpy(v) for name, v in llama3.split_params(config, flat).items()}
    NH, KV, hs = config.num_heads, config.num_kv_heads, config.head_size
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(t["wte"])
        for l, layer in enumerate(model.model.layers):
            q, k, v = t["qkvw"][l].split((NH * hs, KV * hs, KV * hs))
            a, m = layer.self_attn, layer.mlp
            for module, weight in ((a.q_proj, to_hf_rows(q, NH)), (a.k_proj, to_hf_rows(k, KV)), (a.v_proj, v),
                                   (a.o_proj, t["attprojw"][l]), (m.gate_proj, t["fc2w"][l]), (m.up_proj, t["fcw"][l]),
                                   (m.down_proj, t["fcprojw"][l]), (layer.input_layernorm, t["ln1w"][l]),
                                   (layer.post_attention_layernorm, t["ln2w"][l])):
                module.weight.copy_(weight)
        model.model.norm.weight.copy_(t["lnfw"])
        if not config.tied_embeddings:
            model.lm_head.weight.copy_(t["lmhead"])
    return model


def hf_grads(config, model):
    """The Hugging Face model's gradients in our flat layout."""
    NH, KV = config.num_heads, config.num_kv_heads
    grads = {"wte": model.model.embed_tokens.weight.grad, "lnfw": model.model.norm.weight.grad,
             "lmhead": model.lm_head.weight.grad}
    per_layer = {name: [] for name in ("ln1w", "qkvw", "attprojw", "ln2w", "fcw", "fc2w", "fcprojw")}
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        per_layer["qkvw"].append(torch.cat([from_hf_rows(a.q_proj.weight.grad, NH),
                                            from_hf_rows(a.k_proj.weight.grad, KV), a.v_proj.weight.grad]))
        for name, p in (("ln1w", layer.input_layernorm), ("attprojw", a.o_proj),
                        ("ln2w", layer.post_attention_layernorm), ("fcw", m.up_proj), ("fc2w", m.gate_proj),
                        ("fcprojw", m.down_proj)):
            per_layer[name].append(p.weight.grad)
    grads.update({name: torch.stack(tensors) for name, tensors in per_layer.items()})
    return np.concatenate([grads[name].numpy().ravel() for name in llama3.param_shapes(config)])


@pytest.mark.parametrize("tied, scaled_rope, kv_heads", [(False, True, 2), (True, True, 2), (False, False, 2),
                                                          (True, True, 4)])
def test_forward_and_backward_match_transformers_llama(tied, scaled_rope, kv_heads):
    """Our module against LlamaForCausalLM, both float32, on fresh random weights and tokens (B=3, T=64).

    Only the order of float32 sums differs (and RoPE's pairing, a permutation): measured max differences ~1.5e-6
    in logits of size ~3, ~1e-6 of each gradient tensor's largest entry. The bounds, 1e-5 absolute for logits and
    loss and 1e-5 relative per gradient tensor, leave ~10x margin; a RoPE without Llama 3.1's scaling moves the
    logits by ~1e-4, ten times the bound, so the comparison sees the scaling.
    """
    config = variant(SMALL, tied_embeddings=tied, use_scaled_rope=scaled_rope, num_kv_heads=kv_heads)
    flat = random_flat(config, seed=2)
    x, y = random_tokens(config, (3, 64), seed=3), random_tokens(config, (3, 64), seed=4)
    hf = hf_llama(config, flat)
    hf_logits = hf(input_ids=x).logits
    hf_loss = torch.nn.functional.cross_entropy(hf_logits.view(-1, config.vocab_size), y.view(-1))
    hf_loss.backward()
    expected_grads = llama3.split_params(config, hf_grads(config, hf))
    for flash in (True, False):
        model = ref.model_from_flat(config, flat, flash=flash)
        logits, loss = model(x, y)
        loss.backward()
        torch.testing.assert_close(logits, hf_logits, rtol=0, atol=1e-5)
        assert loss.item() == pytest.approx(hf_loss.item(), abs=1e-5)
        for name, grad in llama3.split_params(config, grads_to_flat(model)).items():
            err, scale = np.abs(grad - expected_grads[name]).max(), np.abs(expected_grads[name]).max()
            assert err <= 1e-5 * scale, f"flash={flash} grad {name}: max abs diff {err:.3g} > 1e-5 * max {scale:.3g}"
    other_rope = ref.model_from_flat(variant(config, use_scaled_rope=not scaled_rope), flat)
    assert (other_rope(x, y)[0] - hf_logits).abs().max() > 1e-4


def test_bfloat16_autocast_step_is_close_to_float32():
    """bf16 matmuls (8 bits of mantissa) at C=32: the loss within 1% of the float32 loss."""
    flat = random_flat(SMALL, seed=13)
    x, y = random_tokens(SMALL, (3, 10), seed=14), random_tokens(SMALL, (3, 10), seed=15)
    losses = []
    for amp_dtype in (None, torch.bfloat16):
        model = ref.model_from_flat(SMALL, flat)
        losses.append(train_step(model, configure_optimizer(model, 1e-4, 0.0), x, y, 1e-4, amp_dtype=amp_dtype)[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)


def test_rope_frequencies_are_llama31s_scaled_ones():
    """The head size of Meta's models (128): against transformers' llama3 RoPE, and Meta's three bands."""
    config = Llama3Config(num_layers=1, num_heads=1, num_kv_heads=1, channels=128, vocab_size=16, multiple_of=16)
    for scaled in (True, False):
        c = variant(config, use_scaled_rope=scaled)
        hf_freqs = hf_llama(c, random_flat(c, seed=0)).model.rotary_emb.inv_freq.numpy()
        np.testing.assert_allclose(llama3.rope_frequencies(c), hf_freqs, rtol=1e-6, atol=0)
    scaled, plain = llama3.rope_frequencies(config), llama3.rope_frequencies(variant(config, use_scaled_rope=False))
    wavelength = 2 * math.pi / plain
    short, long = wavelength < 8192 / 4, wavelength > 8192
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long], plain[long] / 8, rtol=1e-6)
    middle = ~short & ~long
    assert np.all((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8))


# ----------------------------------------------------------------------------- llm.c's files


def llmc_write_model(model, path, dtype):
    """A model file as llm.c's train_llama3.py's write_model writes it: an int32 header (so ffn_dim_multiplier and
    norm_eps truncated), then named_parameters() in write_tensors' order, fp32 or bf16."""
    c = model.config
    header = np.zeros(256, dtype="<i4")
    header[:16] = [20240803, {"float32": 3, "bfloat16": 5}[dtype], c.max_seq_len, c.vocab_size, c.num_layers,
                   c.num_heads, c.num_kv_heads, c.channels, int(c.ffn_dim_multiplier), c.multiple_of,
                   int(c.norm_eps), int(c.rope_theta), int(c.use_scaled_rope), 4, *c.llama_version]
    params = dict(model.named_parameters())
    tensors = [params[name].detach().to(getattr(torch, dtype)) for name in llmc_file_tensors(c.num_layers)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for t in tensors:
            f.write((t.view(torch.int16) if dtype == "bfloat16" else t).numpy().tobytes())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_file_has_every_byte_llmc_writes(tmp_path, dtype):
    model = ref.model_from_flat(SMALL, random_flat(SMALL, seed=5))
    llmc_write_model(model, tmp_path / "llmc.bin", dtype)
    formats.write_llama3_model(tmp_path / "ours.bin", SMALL, model_to_flat(model), dtype=dtype)
    llmc, ours = (tmp_path / "llmc.bin").read_bytes(), (tmp_path / "ours.bin").read_bytes()
    assert len(ours) == len(llmc) and ours[64:1024].strip(b"\0") and not llmc[64:1024].strip(b"\0")
    assert ours[:64] == llmc[:64] and ours[1024:] == llmc[1024:]  # slots 0-15 and every tensor
    extension = np.frombuffer(ours, dtype="<i4", count=24)[16:]
    assert list(extension[:2]) == [1, 0] and list(extension[2:].view("<f8")) == [1.3, 1e-5, 500000.0]
    config, flat = formats.read_llama3_model(tmp_path / "ours.bin")
    assert config == SMALL
    expected = model_to_flat(model)
    np.testing.assert_array_equal(flat, expected if dtype == "float32" else
                                  torch.from_numpy(expected).bfloat16().float().numpy())


def test_a_tied_model_file_repeats_wte_in_lmheads_place(tmp_path):
    config = variant(SMALL, tied_embeddings=True)
    flat = random_flat(config, seed=6)
    formats.write_llama3_model(tmp_path / "tied.bin", config, flat)
    data = np.fromfile(tmp_path / "tied.bin", dtype="<f4", offset=1024)
    views = split_flat(llama3.file_shapes(config), data)
    np.testing.assert_array_equal(views["lmhead"], views["wte"])
    read_config, read_flat = formats.read_llama3_model(tmp_path / "tied.bin")
    assert read_config == config and np.array_equal(read_flat, flat)
    data[-1] += 1  # lmhead is no longer wte
    with open(tmp_path / "tied.bin", "r+b") as f:
        f.seek(1024)
        f.write(data.tobytes())
    with pytest.raises(formats.FormatError, match="header says tied embeddings, but lmhead's weights differ"):
        formats.read_llama3_model(tmp_path / "tied.bin")


def test_llmcs_own_files_are_read_through_the_known_sizes(tmp_path):
    """llm.c's header has ffn_dim_multiplier 1 and norm_eps 0 for tiny's 1.3 and 1e-5: the known size gives them
    back. For a size that is not known, nothing can, and the file is refused with one line."""
    tiny = ref.Llama(TINY)
    ref.init_weights(tiny, seed=7)
    llmc_write_model(tiny, tmp_path / "tiny.bin", "float32")
    config, flat = formats.read_llama3_model(tmp_path / "tiny.bin")
    assert config == TINY and np.array_equal(flat, model_to_flat(tiny))
    llmc_write_model(ref.Llama(SMALL), tmp_path / "small.bin", "float32")
    with pytest.raises(formats.FormatError) as error:
        formats.read_llama3_model(tmp_path / "small.bin")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'small.bin'}: llm.c's int32 header truncates")
    assert "is not a known Llama 3 size (tiny, llama3.2-1b, llama3.1-8b)" in message


def corrupted(path, tmp_path, offset=None, value=None, size=None):
    """A copy of the file with one int32 slot changed, or cut (or padded with zeros) to size bytes."""
    data = bytearray(Path(path).read_bytes())
    if offset is not None:
        data[4 * offset: 4 * offset + 4] = np.int32(value).tobytes()
    if size is not None:
        data = data[:size] + bytes(max(0, size - len(data)))
    out = tmp_path / f"bad_{offset}_{value}_{size}.bin"
    out.write_bytes(bytes(data))
    return out


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.bin"
    formats.write_llama3_model(path, SMALL, random_flat(SMALL, seed=8))
    return path


@pytest.mark.parametrize("change, problem", [
    (dict(offset=0, value=20240326), "bad magic 20240326, expected 20240803: not an llm.c Llama 3 model file"),
    (dict(offset=1, value=4), "unsupported Llama 3 model file version 4, expected 3 or 5"),
    (dict(size=1000), "truncated: 1000 bytes, shorter than the 1024-byte header"),
    (dict(size=5000), "truncated: 5000 bytes, the header describes a Llama 3 model of"),
    (dict(size=10 ** 6), "has trailing bytes: 1000000 bytes"),
    (dict(offset=16, value=7), "unknown header extension 7 in slot [16]"),
    (dict(offset=8, value=2), "header disagrees with itself: ffn_dim_multiplier 1.3 in [18:20] but 2 in [8]"),
    (dict(offset=6, value=3), "nonsense Llama 3 model header: num_heads (4) must be a multiple of num_kv_heads (3)"),
])
def test_bad_model_files_are_one_line_errors_naming_the_file(small_file, tmp_path, change, problem):
    bad = corrupted(small_file, tmp_path, **change)
    with pytest.raises(formats.FormatError) as error:
        formats.read_llama3_model(bad)
    assert str(error.value).startswith(f"{bad}: ") and problem in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("tied", [False, True])
def test_debug_state_is_llmcs_write_state(tmp_path, tied):
    """llm.c's write_state: [0] 20240803, [1] B, [2] T; x, y int32; logits, loss, every gradient (write_tensors'
    order) fp32. A tied model's wte gradient stands in lmhead's place too."""
    config = variant(SMALL, tied_embeddings=tied)
    model = ref.model_from_flat(config, random_flat(config, seed=9))
    x, y = random_tokens(config, (2, 5), seed=10), random_tokens(config, (2, 5), seed=11)
    logits, loss = model(x, y)
    loss.backward()
    grads = grads_to_flat(model)
    formats.write_llama3_debug_state(tmp_path / "state.bin", config, x.int().numpy(), y.int().numpy(),
                                     logits.detach().numpy(), loss.item(), grads)
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240803, 2, 5]
    params = {**dict(model.named_parameters()), "lm_head.weight": model.lm_head.weight}
    expected = [header, x.int().numpy(), y.int().numpy(), logits.detach().numpy(), loss.detach().numpy()]
    expected += [params[name].grad.numpy() for name in llmc_file_tensors(config.num_layers)]
    assert (tmp_path / "state.bin").read_bytes() == b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes()
                                                             for a in expected)
    state = formats.read_llama3_debug_state(tmp_path / "state.bin", config)
    assert np.array_equal(state.x, x.numpy()) and np.array_equal(state.y, y.numpy()) and state.loss == loss.item()
    assert np.array_equal(state.logits, logits.detach().numpy()) and np.array_equal(state.grads, grads)
    with pytest.raises(formats.FormatError, match="truncated"):
        formats.read_llama3_debug_state(corrupted(tmp_path / "state.bin", tmp_path, size=2000), config)


# ----------------------------------------------------------------------------- the tokenizer


@pytest.fixture(scope="module")
def encoding(llama3_tokenizer_file):
    return llama3_encoding(llama3_tokenizer_file)


PARAGRAPH = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
             "I'LL say they're here, she's gone; we've won 12345 times (3.14159) -- naïve café, Straße, 日本語, 🙂👍🏽"
             "\r\n"
             "   runs of   spaces\t\ttabs <|begin_of_text|> as text <|eot_id|>\n\n\n")


def random_text(rng, length):
    pieces = ["the", " and", "Hello", "'s", "'LL", " ", "   ", "\n", "\n\n", "\t", "123", "45678", ".", ",!?", "--",
              "é", "中文", "🙂", "\u200b", "\u3000", "<|end_of_text|>", "A", "zz", "'", "\r\n"]
    return "".join(rng.choice(pieces) for _ in range(length))


def test_special_tokens_are_metas(encoding):
    specials = llama3_special_tokens()
    assert len(specials) == 256 and sorted(specials.values()) == list(range(128000, 128256))
    assert {name: specials[name] for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                                              "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                                              "<|python_tag|>", "<|reserved_special_token_245|>")} == {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
        "<|python_tag|>": 128010, "<|reserved_special_token_245|>": 128255}
    assert encoding.n_vocab == 128256
    ids = encoding.encode("<|begin_of_text|>hello world<|eot_id|>", allowed_special="all")
    assert ids == [128000, 15339, 1917, 128009]
    assert llama3_encode(encoding, "<|eot_id|>") != [128009]  # documents: special tokens' text is text


def test_encoding_gives_the_llama_models_packages_ids(encoding, tinyshakespeare_file):
    """Meta's own Tokenizer (llama_models, which ships the ranks file): the same ids, long runs cut alike."""
    meta = pytest.importorskip("llama_models.llama3.tokenizer").Tokenizer.get_instance()
    assert meta.special_tokens == llama3_special_tokens()
    rng = random.Random(1234)
    texts = [PARAGRAPH, "", " " * 60_001 + "x" * 25_001 + "\u3000" * 30_000 + "tail",
             tinyshakespeare_file.read_text(encoding="utf-8")]  # 1,115,394 characters: cut into pieces of 400,000
    texts += [random_text(rng, 300) for _ in range(30)]
    for text in texts:
        assert llama3_encode(encoding, text) == meta.encode(text, bos=False, eos=False), repr(text[:80])
    assert encoding.decode(llama3_encode(encoding, PARAGRAPH)) == PARAGRAPH


def test_tokenizer_file_holds_every_token_and_decodes(encoding, tmp_path):
    every = token_bytes(encoding)
    formats.write_tokenizer(tmp_path / "llama3_tokenizer.bin", every, llama3.BEGIN_OF_TEXT)
    read_back, eot = formats.read_tokenizer(tmp_path / "llama3_tokenizer.bin")
    assert read_back == every and len(every) == 128256 and eot == 128000
    assert every[128000] == b"<|begin_of_text|>" and every[15339] == b"hello" and max(map(len, every)) < 256
    ids = llama3_encode(encoding, PARAGRAPH)
    assert Tokenizer(tmp_path / "llama3_tokenizer.bin").decode(ids) == PARAGRAPH


def test_tokenizer_comes_from_the_environment_or_says_what_to_install(llama3_tokenizer_file, tmp_path, monkeypatch):
    monkeypatch.setenv(LLAMA3_TOKENIZER_FILE_ENV, str(llama3_tokenizer_file))
    assert llama3_encoding().encode_ordinary("hello world") == [15339, 1917]
    monkeypatch.setenv(LLAMA3_TOKENIZER_FILE_ENV, str(tmp_path / "nowhere.model"))
    missing = tmp_path / "nowhere.model"
    with pytest.raises(TokenizerError, match=re.escape(f"{missing}: Llama 3 tokenizer file not found")):
        llama3_encoding()
    monkeypatch.delenv(LLAMA3_TOKENIZER_FILE_ENV)
    monkeypatch.setattr("llmpy.tokenizer.packaged_llama3_ranks", lambda: None)  # as if llama-models were missing
    with pytest.raises(TokenizerError) as error:
        llama3_encoding()
    assert "\n" not in str(error.value) and "pip install llama-models" in str(error.value)
    assert LLAMA3_TOKENIZER_FILE_ENV in str(error.value) and "--tokenizer" in str(error.value)


def test_tinyshakespeare_llama3_shards_are_llmcs(tmp_path, tinyshakespeare_file, encoding):
    """llm.c's dev/data/tinyshakespeare.py --model_desc llama-3: 32,768 val and 276,224 train uint32 tokens, every
    section after a <|begin_of_text|>."""
    result = subprocess.run([sys.executable, str(REPO / "dev/data/tinyshakespeare.py"), "-m", "llama-3", "--input",
                             str(tinyshakespeare_file), "--output_dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    val, train = (tmp_path / f"tiny_shakespeare_llama3_{split}.bin" for split in ("val", "train"))
    assert (val.stat().st_size, train.stat().st_size) == (132_096, 1_105_920)  # llm.c's, as its docstring says
    header = np.fromfile(val, dtype="<i4", count=3)
    assert list(header) == [20240801, 7, 32768]
    tokens = np.concatenate([formats.read_shard(val, 128256), formats.read_shard(train, 128256)])
    assert tokens.dtype == np.uint32 and len(tokens) == 32768 + 276224
    text = tinyshakespeare_file.read_text(encoding="utf-8")
    assert tokens[0] == 128000 and np.count_nonzero(tokens == 128000) == len(text.split("\n\n"))
    assert encoding.decode(tokens[tokens != 128000].tolist()) == text


# ----------------------------------------------------------------------------- the trainer


def run_trainer(*args):
    return subprocess.run([sys.executable, str(REPO / "train_llama3_torch.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.bin"
    formats.write_shard(path, np.random.default_rng(12).integers(0, 128256, 2000), dtype=np.uint32)
    return path


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory, shard, llama3_tokenizer_file):
    """`--write_tensors 1` for the tiny model on a random-token shard, B=2, T=16."""
    out = tmp_path_factory.mktemp("reference")
    result = run_trainer("--model", "tiny", "--device", "cpu", "--input_bin", shard, "-b", 2, "-t", 16,
                         "--write_tensors", 1, "--write_dir", out, "--tokenizer", llama3_tokenizer_file)
    assert result.returncode == 0, result.stderr
    return out


def test_reference_files_hold_the_seeded_init_and_its_recomputed_batch(reference_files, shard):
    """The same fp32 code on the same machine: logits and loss to 1e-5, each gradient tensor to 1e-5 of its max."""
    config, flat = formats.read_llama3_model(reference_files / "llama3_tiny.bin")
    assert config == TINY and np.array_equal(flat, llama3.init_params(TINY, seed=42))
    bf16_config, flat_bf16 = formats.read_llama3_model(reference_files / "llama3_tiny_bf16.bin")
    assert bf16_config == TINY and np.array_equal(flat_bf16, torch.from_numpy(flat).bfloat16().float().numpy())
    state = formats.read_llama3_debug_state(reference_files / "llama3_tiny_debug_state.bin", config)
    tokens = formats.read_shard(shard).astype(np.int32)
    assert np.array_equal(state.x, tokens[:32].reshape(2, 16)) and np.array_equal(state.y, tokens[1:33].reshape(2, 16))
    model = ref.model_from_flat(config, flat)
    logits, loss = model(torch.from_numpy(state.x).long(), torch.from_numpy(state.y).long())
    loss.backward()
    np.testing.assert_allclose(state.logits, logits.detach().numpy(), rtol=0, atol=1e-5)
    assert state.loss == pytest.approx(loss.item(), abs=1e-5)
    expected = llama3.split_params(config, grads_to_flat(model))
    for name, grad in llama3.split_params(config, state.grads).items():
        assert np.abs(grad - expected[name]).max() <= 1e-5 * np.abs(expected[name]).max(), name
    hyper = json.loads((reference_files / "llama3_tiny_debug_losses.json").read_text())
    assert (hyper["model"], hyper["B"], hyper["T"], hyper["losses"][0]) == ("tiny", 2, 16, pytest.approx(state.loss))
    assert len(hyper["losses"]) == 10 and all(a > b for a, b in zip(hyper["losses"], hyper["losses"][1:]))
    token_list, eot = formats.read_tokenizer(reference_files / "llama3_tokenizer.bin")
    assert len(token_list) == 128256 and eot == 128000


def test_training_from_the_reference_model_overfits_a_batch_and_logs(reference_files, shard, tmp_path,
                                                                    llama3_tokenizer_file):
    """3 steps on one batch (the debug state's: its first loss is the debug state's), validation, a decoded
    sample, main.log's lines."""
    result = run_trainer("--init_from", reference_files / "llama3_tiny.bin", "--device", "cpu", "--input_bin", shard,
                         "--input_val_bin", shard, "-b", 2, "-t", 16, "--num_iterations", 3,
                         "--overfit_single_batch", 1, "--learning_rate", 1e-3, "--val_loss_every", 3,
                         "--val_max_steps", 1, "--sample_every", 3, "--sample_length", 4, "--output_dir", tmp_path,
                         "--tokenizer", llama3_tokenizer_file)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model tiny: 16,527,680 parameters, device cpu")
    losses = [float(v) for v in re.findall(r"\| loss (\S+)", result.stdout)]
    first = json.loads((reference_files / "llama3_tiny_debug_losses.json").read_text())["losses"][0]
    assert len(losses) == 3 and losses[0] == pytest.approx(first, abs=1e-5) and losses[0] > losses[1] > losses[2]
    assert result.stdout.count("sample:") == 1 and "sample: [" not in result.stdout  # decoded text, not ids
    log = (tmp_path / "main.log").read_text().splitlines()  # train_gpt2.py's (llmpy.logger)
    assert [" ".join(line.split()[:2]).rsplit(":", 1)[0] for line in log] == [
        "s:0 tel", "s:0 trl", "s:1 trl", "s:2 trl", "s:3 tel"]
    assert all(" lr:0.001000 norm:" in line for line in log if " trl:" in line)


@pytest.fixture
def bad_files(tmp_path, small_file):
    gpt2 = tmp_path / "gpt2.bin"
    gpt2_config = gpt2_config_from_descriptor("tiny")
    formats.write_model(gpt2, gpt2_config, gpt2_init(gpt2_config, 0))
    return {"gpt2": gpt2, "cut": corrupted(small_file, tmp_path, size=3000), "small": small_file,
            "missing": tmp_path / "tokenizer.model"}


def test_bad_input_ends_the_process_with_one_line(bad_files, shard):
    """A GPT-2 model file where a Llama 3 one belongs: exit status 1, one line on stderr, no traceback."""
    result = run_trainer("--init_from", bad_files["gpt2"], "--device", "cpu", "--input_bin", shard)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"train_llama3_torch.py: error: {bad_files['gpt2']}: bad magic 20240326, expected "
                             f"20240803: not an llm.c Llama 3 model file\n")


BAD_INPUT = [
    (["--init_from", "{cut}"], "{cut}: truncated: 3000 bytes, the header describes a Llama 3 model of"),
    (["--model", "llama2-7b"], "--model: unknown model descriptor 'llama2-7b': use tiny, llama3.2-1b, llama3.1-8b"),
    (["--init_from", "{small}", "--model", "tiny"],
     "--init_from {small} holds a L2-C32-NH4-KV2-H112-V300 model, but --model says tiny"),
    (["--init_from", "{small}", "--tied_embeddings", "1"],
     "--init_from {small} holds a L2-C32-NH4-KV2-H112-V300 model with untied embeddings, but --tied_embeddings is 1"),
    (["--model", "tiny", "--write_tensors", "1", "--tokenizer", "{missing}"],
     "--tokenizer: {missing}: Llama 3 tokenizer file not found"),
    (["--model", "tiny", "-t", "2000"], "--sequence_length 2000 exceeds the model's max_seq_len 1024"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUT, ids=[" ".join(f[:2]) for f, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_a_nonzero_exit(flags, message, bad_files, shard, monkeypatch, capsys):
    """In this process, to be quick: main() prints one line and exits with 1, as the process test above checks."""
    flags, message = [f.format(**bad_files) for f in flags], message.format(**bad_files)
    monkeypatch.setattr(sys, "argv", ["train_llama3_torch.py"])
    with pytest.raises(SystemExit) as exit_:
        ref.main(["--device", "cpu", "--input_bin", str(shard), "-b", "2", "-t", "16", *flags])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 1 and stderr.startswith(f"train_llama3_torch.py: error: {message}")
    assert stderr.count("\n") == 1, stderr
