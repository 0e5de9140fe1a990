"""Hugging Face's GPT-2 folders, both ways: our flat parameters <-> transformers' GPT2LMHeadModel.

A Hugging Face model folder holds config.json (the shape: n_layer, n_head, n_embd, n_positions, vocab_size),
the weights in model.safetensors (or shards named by model.safetensors.index.json), and the tokenizer's files.
GPT-2's tensors there differ from llm.c's layout in three ways:
  - names: transformer.h.{l}.attn.c_attn.weight is layer l's slice of qkvw, and so on (_HF_NAMES below);
  - the four matmul weights are stored (in, out) (OpenAI's Conv1D), llm.c's (out, in): transposed both ways;
  - wte has vocab_size rows, llm.c's padded_vocab_size (the padding rows are zero); the LM head is tied to wte.

Reading needs NumPy only (safetensors is a JSON header and raw little-endian arrays, read here directly, bf16
included), so the NumPy trainer takes Hugging Face folders too; downloading pretrained GPT-2 needs huggingface_hub,
writing needs torch and safetensors (pip install "llmpy[hf]").
"""

import json
import os

import numpy as np

from .configs.gpt2 import GPT2_EOT, GPT2Config, num_parameters, pad_vocab, split_params
from .formats import FormatError, bfloat16_bits_to_float32, read_model, write_file_atomic
from .progress import progress
from .tokenizer import token_bytes

# OpenAI's GPT-2 checkpoints on the Hugging Face hub, by the names people use for them
PRETRAINED = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
INSTALL_HINT = 'pip install "llmpy[hf]"'

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


def read_hf_config(folder):
    """config.json of a GPT-2 folder -> GPT2Config, or FormatError naming the field we cannot represent."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise FormatError(path, "file not found (a Hugging Face model folder has config.json)") from None
    except (OSError, ValueError) as e:
        raise FormatError(path, f"cannot read it as JSON ({e})") from None
    if hf.get("model_type") != "gpt2":
        raise FormatError(path, f"model_type is {hf.get('model_type')!r}: only GPT-2 ('gpt2') folders are read")
    for key, allowed in _FIXED_CONFIG.items():
        if key in hf and hf[key] not in allowed:
            raise FormatError(path, f"{key} is {hf[key]!r}: our GPT-2 has {allowed[0]!r}")
    try:
        C, L, NH = int(hf["n_embd"]), int(hf["n_layer"]), int(hf["n_head"])
        V, maxT = int(hf["vocab_size"]), int(hf["n_positions"])
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(path, f"missing or non-integer {e}: a GPT-2 config has n_embd, n_layer, n_head, "
                                f"vocab_size and n_positions") from None
    if hf.get("n_inner") not in (None, 4 * C):
        raise FormatError(path, f"n_inner is {hf['n_inner']}: our GPT-2's MLP is 4 * n_embd = {4 * C} wide")
    try:
        return GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=pad_vocab(V), num_layers=L,
                          num_heads=NH, channels=C)
    except ValueError as e:
        raise FormatError(path, str(e)) from None


# safetensors' dtype names -> how to turn the raw little-endian bytes into float32
_SAFETENSORS_DTYPES = {"F32": ("<f4", None), "F16": ("<f2", None), "BF16": ("<u2", bfloat16_bits_to_float32)}


def read_safetensors(path):
    """A .safetensors file -> {name: float32 array}. The format: an 8-byte little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets: [begin, end]}} (offsets into the data after the header), the data."""
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
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise FormatError(path, f"{name} is {info.get('dtype')}: only F32, F16 and BF16 weights are read")
        numpy_dtype, convert = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end > len(data) or end - begin != count * np.dtype(numpy_dtype).itemsize:
            raise FormatError(path, f"{name}: its bytes {begin}..{end} do not hold {info['shape']} "
                                    f"{info['dtype']} (truncated?)")
        raw = data[begin:end].view(numpy_dtype).reshape(info["shape"])
        tensors[name] = convert(raw) if convert else raw.astype(np.float32)
    return tensors


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


def read_hf_weights(folder, config):
    """A GPT-2 folder's weights -> flat float32 parameters in llm.c's order (wte padded with zero rows)."""
    tensors = {}
    for path in _safetensors_files(folder):
        tensors.update(read_safetensors(path))
    # save_pretrained writes "transformer.h.0...."; OpenAI's hub files have no "transformer." prefix
    tensors = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    flat = np.zeros(num_parameters(config), dtype=np.float32)
    views = split_params(config, flat)

    def take(hf_name, shape, transposed):
        if hf_name not in tensors:
            raise FormatError(folder, f"has no tensor {hf_name} (or transformer.{hf_name}): not a GPT-2 model?")
        t = tensors[hf_name].T if transposed else tensors[hf_name]
        if t.shape != shape:
            raise FormatError(folder, f"{hf_name} has shape {t.shape[::-1] if transposed else t.shape}, the config "
                                      f"needs {shape[::-1] if transposed else shape}")
        return t

    for name, hf_name in _HF_GLOBAL_NAMES.items():
        rows = config.vocab_size if name == "wte" else views[name].shape[0]
        views[name][:rows] = take(hf_name, (rows, *views[name].shape[1:]), False)
    for name, (hf_name, transposed) in _HF_LAYER_NAMES.items():
        for layer in range(config.num_layers):
            views[name][layer] = take(f"h.{layer}.{hf_name}", views[name].shape[1:], transposed)
    head = tensors.get("lm_head.weight")
    if head is not None and not np.array_equal(head, views["wte"][:config.vocab_size]):
        raise FormatError(folder, "lm_head.weight differs from wte: GPT-2 here ties the LM head to the embedding")
    return flat


def load_hf(spec):
    """-e gpt2 | gpt2-medium | gpt2-large | gpt2-xl | FOLDER -> (GPT2Config, flat float32 parameters)."""
    folder = hf_folder(spec)
    config = read_hf_config(folder)
    return config, read_hf_weights(folder, config)


def load_weights(spec):
    """A model to start from, as the programs' -e takes it: a Hugging Face GPT-2 (load_hf) or an llm.c model file
    -> (GPT2Config, flat float32 parameters)."""
    return load_hf(spec) if is_hf_source(spec) else read_model(spec)


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


def hf_config(config, dtype):
    """config.json of a GPT-2 of this shape, as transformers' GPT2Config writes it. Dropout 0: we train without."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.max_seq_len, "n_ctx": config.max_seq_len,
            "n_embd": config.channels, "n_layer": config.num_layers, "n_head": config.num_heads, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "use_cache": True,
            "tie_word_embeddings": True, "bos_token_id": GPT2_EOT, "eos_token_id": GPT2_EOT, "torch_dtype": dtype}


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


def write_hf_folder(folder, config, flat, dtype, encoding):
    """Writes a GPT-2 folder transformers loads (from_pretrained) and lm-eval-harness evaluates: model.safetensors
    in dtype ('float32' or 'bfloat16'), config.json and the tokenizer's files, each file atomically."""
    try:
        import safetensors.torch
        import torch
    except ImportError:
        raise ValueError(f"writing safetensors needs torch and safetensors: {INSTALL_HINT}") from None
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tensors = {name: torch.from_numpy(t).to(torch_dtype)
               for name, t in progress(hf_tensors(config, flat).items(), desc="tensors", unit="")}
    os.makedirs(folder, exist_ok=True)
    write_file_atomic(os.path.join(folder, "model.safetensors"),
                      [safetensors.torch.save(tensors, metadata={"format": "pt"})])
    files = {"config.json": json.dumps(hf_config(config, dtype), indent=2),
             **hf_tokenizer_files(encoding, config.max_seq_len)}
    for name, text in files.items():
        write_file_atomic(os.path.join(folder, name), [text.encode()])
