"""Model FLOPs utilisation: the FLOPs a training step needs, as a fraction of what the GPU could do.

FLOPs per token, the PaLM paper's formula (Chowdhury et al. 2022, appendix B), as nanoGPT uses it:

    flops_per_token = 6 * N + 12 * L * C * T

- N, the parameters that take part in matmuls: every parameter of the model with the real vocab V, i.e.
  num_parameters(config) minus the position embedding wpe (maxT * C: a lookup, no matmul) and minus wte's
  Vp - V padding rows (zero, never a target). wte counts: it is the LM head's matmul. Each parameter costs
  2 FLOPs (multiply, add) per token in the forward and 4 in the backward (the input's and the weight's gradient).
  Biases and layernorm weights are counted too (a rounding error next to the matrices).
- 12 * L * C * T, attention: per layer and token, q @ k^T and att @ v are 2 * C * T FLOPs each in the forward,
  twice that in the backward. Like PaLM we count the full T x T score matrix, not the causal half.

  Llama 3 (no position embedding, no padding): every parameter, less wte when the LM head is a matrix of its own
  (lmhead is the matmul then, wte only a lookup); L C T counts the query heads' width C, whatever the KV heads.

For GPT-2 124M (d12) at T = 1024: N = 123,653,376, 8.55e8 FLOPs a token, 5.6e13 for a step of 65,536 tokens.
MFU = flops_per_token * tokens per second / the GPU's peak for the run's matmul precision: bf16 tensor cores
for --dtype bfloat16, TF32 tensor cores for float32 with TF32 allowed, else plain fp32 (no tensor cores).
The peaks are the datasheets' dense (no sparsity) numbers; unknown GPUs (and the CPU) have none: MFU "n/a".
"""

from . import families
from .configs.llama3 import Llama3Config

# GPU name substring -> peak FLOP/s for (bf16, tf32, fp32), dense; the first match wins, so PCIe before SXM
PEAK_FLOPS = (
    ("H100 PCIe", (756e12, 378e12, 51e12)),
    ("H100", (989.5e12, 494.7e12, 67e12)),  # SXM; NVIDIA's datasheet rounds to 989 / 495 TFLOPS
    ("H200", (989.5e12, 494.7e12, 67e12)),  # the H100 SXM's compute with more, faster memory
    ("A100", (312e12, 156e12, 19.5e12)),
)


def flops_per_token(config, T):
    """Training FLOPs (forward + backward) per token of a sequence of length T: 6N + 12 L C T (module docstring)."""
    C = config.channels
    N = families.of_config(config).num_parameters(config)
    if isinstance(config, Llama3Config):
        N -= 0 if config.tied_embeddings else config.vocab_size * C
    else:
        N -= config.max_seq_len * C + (config.padded_vocab_size - config.vocab_size) * C
    return 6 * N + 12 * config.num_layers * C * T


def peak_flops(device_name, dtype, tf32):
    """Peak dense FLOP/s of the GPU named device_name (torch.cuda.get_device_name) for the run's matmuls, or None.

    dtype: "bfloat16" or "float32"; tf32: whether float32 matmuls may use TF32 tensor cores.
    """
    for key, (bf16, tf32_peak, fp32) in PEAK_FLOPS:
        if key in device_name:
            return bf16 if dtype == "bfloat16" else tf32_peak if tf32 else fp32
    return None


def mfu(flops_per_token, tokens_per_second, peak):
    """The fraction of the peak the run uses, or None when the peak is unknown."""
    return None if peak is None else flops_per_token * tokens_per_second / peak
