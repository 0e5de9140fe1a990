"""Cross-entropy loss and its gradient, the end of the forward and the start of the backward (GPT-2's and Llama 3's):
from three passes to the mainline's fused classifier.

The op. The LM head's logits (N, Vp) bf16, of which the first V columns are real, and the targets (N,) token ids.
GPT-2's V = 50,257 is padded to Vp = 50,304 (a multiple of 128, for the matmul); Llama 3's V = 128,256 is a multiple
of 128 already, so its logits have no padding (Vp = V) and rows 2.5x as long. Per row n:
    lse_n          = log sum_{j < V} exp(logits[n, j])
    losses[n]      = lse_n - logits[n, targets[n]]                                   (fp32)
    dlogits[n, j]  = (exp(logits[n, j] - lse_n) - [j == targets[n]]) * dloss   for j < V, 0 in the padding
where dloss = dloss/dlosses[n] is the same for every row (1 / (B*T) for the mean loss). As in the mainline,
dlogits overwrites the logits in place: at d12 B=64 the logits are 6.6 GB of bf16, too much to keep twice.

Bytes it must move: every logit read, every dlogit written. But a dlogit needs its row's max and sum, which need the
whole row, and a row (100 KB of bf16 for GPT-2, 250 KB for Llama 3) held in one program's registers makes programs
too few and too large to keep the GPU's memory busy (GPT-2's, tried on the H200: half v2's pace; BENCHMARKS.md): a
kernel reads the row once for the statistics and once more to write the gradient. The floor counted here is therefore
read twice + write once, 3 * N * Vp * 2 bytes: the second read comes from HBM too, the rows in flight (100 KB each,
thousands of them) being far more than L2 holds. The losses (4 bytes a row) and targets are negligible.

v1, three kernels, as one would write it from the formulas: the softmax (softmax.v2 here: online max/sum, then
normalise) into an fp32 probabilities buffer (N, Vp); a loss kernel, losses[n] = -log(probs[n, targets[n]]) (a
gather of N values); and a dlogits kernel, (probs - onehot) * dloss into the logits. Per element: 2 reads of the
logits (2 + 2 bytes), a 4-byte probs write, a 4-byte probs read, a 2-byte dlogits write: 14 bytes, against the 6 of
the floor, and an extra (N, Vp) fp32 buffer (twice the logits' size).
v2, fused: the mainline's llmpy.kernels.classifier.fused_classifier (imported). One program per row: sweep 1 computes
max and sum online, the loss comes from one scalar load of the target's logit, sweep 2 rereads the row and
overwrites it with dlogits. 6 bytes per element, no extra buffer.
Tried and dropped (commit 963df99; H200, 2026-12-05): v3, the FP8 LM head's e5m2 dlogits in both layouts, to spare
its weight gradient the transpose (fp8.transpose of (N, Vp) bytes, 1.7 ms at d12): a kernel of v2's first sweep
keeping each row's max and 1 / sum, then tiles of dlogits stored row-major and turned as 32-bit words. At d12's
65,536 rows 6.375 ms at best, as v2's e5m2 dlogits then the transpose (6.376): the tiles ran at 2.8 TB/s, not the
copy's 4.2. Its turned copy also differed from its row-major copy's transpose on the GPU (exact under the
interpreter); not pursued, as it gained nothing.
The bound: PyTorch's cross-entropy forward + backward (F.cross_entropy on the fp32-cast real columns, then autograd),
eager and under torch.compile (which fuses the forward into one kernel and the backward into another); the faster.
Both vocabularies are checked and timed, on 8,192 rows each. Llama 3's walks 31.3 blocks of 4096 columns a sweep:
its last block is partly masked, and with no padding, the mask at Vp is the mask at V.
Where they stand on the H100 (GPT-2's 8,192 rows; dev/kernels/README.md has the table), in GB/s of the
3 * N * Vp * 2 bytes above: v2 2,941 GB/s, 100% of device-to-device copy bandwidth (2,950 GB/s), 2.4x torch.compile
(1,205 GB/s, 41% of copy); v1 1,238 GB/s; eager 292 GB/s.
"""

# common first: without a GPU it sets TRITON_INTERPRET=1, which must precede importing triton
from common import Result, assert_close, compiled, copy_bandwidth_gbps, device, mark_bound, time_ms

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import softmax
from llmpy.configs.llama3 import LLAMA3_VOCAB_SIZE
from llmpy.kernels import classifier as mainline
from llmpy.kernels.rounding import round_to

V, VP = softmax.V, softmax.VP
VOCABULARIES = [(V, VP), (LLAMA3_VOCAB_SIZE, LLAMA3_VOCAB_SIZE)]  # (V, Vp): GPT-2's, padded; Llama 3's, not
_LOSS_ROWS = 256  # rows per program of the loss kernel: one gathered value each


@triton.jit
def _loss_from_probs_kernel(losses_ptr, probs_ptr, targets_ptr, N, stride_row, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=mask, other=0)
    p = tl.load(probs_ptr + rows.to(tl.int64) * stride_row + targets, mask=mask, other=1.0)
    tl.store(losses_ptr + rows, -tl.log(p), mask=mask)


@triton.jit
def _dlogits_kernel(dlogits_ptr, probs_ptr, targets_ptr, stride_dlogits_row, stride_probs_row, Vp, dloss,
                    BLOCK_V: tl.constexpr):
    # program (row, column block): (probs - onehot(target)) * dloss. The probabilities are 0 in the padding, and so is
    # the gradient there.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < Vp
    target = tl.load(targets_ptr + row)
    p = tl.load(probs_ptr + row * stride_probs_row + cols, mask=mask, other=0.0)
    grad = (p - tl.where(cols == target, 1.0, 0.0)) * dloss
    tl.store(dlogits_ptr + row * stride_dlogits_row + cols, round_to(grad, dlogits_ptr.dtype.element_ty), mask=mask)


def v1(logits, losses, targets, V, dloss):
    """Softmax into an fp32 buffer (softmax.v2), then a loss kernel and a dlogits kernel: three passes, 14 bytes per
    element and an (N, Vp) fp32 temporary, where the fused kernel moves 6.

    logits (N, Vp) bf16, overwritten with dlogits; losses (N,) fp32 written; targets (N,) int32 in [0, V)."""
    N, Vp = logits.shape
    probs = torch.empty(N, Vp, dtype=torch.float32, device=logits.device)
    softmax.v2(probs, logits, V)
    _loss_from_probs_kernel[(triton.cdiv(N, _LOSS_ROWS),)](losses, probs, targets, N, probs.stride(0),
                                                            BLOCK=_LOSS_ROWS, num_warps=4)
    block = softmax.block_columns(Vp)
    _dlogits_kernel[(N, triton.cdiv(Vp, block))](logits, probs, targets, logits.stride(0), probs.stride(0), Vp,
                                                 float(dloss), BLOCK_V=block, num_warps=softmax.NUM_WARPS)


def v2(logits, losses, targets, V, dloss):
    """The mainline's fused classifier (llmpy.kernels.classifier.fused_classifier): one program per row, online
    max/sum, the loss from one load of the target logit, dlogits written in place on a second sweep over the
    row. Same arguments as v1."""
    mainline.fused_classifier(logits, losses, targets, V, dloss)


def torch_loss(x, targets, V, dloss):
    """dloss * the sum of the rows' cross-entropy, from the real columns in fp32: its gradient with respect to x is
    dlogits (zero in the padding, which the slice leaves out)."""
    return F.cross_entropy(x[:, :V].float(), targets, reduction="sum") * dloss


def torch_forward_backward(loss_fn, x, targets, V, dloss):
    """loss_fn's forward and backward on the leaf x (N, Vp) bf16: (dloss * the summed loss, dlogits in x.grad)."""
    x.grad = None
    loss = loss_fn(x, targets, V, dloss)
    loss.backward()
    return loss, x.grad


def reference(logits, targets, V, dloss):
    """float64 losses (N,) and dlogits (N, Vp)."""
    x = logits[:, :V].double()
    lse = torch.logsumexp(x, dim=-1)
    losses = lse - x.gather(1, targets.long()[:, None]).squeeze(1)
    dlogits = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    dlogits[:, :V] = torch.exp(x - lse[:, None])
    dlogits[torch.arange(len(targets), device=logits.device), targets.long()] -= 1.0
    return losses, dlogits * dloss


def _inputs(N, V, Vp, dev, seed):
    logits = softmax.make_logits(N, V, Vp, dev, seed)  # padded columns hold 1e4: they must be ignored, then zeroed
    generator = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, V, (N,), generator=generator, dtype=torch.int32).to(dev)
    return logits, targets


# Tolerances, ||got - ref|| / ||ref|| against float64 on the same bf16 logits:
# - losses (fp32, ~11 each): fp32 exp/log and a sum of 50,257 terms, ~1e-7 relative; v1 takes -log of an fp32
#   probability, the same order. 1e-5 fails any real mistake (a wrong target or a missed column shifts a loss by
#   far more than 1e-4).
# - dlogits (bf16): the result is rounded to bf16 once (2^-9 relative at most, ~1.1e-3 in the norm); 4e-3. At
#   GPT-2's width the norm of a row is dominated by its target entry, (p - 1) * dloss with p ~ 1/V, so the entries
#   off the target (the probabilities, padding included) and the N target entries are compared separately: a wrong
#   max, sum or column shows in the first, a wrong target in both.
_TOL_LOSS, _TOL_DLOGITS = 1e-5, 4e-3


def _split_at_targets(dlogits, targets):
    """(dlogits with each row's target entry set to 0, the target entries (N,)), in float64."""
    rows = torch.arange(len(targets), device=dlogits.device)
    off_target = dlogits.detach().to(torch.float64, copy=True)
    at_target = off_target[rows, targets.long()].clone()
    off_target[rows, targets.long()] = 0.0
    return off_target, at_target


def _compare_dlogits(label, dlogits, ref_dlogits, targets):
    off_target, at_target = _split_at_targets(dlogits, targets)
    ref_off_target, ref_at_target = _split_at_targets(ref_dlogits, targets)
    err_off = assert_close(f"{label} dlogits off target", off_target, ref_off_target, _TOL_DLOGITS)
    err_at = assert_close(f"{label} dlogits at target", at_target, ref_at_target, _TOL_DLOGITS)
    return f"dlogits off target {err_off:.1e}, at target {err_at:.1e}"


def check(small: bool) -> list[str]:
    """v1, v2 and the torch bounds against float64. small: 6 rows of V=300 padded to 384, and 2 rows of each
    vocabulary (the interpreter's blocks are 8192 columns for GPT-2's, 16,384 for Llama 3's: neither V is a multiple
    of its block); else 8,192 rows of each (the benchmark's shapes)."""
    dev = device()
    N = 2 if small else 8 * 1024
    shapes = ([(6, 300, 384)] if small else []) + [(N, v, vp) for v, vp in VOCABULARIES]
    lines = []
    for N, v, vp in shapes:
        logits, targets = _inputs(N, v, vp, dev, seed=N)
        dloss = 1.0 / N
        ref_losses, ref_dlogits = reference(logits, targets, v, dloss)
        for name, fn in [("v1", v1), ("v2", v2)]:
            dlogits = logits.clone()
            losses = torch.full((N,), float("nan"), dtype=torch.float32, device=dev)
            fn(dlogits, losses, targets, v, dloss)
            label = f"classifier {name} (N={N}, V={v})"
            err = assert_close(f"{label} losses", losses, ref_losses, _TOL_LOSS)
            lines.append(f"{name} (N={N}, V={v}, Vp={vp}): losses {err:.1e}, "
                         + _compare_dlogits(label, dlogits, ref_dlogits, targets))
        bounds = {"torch eager": torch_loss}
        if dev == "cuda":
            bounds["torch.compile"] = compiled(torch_loss)
        for name, loss_fn in bounds.items():
            x = logits.clone().requires_grad_(True)
            loss, dlogits = torch_forward_backward(loss_fn, x, targets.long(), v, dloss)
            label = f"classifier {name} (N={N}, V={v})"
            err = assert_close(f"{label} summed loss", loss, ref_losses.sum() * dloss, _TOL_LOSS)
            lines.append(f"{name} (N={N}, V={v}, Vp={vp}): summed loss {err:.1e}, "
                         + _compare_dlogits(label, dlogits, ref_dlogits, targets))
    return lines


def benchmark() -> list[Result]:
    """8,192 rows of each vocabulary's logits (0.8 GB of bf16 for GPT-2, 2.1 GB for Llama 3); bytes = read the
    logits twice + write dlogits once. Each call overwrites the logits with dlogits, which are as good an input as any
    (the timing does not depend on values)."""
    N = 8 * 1024
    copy = copy_bandwidth_gbps()
    results = []
    for v, vp in VOCABULARIES:
        logits, targets = _inputs(N, v, vp, "cuda", seed=N)
        losses = torch.empty(N, dtype=torch.float32, device="cuda")
        dloss = 1.0 / N
        moved = 3 * N * vp * logits.element_size()
        op = f"classifier {N}x{vp}"
        ours = [Result(op, "v1 softmax + loss + dlogits", time_ms(lambda: v1(logits, losses, targets, v, dloss)),
                       bytes=moved),
                Result(op, "v2 fused", time_ms(lambda: v2(logits, losses, targets, v, dloss)), bytes=moved,
                       mainline=True)]
        x = logits.clone().requires_grad_(True)
        targets_long = targets.long()
        compiled_loss = compiled(torch_loss)
        bounds = mark_bound([
            Result(op, "torch eager", time_ms(lambda: torch_forward_backward(torch_loss, x, targets_long, v, dloss)),
                   bytes=moved),
            Result(op, "torch.compile",
                   time_ms(lambda: torch_forward_backward(compiled_loss, x, targets_long, v, dloss)), bytes=moved)])
        print(f"{op}: device-to-device copy {copy:.0f} GB/s (read + write); "
              + ", ".join(f"{r.version} {r.gbps / copy * 100:.0f}%" for r in ours + bounds) + " of it")
        results += ours + bounds
    return results


if __name__ == "__main__":
    import run

    raise SystemExit(run.main(["classifier"]))
