"""Where a mainline training step spends its time: a torch.profiler trace of a few steps, summarised.

    python dev/profile_step.py                      # d12, B=64, T=1024, bf16, cuDNN attention
    python dev/profile_step.py -b 16 --attention triton --trace trace.json
    python dev/profile_step.py --model d36 -b 16 --contender compile   # the same for torch.compile's step
    python dev/profile_step.py --model llama3.2-1b -b 8 -t 2048        # Llama 3's mainline

Prints where a step makes the host wait for the GPU (torch's sync debug mode), the GPU time per kernel (grouped by
name, sorted) and per kind of kernel (matmul, attention, the rest), the busy time of each stream, the step's wall
time, and the GPU's busy time within it: wall minus busy is time the GPU sat idle (launch gaps, host work,
synchronisation), and the longest of those gaps with the kernels on either side. With --contender compile it
profiles dev/bench.py's torch.compile step instead, so the two breakdowns can be set side by side.
"""

import argparse
import os
import sys
import time
import traceback
import warnings
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmpy import families, models  # noqa: E402
from llmpy.outlier import OutlierGuard  # noqa: E402
from train_gpt2 import train_step  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "dev"))
import bench  # noqa: E402

# kernel name fragments -> kind; the first match wins
KINDS = [("attention", ("cudnn", "flash", "fmha", "attention", "sdpa")),
         ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "splitk", "Kernel2"))]


def kind_of(name):
    lowered = name.lower()
    return next((kind for kind, parts in KINDS if any(p.lower() in lowered for p in parts)), "other")


def mainline_step(config, B, T, args):
    """A function running one mainline training step on fixed random batches."""
    family = families.of_config(config)
    model = models.build(config, B, T, cuda_graphs=bool(args.cuda_graphs), recompute=args.recompute,
                         attention_impl=args.attention, gelu_fusion=args.gelu_fusion, precision=args.precision,
                         fp8_options={"weight_grads_fp8": not args.fp8_bf16wgrad})
    model.runtime.load_weights(family.init_params(config, 0))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (B, T), generator=g, dtype=torch.int32).numpy()
    y = torch.randint(0, config.vocab_size, (B, T), generator=g, dtype=torch.int32).numpy()
    loss_sum = torch.zeros(1, device="cuda")
    hyper = SimpleNamespace(weight_decay=0.1, grad_clip=1.0)
    guard = OutlierGuard()
    return lambda step: train_step(model, [(x, y)], 3e-4, step, hyper, loss_sum, guard)


def compile_step(config, B, T, args):
    """The same for dev/bench.py's torch.compile contender."""
    args = SimpleNamespace(batch_size=B, sequence_length=T, seed=0, dtype="bfloat16", eager_micro=0)
    steps = bench.torch_steps(config, families.of_config(config).init_params(config, 0), args, compile=True)
    return lambda step: next(steps)


def print_synchronizations(step):
    """Runs one step under torch's sync debug mode and prints where the host waited for the GPU: a training step
    should wait once, for its loss (and its grad norm, on the GPU by then), at its end."""
    places = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):  # the innermost frame of our code that led to it
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(ROOT) and f.name != "record"]
            places.append(f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno}" if ours else filename)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        places.clear()  # switching the mode reports itself
        step()
        in_step = list(places)
        torch.cuda.set_sync_debug_mode("default")
    print(f"host-device synchronizations in one step: {len(in_step)} ({', '.join(in_step)})")


def kernel_spans(prof, stream=None):
    """(start, end, name) of every GPU kernel and copy in the trace (on one stream if given), by start time
    (microseconds)."""
    return sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA and stream in (None, e.device_resource_id))


def busy_time(spans):
    """The time at least one kernel ran: the union of the spans (kernels on two streams overlap, so the sum of the
    kernels' times can exceed it)."""
    busy, last_end = 0.0, float("-inf")
    for start, end, _ in spans:
        if end > last_end:
            busy += end - max(start, last_end)
            last_end = end
    return busy


def format_kinds(ms_by_kind):
    """"matmul 50.3 ms, other 30.1 ms, ...": GPU time per kind of kernel, largest first."""
    return ", ".join(f"{kind} {ms:.1f} ms" for kind, ms in sorted(ms_by_kind.items(), key=lambda kv: -kv[1]))


def print_streams(prof, steps):
    """The GPU's busy time on each stream (the backward's weight gradients run on a side stream beside the main
    one): a stream busy for nearly the whole step is its critical path, and work taken off another one gains
    nothing."""
    streams = sorted({e.device_resource_id for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
    for stream in streams:
        spans = kernel_spans(prof, stream)
        kinds = {}
        for start, end, name in spans:
            kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + (end - start) / 1000 / steps
        print(f"stream {stream}: busy {busy_time(spans) / 1000 / steps:.1f} ms/step, {len(spans) / steps:.0f} kernels "
              f"a step ({format_kinds(kinds)})")


def print_gaps(spans, steps, top=8):
    """The longest stretches in which the GPU ran no kernel, with the kernels on either side: where idle time goes."""
    gaps, last_end, last_name = [], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        if start > last_end:
            gaps.append((start - last_end, last_name, name))
        if end > last_end:
            last_end, last_name = end, name
    total = sum(g for g, _, _ in gaps) / 1000 / steps
    print(f"idle between kernels: {total:.2f} ms/step in {len(gaps) / steps:.0f} gaps a step; the longest:")
    for gap, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"  {gap / 1000:6.2f} ms  after {before}  before {after}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="d12")
    ap.add_argument("-b", "--batch_size", type=int, default=64)
    ap.add_argument("-t", "--sequence_length", type=int, default=1024)
    ap.add_argument("--attention", default="cudnn", choices=["cudnn", "triton"])
    ap.add_argument("-r", "--recompute", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--trace", help="also write a Chrome trace here")
    ap.add_argument("--cuda_graphs", type=int, default=1, choices=[0, 1])
    ap.add_argument("--gelu_fusion", type=int, default=-1, choices=[-1, 0, 1])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp8"], help="the mainline's --precision")
    ap.add_argument("--fp8_bf16wgrad", type=int, default=0, choices=[0, 1],
                    help="--precision fp8 with the weight gradients in bf16")
    ap.add_argument("--contender", default="mainline", choices=["mainline", "compile"])
    args = ap.parse_args()

    family = bench.family_of(args.model)
    config = family.config_from_descriptor(args.model)
    B, T = args.batch_size, args.sequence_length
    run_step = (mainline_step if args.contender == "mainline" else compile_step)(config, B, T, args)
    for step in range(3):
        run_step(step)

    torch.cuda.synchronize()
    print_synchronizations(lambda: run_step(3))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for step in range(args.steps):
            run_step(3 + step)
        torch.cuda.synchronize()
        wall_ms = 1000 * (time.perf_counter() - t0) / args.steps
    if args.trace:
        prof.export_chrome_trace(args.trace)

    kernels = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name if len(event.name) < 70 else event.name[:67] + "..."
            total, count = kernels.get(name, (0.0, 0))
            kernels[name] = (total + event.device_time / 1000, count + 1)  # device_time is in microseconds
    spans = kernel_spans(prof)
    busy_ms = busy_time(spans) / 1000 / args.steps
    by_kind = {}
    for name, (total, _) in kernels.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + total / args.steps
    print(f"{args.contender} {args.model} B={B} T={T} attention={args.attention} recompute={args.recompute}: "
          f"wall {wall_ms:.1f} ms/step (profiled), GPU busy {busy_ms:.1f} ms, idle {wall_ms - busy_ms:.1f} ms")
    print(f"by kind: {format_kinds(by_kind)}")
    print_streams(prof, args.steps)
    print_gaps(spans, args.steps)
    print(f"{'ms/step':>8s} {'calls':>6s}  kernel (times overlap where kernels ran on both streams)")
    for name, (total, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{total / args.steps:8.2f} {count // args.steps:6d}  {name}")


if __name__ == "__main__":
    main()
