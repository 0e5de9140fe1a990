#!/usr/bin/env bash
# GPT-2 124M (d12) on FineWeb 10B with train_gpt2.py: one process a GPU, started by OpenMPI's mpirun on the hosts
# in HOSTS (host:GPUs, comma-separated). The ranks come from MPI; rank 0 tells the others its address and a free port
# through mpi4py (pip install mpi4py), then they meet over TCP. Without mpi4py, add -ps <rank 0's host> below.
#   one node, 8 GPUs:  bash scripts/multi_node/run_mpi.sh
#   two nodes:         HOSTS=node0:8,node1:8 bash scripts/multi_node/run_mpi.sh
# The data first, on every node (or once on a shared file system): python dev/data/fineweb.py --version 10B
# mpirun ends every process when one fails; --dist_timeout (600 s) bounds a wait for one that hangs.
set -euo pipefail
cd "$(dirname "$0")/../.."
HOSTS=${HOSTS:-localhost:8}
PROCESSES=$(( $(echo "$HOSTS" | tr ',' '\n' | cut -d: -f2 | paste -sd+) ))

# --bind-to none: each process drives its GPU from several threads; -x PATH: remote ranks find this python (add
# -x NAME for any other variable they need, e.g. LD_LIBRARY_PATH)
mpirun -np "$PROCESSES" --host "$HOSTS" --bind-to none -x PATH \
    python train_gpt2.py -pi mpi -i "dev/data/fineweb10B/fineweb_train_*.bin" \
    -j "dev/data/fineweb10B/fineweb_val_*.bin" \
    -e d12 -b 64 -t 1024 -d 524288 -z 1 -l 6e-4 -u 700 -q 0.0 -c 0.1 -x 19073 -v 250 -s 5000 -o log124M
