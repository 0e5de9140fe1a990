"""Hugging Face Llama folders both ways (llmpy/hf.py, dev/eval/export_hf.py, train_llama3_torch.py --init_from).

Compared against transformers' own LlamaForCausalLM, the ground truth for what a Hugging Face Llama means:
- import: random LlamaForCausalLMs saved with save_pretrained (grouped-query and plain attention, tied and untied,
  Llama 3.1's RoPE scaling and none), read into our layout, give transformers' logits and loss in the Llama 3
  reference; the trainer runs from --init_from FOLDER to transformers' loss; exporting them again gives back
  save_pretrained's tensors bit for bit; a bf16 folder reads exactly.
- export: our Llama 3 (random init) written as a folder loads in transformers with our logits, reads back as it
  was, and its tokenizer.json encodes as our tiktoken encoding; the export script checks its folder itself.
- bad folders and files: one line naming the file and the problem, exit status 1, no traceback.

The logits tolerance, 1e-5 of the largest logit: both sides compute in fp32 from the same weights, in other orders
(transformers' attention and matmuls vs ours, and the RoPE pairs permuted, which reorders the sums of q.k): measured
~3e-7. A missed permutation of q_proj and k_proj moves the logits by ~1e-2, which one test checks.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import train_llama3_torch as ref  # noqa: E402
from llmpy import formats, hf  # noqa: E402
from llmpy.configs import llama3  # noqa: E402
from llmpy.tokenizer import llama3_encoding  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# head size 8: RoPE's four frequencies fall in each of Llama 3.1's three bands (as in test_llama3_reference.py);
# 8192 positions, so that transformers does not warn of a context shorter than the scaling's original one
SHAPE = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=8192)
VARIANTS = {
    # 2 query heads per KV head, Llama 3.1's RoPE, an LM head of its own, a SwiGLU width none of Meta's
    # (ffn_dim_multiplier, multiple_of) pairs gives at C=32 (so multiple_of 100)
    "gqa-untied-llama3rope": dict(num_key_value_heads=2, intermediate_size=100, rope_theta=500000.0,
                                  rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False, rms_norm_eps=1e-5),
    # one KV head for all, plain RoPE of theta 10000, the head tied to the embedding, tiny's pair (1.3 and 32: 128)
    "mqa-tied-plainrope": dict(num_key_value_heads=1, intermediate_size=128, rope_theta=10000.0, rope_scaling=None,
                               tie_word_embeddings=True, rms_norm_eps=1e-6),
    # a KV head for every query head, tied, Llama 3.1's RoPE
    "mha-tied-llama3rope": dict(num_key_value_heads=4, intermediate_size=64, rope_theta=500000.0,
                                rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True, rms_norm_eps=1e-5),
}
TINY = llama3.DESCRIPTORS["tiny"]


def relative_error(a, b):
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(b).max()


def save_random_llama(folder, seed, dtype=torch.float32, **variant):
    """A LlamaForCausalLM with every matrix N(0, 0.1) (transformers' 0.02 leaves attention nearly uniform, blind to
    RoPE) and the RMSNorm gains 1 + N(0, 0.2), saved with save_pretrained."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SHAPE, **variant}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 if p.dim() == 2 else 1.0 + torch.randn_like(p) * 0.2)
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request, tmp_path_factory):
    return save_random_llama(tmp_path_factory.mktemp("hf") / request.param, 3, **VARIANTS[request.param])


@pytest.fixture(scope="module")
def encoding(llama3_tokenizer_file):
    return llama3_encoding(llama3_tokenizer_file)


def transformers_logits(folder, x):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits.numpy()


def our_logits_and_loss(config, flat, x, y):
    """The Llama 3 reference's logits (B, T, V) and loss."""
    with torch.no_grad():
        logits, loss = ref.model_from_flat(config, flat)(x, y)
    return logits.numpy(), loss.item()


def cross_entropy(logits, targets):
    return torch.nn.functional.cross_entropy(torch.from_numpy(logits).flatten(0, 1), targets.flatten()).item()


def random_tokens(vocab_size, shape, seed):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, vocab_size, shape))


# ----------------------------------------------------------------------------- import


def test_swiglu_rule_gives_every_width_and_metas_pairs():
    """intermediate_size -> an ffn_dim_multiplier and multiple_of whose rule gives it back: Meta's pairs for Meta's
    sizes, and any width from 2 up at any model width C."""
    for config in llama3.DESCRIPTORS.values():
        assert llama3.swiglu_rule_for(config.channels, config.ffn_hidden) == (config.ffn_dim_multiplier,
                                                                                config.multiple_of)
    for channels in (1, 8, 32, 37, 100, 2048):
        for width in (*range(2, 600), 8192, 11008, 14336):
            assert llama3.swiglu_width(channels, *llama3.swiglu_rule_for(channels, width)) == width, (channels, width)


def test_imported_folder_gives_transformers_logits_and_loss(hf_folder):
    hf_config = json.loads((hf_folder / "config.json").read_text())
    config, flat = hf.load_hf_llama3(hf_folder)
    assert (config.channels, config.num_layers, config.num_heads, config.num_kv_heads, config.ffn_hidden,
            config.vocab_size, config.max_seq_len, config.norm_eps, config.tied_embeddings) == (
        hf_config["hidden_size"], hf_config["num_hidden_layers"], hf_config["num_attention_heads"],
        hf_config["num_key_value_heads"], hf_config["intermediate_size"], hf_config["vocab_size"],
        hf_config["max_position_embeddings"], hf_config["rms_norm_eps"], hf_config["tie_word_embeddings"])
    x, y = random_tokens(config.vocab_size, (3, 64), seed=4), random_tokens(config.vocab_size, (3, 64), seed=5)
    expected = transformers_logits(hf_folder, x)
    logits, loss = our_logits_and_loss(config, flat, x, y)
    assert relative_error(logits, expected) < 1e-5
    assert loss == pytest.approx(cross_entropy(expected, y), rel=1e-6)


def test_q_and_k_rows_must_be_permuted(hf_folder, monkeypatch):
    """Without the RoPE permutation of q_proj's and k_proj's rows the logits move far beyond the tolerance."""
    x = random_tokens(SHAPE["vocab_size"], (1, 64), seed=6)
    expected = transformers_logits(hf_folder, x)
    monkeypatch.setattr(hf, "_rope_rows", lambda w, heads, to_hf: w)
    config, flat = hf.load_hf_llama3(hf_folder)
    assert relative_error(our_logits_and_loss(config, flat, x, x)[0], expected) > 1e-3


def test_trainer_evaluates_a_folder_to_transformers_loss(tmp_path):
    """--init_from FOLDER --num_iterations 0: the validation loss of one batch of 2 x 16 tokens."""
    folder = save_random_llama(tmp_path / "folder", 7, **VARIANTS["gqa-untied-llama3rope"])
    shard = tmp_path / "val.bin"
    formats.write_shard(shard, np.random.default_rng(8).integers(0, SHAPE["vocab_size"], 2 * 16 + 1), np.uint32)
    tokens = torch.from_numpy(formats.read_shard(shard).astype(np.int64))
    expected = cross_entropy(transformers_logits(folder, tokens[:-1].view(2, 16)), tokens[1:])
    result = subprocess.run([sys.executable, REPO / "train_llama3_torch.py", "--init_from", folder, "--device", "cpu",
                             "--num_iterations", "0", "-b", "2", "-t", "16", "--val_loss_every", "1",
                             "--val_max_steps", "1", "--input_bin", shard, "--input_val_bin", shard],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model L2-C32-NH4-KV2-H100-V300: ")
    loss = float(re.search(r"val loss (\S+)", result.stdout)[1])
    assert abs(loss - expected) < 1e-5 * expected + 1e-6, (loss, expected)  # printed to 6 decimals


def test_mainline_evaluates_a_folder_to_transformers_loss(tmp_path):
    """train_llama3.py -e FOLDER -x 0 (the mainline in fp32 under Triton's interpreter): the validation loss of one
    batch of 2 x 16 tokens, as the reference's test above; 64 channels, as our attention takes head sizes from 16."""
    folder = save_random_llama(tmp_path / "folder", 7, **{**VARIANTS["gqa-untied-llama3rope"], "hidden_size": 64})
    shard = tmp_path / "val.bin"
    formats.write_shard(shard, np.random.default_rng(8).integers(0, SHAPE["vocab_size"], 2 * 16 + 1), np.uint32)
    tokens = torch.from_numpy(formats.read_shard(shard).astype(np.int64))
    expected = cross_entropy(transformers_logits(folder, tokens[:-1].view(2, 16)), tokens[1:])
    result = subprocess.run([sys.executable, REPO / "train_llama3.py", "-e", folder, "--device", "cpu", "--dtype",
                             "float32", "-x", "0", "-b", "2", "-t", "16", "-v", "1", "-m", "1", "-s", "0", "-i", shard,
                             "-j", shard], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    assert "Llama 3 L=2 C=64 NH=4 KV=2 H=100 maxT=8192 V=300, untied head" in result.stdout
    loss = float(re.search(r"val loss (\S+)", result.stdout)[1])
    assert abs(loss - expected) < 1e-5 * expected + 1e-6, (loss, expected)  # printed to 6 decimals


def test_export_of_an_imported_folder_gives_back_its_tensors_bit_for_bit(hf_folder, tmp_path, encoding):
    config, flat = hf.load_hf_llama3(hf_folder)
    hf.write_hf_folder(tmp_path, config, flat, "float32", encoding)
    theirs = safetensors_torch.load_file(hf_folder / "model.safetensors")
    ours = safetensors_torch.load_file(tmp_path / "model.safetensors")
    if config.tied_embeddings:  # save_pretrained may or may not write the tied head
        theirs.pop("lm_head.weight", None)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    theirs, ours = (transformers.AutoConfig.from_pretrained(folder) for folder in (hf_folder, tmp_path))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias"):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_a_bf16_folder_reads_exactly(tmp_path):
    folder = save_random_llama(tmp_path, 9, dtype=torch.bfloat16, **VARIANTS["gqa-untied-llama3rope"])
    theirs = safetensors_torch.load_file(folder / "model.safetensors")
    assert {t.dtype for t in theirs.values()} == {torch.bfloat16}
    config, flat = hf.load_hf_llama3(folder)
    ours = hf.hf_llama3_tensors(config, flat)
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert np.array_equal(ours[name], t.float().numpy()), name


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("tied", [False, True])
def test_our_llama_exported_loads_in_transformers_with_our_logits(tmp_path, encoding, tied):
    """tiny (the real vocab), random init with random RMSNorm gains; then read back: the same config and weights."""
    config = dataclasses.replace(TINY, tied_embeddings=tied)
    flat = llama3.init_params(config, seed=10)
    for name, gains in llama3.split_params(config, flat).items():
        if name.startswith("ln"):
            gains += np.random.default_rng(11).normal(0, 0.2, gains.shape).astype(np.float32)
    hf.write_hf_folder(tmp_path, config, flat, "float32", encoding)
    x, y = random_tokens(config.vocab_size, (2, 24), seed=12), random_tokens(config.vocab_size, (2, 24), seed=13)
    assert relative_error(transformers_logits(tmp_path, x), our_logits_and_loss(config, flat, x, y)[0]) < 1e-5
    read_config, read_flat = hf.load_hf_llama3(tmp_path)
    assert read_config == config and np.array_equal(read_flat, flat)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"bos_token_id": 128000,
                                                                             "eos_token_id": 128001}


def test_exported_tokenizer_encodes_like_ours(tmp_path, encoding, tinyshakespeare_file):
    """tokenizer.json, loaded by transformers, gives our ids after <|begin_of_text|>; special tokens' text is the
    special token (as tiktoken's allowed_special="all"); it decodes back to the text."""
    for name, text in hf.llama3_tokenizer_files(encoding, 1024).items():
        (tmp_path / name).write_text(text)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    paragraph = ("First Citizen:\nBefore we proceed, hear me speak.\n\nI'LL say they're here; we've won 12345 times "
                 "(3.14159) -- naïve café, Straße, 日本語, 🙂👍🏽\r\n   runs of   spaces\t\ttabs <|eot_id|>\n\n\n")
    ours = encoding.encode(paragraph, allowed_special="all")
    assert tokenizer.encode(paragraph) == [128000, *ours] and 128009 in ours
    assert tokenizer.decode(ours) == paragraph
    text = tinyshakespeare_file.read_text(encoding="utf-8")
    # whole: llama3_encode cuts a text at every 400,000th character as Meta's Tokenizer.encode does (the
    # tokens around a cut can differ), transformers' tokenizers do not
    assert tokenizer.encode(text, add_special_tokens=False) == encoding.encode_ordinary(text)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (128000, 128001, 128256)


def test_export_script_checks_a_llama3_file(tmp_path, llama3_tokenizer_file):
    formats.write_llama3_model(tmp_path / "model.bin", TINY, llama3.init_params(TINY, seed=14), dtype="bfloat16")
    result = subprocess.run([sys.executable, REPO / "dev/eval/export_hf.py", "-i", tmp_path / "model.bin", "-o",
                             tmp_path / "out", "--tokenizer", llama3_tokenizer_file], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'out'}: a Llama 3 model, model.safetensors (bfloat16)")
    diff = float(re.search(r"max \|diff\| / max \|logit\| = (\S+) ", result.stdout)[1])
    assert diff < 1e-5, result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    return save_random_llama(tmp_path_factory.mktemp("good") / "llama", 15, **VARIANTS["gqa-untied-llama3rope"])


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.bin"
    formats.write_shard(path, np.random.default_rng(16).integers(0, SHAPE["vocab_size"], 200), dtype=np.uint32)
    return path


def edit_config(folder, **changes):
    """config.json with these keys changed; a key changed to ... is removed."""
    config = {**json.loads((folder / "config.json").read_text()), **changes}
    (folder / "config.json").write_text(json.dumps({key: v for key, v in config.items() if v is not ...}))


def rope_parameters(folder, **changes):
    """transformers 5's rope_parameters (theta inside) with these changes."""
    rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
    edit_config(folder, rope_parameters={**rope, **changes})


def meta_rope(folder, **changes):
    """The RoPE of Meta's folders on the hub and transformers 4's: rope_theta, and rope_scaling with these changes."""
    rope = dict(json.loads((folder / "config.json").read_text())["rope_parameters"])
    edit_config(folder, rope_parameters=..., rope_theta=rope.pop("rope_theta"), rope_scaling={**rope, **changes})


BAD_FOLDERS = {
    "gpt2": (lambda f: edit_config(f, model_type="gpt2"),
             "config.json: model_type is 'gpt2': only Llama ('llama') folders are read here; GPT-2 folders go to "
             "train_gpt2.py and train_gpt2_cpu.py -e, train_gpt2_torch.py --model"),
    "rope factor": (lambda f: meta_rope(f, factor=16.0),
                    "config.json: rope_scaling.factor is 16.0: Llama 3.1's RoPE scaling, fixed in our config, has 8"),
    "rope_parameters": (lambda f: rope_parameters(f, original_max_position_embeddings=4096),
                        "config.json: rope_parameters.original_max_position_embeddings is 4096: Llama 3.1's RoPE "
                        "scaling, fixed in our config, has 8192"),
    "yarn": (lambda f: meta_rope(f, rope_type="yarn"),
             "config.json: rope_scaling's rope_type is 'yarn': our Llama 3 has Llama 3.1's scaling ('llama3') or "
             "none ('default')"),
    "gelu": (lambda f: edit_config(f, hidden_act="gelu"), "config.json: hidden_act is 'gelu': our Llama 3 has 'silu'"),
    "bias": (lambda f: edit_config(f, attention_bias=True), "config.json: attention_bias is True: our Llama 3 has "
                                                            "False"),
    "head_dim": (lambda f: edit_config(f, head_dim=16), "config.json: head_dim is 16: our Llama 3's heads are "
                                                        "hidden_size / num_attention_heads = 8 wide"),
    "no vocab": (lambda f: edit_config(f, vocab_size=...), "config.json: has no vocab_size"),
    "fractional width": (lambda f: edit_config(f, intermediate_size=1.5),
                         "config.json: intermediate_size is 1.5, expected an integer"),
    "heads": (lambda f: edit_config(f, num_attention_heads=3), "config.json: channels (32) must be divisible by "
                                                                "num_heads (3)"),
    "kv heads": (lambda f: edit_config(f, num_key_value_heads=4),
                 "model.layers.0.self_attn.k_proj.weight has shape (16, 32), the config needs (32, 32)"),
    "layers": (lambda f: edit_config(f, num_hidden_layers=3),
               "has no tensor model.layers.2.input_layernorm.weight: not a Llama model?"),
    "tied": (lambda f: edit_config(f, tie_word_embeddings=True),
             "lm_head.weight differs from model.embed_tokens.weight: config.json ties them (tie_word_embeddings)"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_a_folder_we_cannot_read_is_one_line(good_folder, tmp_path, shard, case, monkeypatch, capsys):
    """train_llama3_torch.py in this process, to be quick: main() prints one line and exits with 1."""
    damage, message = BAD_FOLDERS[case]
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((good_folder / name).read_bytes())
    damage(folder)
    monkeypatch.setattr(sys, "argv", ["train_llama3_torch.py"])
    with pytest.raises(SystemExit) as exit_:
        ref.main(["--init_from", str(folder), "--device", "cpu", "--input_bin", str(shard), "-b", "2", "-t", "16"])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 1 and stderr.startswith("train_llama3_torch.py: error: ") and "Traceback" not in stderr
    assert message in stderr and stderr.count("\n") == 1, stderr


def test_a_missing_init_from_says_how_to_get_metas_models(tmp_path, shard, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_llama3_torch.py"])
    with pytest.raises(SystemExit):
        ref.main(["--init_from", "meta-llama/Llama-3.2-1B", "--device", "cpu", "--input_bin", str(shard)])
    assert capsys.readouterr().err == (
        "train_llama3_torch.py: error: meta-llama/Llama-3.2-1B: no such file or folder (Meta's Llama models on the "
        "Hugging Face hub are gated: accept the licence, download one, e.g. `huggingface-cli download "
        "meta-llama/Llama-3.2-1B --local-dir DIR`, and pass DIR)\n")


def test_gpt2_programs_refuse_a_llama_folder_with_one_line(good_folder):
    result = subprocess.run([sys.executable, REPO / "train_gpt2_cpu.py", "-e", good_folder], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and result.stderr == (
        f"train_gpt2_cpu.py: error: {good_folder / 'config.json'}: model_type is 'llama': only GPT-2 ('gpt2') folders "
        f"are read here; Llama folders go to train_llama3_torch.py --init_from\n")


@pytest.mark.parametrize("program", ["train_gpt2_cpu.py", "sample.py", "dev/eval/hellaswag.py"])
def test_gpt2_programs_refuse_a_llama_model_file_with_one_line(program, tmp_path):
    """A Llama 3 model file (magic 20240803) given to a program of GPT-2's: one line saying what it holds and where
    it goes, not "bad magic"."""
    path = tmp_path / "llama.bin"
    formats.write_llama3_model(path, TINY, llama3.init_params(TINY, seed=1))
    result = subprocess.run([sys.executable, REPO / program, "-e", path], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"{path}: holds a Llama 3 model; this program takes GPT-2's (Llama 3 trains and samples with train_llama3.py, "
        "and exports with dev/eval/export_hf.py)")


def test_export_script_refuses_a_file_of_neither_family(tmp_path):
    (tmp_path / "x.bin").write_bytes(np.full(256, 7, dtype="<i4").tobytes())
    result = subprocess.run([sys.executable, REPO / "dev/eval/export_hf.py", "-i", tmp_path / "x.bin", "-o",
                             tmp_path / "out"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr == (
        f"export_hf.py: error: {tmp_path / 'x.bin'}: bad magic 7, expected 20240326 (GPT-2) or 20240803 (Llama 3): "
        f"not an llm.c model file\n")
