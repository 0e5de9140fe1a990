"""llm.c's binary files, byte for byte: model, debug state, tokenizer, token shards, eval files; GPT-2's and Llama 3's.

Every file starts with a header of 256 little-endian int32 (1024 bytes): a magic number, a version, then sizes;
unused slots are zero. Readers check the magic, the version and that the file is
exactly as long as its header says, and raise FormatError with one line naming the file and the problem. Writers
write to a temporary file and rename it into place, so a failed write never leaves a half-written file behind.
NumPy only.
"""

import math
import os
from dataclasses import dataclass

import numpy as np

from .configs.gpt2 import GPT2Config, num_parameters
from .params import split_flat
from .configs import llama3

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

MODEL_MAGIC = 20240326
MODEL_VERSION_FP32 = 3
MODEL_VERSION_BF16 = 5
STATE_MAGIC, STATE_VERSION = 20240327, 2
TOKENIZER_MAGIC, TOKENIZER_VERSION = 20240328, 2
SHARD_MAGIC_GPT2, SHARD_VERSION_GPT2 = 20240520, 1  # tokens as uint16
SHARD_MAGIC_LLAMA3, SHARD_VERSION_LLAMA3 = 20240801, 7  # tokens as uint32
EVAL_MAGIC, EVAL_VERSION = 20240522, 1
LLAMA3_MAGIC = 20240803  # llm.c's train_llama3.py: its model files and its debug states alike


class FormatError(Exception):
    """A file that is missing, truncated or not what it claims to be. str() is one line: '<path>: <problem>'."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")


def _read_bytes(path, count=-1):
    """The file's bytes (its first count bytes, if given), or FormatError naming the file."""
    try:
        with open(path, "rb") as f:
            return f.read(count)
    except FileNotFoundError:
        raise FormatError(path, "file not found") from None
    except IsADirectoryError:
        raise FormatError(path, "is a directory, expected a file") from None
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror}") from None


def _read_header(path, data, magic, versions, kind):
    """Checks magic and version (versions None: a kind without one, whose [1] is something else); returns the
    header as an int32 array."""
    if len(data) < HEADER_BYTES:
        raise FormatError(path, f"truncated: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header of a {kind} file")
    header = np.frombuffer(data, dtype="<i4", count=HEADER_INTS)
    if header[0] != magic:
        raise FormatError(path, f"bad magic {header[0]}, expected {magic}: not an llm.c {kind} file")
    if versions is not None and header[1] not in versions:
        raise FormatError(path, f"unsupported {kind} file version {header[1]}, expected {' or '.join(map(str, versions))}")
    return header


def _check_length(path, data, expected, kind, size=None):
    size = len(data) if size is None else size
    if size != expected:
        problem = "truncated" if size < expected else "has trailing bytes"
        raise FormatError(path, f"{problem}: {size} bytes, the header describes a {kind} of {expected} bytes")


def _new_header(*values):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[: len(values)] = values
    return header


def write_file_atomic(path, chunks):
    """Writes the chunks (bytes, or arrays written as their bytes) to path, all or nothing: to a temporary file in the
    same folder (path + ".tmp" + the process id), flushed to the disk (fsync), then renamed over path, and the folder
    synced so the rename itself survives a power cut. A reader sees the old file or the whole new one, never a part;
    a failure or an interruption (KeyboardInterrupt) removes the temporary file, and one left by a killed process
    carries that process's id (llmpy.checkpoint removes them)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                # an array as its bytes, without a copy (an empty one too, which memoryview.cast refuses)
                f.write(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8) if isinstance(chunk, np.ndarray)
                        else chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(os.path.dirname(path) or ".")
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def sync_folder(folder):
    """fsync a folder, so that files created, renamed or removed in it stay so after a crash of the machine."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_folder(flag, folder):
    """Makes folder (and its parents) if needed and checks that files can be created in it, before hours of work
    are spent on what would go there; ValueError naming the flag otherwise."""
    try:
        _probe_folder(folder)
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot write there ({_why(e, folder)})") from None


def check_output_file(flag, path):
    """Checks that path can be written (atomically: a temporary beside it, then a rename) without writing it."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder, expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        _probe_folder(folder)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({_why(e, folder)})") from None


def _probe_folder(folder):
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f".write_test{os.getpid()}")
    open(probe, "wb").close()
    os.remove(probe)


def _why(error, folder):
    """An OSError in words, saying which part of the path is a file where a folder should be."""
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        part = folder
        while part and not os.path.exists(part):
            part = os.path.dirname(part)
        if os.path.isfile(part):
            return f"{part} is a file, not a folder"
    return error.strerror


def float32_to_bfloat16_bits(x):
    """Rounds float32 to bfloat16 (to nearest, ties to even; past the largest bf16 to inf); returns the bf16 bit
    patterns as uint16, shaped as x. NaN stays NaN (quiet). In slices of 4M values through one reused uint32 buffer,
    in place: no temporary as large as a model."""
    values = np.ascontiguousarray(x, dtype=np.float32)
    bits = values.reshape(-1).view(np.uint32)
    out = np.empty(bits.shape, dtype=np.uint16)
    buffer = np.empty(max(1, min(bits.size, 1 << 22)), dtype=np.uint32)
    for start in range(0, bits.size, buffer.size):
        part, rounded = bits[start:start + buffer.size], buffer[:min(buffer.size, bits.size - start)]
        np.right_shift(part, 16, out=rounded)
        rounded &= 1  # the lowest kept bit: ties go to even
        rounded += 0x7FFF
        rounded += part  # wraps around only for NaNs (bits above 0xFFFF7FFF), which are set apart below
        rounded >>= 16
        out[start:start + rounded.size] = rounded
    nan = np.isnan(values.reshape(-1))
    if nan.any():  # rounding could carry a NaN's payload into its exponent: keep its top half, quiet
        out[nan] = (bits[nan] >> 16) | 0x40
    return out.reshape(values.shape)


def bfloat16_bits_to_float32(bits):
    """bfloat16 bit patterns (uint16) to float32: bf16 is the top half of a float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------- model


def read_model_header(path, check_length=False):
    """An llm.c model file's header -> (GPT2Config, the number of parameters, its version: 3 fp32 or 5 bf16), without
    reading the weights; check_length also checks the file's size against it."""
    header = _read_header(path, _read_bytes(path, HEADER_BYTES), MODEL_MAGIC, (MODEL_VERSION_FP32, MODEL_VERSION_BF16),
                          "model")
    maxT, V, L, NH, C, Vp = (int(v) for v in header[2:8])
    if min(maxT, V, L, NH, C) <= 0 or C % NH or Vp < V:
        raise FormatError(path, f"nonsense model header: max_seq_len={maxT} vocab={V} layers={L} heads={NH} channels={C} padded_vocab={Vp}")
    config = GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp, num_layers=L, num_heads=NH, channels=C)
    n = num_parameters(config)
    version = int(header[1])
    if check_length:
        _check_length(path, b"", HEADER_BYTES + n * (2 if version == MODEL_VERSION_BF16 else 4), "model",
                      size=os.path.getsize(path))
    return config, n, version


def read_model(path):
    """An llm.c model file (v3 fp32 or v5 bf16) -> (GPT2Config, flat float32 parameters in llm.c's order)."""
    config, n, version = read_model_header(path)
    data = _read_bytes(path)
    bf16 = version == MODEL_VERSION_BF16
    _check_length(path, data, HEADER_BYTES + n * (2 if bf16 else 4), "model")
    if bf16:
        flat = bfloat16_bits_to_float32(np.frombuffer(data, dtype="<u2", count=n, offset=HEADER_BYTES))
    else:
        flat = np.frombuffer(data, dtype="<f4", count=n, offset=HEADER_BYTES).copy()
    return config, flat


def model_file_chunks(config, payload, dtype):
    """A model file's header and payload, for write_file_atomic. payload: the flat parameters, float32 for a v3
    file, or for a v5 (bf16) file their bf16 bit patterns as uint16."""
    version = {"float32": MODEL_VERSION_FP32, "bfloat16": MODEL_VERSION_BF16}[dtype]
    expected = np.dtype("<f4" if dtype == "float32" else "<u2")
    if payload.shape != (num_parameters(config),) or payload.dtype != expected:
        raise ValueError(f"a {dtype} model file needs {expected} parameters of shape ({num_parameters(config)},), "
                         f"got {payload.dtype} {payload.shape}")
    c = config
    header = _new_header(MODEL_MAGIC, version, c.max_seq_len, c.vocab_size, c.num_layers, c.num_heads, c.channels,
                         c.padded_vocab_size)
    return [header, payload]


def write_model(path, config, flat_params, dtype="float32"):
    """Writes flat float32 parameters (llm.c order, padded wte) as an llm.c model file, fp32 (v3) or bf16 (v5)."""
    flat = np.asarray(flat_params, dtype=np.float32)
    if flat.shape != (num_parameters(config),):
        raise ValueError(f"{path}: parameters have shape {flat.shape}, the config needs ({num_parameters(config)},)")
    if dtype == "float32":
        payload = flat.astype("<f4", copy=False)  # no copy on a little-endian host
    elif dtype == "bfloat16":
        payload = float32_to_bfloat16_bits(flat).astype("<u2", copy=False)
    else:
        raise ValueError(f"model dtype must be float32 or bfloat16, not {dtype!r}")
    write_file_atomic(path, model_file_chunks(config, payload, dtype))


# ----------------------------------------------------------------------------- debug state


@dataclass
class DebugState:
    """One batch as the reference saw it: inputs, targets, logits, loss and every parameter gradient."""

    x: np.ndarray  # int32 (B, T) input tokens
    y: np.ndarray  # int32 (B, T) target tokens
    logits: np.ndarray  # float32 (B, T, V), the unpadded vocab
    loss: float
    grads: np.ndarray  # float32 flat (num_parameters,), llm.c's order, wte's padding rows zero


def read_debug_state(path, config):
    """An llm.c debug state file for a model of this config -> DebugState."""
    data = _read_bytes(path)
    header = _read_header(path, data, STATE_MAGIC, (STATE_VERSION,), "debug state")
    return _read_debug_body(path, data, int(header[2]), int(header[3]), config, num_parameters(config))


def _read_debug_body(path, data, B, T, config, n):
    """What follows a debug state's header for a batch of (B, T): x, y, logits, loss and n gradient values."""
    if B <= 0 or T <= 0 or T > config.max_seq_len:
        raise FormatError(path, f"nonsense batch in header: B={B} T={T} (model max_seq_len {config.max_seq_len})")
    V = config.vocab_size
    _check_length(path, data, HEADER_BYTES + 4 * (2 * B * T + B * T * V + 1 + n), f"debug state (B={B}, T={T}, V={V}, {n} params)")
    offset = HEADER_BYTES

    def take(dtype, count):
        nonlocal offset
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).copy()
        offset += 4 * count
        return arr

    x = take("<i4", B * T).reshape(B, T)
    y = take("<i4", B * T).reshape(B, T)
    for name, tokens in (("x", x), ("y", y)):
        if tokens.min() < 0 or tokens.max() >= V:
            raise FormatError(path, f"token ids in {name} out of range [0, {V}): min {tokens.min()}, max {tokens.max()}")
    logits = take("<f4", B * T * V).reshape(B, T, V)
    loss = float(take("<f4", 1)[0])
    grads = take("<f4", n)
    return DebugState(x=x, y=y, logits=logits, loss=loss, grads=grads)


def write_debug_state(path, config, x, y, logits, loss, grads_flat):
    B, T = x.shape
    header = _new_header(STATE_MAGIC, STATE_VERSION, B, T)
    write_file_atomic(path, [header] + _debug_body(path, config.vocab_size, num_parameters(config), x, y, logits,
                                                   loss, grads_flat))


def _debug_body(path, V, n, x, y, logits, loss, grads_flat):
    """The arrays after a debug state's header, checked against each other, the vocab V and n parameters."""
    B, T = x.shape
    if y.shape != (B, T) or logits.shape != (B, T, V) or grads_flat.shape != (n,):
        raise ValueError(f"{path}: debug state shapes disagree: x {x.shape}, y {y.shape}, logits {logits.shape}, grads {grads_flat.shape}")
    # copy=False: on a little-endian host the arrays are written as they are (d12's gradients: 0.5 GB not copied)
    return [x.astype("<i4", copy=False), y.astype("<i4", copy=False), logits.astype("<f4", copy=False),
            np.array([loss], dtype="<f4"), grads_flat.astype("<f4", copy=False)]


# ----------------------------------------------------------------------------- Llama 3 model and debug state
#
# llm.c's train_llama3.py writes a model file's header as int32: [0] 20240803, [1] 3 (fp32) or 5 (bf16),
# [2] max_seq_len, [3] vocab_size, [4] n_layer, [5] n_head, [6] n_kv_head, [7] n_embd, [8] ffn_dim_multiplier,
# [9] multiple_of, [10] norm_eps, [11] rope_theta, [12] use_scaled_rope, [13] max_gen_batch_size (4), [14] major
# and [15] minor version. Being int32 slots, [8] and [10] hold the values truncated (1.3 -> 1, 1e-5 -> 0), and its
# files always hold a separate lmhead. We write every one of those slots as llm.c does, so our files are its files
# in every byte it writes, and after them, in slots llm.c leaves zero, what its header loses:
#   [16] 1, the version of this extension    [17] tied_embeddings (0 or 1)
#   [18:20] ffn_dim_multiplier, [20:22] norm_eps, [22:24] rope_theta: float64 bit patterns, two slots each (exact)
# A file without the extension ([16] = 0, as llm.c writes them) is read as untied, with rope_theta from [11], and
# ffn_dim_multiplier and norm_eps those of the known Llama 3 size (llmpy.configs.llama3.DESCRIPTORS) whose integer
# fields and truncated values it has; of any other size it is refused, with one line.
# The tensors follow in llm.c's order (llmpy.configs.llama3), lmhead last: a tied model writes wte there again.
#
# llm.c's debug state for Llama 3 has the model file's magic and no version: [1] B, [2] T; then x, y (int32,
# (B, T)), logits (fp32, (B, T, V)), the loss (fp32), every gradient (fp32, the model file's order: a tied model's
# wte gradient, both uses summed, stands in lmhead's place too).
#
# This is the layout of llm.c's master train_llama3.py, which writes it and has no reader. llm.c's C trainer
# (train_llama3.cu, on its unmerged llama3 branch) reads another one, not handled here: a header of 256 int32 and
# 256 float32, and GPT-2's 16 tensors with zero biases, fcw and fc2w stacked, and lmhead in wpe's place.

LLAMA3_EXTENSION = 1
_LLAMA3_VERSIONS = {"float32": MODEL_VERSION_FP32, "bfloat16": MODEL_VERSION_BF16}
_LLAMA3_MAX_GEN_BATCH_SIZE = 4  # llm.c's [13]: the batch of its KV cache at sampling; we write what it writes


def _llama3_exact_fields(path, config_fields, ffn_int, eps_int):
    """ffn_dim_multiplier and norm_eps of the known size with these integer fields, for a file without our
    extension."""
    for known in llama3.DESCRIPTORS.values():
        known_fields = (known.vocab_size, known.num_layers, known.num_heads, known.num_kv_heads, known.channels,
                        known.multiple_of)
        if known_fields == config_fields and (int(known.ffn_dim_multiplier), int(known.norm_eps)) == (ffn_int, eps_int):
            return known.ffn_dim_multiplier, known.norm_eps
    V, L, NH, KV, C, multiple_of = config_fields
    raise FormatError(path, f"llm.c's int32 header truncates ffn_dim_multiplier (to {ffn_int}) and norm_eps (to "
                            f"{eps_int}), and L={L} C={C} NH={NH} KV={KV} V={V} multiple_of={multiple_of} is not a "
                            f"known Llama 3 size ({', '.join(llama3.DESCRIPTORS)}): the model cannot be rebuilt")


def read_magic(path):
    """The first int32 of a file, which says what llm.c file it is (None for a file of under 4 bytes)."""
    data = _read_bytes(path, 4)
    return int(np.frombuffer(data, dtype="<i4")[0]) if len(data) == 4 else None


def read_llama3_model_header(path, check_length=False):
    """A Llama 3 model file's header -> (Llama3Config, its version: 3 fp32 or 5 bf16), without the weights;
    check_length also checks the file's size against it."""
    header = _read_header(path, _read_bytes(path, HEADER_BYTES), LLAMA3_MAGIC, tuple(_LLAMA3_VERSIONS.values()),
                          "Llama 3 model")
    maxT, V, L, NH, KV, C, ffn_int, multiple_of, eps_int, theta_int, scaled = (int(v) for v in header[2:13])
    major, minor, extension = (int(v) for v in header[14:17])
    if extension == LLAMA3_EXTENSION:
        tied = int(header[17])
        ffn, eps, theta = (float(v) for v in header[18:24].view("<f8"))
        if (int(ffn), int(eps), int(theta)) != (ffn_int, eps_int, theta_int) or tied not in (0, 1):
            raise FormatError(path, f"header disagrees with itself: ffn_dim_multiplier {ffn} in [18:20] but "
                                    f"{ffn_int} in [8], norm_eps {eps} vs {eps_int}, rope_theta {theta} vs "
                                    f"{theta_int}, tied {tied}")
    elif extension == 0:
        tied, theta = 0, float(theta_int)
        ffn, eps = _llama3_exact_fields(path, (V, L, NH, KV, C, multiple_of), ffn_int, eps_int)
    else:
        raise FormatError(path, f"unknown header extension {extension} in slot [16], expected 0 (llm.c's) or "
                                f"{LLAMA3_EXTENSION} (llm.py's)")
    if scaled not in (0, 1):
        raise FormatError(path, f"nonsense Llama 3 model header: use_scaled_rope={scaled}")
    try:
        config = llama3.Llama3Config(
            num_layers=L, num_heads=NH, num_kv_heads=KV, channels=C, max_seq_len=maxT, vocab_size=V,
            ffn_dim_multiplier=ffn, multiple_of=multiple_of, norm_eps=eps, rope_theta=theta,
            use_scaled_rope=bool(scaled), tied_embeddings=bool(tied), llama_version=(major, minor))
    except ValueError as e:
        raise FormatError(path, f"nonsense Llama 3 model header: {e}") from None
    version = int(header[1])
    if check_length:
        _check_length(path, b"", HEADER_BYTES + _file_count(config) * (2 if version == MODEL_VERSION_BF16 else 4),
                      "Llama 3 model", size=os.path.getsize(path))
    return config, version


def _file_count(config):
    return sum(math.prod(shape) for shape in llama3.file_shapes(config).values())


def _untie(path, config, flat, what):
    """The model's parameters from a file's flat buffer: a tied model's copy of wte in lmhead's place is checked
    and dropped."""
    if not config.tied_embeddings:
        return flat
    views = split_flat(llama3.file_shapes(config), flat)
    if not np.array_equal(views["lmhead"], views["wte"]):
        raise FormatError(path, f"the header says tied embeddings, but lmhead's {what} differ from wte's")
    return flat[: llama3.num_parameters(config)]


def read_llama3_model(path):
    """A Llama 3 model file (llm.c's or ours, fp32 or bf16) -> (Llama3Config, flat float32 parameters in
    llmpy.configs.llama3's layout). The weights are read straight into their array (an 8B model is 32 GB in fp32)."""
    config, version = read_llama3_model_header(path, check_length=True)
    n, bf16 = _file_count(config), version == MODEL_VERSION_BF16
    try:
        payload = np.fromfile(path, dtype="<u2" if bf16 else "<f4", count=n, offset=HEADER_BYTES)
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror}") from None
    flat = bfloat16_bits_to_float32(payload) if bf16 else payload
    return config, _untie(path, config, flat, "weights")


def _llama3_header(config, version):
    c = config
    header = _new_header(LLAMA3_MAGIC, version, c.max_seq_len, c.vocab_size, c.num_layers, c.num_heads,
                         c.num_kv_heads, c.channels, int(c.ffn_dim_multiplier), c.multiple_of, int(c.norm_eps),
                         int(c.rope_theta), int(c.use_scaled_rope), _LLAMA3_MAX_GEN_BATCH_SIZE, *c.llama_version,
                         LLAMA3_EXTENSION, int(c.tied_embeddings))
    header[18:24] = np.array([c.ffn_dim_multiplier, c.norm_eps, c.rope_theta], dtype="<f8").view("<i4")
    return header


def _with_lmhead(config, flat):
    """The file's chunks of a flat buffer in the model's layout: a tied model's wte once more, in lmhead's place."""
    if not config.tied_embeddings:
        return [flat]
    return [flat, llama3.split_params(config, flat)["wte"]]


def llama3_model_file_chunks(config, payload, dtype):
    """A Llama 3 model file's header and payload, for write_file_atomic (model_file_chunks' contract)."""
    expected = np.dtype("<f4" if dtype == "float32" else "<u2")
    if payload.shape != (llama3.num_parameters(config),) or payload.dtype != expected:
        raise ValueError(f"a {dtype} Llama 3 model file needs {expected} parameters of shape "
                         f"({llama3.num_parameters(config)},), got {payload.dtype} {payload.shape}")
    return [_llama3_header(config, _LLAMA3_VERSIONS[dtype])] + _with_lmhead(config, payload)


def write_llama3_model(path, config, flat_params, dtype="float32"):
    """Writes flat float32 parameters (llmpy.configs.llama3's layout) as a Llama 3 model file, fp32 (v3) or bf16
    (v5), in llm.c's layout with our header extension."""
    if dtype not in _LLAMA3_VERSIONS:
        raise ValueError(f"model dtype must be float32 or bfloat16, not {dtype!r}")
    flat = np.asarray(flat_params, dtype="<f4")  # little-endian, as llm.c's files: no copy on a little-endian machine
    if flat.shape != (llama3.num_parameters(config),):
        raise ValueError(f"{path}: parameters have shape {flat.shape}, the config needs "
                         f"({llama3.num_parameters(config)},)")
    payload = flat if dtype == "float32" else float32_to_bfloat16_bits(flat).astype("<u2", copy=False)
    write_file_atomic(path, llama3_model_file_chunks(config, payload, dtype))


def read_llama3_debug_state(path, config):
    """llm.c's Llama 3 debug state file for a model of this config -> DebugState (grads in the model's layout)."""
    data = _read_bytes(path)
    header = _read_header(path, data, LLAMA3_MAGIC, None, "Llama 3 debug state")
    state = _read_debug_body(path, data, int(header[1]), int(header[2]), config, _file_count(config))
    state.grads = _untie(path, config, state.grads, "gradients")
    return state


def write_llama3_debug_state(path, config, x, y, logits, loss, grads_flat):
    """llm.c's Llama 3 debug state: one batch x, y (B, T), its logits (B, T, V) and loss, and every gradient
    (flat, the model's layout)."""
    B, T = x.shape
    body = _debug_body(path, config.vocab_size, llama3.num_parameters(config), x, y, logits, loss, grads_flat)
    write_file_atomic(path, [_new_header(LLAMA3_MAGIC, B, T)] + body[:-1] + _with_lmhead(config, body[-1]))


# ----------------------------------------------------------------------------- tokenizer


def read_tokenizer(path):
    """An llm.c tokenizer file -> (list of each token's bytes, the end-of-text token id)."""
    data = _read_bytes(path)
    header = _read_header(path, data, TOKENIZER_MAGIC, (TOKENIZER_VERSION,), "tokenizer")
    count, eot = int(header[2]), int(header[3])
    if count <= 0 or not 0 <= eot < count:
        raise FormatError(path, f"nonsense tokenizer header: {count} tokens, eot id {eot}")
    tokens, offset = [], HEADER_BYTES
    for i in range(count):
        if offset >= len(data):
            raise FormatError(path, f"truncated: ends at token {i} of {count}")
        length = data[offset]
        if length == 0 or offset + 1 + length > len(data):
            raise FormatError(path, f"token {i} has length {length} at byte {offset}: corrupt or truncated")
        tokens.append(data[offset + 1: offset + 1 + length])
        offset += 1 + length
    if offset != len(data):
        raise FormatError(path, f"has {len(data) - offset} trailing bytes after {count} tokens")
    return tokens, eot


def write_tokenizer(path, token_bytes, eot):
    for i, b in enumerate(token_bytes):
        if not 0 < len(b) < 256:
            raise ValueError(f"{path}: token {i} is {len(b)} bytes long; the format stores lengths 1..255")
    body = b"".join(bytes([len(b)]) + bytes(b) for b in token_bytes)
    write_file_atomic(path, [_new_header(TOKENIZER_MAGIC, TOKENIZER_VERSION, len(token_bytes), eot), body])


# ----------------------------------------------------------------------------- token shards

_SHARD_KINDS = {  # magic -> (version, token dtype)
    SHARD_MAGIC_GPT2: (SHARD_VERSION_GPT2, np.dtype("<u2")),
    SHARD_MAGIC_LLAMA3: (SHARD_VERSION_LLAMA3, np.dtype("<u4")),
}


def read_shard(path, vocab_size=None):
    """A token shard (GPT-2 uint16 or Llama-3 uint32) -> its tokens, memory-mapped read-only.

    With vocab_size, checks every token id is below it (one pass over the shard).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FormatError(path, "file not found") from None
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror}") from None
    if len(head) < 8 or int.from_bytes(head[:4], "little") not in _SHARD_KINDS:
        raise FormatError(path, f"not a token shard (magic {int.from_bytes(head[:4], 'little') if len(head) >= 4 else 'missing'}, "
                                f"expected {SHARD_MAGIC_GPT2} or {SHARD_MAGIC_LLAMA3})")
    magic = int.from_bytes(head[:4], "little")
    version, dtype = _SHARD_KINDS[magic]
    header = _read_header(path, head, magic, (version,), "token shard")
    count = int(header[2])
    if count <= 0:
        raise FormatError(path, f"header says {count} tokens")
    expected = HEADER_BYTES + count * dtype.itemsize
    if size != expected:
        problem = "truncated" if size < expected else "has trailing bytes"
        raise FormatError(path, f"{problem}: {size} bytes, the header says {count} tokens ({expected} bytes)")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
    if vocab_size is not None:
        top = int(tokens.max())
        if top >= vocab_size:
            raise FormatError(path, f"token id {top} out of range for a vocab of {vocab_size}")
    return tokens


def write_shard(path, tokens, dtype=np.uint16):
    """Writes tokens as a shard: uint16 (GPT-2, magic 20240520) or uint32 (Llama-3, magic 20240801)."""
    dtype = np.dtype(dtype)
    magic = {np.dtype(np.uint16): SHARD_MAGIC_GPT2, np.dtype(np.uint32): SHARD_MAGIC_LLAMA3}.get(dtype)
    if magic is None:
        raise ValueError(f"{path}: shard tokens must be uint16 or uint32, not {dtype}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) == 0:
        raise ValueError(f"{path}: shard tokens must be a non-empty 1-D array, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max:
        raise ValueError(f"{path}: token ids [{tokens.min()}, {tokens.max()}] do not fit in {dtype}")
    header = _new_header(magic, _SHARD_KINDS[magic][0], len(tokens))
    write_file_atomic(path, [header, tokens.astype(dtype.newbyteorder("<"))])


# ----------------------------------------------------------------------------- eval files (HellaSwag, MMLU)

EVAL_EXAMPLE_START = 65535


@dataclass
class EvalExample:
    """A multiple-choice example: the context, its candidate completions, and which one is right."""

    index: int
    label: int
    context: list  # token ids
    completions: list  # list of lists of token ids


def _example_stream(ex):
    """The uint16 stream of one example; its second value is the example's size in bytes."""
    body = [ex.index, ex.label, len(ex.completions), len(ex.context), *ex.context]
    for completion in ex.completions:
        body += [len(completion), *completion]
    return [EVAL_EXAMPLE_START, 2 * (len(body) + 2), *body]


def write_eval_file(path, examples):
    streams = [_example_stream(ex) for ex in examples]
    for ex, stream in zip(examples, streams):
        if max(stream) > 65535 or min(stream) < 0:
            raise ValueError(f"{path}: example {ex.index} has a value outside uint16")
    longest = max((2 * len(s) for s in streams), default=0)
    header = _new_header(EVAL_MAGIC, EVAL_VERSION, len(examples), longest)
    write_file_atomic(path, [header] + [np.array(s, dtype="<u2") for s in streams])


def read_eval_file(path, vocab_size=None):
    """An llm.c eval file -> list of EvalExample."""
    data = _read_bytes(path)
    header = _read_header(path, data, EVAL_MAGIC, (EVAL_VERSION,), "eval")
    count, longest = int(header[2]), int(header[3])
    if (len(data) - HEADER_BYTES) % 2:
        raise FormatError(path, "body is not a whole number of uint16 values")
    stream = np.frombuffer(data, dtype="<u2", offset=HEADER_BYTES)
    examples, pos = [], 0
    for i in range(count):
        if pos + 2 > len(stream) or stream[pos] != EVAL_EXAMPLE_START:
            raise FormatError(path, f"example {i} of {count}: missing start marker (truncated or corrupt)")
        size = int(stream[pos + 1])  # bytes, including the marker and the size itself
        if size % 2 or size < 12 or size > longest or pos + size // 2 > len(stream):
            raise FormatError(path, f"example {i} of {count}: bad size {size} bytes (truncated or corrupt)")
        ex = [int(v) for v in stream[pos + 2: pos + size // 2]]
        index, label, num_completions, context_len = ex[:4]
        context, rest = ex[4: 4 + context_len], ex[4 + context_len:]
        completions = []
        for _ in range(num_completions):
            if not rest or len(rest) < 1 + rest[0]:
                raise FormatError(path, f"example {i}: completions run past the example's size")
            completions.append(rest[1: 1 + rest[0]])
            rest = rest[1 + rest[0]:]
        if rest or len(context) != context_len or not 0 <= label < max(num_completions, 1):
            raise FormatError(path, f"example {i}: sizes disagree (context {context_len}, {num_completions} completions, label {label})")
        if vocab_size is not None and any(t >= vocab_size for t in context + sum(completions, [])):
            raise FormatError(path, f"example {i}: token id out of range for a vocab of {vocab_size}")
        examples.append(EvalExample(index=index, label=label, context=context, completions=completions))
        pos += size // 2
    if pos != len(stream):
        raise FormatError(path, f"has {2 * (len(stream) - pos)} trailing bytes after {count} examples")
    return examples
