"""Every execution plan cuDNN offers for our attention, timed: is the heuristic's first the fastest?

llmpy.vendor builds cuDNN's causal flash attention (forward and backward) once per layout and runs the first plan
its heuristics rank (mode A, then the fallback). This script builds the same graphs at a model's training shape,
ranks their plans with the heuristic modes asked (--heuristics, default A, B and the fallback), builds each plan that
builds, and times it alone (CUDA events, median of --iters runs after 3), against plan 0 of the mainline's ranking.
Each plan's outputs are compared with that plan's (max |difference|, the outputs' scale ~1): a plan that computes
something else is flagged, not timed as a contender.

    python dev/attention_plans.py [--model d12] [-b 64] [-t 1024] [--heuristics A,B,FALLBACK] [--iters 20]

On a GPU with the cuDNN frontend (pip install nvidia-cudnn-frontend).
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmpy import vendor  # noqa: E402
from llmpy.configs import gpt2, llama3  # noqa: E402


def tensors(config, B, T, seed=0):
    """The forward's and the backward's (inputs, outputs) at (B, T), as the mainline lays them out: q, k and v in
    one qkv buffer, out and dout (B, T, C), lse (B, NH, T, 1) fp32; random inputs, the lse of the forward."""
    NH = config.num_heads
    KV = getattr(config, "num_kv_heads", NH)
    HS = config.channels // NH
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    qkv = torch.randn(B, T, (NH + 2 * KV) * HS, generator=g, **bf16)
    out, dout = torch.empty(B, T, NH * HS, **bf16), torch.randn(B, T, NH * HS, generator=g, **bf16)
    lse = torch.empty(B, NH, T, dtype=torch.float32, device="cuda")
    dqkv = torch.empty_like(qkv)
    forward = (vendor.qkv_heads(qkv, NH, KV), vendor.heads(out, NH, 1) + [lse.unsqueeze(-1)])
    backward = (vendor.qkv_heads(qkv, NH, KV) + vendor.heads(out, NH, 1) + vendor.heads(dout, NH, 1)
                + [lse.unsqueeze(-1)], vendor.qkv_heads(dqkv, NH, KV))
    vendor.cudnn_attention_forward(out, lse, qkv, NH, KV)  # the backward's out and lse: the forward's
    return forward, backward


def time_plans(name, backward, inputs, outputs, heuristics, iters):
    """Builds every plan of the graph and prints each one's median time and its outputs' largest difference from
    plan 0's; returns {plan name: ms}."""
    cudnn, handle = vendor.cudnn_frontend()
    graph, nodes = vendor.attention_graph(backward, inputs, outputs, heuristics=heuristics)
    graph.build_plans(cudnn.build_plan_policy.ALL)
    pack = dict(zip(nodes, inputs + outputs))
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    reference, times = None, {}
    print(f"{name}: {graph.get_execution_plan_count()} plans ranked ({', '.join(heuristics)})")
    for i in range(graph.get_execution_plan_count()):
        plan = graph.get_plan_name_at_index(i)
        try:
            workspace = torch.empty(graph.get_workspace_size_plan_at_index(i), dtype=torch.uint8, device="cuda")
            for o in outputs:
                o.fill_(float("nan"))
            graph.execute_plan_at_index(pack, workspace, i, handle=handle)
            torch.cuda.synchronize()
        except Exception as e:  # a plan that does not build or run here: cuDNN's errors have no common class
            print(f"  {i:2d} {plan}: not run ({str(e).splitlines()[0][:100]})")
            continue
        result = [o.float().clone() for o in outputs]
        reference = reference or result
        diff = max((a - b).abs().nan_to_num(float("inf")).max().item() for a, b in zip(result, reference))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for _ in range(3):
            graph.execute_plan_at_index(pack, workspace, i, handle=handle)
        for start, end in events:
            start.record()
            graph.execute_plan_at_index(pack, workspace, i, handle=handle)
            end.record()
        torch.cuda.synchronize()
        ms = statistics.median(s.elapsed_time(e) for s, e in events)
        flag = "" if diff <= 2e-2 else "   DIFFERENT OUTPUTS: not a contender"
        if not flag:
            times[plan] = ms
        print(f"  {i:2d} {ms:8.3f} ms  max |diff| vs plan 0 {diff:.1e}  workspace {workspace.numel() / 2**20:.0f} MiB"
              f"  {plan}{flag}")
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="d12", help="d12, d24, d36, ... or a Llama 3 descriptor")
    ap.add_argument("-b", "--batch_size", type=int, default=64)
    ap.add_argument("-t", "--sequence_length", type=int, default=1024)
    ap.add_argument("--heuristics", default="A,B,FALLBACK", help="cuDNN heuristic modes, comma-separated")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_plans.py: needs a GPU")
    family = llama3 if args.model in llama3.DESCRIPTORS else gpt2
    config = family.config_from_descriptor(args.model)
    forward, backward = tensors(config, args.batch_size, args.sequence_length)
    heuristics = tuple(args.heuristics.split(","))
    print(f"{args.model} B={args.batch_size} T={args.sequence_length}, cuDNN {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name()}")
    for name, is_backward, (inputs, outputs) in (("forward", False, forward), ("backward", True, backward)):
        times = time_plans(name, is_backward, inputs, outputs, heuristics, args.iters)
        if times:
            first, (best, best_ms) = next(iter(times.items())), min(times.items(), key=lambda kv: kv[1])
            print(f"{name}: the first plan {first[1]:.3f} ms, the fastest {best_ms:.3f} ms ({best})")


if __name__ == "__main__":
    main()
