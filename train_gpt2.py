"""GPT-2 training on the GPU: bf16 activations, fp32 master weights, hand-written Triton kernels and backward.

The mainline's training program, in the shape of llm.c's train_gpt2.cu: the same flags (long names, and llm.c's
short ones), the same loop (validation, sampling, one optimizer step of one or more micro-batches), the same log.
The model itself is llmpy.models.gpt2.GPT2, over llmpy.runtime.Runtime (its buffers, AdamW, the ranks, CUDA
graphs); torch is only what runs it (memory, cuBLAS, cuDNN). The loop serves any family (a Trainer record says
what differs): train_llama3.py runs it for Llama 3.

    python dev/data/tinyshakespeare.py          # the token shards, once
    python train_gpt2.py                         # GPT-2 124M (d12) from random init on tiny Shakespeare
    python train_gpt2.py -e gpt2_124M.bin -b 16 -t 1024 -d 65536 -x 100 -o log124M

-h 1 also scores HellaSwag (after python dev/data/hellaswag.py) at every validation step after step 0 and at the
end, as llm.c does (llmpy/evals.py); -h alone, like --help, prints the help.

Tests run it on the CPU under Triton's interpreter:
    TRITON_INTERPRET=1 python train_gpt2.py --device cpu --dtype float32 -e tiny -b 2 -t 16 -x 3

On several GPUs, one process each (README, "Multiple GPUs and nodes"; scripts/multi_node/):
    torchrun --standalone --nproc_per_node 8 train_gpt2.py -e d12 -b 16 -t 1024 -d 524288 -z 1
Each rank reads its own batches; the gradients are summed over the ranks with NCCL (-z 0), or reduce-scattered so
that each rank updates its shard of the master weights and AdamW moments, then all-gathered (-z 1, ZeRO stage 1).

Long runs (README, "Long runs"): -n N writes a checkpoint to the -o folder every N steps and at the end, from a
background thread (llmpy/checkpoint.py); -y 1 resumes from the newest one, exactly; Ctrl-C or SIGTERM finishes the
step, writes a checkpoint and exits (130 / 143); -sl / -sg skip the update of an outlier step.
    python train_gpt2.py -e d12 -b 16 -t 1024 -x 5000 -o log124M -n 500 -y 1     # the same command resumes it
"""

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from llmpy import checkpoint, cli, evals, families, formats, hf, precision
from llmpy.data import DataLoader
from llmpy.distributed import INIT_METHODS, DistributedError, init_distributed
from llmpy.kernels import INTERPRET
from llmpy.kernels.reduce import sum_into
from llmpy.logger import Logger
from llmpy.mfu import flops_per_token, mfu, peak_flops
from llmpy.models import gpt2
from llmpy.models.attention import choose_attention
from llmpy.outlier import OutlierGuard
from llmpy.rand import Xorshift
from llmpy.runtime import Runtime
from llmpy.schedule import SCHEDULES, lr_at
from llmpy.signals import StopRequest, exit_quietly, exit_status, signal_name
from llmpy.tokenizer import Tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TIMING_WARMUP_STEPS = 1  # the first step compiles the Triton kernels: the averages leave it out


@dataclass(frozen=True)
class Trainer:
    """What this program's loop needs to know of a model family: GPT2_TRAINER here, train_llama3.py's for Llama 3."""
    family: families.Family  # its descriptors, parameter table and files
    build_model: object  # (config, B, T, runtime, args) -> the mainline model (llmpy/models/)
    default_init: str  # -e's default
    train_data: str  # -i's default
    val_data: str  # -j's default
    tokenizer_file: str  # --tokenizer's default: llm.c's tokenizer file, for decoding samples
    start_token: object  # samples start from it, the token the data puts before every document; None: the EOT of
    # the tokenizer file (llm.c's rule for GPT-2)
    init_help: str  # what -e takes
    hellaswag: bool  # -h 1 (llm.c's eval files are GPT-2 tokens)


FP8_LM_HEAD = {"auto": None, "1": True, "0": False, "gradients": "gradients"}  # --fp8_lm_head -> lm_head option


def fp8_options(args):
    """--fp8_lm_head and --fp8_weight_grads as a model's fp8_options (llmpy.precision.FP8's, and lm_head)."""
    options = {"weight_grads_fp8": bool(args.fp8_weight_grads)}
    if FP8_LM_HEAD[args.fp8_lm_head] is not None:
        options["lm_head"] = FP8_LM_HEAD[args.fp8_lm_head]
    return options


def build_gpt2(config, B, T, runtime, args):
    return gpt2.GPT2(config, B, T, runtime, recompute=args.recompute, attention_impl=args.attention,
                     gelu_fusion=args.gelu_fusion, deterministic=bool(args.deterministic), precision=args.precision,
                     fp8_options=fp8_options(args))


GPT2_TRAINER = Trainer(
    families.GPT2, build_gpt2, "d12", "dev/data/tinyshakespeare/tiny_shakespeare_train.bin",
    "dev/data/tinyshakespeare/tiny_shakespeare_val.bin", "gpt2_tokenizer.bin", None,
    "an llm.c model file (.bin, fp32 or bf16) to start from; gpt2|gpt2-medium|gpt2-large|gpt2-xl (OpenAI's weights "
    "from the Hugging Face hub, downloaded once) or a Hugging Face GPT-2 folder; or a descriptor for a random init "
    f"with --seed: {families.GPT2.descriptors_help}", hellaswag=True)


class HellaSwagOrHelp(argparse.Action):
    """-h is llm.c's HellaSwag flag (-h 1), which argparse would take for its help: with a value it sets
    --hellaswag, alone (-h, or -h followed by another flag) it prints the help, as --help does."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value is None and option_string == "-h":
            parser.print_help()
            parser.exit()
        if value not in (0, 1):
            parser.error("argument -h/--hellaswag: expected 0 or 1" + ("" if value is None else f", got {value}"))
        setattr(namespace, self.dest, value)


def parse_args(argv=None, trainer=GPT2_TRAINER, description=None):
    p = cli.OneLineArgumentParser(description=(description or __doc__).split("\n\n")[0], add_help=False,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--help", action="help", help="print this help and exit (so does -h alone)")
    add("-i", "--input_bin", default=trainer.train_data, help="training token shards (a glob pattern)")
    add("-j", "--input_val_bin", default=trainer.val_data,
        help="validation token shards (a glob pattern); '' disables validation")
    add("-e", "--init", default=trainer.default_init, help=trainer.init_help)
    add("-b", "--batch_size", type=int, default=4, help="micro-batch size B")
    add("-t", "--sequence_length", type=int, default=1024, help="sequence length T")
    add("-d", "--total_batch_size", type=int, default=-1,
        help="tokens per optimizer step, a multiple of B*T: the rest is gradient accumulation; -1 means B*T")
    add("-x", "--max_steps", type=int, default=-1,
        help="optimizer steps; -1 means one epoch of the training data; 0 only evaluates")
    add("-l", "--learning_rate", type=float, default=3e-4, help="peak learning rate")
    add("-u", "--warmup_iters", type=int, default=0, help="steps of linear learning-rate warmup")
    add("-q", "--final_lr_frac", type=float, default=1.0, help="the rate decays to learning_rate * final_lr_frac")
    add("-k", "--lr_schedule", default="cosine", choices=SCHEDULES,
        help="after the warmup: cosine or linear decay, constant, or wsd (flat, then a 1-sqrt decay over the "
             "last 20%% of the steps); see llmpy/schedule.py")
    add("-c", "--weight_decay", type=float, default=0.0, help="AdamW weight decay of the matrices and embeddings")
    add("--grad_clip", type=float, default=1.0, help="maximum global gradient norm; 0 disables clipping")
    add("-v", "--val_loss_every", type=int, default=20, help="validation loss every N steps; 0 never")
    add("-m", "--val_max_steps", type=int, default=20, help="batches per validation loss (at most the val data)")
    add("-s", "--sample_every", type=int, default=20, help="print a sampled text every N steps; 0 never")
    add("-g", "--gen_tokens", type=int, default=64, help="tokens per sample (at most T)")
    add("-h", "--hellaswag", type=int, nargs="?", default=0, action=HellaSwagOrHelp, metavar="0|1",
        help="1: score HellaSwag as llm.c does, at every validation step (-v) after step 0 and at the end, so "
             "-x 0 scores the -e model; needs -b a multiple of 4 (GPT-2 only: the eval files are GPT-2 tokens). "
             "-h alone prints this help")
    add("--hellaswag_file", default="dev/data/hellaswag/hellaswag_val.bin",
        help="the llm.c eval file -h 1 scores (python dev/data/hellaswag.py writes it)")
    add("-o", "--output_log_dir", default=None,
        help="folder for main.log (s:STEP trl:LOSS ..., s:STEP tel:LOSS, s:STEP eval:ACC) and the checkpoints; made "
             "if missing")
    add("-n", "--checkpoint_every", type=int, default=0,
        help="write a checkpoint to -o every N steps and at the end (0: only when stopped by a signal)")
    add("-nk", "--checkpoints_keep", type=int, default=0,
        help="keep the newest K checkpoints, removing older ones (0: keep all)")
    add("-nm", "--major_checkpoint_every", type=int, default=0,
        help="with -nk: also keep every checkpoint whose step is a multiple of M")
    add("-y", "--resume", type=int, default=0, choices=(0, 1),
        help="1: continue from the newest complete checkpoint in -o (start from -e if there is none), exactly: "
             "weights, optimizer, step, data order and RNG")
    add("-sl", "--skip_update_lossz", type=float, default=0.0,
        help="outlier guard: skip the update of a step whose loss z-score over the last 128 steps is above this "
             "(0: off)")
    add("-sg", "--skip_update_gradz", type=float, default=0.0,
        help="outlier guard: skip the update of a step whose grad-norm z-score is above this (0: off)")
    add("-a", "--overfit_single_batch", type=int, default=0, choices=(0, 1), help="train on the first batch only")
    add("--shuffle", type=int, default=1, choices=(0, 1),
        help="read the training batches in llm.c's shuffled order (each rank's own, seeded 42 + rank); 0: in the "
             "files' order (always with -a 1)")
    add("--deterministic", type=int, default=0, choices=(0, 1),
        help="GPU: bit-identical results run to run (the embedding backward and cuDNN's attention backward without "
             "float atomics, cuBLASLt's first algorithm rather than the fastest timed; slower, see BENCHMARKS.md). "
             "CPU runs are deterministic anyway")
    add("--seed", type=int, default=42, help="seed of the random init and of the sampling")
    add("--dtype", default="bfloat16", choices=tuple(DTYPES), help="parameters and activations (grads, master "
        "weights and optimizer state are fp32 either way)")
    add("--precision", default="bf16", choices=precision.PRECISIONS,
        help="the linear layers' matmuls: bf16, or fp8 (e4m3 weights and activations, e5m2 gradients, scaled per "
             "tensor; needs --dtype bfloat16 on a GPU with FP8 tensor cores: Ada, Hopper or newer): the transformer "
             "blocks' and GPT-2's LM head (Llama 3's in bf16: --fp8_lm_head); attention and the optimizer stay as "
             "they are (llmpy/precision.py)")
    add("--fp8_lm_head", default="auto", choices=FP8_LM_HEAD,
        help="--precision fp8: the LM head's three matmuls in FP8 too (1), its two gradients only with the logits "
             "and loss in bf16 (gradients), or all three in bf16 (0); auto: the family's (GPT-2 1, Llama 3 0; "
             "BENCHMARKS.md has the loss and speed measured)")
    add("--fp8_weight_grads", type=int, default=1, choices=(0, 1),
        help="--precision fp8: the weight gradients' matmuls in FP8 (1), or in bf16 from the bf16 inputs the model "
             "then keeps (0: a step about as long as bf16's; BENCHMARKS.md, FP8)")
    add("-f", "--tf32", type=int, default=1, choices=(0, 1), help="allow TF32 tensor cores in float32 matmuls")
    add("-r", "--recompute", type=int, default=0, choices=(0, 1, 2),
        help="activation memory: 1 recomputes the MLP's activation (GELU, SwiGLU) in the backward, 2 also the norms "
             "(--precision fp8 needs neither: it keeps its own FP8 copies, and runs as 0)")
    add("--attention", default="cudnn", choices=("cudnn", "triton"),
        help="cuDNN's flash attention or ours (float32 and CPU runs always use ours)")
    add("--cuda_graphs", type=int, default=1, choices=(0, 1),
        help="replay each micro-batch's forward and backward from a CUDA graph (GPU only)")
    if trainer.family is families.GPT2:
        add("-ge", "--gelu_fusion", type=int, default=-1, choices=(-1, 0, 1),
            help="1: the forward's GELU in the fc matmul's cuBLASLt epilogue; 0: our GELU kernel; -1: 1 on Hopper and "
                 "newer GPUs in bf16, else 0 (under --precision fp8 our kernel writes the next matmul's FP8 input "
                 "itself; llm.c's -ge 2, the backward's too, is slower on an H100: BENCHMARKS.md)")
    add("--device", default="cuda", help="cuda, cuda:N or auto; cpu only under TRITON_INTERPRET=1 (tests)")
    add("--tokenizer", default=trainer.tokenizer_file, help="llm.c tokenizer file for decoding samples")
    add("--write_model", default=None, metavar="FILE", help="write the final weights as an llm.c model file (fp32)")
    add("-z", "--zero_stage", type=int, default=0, choices=(0, 1),
        help="several processes: 0 every rank updates all weights; 1 ZeRO stage 1, each rank updates its shard of "
             "the master weights and AdamW moments (their memory per rank falls by the number of processes)")
    add("-pi", "--init_method", default="auto", choices=INIT_METHODS,
        help="how the processes meet (not -e/--init, the model's init): env (torchrun), tcp (-ps), fs (-pf), mpi "
             "(mpirun); auto: env under torchrun, mpi under mpirun, else tcp given -ps, fs given -pf, else one process")
    add("-ps", "--server_ip", default=None, metavar="HOST[:PORT]", help="-pi tcp: rank 0's host (port 29500 unless "
        "given); -pi mpi without mpi4py: the same")
    add("-pf", "--fs_path", default=None, help="-pi fs: a folder on a file system shared by all processes")
    add("-pn", "--num_processes", type=int, default=None,
        help="processes in all, for -pi tcp/fs; None: from the launcher's environment (e.g. srun's SLURM_NTASKS)")
    add("-pr", "--process_rank", type=int, default=None,
        help="this process's rank, for -pi tcp/fs; None: from the launcher's environment (e.g. SLURM_PROCID)")
    add("-pg", "--gpus_per_node", type=int, default=None,
        help="GPUs a node, to pick a rank's GPU when no launcher gives its local rank; None: the GPUs visible")
    add("--dist_timeout", type=float, default=600.0,
        help="seconds to wait for the other processes at the rendezvous and in a collective before giving up")
    return p.parse_args(argv)


def check_args(args, trainer):
    """Nonsense values -> ValueError, one line naming the flag."""
    if args.hellaswag and not trainer.hellaswag:
        raise ValueError(f"-h 1: llm.c's HellaSwag files are GPT-2 tokens, not {trainer.family.name}'s")
    positive = {"-b/--batch_size": args.batch_size, "-t/--sequence_length": args.sequence_length,
                "-m/--val_max_steps": args.val_max_steps, "-g/--gen_tokens": args.gen_tokens}
    non_negative = {"-u/--warmup_iters": args.warmup_iters, "-v/--val_loss_every": args.val_loss_every,
                    "-s/--sample_every": args.sample_every, "-c/--weight_decay": args.weight_decay,
                    "--grad_clip": args.grad_clip, "-n/--checkpoint_every": args.checkpoint_every,
                    "-nk/--checkpoints_keep": args.checkpoints_keep,
                    "-nm/--major_checkpoint_every": args.major_checkpoint_every,
                    "-sl/--skip_update_lossz": args.skip_update_lossz,
                    "-sg/--skip_update_gradz": args.skip_update_gradz}
    for flag, value in positive.items():
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    for flag, value in non_negative.items():
        if not (value >= 0 and math.isfinite(value)):  # also refuses nan
            raise ValueError(f"{flag} must be >= 0 and finite, got {value}")
    if args.total_batch_size != -1 and args.total_batch_size <= 0:
        raise ValueError(f"-d/--total_batch_size must be positive or -1, got {args.total_batch_size}")
    if args.max_steps < -1:
        raise ValueError(f"-x/--max_steps must be >= 0, or -1 for one epoch, got {args.max_steps}")
    if not args.output_log_dir:
        for flag, value in (("-n/--checkpoint_every", args.checkpoint_every), ("-y/--resume", args.resume)):
            if value:
                raise ValueError(f"{flag} {value} needs -o/--output_log_dir, the folder of the checkpoints")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise ValueError(f"-l/--learning_rate must be positive, got {args.learning_rate}")
    if not 0 <= args.final_lr_frac <= 1:
        raise ValueError(f"-q/--final_lr_frac must be in [0, 1], got {args.final_lr_frac}")
    if args.precision != "fp8":
        for flag, value, default in (("--fp8_lm_head", args.fp8_lm_head, "auto"),
                                     ("--fp8_weight_grads", args.fp8_weight_grads, 1)):
            if value != default:
                raise ValueError(f"{flag} {value} applies to --precision fp8 only, this run's is {args.precision}")
    if args.hellaswag and args.batch_size % evals.COMPLETIONS:
        raise ValueError(f"-h 1 needs -b/--batch_size a multiple of {evals.COMPLETIONS} (an example's "
                         f"{evals.COMPLETIONS} completions take {evals.COMPLETIONS} rows of a batch), got "
                         f"{args.batch_size}")


def pick_device(name):
    """cli.pick_device, and the CPU only under Triton's interpreter (the tests' way of running our kernels)."""
    device = cli.pick_device(name)
    if device.type == "cpu" and not INTERPRET:
        raise ValueError("--device cpu runs the Triton kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    return device


def init_config(init, family):
    """-e: the model's config, from a Hugging Face folder's config.json (init_source resolved a pretrained name to its
    folder), an llm.c model file's header (of the family's magic), or a random-init descriptor."""
    if os.path.isdir(init) and hf.is_hf_source(init):
        return family.read_hf_config(init)
    if os.path.exists(init) or init.endswith(".bin"):
        found = families.of_file(init)
        if found is not family:
            raise ValueError(f"-e/--init {init}: holds a {found.name} model; this program trains {family.name}")
        return family.read_model_header(init)[0]
    try:
        return family.config_from_descriptor(init)
    except ValueError as e:
        raise ValueError(f"-e/--init {init}: no such model file, and {e}") from None


def open_loader(flag, pattern, B, T, vocab_size, dist, shuffle=False):
    """This rank's DataLoader, whose errors (no files, too small for a batch, token ids >= vocab) name the flag."""
    try:
        return DataLoader(pattern, B, T, dist.rank, dist.world_size, shuffle=shuffle, vocab_size=vocab_size)
    except (formats.FormatError, ValueError) as e:
        raise ValueError(f"{flag}: {e}") from None


def open_hellaswag(path, B, T, vocab_size, dist):
    """-h 1: this rank's share of the eval file's examples, in llm.c's batches; every problem (a missing file, an
    example longer than T) is found now, with one line naming the file."""
    if not os.path.isfile(path):
        raise ValueError(f"--hellaswag_file {path}: file not found: write it with python dev/data/hellaswag.py "
                         "(or run without -h 1)")
    try:
        return evals.EvalLoader(evals.read_examples(path, vocab_size), B, T, dist.rank, dist.world_size)
    except formats.FormatError as e:
        raise ValueError(f"--hellaswag_file {e}") from None
    except ValueError as e:
        raise ValueError(f"--hellaswag_file {path}: {e}") from None


def open_tokenizer(path, vocab_size):
    """The tokenizer for samples, or None with a note when its file is missing (a broken file is an error)."""
    if not os.path.exists(path):
        print(f"note: no tokenizer file {path} (--tokenizer): samples are skipped")
        return None
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size < vocab_size:
        raise ValueError(f"--tokenizer {path}: has {tokenizer.vocab_size} tokens, the model's vocab is {vocab_size}")
    return tokenizer


def as_tensors(x, y):
    """Host int32 (B, T) arrays as (host) tensors; the model copies them into its device buffers."""
    return torch.from_numpy(x), torch.from_numpy(y)


def train_step(model, micro_batches, lr, step, args, loss_sum, guard):
    """One optimizer step over this rank's micro-batches: (mean loss, grad norm before clipping, the outlier guard's
    (loss z, grad z, why the update was skipped or None)) as Python values.

    Each micro-batch's dlogits are scaled by 1 / (all tokens of the step, over all ranks), so the fp32 gradients
    accumulated here and summed over the ranks in reduce_gradients are the gradient of the step's mean loss;
    loss_sum accumulates that same mean on the device (this rank's part, then summed over the ranks). The update is
    launched before the step's one host sync, except with the outlier guard on: then it waits for the loss and norm
    to come back, as in llm.c.
    """
    runtime = model.runtime
    tokens = model.B * model.T * len(micro_batches) * runtime.dist.world_size
    loss_sum.zero_()
    for i, (x, y) in enumerate(micro_batches):
        model.train_micro_batch(*as_tensors(x, y), 1.0 / tokens, loss_sum, first=i == 0)
    runtime.reduce_gradients()
    runtime.dist.all_reduce_sum_(loss_sum, "the loss")

    def update():
        runtime.update(lr, step + 1, weight_decay=args.weight_decay, grad_clip=args.grad_clip)

    if not guard.active:
        update()
    # the step's one synchronisation: the loss and the squared grad norm come back to the host in one copy
    loss, grad_norm_sq = torch.cat([loss_sum, runtime.grad_norm_sq]).tolist()
    verdict = guard.check(loss, math.sqrt(grad_norm_sq))
    if guard.active and verdict[2] is None:
        update()
    return loss, math.sqrt(grad_norm_sq), verdict


def validation_loss(model, loader, num_batches, loss_sum):
    """The mean loss over the first num_batches validation batches of every rank (no dlogits written): the ranks
    read disjoint batches, together the first num_batches * world_size of the data."""
    loader.reset()
    loss_sum.zero_()
    for _ in range(num_batches):
        x, y = loader.next_batch()
        model.forward(*as_tensors(x, y), train=False)
        sum_into(loss_sum, model.acts.losses,
                 scale=1.0 / (model.B * model.T * num_batches * model.runtime.dist.world_size))
    model.runtime.dist.all_reduce_sum_(loss_sum, "the validation loss")
    return loss_sum.item()


def hellaswag_correct(model, loader):
    """The examples of the eval file that the model gets right: each rank scores its share (llmpy.evals) with the
    forward's per-token losses, then one all-reduce sums the counts."""
    def token_losses(inputs, targets):
        model.forward(*as_tensors(inputs, targets), train=False)
        return model.acts.losses.cpu().numpy()

    correct = evals.evaluate(loader, token_losses).correct
    return model.runtime.dist.sum_ints([correct], "the HellaSwag counts")[0]


def sample_softmax(logits, coin):
    """A token id drawn from softmax(logits) (fp32, (V,)) by the uniform number coin in [0, 1): inverse CDF."""
    cdf = np.cumsum(np.exp(logits - logits.max()))
    return min(int(np.searchsorted(cdf, coin * cdf[-1], side="right")), len(logits) - 1)


def generate(model, tokenizer, start_token, num_tokens, rng):
    """Samples num_tokens - 1 tokens after start_token (GPT-2's EOT, Llama 3's <|begin_of_text|>), as llm.c: the
    (B, T) batch starts all start_token and position t of row 0 is drawn from the logits at t - 1 (a full forward per
    token: no KV cache, the buffers are (B, T)), with coins from llm.c's xorshift generator rng
    (llmpy.rand.Xorshift; a checkpoint saves its state)."""
    B, T, V, Vp = model.B, model.T, model.config.vocab_size, model.acts.logits.shape[-1]
    num_tokens = min(num_tokens, T)
    tokens = np.full((B, T), start_token, dtype=np.int32)
    for t in range(1, num_tokens):
        model.forward(torch.from_numpy(tokens))
        logits = model.acts.logits.view(B, T, Vp)[0, t - 1, :V].float().cpu().numpy()
        tokens[0, t] = sample_softmax(logits, rng.random_f32())
    return tokenizer.decode(tokens[0, 1:num_tokens])


def format_mfu(value):
    return "MFU n/a" if value is None else f"MFU {100 * value:.1f}%"


# the flags that shape the run, saved with each checkpoint so that a resume can say which ones changed
RUN_FLAGS = ("batch_size", "sequence_length", "total_batch_size", "max_steps", "learning_rate", "warmup_iters",
             "final_lr_frac", "lr_schedule", "weight_decay", "grad_clip", "dtype", "seed", "shuffle", "zero_stage",
             "skip_update_lossz", "skip_update_gradz", "input_bin", "precision", "fp8_lm_head", "fp8_weight_grads")
# what a checkpoint written before a flag existed ran with
RUN_FLAGS_BEFORE_THEY_EXISTED = {"precision": "bf16", "fp8_lm_head": "auto", "fp8_weight_grads": 1}


class Stopped(Exception):
    """The run stopped at the end of a step because of a signal (after its checkpoint, when it has a folder)."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def train(args, trainer):
    check_args(args, trainer)
    device = pick_device(args.device)
    dist = init_distributed(args.init_method, args.server_ip, args.fs_path, args.num_processes, args.process_rank,
                            args.gpus_per_node, device, args.dist_timeout)
    try:
        train_on(args, dist, trainer)
    finally:
        dist.destroy()


def open_outputs(args, dist, say):
    """Checks the outputs before any work (-o, --write_model), finds the checkpoint to resume from (-y 1) and
    clears what a killed run left in the folder. Returns (the checkpoint or None, the complete checkpoints kept)."""
    folder = args.output_log_dir
    if args.write_model:
        formats.check_output_file("--write_model", args.write_model)
    if not folder:
        return None, []
    formats.check_output_folder("-o/--output_log_dir", folder)
    resume, kept = None, checkpoint.complete_steps(folder)
    if args.resume:
        resume = checkpoint.latest_checkpoint(folder, say)
        if resume is None:
            say(f"note: -y 1: no complete checkpoint in {folder}, starting from -e {args.init}")
        kept = [step for step in kept if resume is not None and step <= resume.step]
    elif kept:
        raise ValueError(f"-o/--output_log_dir {folder} holds the checkpoints of an earlier run (the newest of step "
                         f"{kept[-1]}): continue it with -y 1, or give another folder")
    step = resume.step if resume else -1
    if not dist.all_same(step, "the checkpoint to resume from"):
        raise ValueError(f"-y 1: the processes found different checkpoints in {folder} (this one {step}): is it on "
                         "a file system every process sees?")
    checkpoint.remove_incomplete(folder, dist.rank, dist.world_size, kept)
    return resume, kept


def restore_run(resume, model, train_loader, guard, grad_accum_steps, run_flags, say):
    """Sets the model, the loader, the sampling RNG and the outlier guard from the checkpoint (weights from its model
    file, the optimizer state of this rank's shard assembled from the old ranks' files, whatever their number).
    Returns the sampling RNG."""
    runtime, dist = model.runtime, model.runtime.dist
    _, weights = families.of_config(model.config).read_model(resume.model_path)
    runtime.load_weights(weights)
    runtime.load_optimizer_state(*checkpoint.assemble_shard(resume.states, model.config, runtime.shard.start,
                                                            runtime.shard.stop))
    old_world = len(resume.states)
    mine = resume.states[dist.rank] if dist.rank < old_world else None
    saved = (mine or resume.states[0]).extension
    if saved is not None:
        before = {k: saved["run"].get(k, RUN_FLAGS_BEFORE_THEY_EXISTED.get(k)) for k in RUN_FLAGS}
        changed = [f"{k} {before[k]} -> {run_flags[k]}" for k in RUN_FLAGS if before[k] != run_flags[k]]
        if changed:
            say(f"note: the checkpoint's run differs ({'; '.join(changed)}): it continues, but not as it would have")
        guard.load_state(saved["outlier"])
        if saved.get("fp8_scales") and model.precision == "fp8":  # FP8's delayed scales, as they were
            if before["fp8_lm_head"] == run_flags["fp8_lm_head"]:
                model.matmuls.load_state(saved["fp8_scales"])
            else:  # the head's scales come and go with it
                say("note: --fp8_lm_head changed: FP8's scales start afresh, each from its tensor's first cast")
    same_layout = old_world == dist.world_size and (saved is None or (saved["run"]["batch_size"],
                  saved["run"]["sequence_length"]) == (model.B, model.T))
    try:
        if not same_layout:
            raise ValueError(f"it was written by {old_world} processes with other batches")
        train_loader.restore(mine.loader)
        train_loader.epoch = saved["loader_epoch"] if saved else 0
    except ValueError as e:
        say(f"note: the data loader cannot continue where the checkpoint's was ({e}): it goes on after as many "
            f"tokens, {resume.step} steps' worth, in the order of a fresh start")
        train_loader.skip(resume.step * grad_accum_steps)
    say(f"resumed from {resume.model_path}: step {resume.step}, written by {old_world} process(es)")
    return Xorshift(resume.states[0].rng)


def checkpoint_tensors(model):
    """What a checkpoint copies from the device: the flat parameters (the model file) and this rank's optimizer
    state."""
    return model.runtime.params[:model.runtime.num_parameters], model.runtime.optimizer_state()


def save_checkpoint(writer, step, model, train_loader, sample_rng, guard, run_flags):
    runtime = model.runtime
    extension = {"zero_stage": runtime.zero_stage, "shard": [runtime.shard.start, runtime.shard.stop], "run": run_flags,
                 "loader_epoch": train_loader.epoch, "outlier": guard.state(), "fp8_scales": model.matmuls.state()}
    fields = (runtime.dist.world_size, runtime.dist.rank, sample_rng.state, train_loader.state(), extension)
    writer.save(step, model.config, *checkpoint_tensors(model), fields)


@dataclass
class Run:
    """Everything a run's loop works with, made by setup_run before the first step."""
    trainer: Trainer
    config: object
    model: object  # the family's mainline model (llmpy/models/)
    train_loader: DataLoader
    val_loader: object  # DataLoader or None (no validation)
    val_batches: int  # this rank's validation batches
    hellaswag: object  # evals.EvalLoader or None (-h 0)
    tokenizer: object  # for the samples, or None (not sampling)
    grad_accum_steps: int
    total_batch_size: int  # tokens a step over all ranks
    max_steps: int
    step0: int  # the first step: 0, or the resumed checkpoint's
    resumed: bool
    shuffle: bool
    run_flags: dict  # what a checkpoint records of the run (restore_run compares them)
    guard: OutlierGuard
    sample_rng: Xorshift
    writer: object  # checkpoint.CheckpointWriter, or None without -o
    device_name: str  # the GPU's name, or cpu
    flops: float  # FLOPs a token
    peak: object  # the GPU's peak FLOP/s, or None (unknown, CPU)


def train_on(args, dist, trainer):
    """The run of this rank; only rank 0 (dist.is_main) prints, logs, samples and writes files."""
    say = print if dist.is_main else lambda *_, **__: None
    run = setup_run(args, dist, say, trainer)
    describe_run(args, run, dist, say)
    timed_ms = run_loop(args, run, dist, say)
    finish_run(args, run, dist, say, timed_ms)


def setup_run(args, dist, say, trainer):
    """Checks what the flags ask for, then builds the run: the model, its data and outputs, its starting weights (or
    the checkpoint it resumes). Everything that can be refused is refused here, before the first step."""
    device, world = dist.device, dist.world_size
    dtype = DTYPES[args.dtype]
    B, T = args.batch_size, args.sequence_length
    # -e resolved once: a pretrained GPT-2's name becomes its folder (downloaded, or from the cache)
    family = trainer.family
    # (pretrained names are GPT-2's; another family only reads folders)
    from_hf = hf.is_hf_source(args.init) and (family is families.GPT2 or os.path.isdir(args.init))
    init = hf.hf_folder(args.init) if from_hf else args.init
    config = init_config(init, family)
    if T > config.max_seq_len:
        raise ValueError(f"-t/--sequence_length {T} is longer than the model's max_seq_len {config.max_seq_len}")
    tokens_per_micro_batch = B * T * world  # one micro-batch on every rank
    total_batch_size = tokens_per_micro_batch if args.total_batch_size == -1 else args.total_batch_size
    if total_batch_size % tokens_per_micro_batch:
        processes = f"B*T = {B}*{T}" if world == 1 else f"B*T*processes = {B}*{T}*{world}"
        raise ValueError(f"-d/--total_batch_size {total_batch_size} is not a multiple of {processes} = "
                         f"{tokens_per_micro_batch}")
    grad_accum_steps = total_batch_size // tokens_per_micro_batch
    resume, kept_checkpoints = open_outputs(args, dist, say)
    if resume is not None and resume.config != config:
        raise ValueError(f"{resume.model_path}: holds a model of {resume.config}, but -e/--init {args.init} is "
                         f"{config}: resume with the -e of the run that wrote it")

    shuffle = bool(args.shuffle) and not args.overfit_single_batch  # llm.c: -a 1 reads the first batch, unshuffled
    train_loader = open_loader("-i/--input_bin", args.input_bin, B, T, config.vocab_size, dist, shuffle)
    val_loader = None
    if args.input_val_bin and args.val_loss_every > 0:
        val_loader = open_loader("-j/--input_val_bin", args.input_val_bin, B, T, config.vocab_size, dist)
    # -m counts the validation batches of all ranks together, so that a run's val loss does not depend on its world
    # size when -m is a multiple of it; each rank reads its share, at most the val data
    val_batches = min(-(-args.val_max_steps // world), val_loader.num_batches_per_epoch) if val_loader else 0
    max_steps = args.max_steps
    if max_steps == -1:  # one epoch
        max_steps = train_loader.num_batches_per_epoch // grad_accum_steps
        if max_steps == 0:
            raise ValueError(f"-i/--input_bin {args.input_bin}: one epoch has {train_loader.num_batches_per_epoch} "
                             f"micro-batches a process, fewer than the {grad_accum_steps} of one step (-d)")
    hellaswag = open_hellaswag(args.hellaswag_file, B, T, config.vocab_size, dist) if args.hellaswag else None
    sampling = dist.is_main and args.sample_every > 0
    tokenizer = open_tokenizer(args.tokenizer, config.vocab_size) if sampling else None

    if device.index is not None:
        torch.cuda.set_device(device)
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    # the runtime (buffers, optimizer, ranks, graphs) from the family's parameter table, and the model over it; a
    # model that cannot run is refused before anything is allocated
    choose_attention(config, T, args.attention, dtype, device)
    runtime = Runtime(family.param_table(config), dtype=dtype, device=device, dist=dist, zero_stage=args.zero_stage,
                      cuda_graphs=bool(args.cuda_graphs), deterministic=bool(args.deterministic))
    model = trainer.build_model(config, B, T, runtime, args)
    run_flags = {**{k: getattr(args, k) for k in RUN_FLAGS}, "total_batch_size": total_batch_size,
                 "max_steps": max_steps, "shuffle": int(shuffle)}
    guard = OutlierGuard(args.skip_update_lossz, args.skip_update_gradz)
    if resume is not None:
        sample_rng = restore_run(resume, model, train_loader, guard, grad_accum_steps, run_flags, say)
    else:
        sample_rng = Xorshift(args.seed)
        if from_hf:
            runtime.load_weights(family.read_hf_weights(init, config))
        elif os.path.exists(args.init) or args.init.endswith(".bin"):
            runtime.load_weights(family.read_model(args.init)[1])
        else:
            model.init_weights(args.seed)

    writer = None
    if args.output_log_dir:
        writer = checkpoint.CheckpointWriter(args.output_log_dir, dist, args.checkpoints_keep,
                                             args.major_checkpoint_every, kept_checkpoints, say)
        if args.checkpoint_every:
            writer.reserve(*checkpoint_tensors(model))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, args.dtype, args.tf32) if device.type == "cuda" else None
    return Run(trainer=trainer, config=config, model=model, train_loader=train_loader, val_loader=val_loader, val_batches=val_batches,
               hellaswag=hellaswag, tokenizer=tokenizer, grad_accum_steps=grad_accum_steps,
               total_batch_size=total_batch_size, max_steps=max_steps,
               step0=resume.step if resume is not None else 0, resumed=resume is not None, shuffle=shuffle,
               run_flags=run_flags, guard=guard, sample_rng=sample_rng, writer=writer, device_name=device_name,
               flops=flops_per_token(config, T), peak=peak)


def describe_run(args, run, dist, say):
    """The run's summary, printed before its first step."""
    config, world, family = run.config, dist.world_size, run.trainer.family
    shape = (f"{family.name} L={config.num_layers} C={config.channels} NH={config.num_heads}"
             + (f" KV={config.num_kv_heads} H={config.ffn_hidden}" if family is families.LLAMA3 else "")
             + f" maxT={config.max_seq_len} V={config.vocab_size}"
             + (f" (padded {config.padded_vocab_size})" if family is families.GPT2 else "")
             + (", tied head" if getattr(config, "tied_embeddings", True) else ", untied head"))
    say(f"model {args.init}: {shape}, {family.num_parameters(config):,} parameters")
    matmuls = args.precision
    if args.precision == "fp8":
        head = {True: "fp8", False: "bf16", "gradients": "fp8 for its gradients only"}[run.model.fp8_lm_head]
        matmuls += f" (LM head {head}; weight gradients {'fp8' if args.fp8_weight_grads else 'bf16'})"
    say(f"device {run.device_name}, dtype {args.dtype}, matmuls {matmuls}, attention "
        f"{run.model.attention_impl}, recompute {run.model.recompute}{', deterministic' if args.deterministic else ''}")
    say(f"processes {world}" + (f" (rendezvous {dist.rendezvous})" if dist.group else "") +
        f", zero stage {args.zero_stage}")
    per_process = (f" x {world} processes", f" for each of {world} processes") if world > 1 else ("", "")
    say(f"B={args.batch_size} T={args.sequence_length}, {run.grad_accum_steps} micro-batch(es){per_process[0]} = "
        f"{run.total_batch_size:,} tokens a step, {run.max_steps} steps; train data "
        f"{run.train_loader.num_batches_per_epoch} micro-batches an epoch{per_process[1]}"
        f"{', shuffled' if run.shuffle else ''}")
    if run.val_loader:
        say(f"validation: {run.val_batches * world} batches every {args.val_loss_every} steps")
    if run.hellaswag:
        say(f"HellaSwag: {run.hellaswag.num_examples:,} examples of {args.hellaswag_file}, "
            f"{args.batch_size // evals.COMPLETIONS} a forward{f', split over {world} processes' if world > 1 else ''}")
    say(f"{run.flops / 1e9:.3f} GFLOPs a token; peak "
        f"{'unknown' if run.peak is None else f'{run.peak / 1e12:.1f} TFLOP/s'}")
    if run.writer and args.checkpoint_every:
        say(f"checkpoints: every {args.checkpoint_every} steps and at the end, in {args.output_log_dir}"
            + (f", keeping the newest {args.checkpoints_keep}" if args.checkpoints_keep else ""))


def run_loop(args, run, dist, say):
    """Steps step0 .. max_steps: validation, HellaSwag, samples and checkpoints at their steps, a training step
    between; a signal stops it at the end of a step, with a checkpoint. Returns the timed steps' milliseconds."""
    model, writer, guard, world = run.model, run.writer, run.guard, dist.world_size
    logger = Logger(args.output_log_dir if dist.is_main else None, resume_step=run.step0 if run.resumed else None)
    loss_sum = torch.zeros(1, dtype=torch.float32, device=dist.device)
    single_batch = None
    timed_ms = []

    def checkpoint_state(step):
        return step, model, run.train_loader, run.sample_rng, guard, run.run_flags

    def stopped_at_once(signum):  # a second signal: one line, and the process ends (StopRequest)
        newest = f"; the newest complete checkpoint is step {writer.complete[-1]}" if writer and writer.complete else ""
        print(f"{os.path.basename(sys.argv[0])}: second {signal_name(signum)}: stopped at once{newest}",
              file=sys.stderr)

    with StopRequest(stopped_at_once) as stop:
        for step in range(run.step0, run.max_steps + 1):
            last_step = step == run.max_steps
            if (writer and args.checkpoint_every and step > run.step0
                    and (step % args.checkpoint_every == 0 or last_step)):
                save_checkpoint(writer, *checkpoint_state(step))
            if run.val_loader and (step % args.val_loss_every == 0 or last_step):
                val_loss = validation_loss(model, run.val_loader, run.val_batches, loss_sum)
                say(f"val loss {val_loss:.6f}")
                logger.log_val(step, val_loss)
            # as llm.c: not at step 0 (a fresh model scores chance, 25%), but at the end, so -x 0 scores a model
            if run.hellaswag and ((step > 0 and args.val_loss_every and step % args.val_loss_every == 0)
                                  or last_step):
                correct = hellaswag_correct(model, run.hellaswag)
                say(f"HellaSwag: {correct}/{run.hellaswag.num_examples} = {correct / run.hellaswag.num_examples:f}")
                logger.log_eval(step, correct / run.hellaswag.num_examples)
            if run.tokenizer and ((step > 0 and step % args.sample_every == 0) or last_step):
                start = run.tokenizer.eot if run.trainer.start_token is None else run.trainer.start_token
                text = generate(model, run.tokenizer, start, args.gen_tokens, run.sample_rng)
                say(f"generating:\n---\n{text}\n---")
            if last_step:
                break

            t0 = time.perf_counter()  # a step is timed as llm.c's: from reading its batches to its loss on the host
            if args.overfit_single_batch:  # llm.c resets the loader before every micro-batch: the same batch always
                if single_batch is None:
                    single_batch = run.train_loader.next_batch()
                micro_batches = [single_batch] * run.grad_accum_steps
            else:
                micro_batches = [run.train_loader.next_batch() for _ in range(run.grad_accum_steps)]
            lr = lr_at(step, run.max_steps, args.learning_rate, args.warmup_iters, args.final_lr_frac,
                       args.lr_schedule)
            loss, grad_norm, (zl, zg, skipped) = train_step(model, micro_batches, lr, step, args, loss_sum, guard)
            ms = (time.perf_counter() - t0) * 1000
            tokens_per_second = run.total_batch_size / ms * 1000  # all ranks' tokens; MFU is per GPU
            if step >= run.step0 + TIMING_WARMUP_STEPS:
                timed_ms.append(ms)
            zscores = f" | z {zl:+.2f} {zg:+.2f}" if guard.active else ""
            say(f"step {step + 1:4d}/{run.max_steps} | loss {loss:.6f} | norm {grad_norm:.4f}{zscores} | "
                f"lr {lr:.2e} | {ms:.2f} ms | {format_mfu(mfu(run.flops, tokens_per_second / world, run.peak))} | "
                f"{tokens_per_second:.0f} tok/s")
            if skipped:
                say(f"step {step + 1}: update skipped, {skipped}")
            logger.log_train(step, loss, lr, grad_norm, ms, tokens_per_second, (zl, zg) if guard.active else None,
                             skipped is not None)
            if writer:
                writer.poll()
            signum = stop.signum or 0
            if world > 1:  # every rank stops at the same step, whichever got the signal
                signum = max(signum, 1) if dist.sum_ints([signum], "whether to stop")[0] else 0
            if signum:
                raise stop_with_checkpoint(signum, writer, logger, *checkpoint_state(step + 1))
        logger.close()
        if writer:
            writer.finish()
        if stop.requested:  # a signal during the last validation: the run is complete, the checkpoint written
            raise Stopped(stop.signum, f"stopped by {signal_name(stop.signum)} at the end of the run")
    return timed_ms


def finish_run(args, run, dist, say, timed_ms):
    """After the last step: the average step time, the peak memory, the checkpoint writer closed, --write_model."""
    if timed_ms:
        ms = sum(timed_ms) / len(timed_ms)
        tokens_per_second = run.total_batch_size / ms * 1000
        say(f"average over steps {run.step0 + TIMING_WARMUP_STEPS + 1}..{run.max_steps}: {ms:.2f} ms/step, "
            f"{tokens_per_second:.0f} tok/s, "
            f"{format_mfu(mfu(run.flops, tokens_per_second / dist.world_size, run.peak))}")
    elif run.max_steps > run.step0:
        say("no average time: the first step compiles the kernels and is left out")
    if dist.device.type == "cuda":
        say(f"peak memory allocated: {torch.cuda.max_memory_allocated(dist.device) / 2**20:.0f} MiB")
    if run.writer:
        run.writer.close()
    if args.write_model:
        weights = run.model.runtime.weights_fp32()  # under -z 1 a collective: every rank takes part
        if dist.is_main:
            run.trainer.family.write_model(args.write_model, run.config, weights, dtype="float32")
            say(f"wrote {args.write_model}")


def stop_with_checkpoint(signum, writer, logger, step, model, train_loader, sample_rng, guard, run_flags):
    """A signal arrived: the step is done; write its checkpoint (when there is a folder) and say how to go on."""
    logger.close()
    if signum not in (signal.SIGINT, signal.SIGTERM):  # another rank's signal
        signum = signal.SIGTERM
    if writer is None:
        return Stopped(signum, f"stopped by {signal_name(signum)} after step {step}; no -o folder, so no checkpoint")
    save_checkpoint(writer, step, model, train_loader, sample_rng, guard, run_flags)  # none of this step yet
    writer.finish()
    writer.close()
    return Stopped(signum, f"stopped by {signal_name(signum)} after step {step}; checkpoint {step} in "
                           f"{writer.folder}: continue with the same command and -y 1")


def main(argv=None, trainer=GPT2_TRAINER, description=None):
    prog = os.path.basename(sys.argv[0])
    with exit_quietly(prog):  # a signal before the training loop: one line (the loop stops at a step's end)
        args = parse_args(argv, trainer, description)
        try:
            train(args, trainer)
        except torch.cuda.OutOfMemoryError:
            fail(f"CUDA out of memory with -b {args.batch_size} -t {args.sequence_length} -r {args.recompute}: use "
                 f"a smaller -b (with -d to keep the tokens a step) or -r 1 / -r 2 to recompute activations")
        except Stopped as e:
            print(f"{prog}: {e}", file=sys.stderr)
            sys.exit(exit_status(e.signum))
        except (formats.FormatError, ValueError, OSError, DistributedError) as e:
            fail(str(e))


def fail(message):
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
