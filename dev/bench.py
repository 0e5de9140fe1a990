"""GPU benchmark: the llm.py mainline against PyTorch, eager and torch.compile'd, training the same model.

    python dev/bench.py                                   # d12, B=64, T=1024, bf16: the headline comparison
    python dev/bench.py --model d24 -b 32 --json bench_d24.json
    python dev/bench.py --contenders mainline,compile --attention triton
    python dev/bench.py --contenders mainline,ddp,zero1   # data parallel's overhead at world size 1

    python dev/bench.py --model llama3.2-1b -b 8 -t 2048 --contenders mainline,compile   # Llama 3's mainline

Every contender trains the same model (GPT-2, or Llama 3 for a Llama 3 descriptor) from the same weights (its
family's seeded init with --seed) on the same batches of tiny Shakespeare in the family's tokens (or random tokens
when the shards are missing), with the same hyperparameters (AdamW
lr 3e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1, grad clip 1.0), each in its own process so that one's
memory and compiled state cannot help or hurt another:
  mainline   train_gpt2.py's training step: our kernels, cuBLAS, cuDNN attention (or ours with --attention triton)
  eager      the PyTorch reference's model (train_gpt2_torch.py, train_llama3_torch.py), flash SDPA, bf16 autocast,
             fused AdamW; B/2 x 2 micro-batches by
             default (--eager_micro 0 for none), since eager at B=64 needs more memory than the GPU has
  compile    the same under torch.compile: the baseline to beat
  compile_fp8  the same with torchao's float8 training (torchtitan's recipe: the blocks' linear layers, tensorwise
             scales), then torch.compile: FP8's baseline (pip install torchao; not run by default)
  fp8        the mainline with --precision fp8 (llmpy/precision.py); fp8_bf16wgrad with the weight gradients in
             bf16, fp8_fast with cuBLASLt's FP8 fast accumulation, fp8_bf16_head with the LM head in bf16,
             fp8_head_grads with the LM head's two gradients in FP8 (its logits in bf16), fp8_gelu_epilogue with GELU
             in cuBLASLt's epilogue, then cast (-ge 1; under FP8 -ge -1 runs our GELU kernel writing e4m3) (not run by
             default)
  deterministic  the mainline with --deterministic 1 (bit-identical run to run: llmpy.vendor.set_deterministic, the
             deterministic embedding backward); not run by default
  ddp        mainline's step in a process group of one process (llmpy.distributed, -z 0): its all-reduces run
  zero1      the same with -z 1 (ZeRO-1): reduce-scatter, sharded AdamW, all-gather, all over one rank
             (ddp and zero1 against mainline: the world-size-1 overhead of data parallelism; not run by default)
A step is timed from its first byte of data to the loss on the host (one synchronisation, as in training); the
median over --steps steps after --warmup untimed ones is reported, with tok/s, MFU (llmpy/mfu.py: 6N + 12LCT FLOPs
a token over the GPU's dense bf16 peak) and the peak device memory (torch.cuda.max_memory_allocated). The last
column is each contender's tok/s over torch.compile's.
Where NVML is there (pynvml), also the energy a step takes (the GPU's energy counter over the timed steps), its mean
power and the median SM clock sampled every 10 ms: an H100 training d24 or d36 runs at its power limit, where
a step's time is its energy over the limit, so joules a step is the number that faster kernels must move.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmpy import families  # noqa: E402
from llmpy.configs import llama3  # noqa: E402
from llmpy.data import DataLoader  # noqa: E402
from llmpy.mfu import flops_per_token, mfu, peak_flops  # noqa: E402

LR, WEIGHT_DECAY, GRAD_CLIP = 3e-4, 0.1, 1.0
# the mainline with --precision fp8 (its fp8_options): as train_gpt2.py runs it; with the weight gradients in bf16;
# with cuBLASLt's FP8 fast accumulation; with the LM head in bf16; with its gradients only in FP8; with -ge 1 (a
# model option, not FP8's: taken out of the options by mainline_steps)
FP8_CONTENDERS = {"fp8": {}, "fp8_bf16wgrad": {"weight_grads_fp8": False}, "fp8_fast": {"fast_accum": True},
                  "fp8_bf16_head": {"lm_head": False}, "fp8_head_grads": {"lm_head": "gradients"},
                  "fp8_gelu_epilogue": {"gelu_fusion": 1}}
SHARDS = {families.GPT2: "dev/data/tinyshakespeare/tiny_shakespeare_train.bin",
          families.LLAMA3: "dev/data/tinyshakespeare/tiny_shakespeare_llama3_train.bin"}


def family_of(descriptor):
    return families.LLAMA3 if descriptor in llama3.DESCRIPTORS else families.GPT2


def batches(config, B, T, seed):
    """An endless stream of (x, y) int32 (B, T): tiny Shakespeare's training batches, or random tokens."""
    shard = os.path.join(ROOT, SHARDS[families.of_config(config)])
    if os.path.exists(shard):
        loader = DataLoader(shard, B, T)
        while True:
            yield loader.next_batch()
    rng = np.random.default_rng(seed)
    while True:
        tokens = rng.integers(0, config.vocab_size, (B, T + 1), dtype=np.int32)
        yield tokens[:, :-1], tokens[:, 1:]


def mainline_steps(config, flat, args, dist=None, zero_stage=0, deterministic=False, precision="bf16",
                   fp8_options=None):
    """Yields after each training step of the mainline; the step's loss is on the host by then.
    dist, zero_stage, deterministic, precision: as train_gpt2.py's (ddp, zero1, deterministic, the fp8 contenders);
    fp8_options: llmpy.precision.FP8's."""
    import torch

    from llmpy import models
    from llmpy.outlier import OutlierGuard
    from train_gpt2 import train_step

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    fp8_options = dict(fp8_options or {})
    gelu_fusion = fp8_options.pop("gelu_fusion", args.gelu_fusion)
    model = models.build(config, args.batch_size, args.sequence_length, dtype=dtype, device="cuda", dist=dist,
                         zero_stage=zero_stage, cuda_graphs=bool(args.cuda_graphs), deterministic=deterministic,
                         recompute=args.recompute, attention_impl=args.attention, gelu_fusion=gelu_fusion,
                         precision=precision, fp8_options=fp8_options)
    model.runtime.load_weights(flat)
    loss_sum = torch.zeros(1, dtype=torch.float32, device="cuda")
    hyper = SimpleNamespace(weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP)
    data = batches(config, args.batch_size, args.sequence_length, args.seed)
    guard = OutlierGuard()  # off, as in training without -sl/-sg
    step = 0
    while True:
        loss, _, _ = train_step(model, [next(data)], LR, step, hyper, loss_sum, guard)
        step += 1
        yield loss


def torch_steps(config, flat, args, compile, float8=False):
    """Yields after each training step of the PyTorch reference (eager or compiled). float8: torchao's float8
    training (torchtitan's recipe: every nn.Linear of the blocks, not the LM head, through torchao's Float8Linear
    with tensorwise dynamic scaling), before torch.compile."""
    import torch

    from train_gpt2_torch import configure_optimizer, train_step
    if families.of_config(config) is families.GPT2:
        from train_gpt2_torch import model_from_flat
    else:
        from train_llama3_torch import model_from_flat

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = model_from_flat(config, flat, flash=True).cuda()
    optimizer = configure_optimizer(model, LR, WEIGHT_DECAY, device_type="cuda")
    if float8:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                                   module_filter_fn=lambda module, name: "lm_head" not in name)
    if compile:
        model = torch.compile(model)
    micro = args.batch_size if compile or args.eager_micro == 0 else args.eager_micro
    if args.batch_size % micro:
        raise SystemExit(f"bench.py: --eager_micro {micro} must divide -b {args.batch_size}")
    data = batches(config, args.batch_size, args.sequence_length, args.seed)
    amp = torch.bfloat16 if args.dtype == "bfloat16" else None
    while True:
        x, y = (torch.from_numpy(a).long().cuda().view(-1, micro, args.sequence_length) for a in next(data))
        loss, _ = train_step(model, optimizer, x, y, LR, GRAD_CLIP, amp)
        yield loss


class PowerMeter:
    """The GPU's energy counter and a 10 ms sampler of its SM clock (NVML), between start() and stop().
    Without pynvml, or where NVML refuses, stop() returns an empty dict."""

    def __init__(self, torch):
        try:
            import pynvml

            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
            self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception as e:  # no pynvml, no NVML library, or a GPU without the counter
            print(f"bench.py: no energy readings ({type(e).__name__}: {e})", file=sys.stderr)
            self.nvml = None

    def _sample(self):
        while not self.done.wait(0.01):
            self.clocks.append(self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM))

    def start(self):
        if self.nvml is None:
            return
        self.clocks, self.done = [], threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()
        self.t0, self.mj0 = time.perf_counter(), self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def stop(self, steps):
        """{"joules_per_step", "watts", "sm_mhz"} over the steps since start()."""
        if self.nvml is None:
            return {}
        joules = (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.mj0) / 1000
        seconds = time.perf_counter() - self.t0
        self.done.set()
        self.sampler.join()
        return {"joules_per_step": joules / steps, "watts": joules / seconds,
                "sm_mhz": statistics.median(self.clocks) if self.clocks else None}


def software_versions():
    """The versions a GPU result depends on: torch (and its CUDA), Triton, cuDNN, and the cuDNN frontend."""
    import torch
    import triton
    try:
        import cudnn
        frontend = cudnn.__version__
    except (ImportError, OSError):
        frontend = "not installed"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version(), "cudnn_frontend": frontend}


def worker(args):
    """Times one contender in this process and prints its results as one JSON line."""
    import torch

    family = family_of(args.model)
    config = family.config_from_descriptor(args.model)
    flat = family.init_params(config, args.seed)
    dist = None
    if args.worker in ("mainline", "deterministic"):
        steps = mainline_steps(config, flat, args, deterministic=args.worker == "deterministic")
    elif args.worker in FP8_CONTENDERS:
        steps = mainline_steps(config, flat, args, precision="fp8", fp8_options=FP8_CONTENDERS[args.worker])
    elif args.worker in ("ddp", "zero1"):
        from llmpy.distributed import init_distributed

        # one process meeting itself through a file: a real NCCL process group, every collective of the step runs
        dist = init_distributed("fs", fs_path=tempfile.mkdtemp(prefix="bench_rendezvous_"), num_processes=1,
                                process_rank=0, device="cuda")
        steps = mainline_steps(config, flat, args, dist, zero_stage=1 if args.worker == "zero1" else 0)
    else:
        steps = torch_steps(config, flat, args, compile=args.worker != "eager", float8=args.worker == "compile_fp8")
    times, losses = [], []
    meter = PowerMeter(torch)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            meter.start()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(next(steps))  # the loss is on the host: the step has finished
        times.append(time.perf_counter() - t0)
    power = meter.stop(args.steps)
    ms = 1000 * statistics.median(times[args.warmup:])
    tokens_per_second = args.batch_size * args.sequence_length / (ms / 1000)
    peak = peak_flops(torch.cuda.get_device_name(), args.dtype, tf32=True)
    print(json.dumps({"ms": ms, "tok_s": tokens_per_second, "losses": losses,
                      "mfu": mfu(flops_per_token(config, args.sequence_length), tokens_per_second, peak),
                      "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "versions": software_versions(), **power}))
    if dist is not None:
        dist.destroy()


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="d12", help="model descriptor: d12, d24, d36, d48, gpt3:c768, ... (GPT-2), "
                    f"{', '.join(llama3.DESCRIPTORS)} (Llama 3)")
    ap.add_argument("-b", "--batch_size", type=int, default=64)
    ap.add_argument("-t", "--sequence_length", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attention", default="cudnn", choices=["cudnn", "triton"], help="the mainline's attention")
    ap.add_argument("--cuda_graphs", type=int, default=1, choices=[0, 1], help="the mainline's CUDA graphs")
    ap.add_argument("--gelu_fusion", type=int, default=-1, choices=[-1, 0, 1], help="the mainline's -ge")
    ap.add_argument("-r", "--recompute", type=int, default=0, choices=[0, 1, 2], help="the mainline's recompute")
    ap.add_argument("--contenders", default="mainline,eager,compile")
    ap.add_argument("--eager_micro", type=int, default=-1, help="eager's micro-batch (default B/2; 0: B)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--all_or_none", type=int, default=0, choices=[0, 1],
                    help="1: stop at the first contender that fails (a search for the largest B that fits them all)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.eager_micro == -1:
        args.eager_micro = max(1, args.batch_size // 2)
    return args


def main():
    args = parse_args()
    if args.worker:
        return worker(args)
    contenders = args.contenders.split(",")
    known = ["mainline", "deterministic", "eager", "compile", "compile_fp8", "ddp", "zero1", *FP8_CONTENDERS]
    if set(contenders) - set(known) or args.steps < 1 or args.warmup < 0:
        sys.exit(f"bench.py: contenders are {', '.join(known)} (got {args.contenders}); --steps >= 1")
    results = {}
    for name in contenders:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{name}: failed ({tail})")
            results[name] = None
            if args.all_or_none:
                break
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name}: {r['ms']:.1f} ms/step, losses {r['losses'][0]:.4f} .. {r['losses'][-1]:.4f}")

    base = (results.get("compile") or {}).get("tok_s")
    device = next((r["device"] for r in results.values() if r), "?")
    torch_version = next((r["torch"] for r in results.values() if r), "?")
    versions = next((r["versions"] for r in results.values() if r), {})
    print(f"\n{args.model} B={args.batch_size} T={args.sequence_length} {args.dtype}, {device}, "
          + ", ".join(f"{name} {version}" for name, version in versions.items())
          + f", median of {args.steps} steps after {args.warmup}, {time.strftime('%Y-%m-%d')}")
    print(f"{'contender':13s} {'ms/step':>9s} {'tok/s':>10s} {'MFU':>6s} {'peak GiB':>9s} {'vs compile':>11s} "
          f"{'J/step':>7s} {'W':>5s} {'SM MHz':>7s}")
    for name, r in results.items():
        if r is None:
            print(f"{name:13s} {'failed':>9s}")
            continue
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "n/a"
        mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        power = (f" {r['joules_per_step']:7.1f} {r['watts']:5.0f} {r['sm_mhz'] or 0:7.0f}"
                 if "joules_per_step" in r else "")
        print(f"{name:13s} {r['ms']:9.1f} {r['tok_s']:10.0f} {mfu_text:>6s} {r['peak_mem_gib']:9.1f} {ratio:>11s}"
              + power)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch_version,
                       "versions": versions,
                       "config": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
