"""llm.c's binary files, byte for byte: model, debug state, tokenizer, token shards, eval files.

Every file starts with a header of 256 little-endian int32 (1024 bytes): a magic number, a version, then sizes;
unused slots are zero. Readers check the magic, the version and that the file is
exactly as long as its header says, and raise FormatError with one line naming the file and the problem. Writers
write to a temporary file and rename it into place, so a failed write never leaves a half-written file behind.
NumPy only.
"""

import os
from dataclasses import dataclass

import numpy as np

from .config import GPT2Config, num_parameters

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
    """Checks magic and version; returns the header as an int32 array."""
    if len(data) < HEADER_BYTES:
        raise FormatError(path, f"truncated: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header of a {kind} file")
    header = np.frombuffer(data, dtype="<i4", count=HEADER_INTS)
    if header[0] != magic:
        raise FormatError(path, f"bad magic {header[0]}, expected {magic}: not an llm.c {kind} file")
    if header[1] not in versions:
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
                f.write(memoryview(np.ascontiguousarray(chunk)).cast("B") if isinstance(chunk, np.ndarray) else chunk)
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
    """Rounds float32 to bfloat16 (to nearest, ties to even); returns the bf16 bit patterns as uint16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


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
        payload = flat.astype("<f4")
    elif dtype == "bfloat16":
        payload = float32_to_bfloat16_bits(flat).astype("<u2")
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
    B, T = int(header[2]), int(header[3])
    if B <= 0 or T <= 0 or T > config.max_seq_len:
        raise FormatError(path, f"nonsense batch in header: B={B} T={T} (model max_seq_len {config.max_seq_len})")
    V, n = config.vocab_size, num_parameters(config)
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
    V, n = config.vocab_size, num_parameters(config)
    if y.shape != (B, T) or logits.shape != (B, T, V) or grads_flat.shape != (n,):
        raise ValueError(f"{path}: debug state shapes disagree: x {x.shape}, y {y.shape}, logits {logits.shape}, grads {grads_flat.shape}")
    header = _new_header(STATE_MAGIC, STATE_VERSION, B, T)
    write_file_atomic(path, [header, x.astype("<i4"), y.astype("<i4"), logits.astype("<f4"),
                         np.array([loss], dtype="<f4"), grads_flat.astype("<f4")])


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
