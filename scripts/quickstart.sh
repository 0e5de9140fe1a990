#!/usr/bin/env bash
# Set up, prepare tiny Shakespeare and train GPT-2 124M from a seeded random init: on the GPU with the mainline
# (train_gpt2.py) when there is one, else on the CPU with the NumPy reference trainer (train_gpt2_cpu.py).
# Offline, point LLMPY_TIKTOKEN_FILE and LLMPY_TINYSHAKESPEARE_FILE at local copies first (README, "Offline use").
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
python dev/data/tinyshakespeare.py
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    python -m pip install -q -e ".[gpu]"  # adds NVIDIA's cuDNN frontend, for cuDNN's attention
    # the reference writes gpt2_124M.bin (seed 42) and gpt2_tokenizer.bin (for decoding samples)
    [ -f gpt2_124M.bin ] || python train_gpt2_torch.py --model d12 --write_tensors 1 --device cuda
    python train_gpt2.py -e gpt2_124M.bin -b 16 -t 1024 -d 32768 -x 200 -l 3e-4 -u 20 -q 0.1 -c 0.1 -v 25 -m 1 -s 50 -o log124M
else
    [ -f gpt2_124M.bin ] || python train_gpt2_torch.py --model d12 --write_tensors 1 --device cpu
    python train_gpt2_cpu.py
fi
