#!/usr/bin/env bash
# The GPU check: kernel tests, the match test in every mode, and a short training run, in one call.
#   bash dev/gpu_check.sh [kernels] [match] [train] [compare] [bench]      (no argument: all of them)
# Needs the tiny Shakespeare shards (python dev/data/tinyshakespeare.py) and, for the reference's tokenizer file,
# LLMPY_TIKTOKEN_FILE. Writes its log to $OUT/gpu_check.log when $OUT is set (the device tool), else ./gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-.}/gpu_check.log"
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(kernels match train compare bench)
status=0
run() {  # run a command, log it, remember a failure, keep going
    echo "+ $*" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && { echo "FAILED ($rc): $*" | tee -a "$LOG"; status=1; }
    return 0
}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
} 2>&1 | tee -a "$LOG"

for step in "${steps[@]}"; do
    case "$step" in
    kernels)
        run python3 -m pytest -q -x tests/kernels ;;
    match)
        # reference files for d12 at B=4, T=64, computed in fp32 on the GPU
        [ -f gpt2_124M_debug_state.bin ] || run python3 train_gpt2_torch.py --model d12 --write_tensors 1 --device cuda
        for attention in cudnn triton; do
            for r in 0 1 2; do
                run python3 test_gpt2.py --dtype bfloat16 --attention "$attention" -r "$r"
            done
        done
        for r in 0 1 2; do  # fp32: our attention (cuDNN's flash attention is bf16 only)
            run python3 test_gpt2.py --dtype float32 --attention triton -r "$r"
        done ;;
    train)
        run python3 train_gpt2.py -e d12 -b 16 -t 1024 -x 30 -v 10 -m 4 -s 30 -g 32 -o "${OUT:-.}/train_log" ;;
    compare)
        # the mainline and the PyTorch reference (torch.compile, bf16) from the same init, data and hyperparameters:
        # batches of 32 x 1024 tokens as 2 micro-batches of 16 (tiny Shakespeare's val split is one batch of 16)
        [ -f gpt2_124M.bin ] || run python3 train_gpt2_torch.py --model d12 --write_tensors 1 --device cuda
        run python3 train_gpt2.py -e gpt2_124M.bin -b 16 -t 1024 -d 32768 -x 200 -l 3e-4 -u 20 -q 0.1 -c 0.1 \
            -v 25 -m 1 -s 0 -o "${OUT:-.}/compare_mainline"
        run python3 train_gpt2_torch.py --init_from gpt2_124M.bin -b 16 -t 1024 --total_batch_size 32768 \
            --num_iterations 200 --learning_rate 3e-4 --warmup_iters 20 --final_lr_frac 0.1 --weight_decay 0.1 \
            --val_loss_every 25 --val_max_steps 1 --sample_every 0 --dtype bfloat16 --flash 1 --compile 1 \
            --output_dir "${OUT:-.}/compare_torch" ;;
    bench)
        run python3 dev/bench.py --json "${OUT:-.}/bench_d12.json" ;;
    *)
        echo "unknown step $step (kernels, match, train, compare, bench)"; status=1 ;;
    esac
done
echo "gpu_check: $([ $status -eq 0 ] && echo all passed || echo FAILURES, see above)" | tee -a "$LOG"
exit $status
