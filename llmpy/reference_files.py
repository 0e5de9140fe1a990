"""The PyTorch reference's files for the match tests (test_gpt2_cpu.py, test_gpt2.py), read as one set.

`python train_gpt2_torch.py --write_tensors 1` writes {prefix}.bin (the model), {prefix}_debug_state.bin (one batch,
its logits, loss and every gradient) and, after 10 AdamW steps on that batch, {prefix}_debug_losses.json (the
hyperparameters and the 10 losses). A run stopped during those steps, or one into the same folder with other
flags, can leave a losses file beside a debug state of another run; compared with each other they would report
mismatches that are not there. So the losses file must be of the debug state's batch shape, the model file's model
and the debug state's loss. NumPy only.
"""

import dataclasses
import json
import os

import numpy as np

from . import families
from .formats import FormatError

HYPERPARAMETERS = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip")


def read_reference_files(directory, prefix, command, family=families.GPT2):
    """(config, flat params, DebugState, the losses file's dict) of the files {prefix}* in directory, written by
    family's PyTorch reference (train_gpt2_torch.py or train_llama3_torch.py); the dict has
    "model", "B", "T", the HYPERPARAMETERS as floats and "losses", a list of floats. FormatError, one line
    naming the file: missing, unreadable, or of another run than the others; command (the reference's command line
    that writes them) says how to fix it."""
    model_path, state_path, losses_path = (os.path.join(directory, f"{prefix}{suffix}")
                                           for suffix in (".bin", "_debug_state.bin", "_debug_losses.json"))
    for path in (model_path, state_path, losses_path):
        if not os.path.isfile(path):
            raise FormatError(path, f"file not found: write the reference files with `{command}`")
    config, params = family.read_model(model_path)
    state = family.read_debug_state(state_path, config)
    try:
        with open(losses_path) as f:
            reference = json.load(f)
        reference.update({k: float(reference[k]) for k in HYPERPARAMETERS},
                         losses=[float(v) for v in reference["losses"]])
        batch = (int(reference["B"]), int(reference["T"]))
        model_config, first_loss = family.config_from_descriptor(reference["model"]), reference["losses"][0]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise FormatError(losses_path, f"not a debug losses file ({type(e).__name__}: {e})") from None

    if getattr(config, "tied_embeddings", None) is not None:  # Llama 3's --tied_embeddings overrides the descriptor
        model_config = dataclasses.replace(model_config, tied_embeddings=config.tied_embeddings)
    if batch != state.x.shape:
        other_run = f"{state_path} holds B={state.x.shape[0]}, T={state.x.shape[1]}"
    elif model_config != config:
        other_run = f"{model_path} holds another model"
    elif np.float32(first_loss) != np.float32(state.loss):
        other_run = f"its first loss {first_loss:.6f} is not the debug state's {state.loss:.6f}"
    else:
        return config, params, state, reference
    raise FormatError(losses_path, f"is for model {reference['model']}, B={batch[0]}, T={batch[1]}, but {other_run}: "
                                   f"the files are of different runs; rerun `{command}`")
