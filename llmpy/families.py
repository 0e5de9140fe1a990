"""The model families, each as one record of what the code outside its model needs: its descriptors, parameter
table and init (llmpy/configs/), its llm.c files (llmpy/formats.py) and its Hugging Face folders (llmpy/hf.py). A
model file's magic number or a config's type says which family it is, so checkpoints, reference files and the
trainers work for any of them. NumPy only.
"""

from dataclasses import dataclass

from . import formats, hf
from .configs import gpt2, llama3


@dataclass(frozen=True)
class Family:
    name: str  # in messages: "GPT-2"
    config_type: type
    magic: int  # of its model files (formats)
    config_from_descriptor: object  # descriptor -> config (ValueError naming the known ones)
    descriptors_help: str  # the descriptors, for --help
    file_prefix: object  # descriptor -> the name stem of the reference files ("gpt2_124M")
    param_table: object  # config -> [ParamSpec] in llm.c's order (llmpy.params)
    num_parameters: object  # config -> int
    split_params: object  # (config, flat) -> name -> view
    init_params: object  # (config, seed) -> the seeded init, flat float32
    read_model_header: object  # path -> (config, version), the length checked
    read_model: object  # path -> (config, flat float32)
    write_model: object  # (path, config, flat float32, dtype "float32" | "bfloat16")
    model_file_chunks: object  # (config, payload: float32, or bf16 bits as uint16, dtype) -> chunks of the file
    read_debug_state: object  # (path, config) -> formats.DebugState
    read_hf_config: object  # a Hugging Face folder -> config (llmpy/hf.py)
    read_hf_weights: object  # (folder, config) -> flat float32 parameters


def _gpt2_model_header(path):
    config, _, version = formats.read_model_header(path, check_length=True)
    return config, version


def _llama3_model_header(path):
    return formats.read_llama3_model_header(path, check_length=True)


GPT2 = Family("GPT-2", gpt2.GPT2Config, formats.MODEL_MAGIC, gpt2.config_from_descriptor, gpt2.DESCRIPTORS_HELP,
              gpt2.file_prefix, gpt2.param_table, gpt2.num_parameters, gpt2.split_params, gpt2.gpt2_init,
              _gpt2_model_header, formats.read_model, formats.write_model, formats.model_file_chunks,
              formats.read_debug_state, hf.read_hf_config, hf.read_hf_weights)
LLAMA3 = Family("Llama 3", llama3.Llama3Config, formats.LLAMA3_MAGIC, llama3.config_from_descriptor,
                ", ".join(llama3.DESCRIPTORS), llama3.file_prefix, llama3.param_table, llama3.num_parameters,
                llama3.split_params, llama3.init_params, _llama3_model_header, formats.read_llama3_model,
                formats.write_llama3_model, formats.llama3_model_file_chunks, formats.read_llama3_debug_state,
                hf.read_hf_llama3_config, hf.read_hf_llama3_weights)
FAMILIES = (GPT2, LLAMA3)


def of_config(config):
    for family in FAMILIES:
        if isinstance(config, family.config_type):
            return family
    raise TypeError(f"not a model config: {config!r}")


def of_file(path):
    """The family of an llm.c model file, by its magic number; FormatError (one line) for anything else."""
    magic = formats.read_magic(path)
    for family in FAMILIES:
        if magic == family.magic:
            return family
    if magic is None:
        raise formats.FormatError(path, "too short for an llm.c model file (no header)")
    known = " or ".join(f"{f.magic} ({f.name})" for f in FAMILIES)
    raise formats.FormatError(path, f"bad magic {magic}, expected {known}: not an llm.c model file")
