#!/usr/bin/env bash
# The GPU check: kernel tests, the match test in every mode, and a short training run, in one call.
#   bash dev/gpu_check.sh [kernels] [match] [train] [compare] [zero] [gelu_fusion] [bench] [long_runs] [sample]
#                         [hellaswag] [llama] [llama_bench] [fp8] [fp8_bench] [fp8_llama] [fp8_head]
#                         [fp8_kernels] [fp8_profile] [llama_curves] [fp8_curves] [fp8_curves_low_lr]
#                         [fp8_parts_low_lr] [fp8_curves_fresh] [matmul_algos] [bench_large] (none: all but the last
#                         eleven)
# Needs the tiny Shakespeare shards (python dev/data/tinyshakespeare.py, and -m llama-3 for the llama steps) and, for
# the references' tokenizer files, LLMPY_TIKTOKEN_FILE (and LLMPY_LLAMA3_TOKENIZER_FILE for the llama steps); hellaswag also LLMPY_TINYSHAKESPEARE_FILE (the text its examples are made from). Writes its log to $OUT/gpu_check.log when $OUT is set (the device tool), else ./gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-.}/gpu_check.log"
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(kernels match train compare zero gelu_fusion bench long_runs sample hellaswag llama
                                 llama_bench fp8 fp8_bench)
status=0
run() {  # run a command, log it, remember a failure, keep going
    echo "+ $*" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && { echo "FAILED ($rc): $*" | tee -a "$LOG"; status=1; }
    return 0
}
bench_largest() {  # model, extra flags, contenders, then batch sizes, largest first: dev/bench.py at the first B
    # at which every contender runs (--all_or_none: bench.py stops at the first that fails, e.g. out of
    # memory; torch.compile goes first, the likeliest to)
    local model=$1 extra=$2 contenders=$3 B json
    shift 3
    for B in "$@"; do
        json="${OUT:-.}/bench_${model}_b${B}.json"
        run python3 dev/bench.py --model "$model" -b "$B" $extra --contenders "$contenders" --steps 10 --warmup 3 \
            --all_or_none 1 --json "$json"
        python3 -c "import json, sys; r = json.load(open('$json'))['results']; sys.exit(not all(r.values()))" \
            && return 0
    done
}
curves() {  # peak learning rate, the runs' prefix under $OUT, the data's flags ("": tiny Shakespeare), then the
    # runs as NAME=FLAGS, the first the one the others are compared to. 1,000 steps of d12 B=16 T=1024 each, the same
    # init, data and hyperparameters; a run repeated (bf16 against itself: float atomics sum in another order each
    # run) gives the gap the others are to be judged by
    local lr=$1 dir="${OUT:-.}/$2" data=$3 spec name first=
    local flags=(-e d12 -b 16 -t 1024 -x 1000 -l "$lr" -u 100 -q 0.1 -c 0.1 -v 100 -m 4 -s 0 --seed 42)
    shift 3
    local names=()
    for spec in "$@"; do
        name=${spec%%=*}
        run python3 train_gpt2.py "${flags[@]}" $data ${spec#*=} -o "${dir}_$name"
        names+=("${dir}_$name")
        [ -z "$first" ] && first=$name ||
            run python3 dev/compare_logs.py "${dir}_$name/main.log" "${dir}_$first/main.log"
    done
    run python3 dev/plot.py "${names[@]}" -o "${dir}_curves.png"
}
fp8_curves() {  # peak learning rate, the runs' prefix, the data's flags: FP8 against bf16, and bf16 against itself
    curves "$1" "$2" "$3" bf16= fp8="--precision fp8" bf16_again=
}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
} 2>&1 | tee -a "$LOG"

# what the steps need, checked before any of them runs: a missing package or file ends the check in seconds, not after
# minutes of steps that fail on it one by one
needs=()
has_step() { [[ " ${steps[*]} " == *" $1 "* ]]; }
python3 -c "import cudnn" 2>/dev/null ||
    needs+=("NVIDIA's cuDNN frontend (pip install nvidia-cudnn-frontend): the default attention")
has_step fp8_bench && { python3 -c "import torchao" 2>/dev/null ||
    needs+=("torchao (pip install torchao): fp8_bench's float8 contender"); }
[ -f dev/data/tinyshakespeare/tiny_shakespeare_train.bin ] ||
    needs+=("the tiny Shakespeare shards: python dev/data/tinyshakespeare.py")
PYTHON_SOURCES=dev/data/python_sources
has_step fp8_curves_fresh && { [ -f $PYTHON_SOURCES/python_sources_train.bin ] ||
    needs+=("the Python sources shards (fp8_curves_fresh): python dev/data/python_sources.py -t 16500000"); }
for step in llama llama_bench llama_curves fp8_llama; do
    has_step $step && { [ -f dev/data/tinyshakespeare/tiny_shakespeare_llama3_train.bin ] ||
        needs+=("the Llama 3 tiny Shakespeare shards ($step): python dev/data/tinyshakespeare.py -m llama-3"); break; }
done
if [ ${#needs[@]} -gt 0 ]; then
    printf 'gpu_check: missing %s\n' "${needs[@]}" | tee -a "$LOG"
    exit 1
fi

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
    train)  # 2 micro-batches a step: the first writes the weight gradients, the second adds (a CUDA graph each)
        run python3 train_gpt2.py -e d12 -b 16 -t 1024 -d 32768 -x 30 -v 10 -m 4 -s 30 -g 32 -o "${OUT:-.}/train_log" ;;
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
    zero)
        # one process: plain (twice: its run-to-run noise, from float atomics in the embedding backward and cuDNN's
        # attention backward), then in a process group of one (-pi fs) with -z 0 and -z 1: no further from the
        # plain run than the plain runs are from each other
        rdv=$(mktemp -d)
        for mode in plain plain2 z0 z1; do
            case $mode in
            plain*) extra=() ;;
            z0) extra=(-pi fs -pf "$rdv/z0" -pn 1 -pr 0 -z 0) ;;
            z1) extra=(-pi fs -pf "$rdv/z1" -pn 1 -pr 0 -z 1) ;;
            esac
            run python3 train_gpt2.py -e d12 -b 16 -t 1024 -x 10 -v 0 -s 0 "${extra[@]}" \
                --write_model "$rdv/$mode.bin" -o "$rdv/$mode"
        done
        run python3 - "$rdv" <<'PY'
import sys
import numpy as np
from llmpy.formats import read_model
rdv = sys.argv[1]
def losses(mode):
    return np.array([float(l.split()[1][4:]) for l in open(f"{rdv}/{mode}/main.log") if " trl:" in l])
def weights(mode):
    return read_model(f"{rdv}/{mode}.bin")[1]
diffs = {m: (np.abs(losses(m) - losses("plain")).max(),
             np.linalg.norm(weights(m) - weights("plain")) / np.linalg.norm(weights("plain")))
         for m in ("plain2", "z0", "z1")}
for m, (dl, dw) in diffs.items():
    print(f"zero: {m} vs plain over 10 steps: max |loss diff| {dl:.1e}, weights rel diff {dw:.1e}")
floor_l, floor_w = diffs["plain2"]
bad = [m for m in ("z0", "z1") if diffs[m][0] > max(3 * floor_l, 1e-3) or diffs[m][1] > max(3 * floor_w, 1e-4)]
sys.exit(f"zero: {bad} differ from the plain run by more than 3x its run-to-run noise" if bad else 0)
PY
        ;;
    gelu_fusion)
        # the MLP's GELU inside the fc matmuls or not: cuBLAS + our kernel vs cuBLASLt's epilogues vs a Triton GEMM's
        run python3 dev/gelu_fusion.py ;;
    matmul_algos)
        # the step's matmuls on torch's cuBLAS algorithm vs the cuBLASLt candidates we time (d36 and d24)
        run python3 dev/matmul_algos.py ;;
    bench)
        run python3 dev/bench.py --contenders mainline,eager,compile,ddp,zero1 --json "${OUT:-.}/bench_d12.json" ;;
    long_runs)
        # a d12 run killed at 3 random steps and resumed: bit-identical under --deterministic 1 (dev/resume_check.py);
        # what --deterministic 1 costs; the checkpoint's stall and write rate at d12 and d36, and the step time with
        # checkpoints against without (the training log's averages and "checkpoint N written" lines)
        ck=$(mktemp -d)
        run python3 dev/resume_check.py -o "$ck/resume" --deterministic 1
        run python3 dev/bench.py --contenders mainline,deterministic --json "${OUT:-.}/bench_d12_deterministic.json"
        for spec in "d12 64 40" "d36 16 40"; do
            set -- $spec
            run python3 train_gpt2.py -e "$1" -b "$2" -t 1024 -x "$3" -v 0 -s 0 -o "$ck/$1_plain"
            run python3 train_gpt2.py -e "$1" -b "$2" -t 1024 -x "$3" -v 0 -s 0 -o "$ck/$1_checkpoints" -n 20 -nk 1
            rm -rf "$ck/$1_plain" "$ck/$1_checkpoints"
        done ;;
    sample)
        # generation (sample.py): its tests on the GPU (decode attention; the KV cache, replayed from a CUDA graph,
        # against the full forward and the NumPy forward on a tiny model), then at d12 the KV cache against the NumPy
        # forward and the full forward, and tokens/s in bf16 at B = 1 and 8, with and without the cache
        # (dev/sample_check.py)
        [ -f gpt2_124M.bin ] || run python3 train_gpt2_torch.py --model d12 --write_tensors 1 --device cuda
        run python3 -m pytest -q tests/test_sample.py
        run python3 dev/sample_check.py -e gpt2_124M.bin --json "${OUT:-.}/sample_check.json" ;;
    hellaswag)
        # -h 1 and dev/eval/hellaswag.py on the GPU: 48 examples made from tiny Shakespeare (a line's context, its next
        # line against 3 lines from elsewhere), scored at d12 by the NumPy forward (fp32), the mainline in fp32 (each
        # example's mean losses within 1e-4 of NumPy's, the same answers) and in bf16, and by train_gpt2.py -h 1 -x 0
        [ -f gpt2_124M.bin ] || run python3 train_gpt2_torch.py --model d12 --write_tensors 1 --device cuda
        hs=$(mktemp -d)
        python3 - "$hs/examples.jsonl" <<'PY'
import json, os, random, sys
lines = [l for l in open(os.environ["LLMPY_TINYSHAKESPEARE_FILE"]).read().splitlines() if len(l.split()) >= 4]
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for i in rng.sample(range(len(lines) - 1), 48):
        endings = [lines[i + 1]] + [lines[j] for j in rng.sample(range(len(lines)), 3)]
        label = rng.randrange(4)
        endings[0], endings[label] = endings[label], endings[0]
        f.write(json.dumps({"ctx": lines[i], "endings": endings, "label": label}) + "\n")
PY
        run python3 dev/data/hellaswag.py --input "$hs/examples.jsonl" -o "$hs/eval.bin"
        for mode in "cpu float32" "cuda float32" "cuda bfloat16"; do
            set -- $mode
            python3 dev/eval/hellaswag.py -e gpt2_124M.bin -i "$hs/eval.bin" --device "$1" --dtype "$2" --verbose \
                > "$hs/$1_$2.txt" 2>&1 || { echo "FAILED: hellaswag.py --device $1 --dtype $2"; status=1; }
            tail -1 "$hs/$1_$2.txt" | tee -a "$LOG"
        done
        run python3 train_gpt2.py -e gpt2_124M.bin -b 16 -t 1024 -x 0 -v 0 -s 0 -h 1 --hellaswag_file "$hs/eval.bin"
        run python3 - "$hs" <<'PY'
import re, sys
def scores(name):
    text = open(f"{sys.argv[1]}/{name}.txt").read()
    rows = re.findall(r"^example (\d+) label \d+ predicted (\d+) losses (.*)$", text, re.M)
    return {int(i): (int(p), [float(x) for x in losses.split()]) for i, p, losses in rows}
cpu, gpu = scores("cpu_float32"), scores("cuda_float32")
diff = max(abs(a - b) for i in cpu for a, b in zip(cpu[i][1], gpu[i][1]))
same = all(cpu[i][0] == gpu[i][0] for i in cpu)
print(f"hellaswag: {len(cpu)} examples, mainline fp32 vs NumPy: max |mean loss diff| {diff:.1e}, same answers {same}")
sys.exit(0 if len(cpu) == 48 and diff <= 1e-4 and same else 1)
PY
        ;;
    llama)
        # Llama 3's mainline against its PyTorch reference at Llama 3.2 1B's shape (16 layers, 2048 channels, 32 query
        # and 8 key/value heads, the 128,256 vocab, tied), B=4, T=64: bf16 on both attentions with and without
        # recompute, and fp32; the first 6 of the reference's steps (test_llama3.py says why)
        [ -f llama3.2_1B_debug_state.bin ] || run python3 train_llama3_torch.py --model llama3.2-1b --write_tensors 1 \
            --device cuda -b 4 -t 64
        for attention in cudnn triton; do
            for r in 0 2; do
                run python3 test_llama3.py --model llama3.2-1b --dtype bfloat16 --attention "$attention" -r "$r" \
                    --steps 6
            done
        done
        run python3 test_llama3.py --model llama3.2-1b --dtype float32 --attention triton --steps 6 ;;
    llama_bench)  # issue 18's target shape: Llama 3.2 1B at T=2048 and the largest B of those tried at which all of
        # the mainline (bf16 and FP8) and torch.compile run
        bench_largest llama3.2-1b "-t 2048" compile,mainline,fp8 28 24 16 8 ;;
    llama_curves)
        # 200 steps of tiny Shakespeare in Llama 3 tokens at Llama 3.2 1B's shape, B=8 T=1024, the same seeded init,
        # data order and hyperparameters: the mainline (bf16) against the reference under torch.compile (bf16
        # autocast); the gaps (dev/compare_logs.py) and both curves in one figure (dev/plot.py)
        flags=(-b 8 -t 1024 -x 200 -l 3e-4 -u 20 -q 0.1 -c 0.1 -v 25 -m 4 -s 0 --seed 42)
        run python3 train_llama3.py -e llama3.2-1b "${flags[@]}" -o "${OUT:-.}/llama_mainline"
        run python3 train_llama3_torch.py --model llama3.2-1b "${flags[@]}" --dtype bfloat16 --flash 1 --compile 1 \
            --device cuda -o "${OUT:-.}/llama_torch"
        run python3 dev/compare_logs.py "${OUT:-.}/llama_mainline/main.log" "${OUT:-.}/llama_torch/main.log"
        run python3 dev/plot.py "${OUT:-.}/llama_mainline" "${OUT:-.}/llama_torch" -o "${OUT:-.}/llama_curves.png" ;;
    fp8)
        # --precision fp8 (llmpy/precision.py): the FP8 casts, cuBLASLt's FP8 matmuls against float64, and the kernels
        # writing FP8 themselves (the classifier, GELU, the norms), then the match test at d12 with FP8's tolerances on
        # both attentions, GELU in the epilogue or not, recompute
        run python3 -m pytest -q tests/kernels/test_fp8.py tests/kernels/test_matmul_fp8.py \
            tests/kernels/test_classifier.py tests/kernels/test_gelu.py tests/kernels/test_layernorm.py \
            tests/kernels/test_rmsnorm.py
        [ -f gpt2_124M_debug_state.bin ] || run python3 train_gpt2_torch.py --model d12 --write_tensors 1 --device cuda
        run python3 test_gpt2.py --precision fp8 --attention cudnn -r 0
        run python3 test_gpt2.py --precision fp8 --attention cudnn -r 0 -ge 1
        run python3 test_gpt2.py --precision fp8 --attention triton -r 2 ;;
    fp8_llama)
        [ -f llama3.2_1B_debug_state.bin ] || run python3 train_llama3_torch.py --model llama3.2-1b --write_tensors 1 \
            --device cuda -b 4 -t 64
        run python3 test_llama3.py --model llama3.2-1b --precision fp8 --attention cudnn --steps 6 ;;
    fp8_bench)
        # the FP8 mainline (and with its LM head in bf16, and with GELU in cuBLASLt's epilogue) against bf16's,
        # torch.compile and torchao's float8 at d12 B=64 (issue 19's target: 1.6x torch.compile), then the FP8 casts
        # alone against torch (dev/kernels/fp8_cast.py) and the layernorm writing e4m3 itself against the layernorm
        # and a cast (dev/kernels/layernorm.py)
        run python3 dev/bench.py --contenders mainline,fp8,fp8_bf16_head,fp8_gelu_epilogue,compile,compile_fp8 \
            --steps 10 --warmup 3 --json "${OUT:-.}/bench_fp8_d12.json"
        run python3 dev/kernels/run.py fp8_cast layernorm ;;
    fp8_kernels)
        # the FP8 step's largest non-matmul kernels alone against the copy's bandwidth, with their other tiles
        # (dev/fp8_fused_kernels.py, GPT-2's vocabulary and Llama 3's), and every plan cuDNN has for our attention
        run python3 dev/fp8_fused_kernels.py --sweep --iters 10
        run python3 dev/fp8_fused_kernels.py --sweep --iters 5 -b 24 -t 2048 --vocab_size 128256
        run python3 dev/attention_plans.py ;;
    fp8_head)
        # the LM head in FP8 (the default, fp8_options lm_head=True): the amax past 2^31 elements (its gradient's size
        # at d12 B=64), its classifier bytes and two gradients against float64 (dev/fp8_head_check.py, the head's
        # gradients in FP8), then its speed and 13-step loss against the bf16 head's and the head's gradients only in
        # FP8, in one call
        run python3 -m pytest -q tests/kernels/test_fp8.py -k past_2
        run python3 dev/fp8_head_check.py
        run python3 dev/bench.py --contenders mainline,fp8,fp8_head_grads,fp8_bf16_head,compile --steps 10 \
            --warmup 3 --json "${OUT:-.}/bench_fp8_d12_head.json" ;;
    fp8_profile)  # where the FP8 step's time goes, kernel by kernel and stream by stream, at d12 and d24 (with trace)
        run python3 dev/profile_step.py --precision fp8
        run python3 dev/profile_step.py --precision fp8 --model d24 -b 48 --steps 2 \
            --trace "${OUT:-.}/trace_fp8_d24.json"
        gzip -f "${OUT:-.}/trace_fp8_d24.json" ;;
    fp8_curves)  # 1,000 steps at GPT-2 small's learning rate, 6e-4: tiny Shakespeare is overfit from step ~200 on
        fp8_curves 6e-4 fp8 "" ;;
    fp8_curves_low_lr)  # the same at 1e-4: overfit past step ~200 too, but there bf16 repeats itself closely
        fp8_curves 1e-4 fp8_lr1e-4 "" ;;
    fp8_parts_low_lr)  # which of FP8's products slows the memorising at 1e-4: FP8 with its LM head in bf16, and
        # with its weight gradients in bf16, beside bf16 and FP8 as they are
        curves 1e-4 fp8_parts_lr1e-4 "" bf16= fp8="--precision fp8" fp8_head_bf16="--precision fp8 --fp8_lm_head 0" \
            fp8_wgrads_bf16="--precision fp8 --fp8_weight_grads 0" ;;
    fp8_curves_fresh)  # fp8_curves on text that 1,000 steps see once (dev/data/python_sources.py): no memorising
        fp8_curves 6e-4 fp8_fresh "-i $PYTHON_SOURCES/python_sources_train.bin
                                   -j $PYTHON_SOURCES/python_sources_val.bin" ;;
    bench_large)
        # d24 and d36 at the largest B (of those tried, largest first) at which the mainline, bf16 and FP8, and
        # torch.compile all run (issue 19's target there: FP8 at 1.4x torch.compile)
        bench_largest d24 "" compile,mainline,fp8 48 40
        bench_largest d36 "" compile,mainline,fp8 28 24 ;;
    *)
        echo "unknown step $step (kernels, match, train, compare, zero, gelu_fusion, bench, long_runs, sample," \
            "hellaswag, llama, llama_bench, fp8, fp8_llama, fp8_bench, fp8_head, fp8_kernels, fp8_profile," \
            "llama_curves, fp8_curves, fp8_curves_low_lr, fp8_parts_low_lr, fp8_curves_fresh, matmul_algos," \
            "bench_large)"; status=1 ;;
    esac
done
echo "gpu_check: $([ $status -eq 0 ] && echo all passed || echo FAILURES, see above)" | tee -a "$LOG"
exit $status
