"""Hugging Face both ways (llmpy/hf.py, dev/eval/export_hf.py, -e FOLDER in the three trainers).

Compared against transformers' own GPT2LMHeadModel, the ground truth for what a Hugging Face GPT-2 means:
- export: our weights written as a folder, loaded by transformers: its logits equal our NumPy forward's to 1e-5
  relative (fp32; the same weights summed in other orders agree to ~1e-7), at a tiny size and at GPT-2 124M (d12);
  the exported tokenizer encodes text to tiktoken's ids; bf16 export holds our weights rounded to bf16, bit for bit.
- import: a randomly initialised GPT2LMHeadModel saved with save_pretrained, loaded by the NumPy trainer, the mainline
  (interpreter, fp32) and the PyTorch reference, gives transformers' logits to 1e-5 relative; exporting it again gives
  back save_pretrained's tensors bit for bit; each trainer runs from -e FOLDER to transformers' loss.
- the safetensors reader against the safetensors package, and bad folders: one line naming the file and the problem.
"""

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

import train_gpt2_cpu as cpu  # noqa: E402
import train_gpt2_torch as ref  # noqa: E402
from llmpy import formats, hf  # noqa: E402
from llmpy.configs.gpt2 import config_from_descriptor, gpt2_init  # noqa: E402
from llmpy.models import gpt2  # noqa: E402
from llmpy.tokenizer import gpt2_encoding  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# a random GPT-2 of transformers' own making: a small vocab keeps the interpreter fast (padded 500 -> 512 here)
HF_SHAPE = dict(vocab_size=500, n_positions=32, n_embd=64, n_layer=2, n_head=4)
PARAGRAPH = ("The quick brown fox's 3 cubs didn't jump over 1,234 lazy dogs.\n\n  Indented   text, tabs\tand "
             "ünïcödé (çà et là), emoji 🚀, CJK 漢字, <|endoftext|> then more.  Trailing spaces   ")


def relative_error(a, b):
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(b).max()


def transformers_logits(folder, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def numpy_logits(config, flat, tokens):
    model = cpu.GPT2(config, flat)
    model.forward(tokens)
    return model.acts.logits[:, :config.vocab_size].reshape(*tokens.shape, -1)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A randomly initialised GPT2LMHeadModel (transformers' init, seeded), saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("hf") / "random_gpt2"
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_SHAPE))
    with torch.no_grad():  # non-zero biases and layernorms, so that a mixed-up tensor shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(5).integers(0, HF_SHAPE["vocab_size"], (2, 16)).astype(np.int32)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("descriptor", ["tiny", "d12"])
def test_exported_folder_loads_in_transformers_with_our_logits(tmp_path, tiktoken_file, descriptor):
    config = config_from_descriptor(descriptor)
    flat = gpt2_init(config, seed=7)
    hf.write_hf_folder(tmp_path, config, flat, "float32", gpt2_encoding())
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (1, 24)).astype(np.int32)
    # fp32 both sides, the same weights: rounding differences only (measured ~3e-7); allowed 1e-5
    assert relative_error(transformers_logits(tmp_path, tokens), numpy_logits(config, flat, tokens)) < 1e-5


def test_exported_tokenizer_encodes_like_ours(tmp_path, tiktoken_file):
    encoding = gpt2_encoding()
    for name, text in hf.hf_tokenizer_files(encoding, 1024).items():
        (tmp_path / name).write_text(text)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = encoding.encode(PARAGRAPH, allowed_special="all")
    assert tokenizer.encode(PARAGRAPH) == ours
    assert tokenizer.decode(ours) == PARAGRAPH
    assert tokenizer.eos_token_id == encoding.eot_token == 50256


def test_bf16_export_holds_our_weights_rounded_to_bf16(tmp_path, tiktoken_file):
    config = config_from_descriptor("tiny")
    flat = gpt2_init(config, seed=8)
    hf.write_hf_folder(tmp_path, config, flat, "bfloat16", gpt2_encoding())
    tensors = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    expected = hf.hf_tensors(config, formats.bfloat16_bits_to_float32(formats.float32_to_bfloat16_bits(flat)))
    assert tensors.keys() == expected.keys()
    for name, t in tensors.items():
        assert np.array_equal(t.float().numpy(), expected[name]), name
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_script_checks_its_folder_with_transformers(tmp_path, tiktoken_file):
    config = config_from_descriptor("tiny")
    formats.write_model(tmp_path / "model.bin", config, gpt2_init(config, seed=9), dtype="bfloat16")
    result = subprocess.run([sys.executable, REPO / "dev/eval/export_hf.py", "-i", tmp_path / "model.bin", "-o",
                             tmp_path / "out"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    diff = float(re.search(r"max \|diff\| / max \|logit\| = (\S+) ", result.stdout)[1])
    assert diff < 1e-5, result.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "merges.txt", "model.safetensors",
                                                    "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


@pytest.mark.parametrize("case", ["missing input", "output under a file"])
def test_export_script_bad_input_is_one_line(tmp_path, tiktoken_file, case):
    (tmp_path / "a_file").write_text("")
    model = tmp_path / "model.bin"
    formats.write_model(model, config_from_descriptor("tiny"), gpt2_init(config_from_descriptor("tiny"), seed=1))
    args, message = {
        "missing input": (["-i", tmp_path / "nope.bin", "-o", tmp_path / "out"], f"{tmp_path / 'nope.bin'}: file not "
                                                                                  "found"),
        "output under a file": (["-i", model, "-o", tmp_path / "a_file" / "out"],
                                f"-o/--output {tmp_path / 'a_file' / 'out'}: cannot write there ({tmp_path / 'a_file'} "
                                "is a file, not a folder)")}[case]
    result = subprocess.run([sys.executable, REPO / "dev/eval/export_hf.py", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and result.stderr == f"export_hf.py: error: {message}\n", result.stderr


# ----------------------------------------------------------------------------- import


def test_folder_loads_in_every_trainer_with_transformers_logits(hf_folder, tokens):
    expected = transformers_logits(hf_folder, tokens)

    config, flat = cpu.load_model(str(hf_folder), seed=0)  # the NumPy trainer's -e
    assert relative_error(numpy_logits(config, flat, tokens), expected) < 1e-5

    model, _ = ref.build_model(ref.parse_args(["--model", str(hf_folder)]))  # the reference's --model
    with torch.no_grad():  # with targets (any), the reference's forward returns every position's logits
        x = torch.from_numpy(tokens).long()
        assert relative_error(model(x, x)[0].numpy(), expected) < 1e-5

    config = hf.read_hf_config(hf_folder)  # the mainline's -e (train_gpt2.py: init_config, then the weights)
    mainline = gpt2.build(config, *tokens.shape, dtype=torch.float32, device="cpu", attention_impl="triton")
    mainline.runtime.load_weights(hf.read_hf_weights(hf_folder, config))
    mainline.forward(torch.from_numpy(tokens))
    logits = mainline.acts.logits[:, :config.vocab_size].reshape(*tokens.shape, -1).numpy()
    assert relative_error(logits, expected) < 1e-5


def test_export_of_an_imported_folder_gives_back_its_tensors_bit_for_bit(hf_folder, tmp_path, tiktoken_file):
    config, flat = hf.load_hf(str(hf_folder))
    hf.write_hf_folder(tmp_path, config, flat, "float32", gpt2_encoding())
    theirs = safetensors_torch.load_file(hf_folder / "model.safetensors")
    ours = safetensors_torch.load_file(tmp_path / "model.safetensors")
    theirs.pop("lm_head.weight", None)  # tied to wte; save_pretrained may or may not write it
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("program", ["train_gpt2_cpu.py", "train_gpt2.py", "train_gpt2_torch.py"])
def test_each_trainer_evaluates_from_a_folder_to_transformers_loss(hf_folder, tmp_path, program):
    """-x 0 / --num_iterations 0: only the validation loss, over one batch of 2 x 16 tokens of a shard."""
    rng = np.random.default_rng(6)
    shard = tmp_path / "val.bin"
    formats.write_shard(shard, rng.integers(0, HF_SHAPE["vocab_size"], 2 * 16 + 1))
    tokens = np.array(formats.read_shard(shard), dtype=np.int64)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens[:-1]).view(2, 16), labels=None).logits
        expected = torch.nn.functional.cross_entropy(expected.view(-1, expected.shape[-1]),
                                                     torch.from_numpy(tokens[1:])).item()
    args = {"train_gpt2_cpu.py": ["-e", hf_folder, "-x", 0, "-b", 2, "-t", 16, "-m", 1, "-s", 0],
            "train_gpt2.py": ["-e", hf_folder, "-x", 0, "-b", 2, "-t", 16, "-m", 1, "-s", 0, "--device", "cpu",
                              "--dtype", "float32"],
            "train_gpt2_torch.py": ["--model", hf_folder, "--num_iterations", 0, "-b", 2, "-t", 16,
                                    "--val_max_steps", 1, "--val_loss_every", 1, "--device", "cpu"]}[program]
    data = ["--input_bin", shard, "--input_val_bin", shard]
    result = subprocess.run([sys.executable, REPO / program, *map(str, args + data)], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    loss = float(re.search(r"val loss (\S+)", result.stdout)[1])
    assert abs(loss - expected) < 1e-5 * expected + 1e-6, (loss, expected)  # printed to 6 decimals


# ----------------------------------------------------------------------------- the reader and bad folders


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_reader_matches_the_safetensors_package(tmp_path, dtype):
    tensors = {"a": torch.randn(3, 5).to(dtype), "b": torch.randn(7).to(dtype), "empty": torch.zeros(0, 4).to(dtype)}
    safetensors_torch.save_file(tensors, tmp_path / "x.safetensors")
    arrays = hf.safetensors_arrays(tmp_path / "x.safetensors")
    assert arrays.keys() == tensors.keys()
    for name, t in tensors.items():
        raw, to_float32 = arrays[name]
        assert to_float32(raw).dtype == np.float32 and np.array_equal(to_float32(raw), t.float().numpy()), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_safetensors_writer_is_read_by_the_safetensors_package(tmp_path, dtype):
    """Our float32 tensors in dtype, bf16 rounded to nearest even as torch rounds them."""
    tensors = {"b": np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32),
               "a": np.arange(7, dtype=np.float32), "empty": np.zeros((0, 4), np.float32)}
    formats.write_file_atomic(tmp_path / "x.safetensors", hf.safetensors_chunks(tensors, dtype))
    theirs = safetensors_torch.load_file(tmp_path / "x.safetensors")
    assert theirs.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(theirs[name], torch.from_numpy(t).to(getattr(torch, dtype))), name


def break_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("damage, message", [
    (lambda f: break_config(f, model_type="llama"), "config.json: model_type is 'llama': only GPT-2 ('gpt2') "
                                                    "folders are read"),
    (lambda f: break_config(f, n_inner=100), "config.json: n_inner is 100: our GPT-2's MLP is 4 * n_embd = 256 wide"),
    (lambda f: break_config(f, activation_function="relu"), "config.json: activation_function is 'relu': our GPT-2 "
                                                            "has 'gelu_new'"),
    (lambda f: break_config(f, n_embd=65, n_head=4), "config.json: channels (65) must be divisible by num_heads (4)"),
    (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
     "no model.safetensors (it has pytorch_model.bin: load it with transformers and save_pretrained it, which writes "
     "safetensors)"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
     "model.safetensors: transformer.wte.weight: its bytes"),
    (lambda f: break_config(f, n_layer=3), "has no tensor h.2.ln_1.weight (or transformer.h.2.ln_1.weight): not a "
                                           "GPT-2 model?"),
], ids=["llama", "n_inner", "relu", "heads", "pytorch_model.bin", "truncated", "layers"])
def test_a_folder_we_cannot_read_is_one_line_naming_the_problem(hf_folder, tmp_path, damage, message):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((hf_folder / name).read_bytes())
    damage(folder)
    result = subprocess.run([sys.executable, REPO / "train_gpt2_cpu.py", "-e", folder], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("train_gpt2_cpu.py: error: ") and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1


def test_an_untied_lm_head_is_refused(hf_folder, tmp_path):
    tensors = safetensors_torch.load_file(hf_folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    with pytest.raises(formats.FormatError, match="lm_head.weight differs from wte"):
        hf.load_hf(str(tmp_path))


@pytest.mark.parametrize("hub, message", [
    ("raise ImportError('No module named huggingface_hub')",
     'gpt2: downloading pretrained GPT-2 needs huggingface_hub: pip install "llmpy[hf]"'),
    ("def snapshot_download(repo_id, allow_patterns):\n"
     "    raise OSError('We could not connect to https://huggingface.co\\nCheck your connection')\n",
     "gpt2: could not download openai-community/gpt2 from the Hugging Face hub (OSError); offline? pass a local "
     "folder with config.json and model.safetensors instead"),
], ids=["huggingface_hub missing", "offline"])
@pytest.mark.parametrize("program", ["train_gpt2_cpu.py", "train_gpt2.py", "train_gpt2_torch.py"])
def test_pretrained_gpt2_without_the_hub_is_one_line(tmp_path, hub, message, program):
    """A stand-in huggingface_hub first on the path: one that fails to import, one whose download fails with a
    message of several lines, as the real one does offline."""
    (tmp_path / "huggingface_hub").mkdir()
    (tmp_path / "huggingface_hub" / "__init__.py").write_text(hub)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1"}
    flag = "--model" if program == "train_gpt2_torch.py" else "-e"
    extra = ["--device", "cpu"] if program != "train_gpt2_cpu.py" else []
    result = subprocess.run([sys.executable, REPO / program, flag, "gpt2", *extra], env=env, capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert result.stderr == f"{program}: error: {message}\n", result.stderr


def test_sample_py_continues_a_folder_as_its_model_file(tmp_path, tiktoken_file):
    config = config_from_descriptor("tiny")
    flat = gpt2_init(config, seed=10)
    formats.write_model(tmp_path / "model.bin", config, flat)
    hf.write_hf_folder(tmp_path / "folder", config, flat, "float32", gpt2_encoding())
    samples = []
    for model in (tmp_path / "model.bin", tmp_path / "folder"):
        result = subprocess.run([sys.executable, REPO / "sample.py", "-e", model, "--device", "cpu", "--prompt", "Hi",
                                 "--max_new_tokens", "6", "--num_samples", "2", "--seed", "3"], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        samples.append(re.findall(r"^--- sample \d/2 ---\n(.*)$", result.stdout, re.M))
    assert len(samples[0]) == 2 and samples[0] == samples[1]
