"""Llama 3 training on the GPU: bf16 activations, fp32 master weights, hand-written Triton kernels and backward.

The mainline's Llama 3: train_gpt2.py's program (its flags, loop, log, checkpoints, ranks) with Llama 3's model,
llmpy.models.llama3.Llama3 (RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases, tied or untied LM head),
over the same runtime; its data are uint32 shards in Llama 3's tokens.

    python dev/data/tinyshakespeare.py -m llama-3        # the token shards, once (pip install llama-models)
    python train_llama3.py -e llama3.2-1b -b 8 -t 2048    # Llama 3.2 1B's shape from random init on tiny Shakespeare
    python train_llama3.py -e llama3.2_1B.bin -x 100      # from an llm.c Llama 3 model file (train_llama3_torch.py's)
    python train_llama3.py -e Llama-3.2-1B/ -x 100        # from a Hugging Face Llama folder
    TRITON_INTERPRET=1 python train_llama3.py --device cpu --dtype float32 -e tiny -b 2 -t 16 -x 3   # tests

Samples decode with llm.c's Llama 3 tokenizer file (train_llama3_torch.py --write_tensors 1 writes it) and start
from <|begin_of_text|>.
"""

from llmpy import families
from llmpy.configs.llama3 import BEGIN_OF_TEXT
from llmpy.models import llama3
from train_gpt2 import Trainer, fp8_options, main as run_trainer


def build_llama3(config, B, T, runtime, args):
    return llama3.Llama3(config, B, T, runtime, recompute=args.recompute, attention_impl=args.attention,
                         deterministic=bool(args.deterministic), precision=args.precision,
                         fp8_options=fp8_options(args))


LLAMA3_TRAINER = Trainer(
    families.LLAMA3, build_llama3, "llama3.2-1b", "dev/data/tinyshakespeare/tiny_shakespeare_llama3_train.bin",
    "dev/data/tinyshakespeare/tiny_shakespeare_llama3_val.bin", "llama3_tokenizer.bin", BEGIN_OF_TEXT,
    "a Llama 3 model file (.bin, fp32 or bf16; llm.c's train_llama3.py's or ours) or a Hugging Face Llama folder "
    "(Meta's are gated on the hub: download one, then pass its folder) to start from, or a descriptor for a random "
    f"init with --seed: {families.LLAMA3.descriptors_help}", hellaswag=False)


if __name__ == "__main__":
    run_trainer(trainer=LLAMA3_TRAINER, description=__doc__)
