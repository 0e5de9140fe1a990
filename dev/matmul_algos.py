"""Do the step's matmuls run faster on cuBLASLt algorithms we time ourselves than on the ones torch's cuBLAS picks?

    python dev/matmul_algos.py                    # d36 B=24 and d24 B=48, T=1024, bf16
    python dev/matmul_algos.py --models d12:64

A GPT-2 step spends ~65% of its time in matmuls of 14 shapes (per layer: 3 forwards, the fc's being fused with GELU,
4 input gradients, 4 weight gradients; and the LM head's three). torch sends them to cuBLAS, which takes the
algorithm its heuristic ranks first. cuBLASLt hands out the ranked list. Contenders, per shape:
  torch      torch.mm / addmm (addmm with out_dtype=fp32 for dW): cuBLAS with its heuristic's algorithm
  lt-first   cuBLASLt (llmpy.vendor), the heuristic's first candidate
  lt-timed   cuBLASLt (llmpy.vendor), the candidate llmpy.cublaslt picks of the heuristic's 8: the mainline
  lt-best    cuBLASLt, the fastest of all the heuristic's candidates (asked for 32, the H100 gets 8), each timed
             sustained (below): what a slower, more careful choice would give
Every result is checked against torch's (||got - ref|| / ||ref||). Times are per call, sustained: each contender runs
its call back to back for ~100 ms, three rounds interleaved with the others (an H100 at d24/d36 runs at its 700 W
cap, so a short burst would time a clock the step never sees). Then the whole step's matmul sequence (L layers,
the LM head) for each contender, also sustained: the number that matters.
"""

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "dev", "kernels")]

import torch  # noqa: E402

from common import rel_error  # noqa: E402
from llmpy import cublaslt, vendor  # noqa: E402
from llmpy.configs.gpt2 import config_from_descriptor  # noqa: E402
from matmul import bound_backward_input, bound_backward_weight, bound_forward  # noqa: E402

CONTENDERS = ("torch", "lt-first", "lt-timed", "lt-best")
BEST_OF = 32  # candidates asked of the heuristic for lt-best


def shapes(C, Vp):
    """[(name, kind, OC, K, has_bias)] for the matmuls of one layer and of the LM head: out (N, OC) = inp (N, K) @ W^T."""
    layer = [("qkv", 3 * C, C, True), ("attproj", C, C, True), ("fcproj", C, 4 * C, True)]
    calls = []
    for name, OC, K, has_bias in layer + [("fc", 4 * C, C, True)]:
        if name != "fc":  # the fc forward already runs on cuBLASLt with the GELU epilogue (-ge 1)
            calls.append((f"{name} fwd", "forward", OC, K, has_bias))
        calls.append((f"{name} dinp", "backward_input", OC, K, False))
        calls.append((f"{name} dW", "backward_weight", OC, K, False))
    lm_head = [("lm_head fwd", "forward", Vp, C, False), ("lm_head dinp", "backward_input", Vp, C, False),
               ("lm_head dW", "backward_weight", Vp, C, False)]
    return calls, lm_head


class Call:
    """One matmul of the step with its operands (random, fixed) and a runner per contender."""

    def __init__(self, name, kind, OC, K, has_bias, N, seed):
        g = torch.Generator(device="cuda").manual_seed(seed)

        def randn(*shape, dtype=torch.bfloat16):
            return torch.randn(*shape, device="cuda", generator=g).to(dtype)

        self.name, self.kind = name, kind
        if kind == "forward":
            self.x, self.w = randn(N, K), randn(OC, K) * K ** -0.5
            self.b = randn(OC) if has_bias else None
            self.out = torch.empty(N, OC, device="cuda", dtype=torch.bfloat16)
        elif kind == "backward_input":
            self.dout, self.w = randn(N, OC), randn(OC, K) * OC ** -0.5
            self.out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
        else:
            self.dout, self.x = randn(N, OC) * N ** -0.5, randn(N, K)
            self.out = randn(OC, K, dtype=torch.float32)
        self.out0 = self.out.clone()

    def run(self, contender):
        lt = contender != "torch"
        if self.kind == "forward":
            (vendor.matmul_forward if lt else bound_forward)(self.out, self.x, self.w, self.b)
        elif self.kind == "backward_input":
            (vendor.matmul_backward_input if lt else bound_backward_input)(self.out, self.dout, self.w)
        else:
            (vendor.matmul_backward_weight if lt else bound_backward_weight)(self.out, self.dout, self.x)

    def result(self, contender):
        """The output of one call from the initial state (dW accumulates)."""
        self.out.copy_(self.out0)
        self.run(contender)
        return self.out.clone()


def choose_best(call):
    """Plans call's shape with BEST_OF candidates and keeps the one fastest sustained; returns how many there were."""
    candidates = []

    def first(algos, launch):  # stands in for llmpy.cublaslt's choice: remember the candidates, take the first
        candidates.extend(algos)
        return algos[0]

    keys = set(cublaslt._plans)
    timed, cublaslt._fastest = cublaslt._fastest, first
    try:
        call.run("lt-best")
    finally:
        cublaslt._fastest = timed
    plan = cublaslt._plans[(set(cublaslt._plans) - keys).pop()]
    times = []
    for algo in candidates:
        plan[4] = algo
        times.append(sustained_ms(lambda: call.run("lt-best"), seconds=0.03))
    plan[4] = candidates[times.index(min(times))]
    return len(candidates)


def sustained_ms(fn, seconds=0.1):
    """Time per call of fn run back to back for ~seconds (after as long again of warm-up)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = max(3, int(seconds * 1e3 / max(start.elapsed_time(end), 1e-3)))
    for _ in range(reps):
        fn()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def study(model, B, T, rounds=3):
    config = config_from_descriptor(model)
    C, L, Vp, N = config.channels, config.num_layers, config.padded_vocab_size, B * T
    layer, lm_head = shapes(C, Vp)
    calls = [Call(*spec, N=N, seed=i) for i, spec in enumerate(layer + lm_head)]
    plans = {}  # contender -> llmpy.cublaslt's plan cache after its first calls
    errors = {}
    candidates = cublaslt._CANDIDATES
    try:
        for contender in CONTENDERS:
            cublaslt._plans.clear()
            cublaslt._CANDIDATES = {"lt-first": 1, "lt-timed": candidates, "lt-best": BEST_OF}.get(contender)
            if contender == "lt-best":
                found = [choose_best(call) for call in calls]
                print(f"lt-best candidates per shape: {found}")
            for call in calls:
                errors[call.name, contender] = rel_error(call.result(contender), call.result("torch"))
            if contender != "torch":
                plans[contender] = dict(cublaslt._plans)
    finally:
        cublaslt._CANDIDATES = candidates

    def activate(contender):
        if contender != "torch":
            cublaslt._plans.clear()
            cublaslt._plans.update(plans[contender])

    def step(contender):  # the step's matmuls: L layers, then the LM head, each call once per layer
        for _ in range(L):
            for call in calls[:len(layer)]:
                call.run(contender)
        for call in calls[len(layer):]:
            call.run(contender)

    per_call = {(c.name, k): [] for c in calls for k in CONTENDERS}
    per_step = {k: [] for k in CONTENDERS}
    for _ in range(rounds):
        for contender in CONTENDERS:
            activate(contender)
            for call in calls:
                per_call[call.name, contender].append(sustained_ms(lambda: call.run(contender)))
            per_step[contender].append(sustained_ms(lambda: step(contender), seconds=1.0))
    print(f"\n{model} B={B} T={T} (N={N}, C={C}, L={L}): ms per call, sustained, median of {rounds} rounds; "
          f"in brackets ||got - torch|| / ||torch||")
    print(f"{'matmul':<14}" + "".join(f"{k:>22}" for k in CONTENDERS) + f"{'best/torch':>12}")
    for call in calls:
        ms = {k: statistics.median(per_call[call.name, k]) for k in CONTENDERS}
        cells = "".join(f"{ms[k]:>11.3f} ({errors[call.name, k]:7.1e})" for k in CONTENDERS)
        print(f"{call.name:<14}{cells}{min(ms.values()) / ms['torch']:>12.3f}")
    steps = {k: statistics.median(per_step[k]) for k in CONTENDERS}
    print(f"{'step matmuls':<14}" + "".join(f"{steps[k]:>22.2f}" for k in CONTENDERS)
          + "".join(f"   {k}/torch {steps[k] / steps['torch']:.3f}" for k in CONTENDERS[1:]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="d36:24,d24:48", help="model:B pairs, comma-separated")
    ap.add_argument("-t", "--seq_len", type=int, default=1024)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("dev/matmul_algos.py: needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for pair in args.models.split(","):
        model, B = pair.split(":")
        study(model, int(B), args.seq_len)


if __name__ == "__main__":
    main()
