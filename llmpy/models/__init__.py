"""The mainline's model families on torch and our kernels, over llmpy/runtime.py: gpt2.py, llama3.py. Each holds
its activations and writes its forward and backward out layer by layer; what a family is (config, parameter table,
init) is in llmpy/configs/.
"""

from ..configs.llama3 import Llama3Config
from . import gpt2, llama3


def build(config, B, T, gelu_fusion=0, **options):
    """The mainline model of config's family and the runtime it trains on (gpt2.build or llama3.build), for tools
    that take either family. gelu_fusion is GPT-2's -ge; Llama 3 has no GELU and ignores it. options: the family's
    build's (dtype, device, dist, zero_stage, cuda_graphs, deterministic, recompute, attention_impl)."""
    if isinstance(config, Llama3Config):
        return llama3.build(config, B, T, **options)
    return gpt2.build(config, B, T, gelu_fusion=gelu_fusion, **options)
