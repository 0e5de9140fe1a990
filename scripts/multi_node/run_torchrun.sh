#!/usr/bin/env bash
# GPT-2 124M (d12) on FineWeb 10B with train_gpt2.py: one process a GPU, GPUS_PER_NODE GPUs on each of NNODES
# nodes, started by torchrun (the processes meet at torchrun's env:// rendezvous, on node 0).
#   one node, 8 GPUs:  bash scripts/multi_node/run_torchrun.sh
#   two nodes: run it on each, with node 0's address
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/multi_node/run_torchrun.sh    # on node 0
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash scripts/multi_node/run_torchrun.sh    # on node 1
# The data first, on every node (or once on a shared file system): python dev/data/fineweb.py --version 10B
# 524,288 tokens a step: 64 x 1024 tokens a GPU, accumulated over 524288 / (65536 x GPUs) micro-batches.
# -z 1 shards the master weights and AdamW moments over the GPUs; torchrun ends every process when one fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    train_gpt2.py -i "dev/data/fineweb10B/fineweb_train_*.bin" -j "dev/data/fineweb10B/fineweb_val_*.bin" \
    -e d12 -b 64 -t 1024 -d 524288 -z 1 -l 6e-4 -u 700 -q 0.0 -c 0.1 -x 19073 -v 250 -s 5000 -o log124M
