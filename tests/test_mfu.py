"""llmpy.mfu: FLOPs per token against GPT-2 124M's published size, the peak table, and the MFU ratio.

GPT-2 124M has 124,439,808 parameters (V = 50257, maxT = 1024, as published with the Hugging Face checkpoint);
without the position embedding (1024 x 768) that is N = 123,653,376, so at T = 1024 the PaLM formula gives
6 N + 12 L C T = 741,920,256 + 113,246,208 = 855,166,464 FLOPs a token. Integers: compared exactly.
"""

import dataclasses

import pytest

from llmpy.configs import llama3
from llmpy.configs.gpt2 import config_from_descriptor
from llmpy.mfu import flops_per_token, mfu, peak_flops


def test_flops_per_token_of_gpt2_124m():
    assert flops_per_token(config_from_descriptor("d12"), 1024) == 855_166_464


def test_flops_per_token_of_llama3_2_1b():
    """Meta's 1,235,814,400 parameters, tied (wte is the LM head's matmul): 6 N + 12 L C T at T = 2048 is
    7,414,886,400 + 12 * 16 * 2048 * 2048 = 8,220,192,768. Untied, wte is a lookup: 6 V C fewer."""
    config = llama3.DESCRIPTORS["llama3.2-1b"]
    assert flops_per_token(config, 2048) == 8_220_192_768
    untied = dataclasses.replace(config, tied_embeddings=False)
    assert flops_per_token(untied, 2048) == 8_220_192_768 + 6 * (llama3.num_parameters(untied) - 1_235_814_400) \
        - 6 * 128256 * 2048


def test_attention_term_grows_with_T():
    d12 = config_from_descriptor("d12")
    assert flops_per_token(d12, 1024) - flops_per_token(d12, 512) == 12 * 12 * 768 * 512


@pytest.mark.parametrize("name, dtype, tf32, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 1, 989.5e12),
    ("NVIDIA H100 80GB HBM3", "float32", 1, 494.7e12),
    ("NVIDIA H100 80GB HBM3", "float32", 0, 67e12),
    ("NVIDIA H100 PCIe", "bfloat16", 1, 756e12),
    ("NVIDIA H200", "bfloat16", 0, 989.5e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 1, 312e12),
    ("Tesla T4", "bfloat16", 1, None),
])
def test_peak_flops_by_gpu_name_and_precision(name, dtype, tf32, expected):
    assert peak_flops(name, dtype, tf32) == expected


def test_mfu_is_achieved_over_peak():
    # d12 at 500,000 tok/s on an H100 in bf16: 8.55e8 * 5e5 / 9.895e14 = 43.2%
    assert mfu(855_166_464, 500_000, 989.5e12) == pytest.approx(0.4321, abs=1e-4)
    assert mfu(855_166_464, 500_000, None) is None
