"""Hugging Face model folders, both ways: our flat parameters <-> transformers' GPT2LMHeadModel and LlamaForCausalLM.

A Hugging Face model folder holds config.json (the shape and the architecture's options), the weights in
model.safetensors (or shards named by model.safetensors.index.json), and the tokenizer's files.

GPT-2's tensors there differ from llm.c's layout in three ways:
  - names: transformer.h.{l}.attn.c_attn.weight is layer l's slice of qkvw, and so on (_HF_LAYER_NAMES below);
  - the four matmul weights are stored (in, out) (OpenAI's Conv1D), llm.c's (out, in): transposed both ways;
  - wte has vocab_size rows, llm.c's padded_vocab_size (the padding rows are zero); the LM head is tied to wte.
Llama's (Meta's Llama 3, llmpy/configs/llama3.py) in four:
  - names: model.layers.{l}.mlp.up_proj.weight is layer l's slice of fcw, and so on (_llama3_layout below);
  - qkvw is three tensors there, q_proj, k_proj and v_proj, stacked by rows here;
  - RoPE: we turn each head's channels (2i, 2i+1) together, as Meta's and llm.c's code do; transformers'
    rotate_half turns channel i with i + hs/2. The same model, with q_proj's and k_proj's rows permuted in each head;
  - the LM head is lm_head.weight, absent when config.json ties it to the embedding.
config.json's SwiGLU width (intermediate_size) is ours through an ffn_dim_multiplier and multiple_of that give it
(llama3.swiglu_rule_for); its RoPE scaling must be none or Llama 3.1's, whose constants are fixed in our config.

Reading needs NumPy only (safetensors is a JSON header and raw little-endian arrays, read here directly, bf16
included), so the NumPy trainer takes Hugging Face folders too; so does writing the weights. Downloading pretrained
GPT-2 needs huggingface_hub, and Llama's tokenizer file is made by transformers' tiktoken converter (pip install
"llmpy[hf]"). Meta's Llama weights on the hub are gated (a licence to accept, a token): we read a folder
downloaded beforehand, never a name.
"""

import dataclasses
import json
import os

import numpy as np

from .configs import llama3
from .configs.gpt2 import GPT2_EOT, GPT2Config, num_parameters, pad_vocab, split_params
from .formats import (LLAMA3_MAGIC, FormatError, bfloat16_bits_to_float32, float32_to_bfloat16_bits,
                      read_llama3_model, read_magic, read_model, write_file_atomic)
from .progress import progress
from .tokenizer import LLAMA3_BPE_TOKENS, LLAMA3_SPLIT_PATTERN, llama3_special_tokens, token_bytes

# OpenAI's GPT-2 checkpoints on the Hugging Face hub, by the names people use for them
PRETRAINED = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
INSTALL_HINT = 'pip install "llmpy[hf]"'
# a config.json's model_type -> the family in words, and which of our programs reads its folders
_FAMILIES = {"gpt2": ("GPT-2", "train_gpt2.py and train_gpt2_cpu.py -e, train_gpt2_torch.py --model"),
             "llama": ("Llama", "train_llama3_torch.py --init_from")}

# llm.c's per-layer tensors -> the Hugging Face name of layer l's slice, and whether it is stored transposed
_HF_LAYER_NAMES = {
    "ln1w": ("ln_1.weight", False), "ln1b": ("ln_1.bias", False),
    "qkvw": ("attn.c_attn.weight", True), "qkvb": ("attn.c_attn.bias", False),
    "attprojw": ("attn.c_proj.weight", True), "attprojb": ("attn.c_proj.bias", False),
    "ln2w": ("ln_2.weight", False), "ln2b": ("ln_2.bias", False),
    "fcw": ("mlp.c_fc.weight", True), "fcb": ("mlp.c_fc.bias", False),
    "fcprojw": ("mlp.c_proj.weight", True), "fcprojb": ("mlp.c_proj.bias", False),
}
_HF_GLOBAL_NAMES = {"wte": "wte.weight", "wpe": "wpe.weight", "lnfw": "ln_f.weight", "lnfb": "ln_f.bias"}
# config.json values our GPT-2 has (the others change the architecture and are refused)
_FIXED_CONFIG = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
                 "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
                 "tie_word_embeddings": (True,), "add_cross_attention": (False,)}
# ... and our Llama 3's (transformers' defaults, absent from older files)
_LLAMA3_FIXED_CONFIG = {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,)}
# transformers' llama3 RoPE scaling: its fields -> ours, fixed for the family
_LLAMA3_ROPE_SCALING = {"factor": llama3.ROPE_SCALE_FACTOR, "low_freq_factor": llama3.ROPE_LOW_FREQ_FACTOR,
                        "high_freq_factor": llama3.ROPE_HIGH_FREQ_FACTOR,
                        "original_max_position_embeddings": llama3.ROPE_ORIGINAL_CONTEXT}


def is_hf_source(spec):
    """Whether -e names a Hugging Face model: a pretrained GPT-2's name, or a folder holding a config.json."""
    return spec in PRETRAINED or os.path.isfile(os.path.join(spec, "config.json"))


def hf_folder(spec):
    """The local folder of a Hugging Face model: spec itself, or a pretrained GPT-2 downloaded (once; later calls
    find it in Hugging Face's cache, ~/.cache/huggingface, offline too)."""
    if spec not in PRETRAINED:
        return spec
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError(f"{spec}: downloading pretrained GPT-2 needs huggingface_hub: {INSTALL_HINT}") from None
    patterns = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    try:
        return huggingface_hub.snapshot_download(PRETRAINED[spec], allow_patterns=patterns)
    except Exception as e:  # offline, a proxy, no disk: huggingface_hub's messages are paragraphs
        raise ValueError(f"{spec}: could not download {PRETRAINED[spec]} from the Hugging Face hub "
                         f"({type(e).__name__}); offline? pass a local folder with config.json and "
                         f"model.safetensors instead") from None


# ----------------------------------------------------------------------------- reading: config.json


def _read_config_json(folder, model_type):
    """A folder's config.json -> (its path, its dict), which must be of this model_type; FormatError naming the file
    otherwise, and for the other family's folder, the program that reads it."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise FormatError(path, "file not found (a Hugging Face model folder has config.json)") from None
    except (OSError, ValueError) as e:
        raise FormatError(path, f"cannot read it as JSON ({e})") from None
    if not isinstance(hf, dict):
        raise FormatError(path, "not a model's config (a JSON object)")
    found = hf.get("model_type")
    if found != model_type:
        elsewhere = f"; {_FAMILIES[found][0]} folders go to {_FAMILIES[found][1]}" if found in _FAMILIES else ""
        raise FormatError(path, f"model_type is {found!r}: only {_FAMILIES[model_type][0]} ({model_type!r}) folders "
                                f"are read here{elsewhere}")
    return path, hf


def _check_fixed(path, hf, fixed, family):
    """The config.json values that must be ours (fixed: key -> the values we have, ours first)."""
    for key, allowed in fixed.items():
        if key in hf and hf[key] not in allowed:
            raise FormatError(path, f"{key} is {hf[key]!r}: our {family} has {allowed[0]!r}")


def _config_number(path, key, value, kind):
    """A config.json value as an integer (kind int) or any number (kind float); FormatError naming its key if it is
    of another kind (true and 1.5 are not integers)."""
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise FormatError(path, f"{key} is {value!r}, expected {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _config_numbers(path, hf, kind, *keys):
    """config.json's values of these keys (_config_number); FormatError naming the first that is missing."""
    missing = [key for key in keys if key not in hf]
    if missing:
        raise FormatError(path, f"has no {missing[0]}")
    return [_config_number(path, key, hf[key], kind) for key in keys]


def read_hf_config(folder):
    """config.json of a GPT-2 folder -> GPT2Config, or FormatError naming the field we cannot represent."""
    path, hf = _read_config_json(folder, "gpt2")
    _check_fixed(path, hf, _FIXED_CONFIG, "GPT-2")
    C, L, NH, V, maxT = _config_numbers(path, hf, int, "n_embd", "n_layer", "n_head", "vocab_size", "n_positions")
    if hf.get("n_inner") not in (None, 4 * C):
        raise FormatError(path, f"n_inner is {hf['n_inner']}: our GPT-2's MLP is 4 * n_embd = {4 * C} wide")
    try:
        return GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=pad_vocab(V), num_layers=L,
                          num_heads=NH, channels=C)
    except ValueError as e:
        raise FormatError(path, str(e)) from None


def _llama3_rope(path, hf):
    """config.json's RoPE -> (rope_theta, use_scaled_rope), read as transformers 5 reads it: the scaling from
    rope_scaling (earlier versions' key, and Meta's folders' on the hub: null, or {rope_type (or type), its fields}),
    else from rope_parameters (transformers 5's: {rope_type, rope_theta, its fields}); theta from that object, else
    from rope_theta. The scaling must be none or Llama 3.1's."""
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(field) or {}
    if not isinstance(rope, dict):
        raise FormatError(path, f"{field} is {rope!r}, expected an object or null")
    theta = _config_number(path, "rope_theta", rope.get("rope_theta", hf.get("rope_theta", 10000.0)), float)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise FormatError(path, f"{field}'s rope_type is {kind!r}: our Llama 3 has Llama 3.1's scaling ('llama3') or "
                                f"none ('default')")
    for key, ours in _LLAMA3_ROPE_SCALING.items() if kind == "llama3" else ():
        if rope.get(key) != ours:
            raise FormatError(path, f"{field}.{key} is {rope.get(key)!r}: Llama 3.1's RoPE scaling, fixed in our "
                                    f"config, has {ours:g}")
    return theta, kind == "llama3"


def read_hf_llama3_config(folder):
    """config.json of a Llama folder -> Llama3Config, or FormatError naming the field we cannot represent."""
    path, hf = _read_config_json(folder, "llama")
    _check_fixed(path, hf, _LLAMA3_FIXED_CONFIG, "Llama 3")
    C, L, NH, H, V, maxT = _config_numbers(path, hf, int, "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "intermediate_size", "vocab_size", "max_position_embeddings")
    # transformers' defaults: a key and value head for every query head, an LM head of its own
    KV = _config_number(path, "num_key_value_heads", NH if hf.get("num_key_value_heads") is None
                        else hf["num_key_value_heads"], int)
    eps, = _config_numbers(path, hf, float, "rms_norm_eps")
    theta, scaled = _llama3_rope(path, hf)
    try:
        config = llama3.Llama3Config(
            num_layers=L, num_heads=NH, num_kv_heads=KV, channels=C, max_seq_len=maxT, vocab_size=V, norm_eps=eps,
            rope_theta=theta, use_scaled_rope=scaled, tied_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except ValueError as e:
        raise FormatError(path, str(e)) from None
    rule = llama3.swiglu_rule_for(C, H)
    if rule is None:
        raise FormatError(path, f"intermediate_size is {H}: no ffn_dim_multiplier and multiple_of give it by Meta's "
                                f"rule")
    config = dataclasses.replace(config, ffn_dim_multiplier=rule[0], multiple_of=rule[1])
    if hf.get("head_dim") not in (None, config.head_size):
        raise FormatError(path, f"head_dim is {hf['head_dim']}: our Llama 3's heads are hidden_size / "
                                f"num_attention_heads = {config.head_size} wide")
    return config


# ----------------------------------------------------------------------------- reading: the weights

# safetensors' dtype names -> the raw little-endian array's dtype, and how to turn it into float32
_SAFETENSORS_DTYPES = {"F32": ("<f4", lambda raw: raw.astype(np.float32)),
                       "F16": ("<f2", lambda raw: raw.astype(np.float32)), "BF16": ("<u2", bfloat16_bits_to_float32)}


def safetensors_arrays(path):
    """A .safetensors file -> {name: (its raw array, memory-mapped, not read yet; the function to float32)}. The
    format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}}
    (offsets into the data after the header), the data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise FormatError(path, "not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise FormatError(path, "not a safetensors file (its header is not JSON)") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise FormatError(path, f"{name} is {info.get('dtype')}: only F32, F16 and BF16 weights are read")
        numpy_dtype, to_float32 = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end > len(data) or end - begin != count * np.dtype(numpy_dtype).itemsize:
            raise FormatError(path, f"{name}: its bytes {begin}..{end} do not hold {info['shape']} "
                                    f"{info['dtype']} (truncated?)")
        arrays[name] = (data[begin:end].view(numpy_dtype).reshape(info["shape"]), to_float32)
    return arrays


def _safetensors_files(folder):
    """The folder's weight files: model.safetensors, or the shards its index names."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    other = [name for name in ("pytorch_model.bin", "tf_model.h5") if os.path.isfile(os.path.join(folder, name))]
    hint = (f" (it has {other[0]}: load it with transformers and save_pretrained it, which writes safetensors)"
            if other else "")
    raise FormatError(folder, f"no model.safetensors{hint}")


class _FolderTensors:
    """A folder's weights by name, over all its safetensors files, each read and made float32 only when taken (a
    Llama 3 8B is 32 GB in float32: the flat parameters, and one tensor at a time besides).

    prefix: one that some files of the family put before every name and others do not (GPT-2's "transformer."),
    dropped."""

    def __init__(self, folder, family, prefix=""):
        self.folder, self.family, self.prefix = folder, family, prefix
        self.arrays = {name.removeprefix(prefix): array
                       for path in _safetensors_files(folder) for name, array in safetensors_arrays(path).items()}

    def __contains__(self, name):
        return name in self.arrays

    def take(self, name, shape, transposed=False):
        """The tensor, float32, of this shape (stored transposed: of the reverse shape, and transposed back)."""
        if name not in self.arrays:
            also = f" (or {self.prefix}{name})" if self.prefix else ""
            raise FormatError(self.folder, f"has no tensor {name}{also}: not a {self.family} model?")
        raw, to_float32 = self.arrays[name]
        stored = tuple(shape[::-1] if transposed else shape)
        if raw.shape != stored:
            raise FormatError(self.folder, f"{name} has shape {raw.shape}, the config needs {stored}")
        return to_float32(raw).T if transposed else to_float32(raw)

    def check_tied(self, name, embedding, embedding_name, why):
        """A tied LM head stored all the same (save_pretrained may write it) must be the embedding."""
        if name in self and not np.array_equal(self.take(name, embedding.shape), embedding):
            raise FormatError(self.folder, f"{name} differs from {embedding_name}: {why}")


def read_hf_weights(folder, config):
    """A GPT-2 folder's weights -> flat float32 parameters in llm.c's order (wte padded with zero rows)."""
    # save_pretrained writes "transformer.h.0...."; OpenAI's hub files have no "transformer." prefix
    tensors = _FolderTensors(folder, "GPT-2", prefix="transformer.")
    flat = np.zeros(num_parameters(config), dtype=np.float32)
    views = split_params(config, flat)
    for name, hf_name in _HF_GLOBAL_NAMES.items():
        rows = config.vocab_size if name == "wte" else views[name].shape[0]
        views[name][:rows] = tensors.take(hf_name, (rows, *views[name].shape[1:]))
    for name, (hf_name, transposed) in _HF_LAYER_NAMES.items():
        for layer in range(config.num_layers):
            views[name][layer] = tensors.take(f"h.{layer}.{hf_name}", views[name].shape[1:], transposed)
    tensors.check_tied("lm_head.weight", views["wte"][:config.vocab_size], "wte",
                       "GPT-2 here ties the LM head to the embedding")
    return flat


def _llama3_layout(config):
    """Where each Hugging Face tensor of a Llama 3 sits in our parameters: its name -> (our tensor, the layer or
    None, its rows there, the heads whose rows are in RoPE's other order, or None)."""
    NH, KV, hs = config.num_heads, config.num_kv_heads, config.head_size
    every, q, k = slice(None), NH * hs, KV * hs  # qkvw's rows: q (NH hs), then k (KV hs), then v (KV hs)
    per_layer = {"input_layernorm.weight": ("ln1w", every, None),
                 "self_attn.q_proj.weight": ("qkvw", slice(0, q), NH),
                 "self_attn.k_proj.weight": ("qkvw", slice(q, q + k), KV),
                 "self_attn.v_proj.weight": ("qkvw", slice(q + k, None), None),
                 "self_attn.o_proj.weight": ("attprojw", every, None),
                 "post_attention_layernorm.weight": ("ln2w", every, None),
                 "mlp.gate_proj.weight": ("fc2w", every, None),  # Meta's w1, through SiLU
                 "mlp.up_proj.weight": ("fcw", every, None),  # w3
                 "mlp.down_proj.weight": ("fcprojw", every, None)}  # w2
    layout = {"model.embed_tokens.weight": ("wte", None, every, None)}
    for layer in range(config.num_layers):
        layout.update({f"model.layers.{layer}.{name}": (ours, layer, rows, heads)
                       for name, (ours, rows, heads) in per_layer.items()})
    layout["model.norm.weight"] = ("lnfw", None, every, None)
    if not config.tied_embeddings:
        layout["lm_head.weight"] = ("lmhead", None, every, None)
    return layout


def _llama3_part(views, name, layer, rows):
    """The view of our parameters that a Hugging Face tensor fills (_llama3_layout's entry)."""
    return (views[name] if layer is None else views[name][layer])[rows]


def _rope_rows(w, heads, to_hf):
    """q_proj's or k_proj's rows (heads * hs, C) between our RoPE order and transformers'. We turn each head's
    channels (2i, 2i+1) by pair i's angle, transformers' rotate_half turns channels i and i + hs/2: our row 2i + j of
    a head (j = 0, 1) is its row j * hs/2 + i. So a head's rows, seen as (hs/2, 2) ours or (2, hs/2) theirs, are
    transposed. heads None: rows RoPE does not touch (v_proj, and every other tensor), as they are."""
    if heads is None:
        return w
    grouped = (heads, -1, 2) if to_hf else (heads, 2, -1)
    return w.reshape(*grouped, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)


def read_hf_llama3_weights(folder, config):
    """A Llama folder's weights -> flat float32 parameters in llmpy.configs.llama3's layout."""
    tensors = _FolderTensors(folder, "Llama")
    flat = np.empty(llama3.num_parameters(config), dtype=np.float32)  # every element is written below
    views = llama3.split_params(config, flat)
    for hf_name, (name, layer, rows, heads) in _llama3_layout(config).items():
        part = _llama3_part(views, name, layer, rows)
        part[...] = _rope_rows(tensors.take(hf_name, part.shape), heads, to_hf=False)
    if config.tied_embeddings:
        tensors.check_tied("lm_head.weight", views["wte"], "model.embed_tokens.weight",
                           "config.json ties them (tie_word_embeddings)")
    return flat


def load_hf(spec):
    """-e gpt2 | gpt2-medium | gpt2-large | gpt2-xl | FOLDER -> (GPT2Config, flat float32 parameters)."""
    folder = hf_folder(spec)
    config = read_hf_config(folder)
    return config, read_hf_weights(folder, config)


def load_weights(spec):
    """A model to start from, as the programs' -e takes it: a Hugging Face GPT-2 (load_hf) or an llm.c model file
    -> (GPT2Config, flat float32 parameters)."""
    if is_hf_source(spec):
        return load_hf(spec)
    if os.path.isfile(spec) and read_magic(spec) == LLAMA3_MAGIC:
        raise FormatError(spec, "holds a Llama 3 model; this program takes GPT-2's (Llama 3 trains and samples with "
                                "train_llama3.py, and exports with dev/eval/export_hf.py)")
    return read_model(spec)


def load_hf_llama3(folder):
    """A Hugging Face Llama folder -> (Llama3Config, flat float32 parameters)."""
    config = read_hf_llama3_config(folder)
    return config, read_hf_llama3_weights(folder, config)


def load_llama3_weights(path):
    """A Llama 3 to start from, as train_llama3_torch.py's --init_from takes it: a Hugging Face Llama folder or an
    llm.c Llama 3 model file -> (Llama3Config, flat float32 parameters)."""
    if os.path.isdir(path):
        return load_hf_llama3(path)
    if not os.path.exists(path):
        raise FormatError(path, "no such file or folder (Meta's Llama models on the Hugging Face hub are gated: "
                                "accept the licence, download one, e.g. `huggingface-cli download "
                                "meta-llama/Llama-3.2-1B --local-dir DIR`, and pass DIR)")
    return read_llama3_model(path)


# ----------------------------------------------------------------------------- writing


def hf_tensors(config, flat):
    """Flat parameters (llm.c's order) -> {Hugging Face name: float32 array}, as save_pretrained names them: the
    matmul weights transposed to (in, out), wte without its padding rows, no lm_head (tied to wte)."""
    views = split_params(config, np.asarray(flat, dtype=np.float32))
    tensors = {f"transformer.{hf_name}": views[name][:config.vocab_size] if name == "wte" else views[name]
               for name, hf_name in _HF_GLOBAL_NAMES.items()}
    for layer in range(config.num_layers):
        for name, (hf_name, transposed) in _HF_LAYER_NAMES.items():
            t = views[name][layer]
            tensors[f"transformer.h.{layer}.{hf_name}"] = t.T if transposed else t
    return {name: np.ascontiguousarray(t) for name, t in tensors.items()}


def hf_llama3_tensors(config, flat):
    """Flat parameters (llmpy.configs.llama3's layout) -> {Hugging Face name: float32 array}, as save_pretrained
    names them: q_proj's and k_proj's rows in transformers' RoPE order, no lm_head when it is tied."""
    views = llama3.split_params(config, np.asarray(flat, dtype=np.float32))
    return {hf_name: np.ascontiguousarray(_rope_rows(_llama3_part(views, name, layer, rows), heads, to_hf=True))
            for hf_name, (name, layer, rows, heads) in _llama3_layout(config).items()}


def hf_config(config, dtype):
    """config.json of a GPT-2 of this shape, as transformers' GPT2Config writes it. Dropout 0: we train without."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.max_seq_len, "n_ctx": config.max_seq_len,
            "n_embd": config.channels, "n_layer": config.num_layers, "n_head": config.num_heads, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "use_cache": True,
            "tie_word_embeddings": True, "bos_token_id": GPT2_EOT, "eos_token_id": GPT2_EOT, "torch_dtype": dtype}


def hf_llama3_config(config, dtype):
    """config.json of a Llama 3 of this config. RoPE as rope_theta and rope_scaling, as Meta's folders on the hub
    have it: transformers 4 reads only that, transformers 5 reads it too (and writes rope_parameters)."""
    rope_scaling = {"rope_type": "llama3", **_LLAMA3_ROPE_SCALING} if config.use_scaled_rope else None
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
            "hidden_size": config.channels, "intermediate_size": config.ffn_hidden,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_size, "hidden_act": "silu",
            "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta, "rope_scaling": rope_scaling, "attention_bias": False,
            "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
            "tie_word_embeddings": config.tied_embeddings, "use_cache": True, "bos_token_id": llama3.BEGIN_OF_TEXT,
            "eos_token_id": llama3.END_OF_TEXT, "torch_dtype": dtype}


def _byte_to_unicode():
    """GPT-2's byte-level BPE shows each byte as a printable character in vocab.json and merges.txt: the printable
    Latin-1 bytes as themselves, the other 68 (controls, space, ...) as chr(256), chr(257), ... in byte order.
    So ' the' is 'Ġthe': the space, byte 32, is the 33rd unprintable byte, chr(256 + 32)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merge_pair(token, ranks):
    """The two tokens whose merge made `token`: rerun BPE on its bytes with only the merges ranked before it (lowest
    rank first, as BPE merges); what is left is the last merge's two halves."""
    parts = [token[i:i + 1] for i in range(len(token))]
    limit = ranks[token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not one merge of two earlier tokens")
    return parts


def hf_tokenizer_files(encoding, max_seq_len):
    """GPT-2's tokenizer as transformers' files ({name: text}), made from the tiktoken encoding we encode with:
    vocab.json (each token's bytes shown as in _byte_to_unicode -> its id), merges.txt (the BPE merges in rank
    order, one 'left right' pair a line: the id of a merged token is its rank), and the tokenizer's config."""
    show = _byte_to_unicode()
    by_rank = token_bytes(encoding)[:encoding.eot_token]  # the BPE tokens' bytes; a token's id is its rank
    ranks = {token: rank for rank, token in enumerate(by_rank)}
    text = {token: "".join(show[b] for b in token) for token in by_rank}
    vocab = {text[token]: ranks[token] for token in by_rank}
    eot = encoding.decode_single_token_bytes(encoding.eot_token).decode()
    vocab[eot] = encoding.eot_token
    merges = ["#version: 0.2"]
    for token in by_rank:
        if len(token) > 1:
            left, right = _merge_pair(token, ranks)
            merges.append(f"{text[left]} {text[right]}")
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_seq_len, "add_prefix_space": False,
              "add_bos_token": False, **special}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False), "merges.txt": "\n".join(merges) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2), "special_tokens_map.json": json.dumps(special)}


def llama3_tokenizer_files(encoding, max_seq_len):
    """Llama 3's tokenizer as transformers' files ({name: text}), made from the tiktoken encoding we encode with:
    tokenizer.json by transformers' tiktoken converter (every split of a token into two tokens is a merge ranked as
    the token, and a piece of text that is a token is taken whole, as tiktoken takes it), with <|begin_of_text|>
    put before each text as Meta's tokenizer does; and the tokenizer's config. Special tokens' text in a text is the
    special token, as with tiktoken's allowed_special="all"."""
    try:
        from tokenizers import processors
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        raise ValueError(f"writing Llama 3's tokenizer needs transformers: {INSTALL_HINT}") from None

    class FromRanks(TikTokenConverter):
        # the converter reads a ranks file through tiktoken's loader, which keeps a copy of a local file by its path
        # and serves it after the file has changed: it is given the ranks themselves instead
        load_tiktoken_bpe = staticmethod(lambda ranks: ranks)

    ranks = {token: rank for rank, token in enumerate(token_bytes(encoding)[:LLAMA3_BPE_TOKENS])}
    specials = llama3_special_tokens()  # added after the 128,000 BPE tokens in their order: ids 128000..128255
    tokenizer = FromRanks(vocab_file=ranks, pattern=LLAMA3_SPLIT_PATTERN, extra_special_tokens=specials).converted()
    bos, eos = (encoding.decode_single_token_bytes(i).decode() for i in (llama3.BEGIN_OF_TEXT, llama3.END_OF_TEXT))
    tokenizer.post_processor = processors.Sequence([tokenizer.post_processor, processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, llama3.BEGIN_OF_TEXT)])])
    special = {"bos_token": bos, "eos_token": eos}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
              "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"], **special}
    return {"tokenizer.json": tokenizer.to_str(), "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(special)}


# each dtype we write: safetensors' name of it, its size, and float32 -> it, little-endian
_SAFETENSORS_OUT = {"float32": ("F32", 4, lambda t: np.asarray(t, dtype="<f4")),
                    "bfloat16": ("BF16", 2, lambda t: float32_to_bfloat16_bits(t).astype("<u2", copy=False))}


def safetensors_chunks(tensors, dtype):
    """{name: float32 array} -> a .safetensors file in dtype ('float32', or 'bfloat16' rounded to nearest even) as
    chunks for write_file_atomic: the header, then each tensor converted as it is written (safetensors_arrays reads
    the format). The header is padded with spaces to 8 bytes, as the safetensors package pads it."""
    code, itemsize, convert = _SAFETENSORS_OUT[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # transformers loads "pt" files
    for name, t in tensors.items():
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + t.size * itemsize]}
        offset += t.size * itemsize
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    yield len(text).to_bytes(8, "little") + text
    for t in progress(tensors.values(), desc="tensors", unit=""):
        yield convert(t)


def write_hf_folder(folder, config, flat, dtype, encoding):
    """Writes a folder transformers loads (from_pretrained) and lm-eval-harness evaluates, for a GPT2Config or a
    Llama3Config: model.safetensors in dtype ('float32' or 'bfloat16'), config.json, the tokenizer's files from the
    encoding and, for Llama, generation_config.json (its begin and end tokens); each file atomically."""
    if isinstance(config, llama3.Llama3Config):
        tensors = hf_llama3_tensors(config, flat)
        ids = {"bos_token_id": llama3.BEGIN_OF_TEXT, "eos_token_id": llama3.END_OF_TEXT}
        files = {"config.json": json.dumps(hf_llama3_config(config, dtype), indent=2),
                 "generation_config.json": json.dumps(ids, indent=2),
                 **llama3_tokenizer_files(encoding, config.max_seq_len)}
    else:
        tensors = hf_tensors(config, flat)
        files = {"config.json": json.dumps(hf_config(config, dtype), indent=2),
                 **hf_tokenizer_files(encoding, config.max_seq_len)}
    os.makedirs(folder, exist_ok=True)
    write_file_atomic(os.path.join(folder, "model.safetensors"), safetensors_chunks(tensors, dtype))
    for name, text in files.items():
        write_file_atomic(os.path.join(folder, name), [text.encode()])
