"""What every dev/kernels/<op>.py file shares: the error measure, the GPU timer, and the table printer.

An op file checks each of its versions against a torch reference with `assert_close`, which measures the error the
same way for every op: the norm of the difference over the norm of the reference, computed in float64. It times
each version with `time_ms` (median of CUDA-event timings) and reports a `Result` per version; `print_table` turns
them into the table of run.py, where "% of bound" is how close a version comes to the expert bound of its op
(cuBLAS, cuDNN, torch's fused eager op or torch.compile): bound time / version time.

For memory-bound ops, `bytes` is the minimum traffic of the op (each input read once, each output written once), so
GB/s compares directly with `copy_bandwidth_gbps()`, what a device-to-device copy reaches on this GPU.

Op files import it first, as `from common import ...` (dev/kernels is on sys.path: it is the script's folder when
run directly, and run.py and tests/test_dev_kernels.py put it there): without a GPU, importing it sets
TRITON_INTERPRET=1, which Triton reads when a kernel is defined (@triton.jit), so it must come before any kernel.
"""

import functools
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
_REPOSITORY = str(Path(__file__).resolve().parents[2])
if _REPOSITORY not in sys.path:  # run as `python dev/kernels/<op>.py`, llmpy is found from the repository root
    sys.path.insert(0, _REPOSITORY)

from llmpy.kernels import INTERPRET  # noqa: E402

__all__ = ["INTERPRET", "device", "rel_error", "assert_close", "compare", "precisions", "time_ms",
           "copy_bandwidth_gbps", "compiled", "Result", "timed", "mark_bound", "print_table", "format_table"]


def device() -> str:
    """Where the checks run: the GPU when there is one, else CPU tensors under Triton's interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (0 when both are 0); NaN or inf anywhere in got gives inf.

    Computed on the GPU when either tensor is there (float64 norms of the 400M-element outputs of the d12 checks
    take seconds on the CPU, milliseconds there).
    """
    if got.shape != ref.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}")
    where = ref.device if ref.is_cuda else got.device
    got = got.detach().to(where, torch.float64)
    ref = ref.detach().to(where, torch.float64)
    if not torch.isfinite(got).all():
        return float("inf")
    ref_norm = torch.linalg.vector_norm(ref).item()
    diff_norm = torch.linalg.vector_norm(got - ref).item()
    if ref_norm == 0.0:
        return diff_norm
    return diff_norm / ref_norm


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Raise AssertionError("name: rel error X > tol T") unless rel_error(got, ref) <= tol; return the error."""
    err = rel_error(got, ref)
    if not err <= tol:
        raise AssertionError(f"{name}: rel error {err:.3e} > tol {tol:.0e}")
    return err


def compare(what: str, **outputs: tuple[torch.Tensor, torch.Tensor, float]) -> str:
    """assert_close of every output, given by name as (got, reference, tol): the first out of tolerance raises,
    named 'what name'; else the check's line for them all, 'what: name rel error X, name rel error Y'."""
    errors = {name: assert_close(f"{what} {name}", got, ref, tol) for name, (got, ref, tol) in outputs.items()}
    return f"{what}: " + ", ".join(f"{name} rel error {err:.1e}" for name, err in errors.items())


def precisions(fp32_tol: float, bf16_tol: float) -> list[tuple[torch.dtype, str, float]]:
    """(dtype, tag, tol) of the two activation dtypes the checks run in: fp32 first, then bf16, each with the
    tolerance of its rounded outputs."""
    return [(torch.float32, "fp32", fp32_tol), (torch.bfloat16, "bf16", bf16_tol)]


def time_ms(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median time of fn() in milliseconds, each call timed with CUDA events, L2 flushed before each (GPU only).

    The flush (writing a 256 MiB buffer) keeps an op from reading its inputs out of the 50 MB L2 cache that the
    previous call left them in: at the benchmark sizes the inputs are larger than L2 anyway, so it only removes noise.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_ms needs a GPU")
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@functools.cache
def copy_bandwidth_gbps() -> float:
    """What a device-to-device copy of a 1 GiB buffer reaches, in GB/s counting the read and the write."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, rep=20)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


@functools.cache
def compiled(fn):
    """torch.compile(fn), once per process: an op's check and benchmark share the compiled code (GPU only)."""
    return torch.compile(fn)


@dataclass
class Result:
    """One timed version of an op: bytes for memory-bound ops, flops for compute-bound ones (either may be None)."""

    op: str
    version: str
    ms: float
    bytes: int | None = None
    flops: int | None = None
    mainline: bool = False
    bound: bool = False

    @property
    def gbps(self) -> float | None:
        return None if self.bytes is None else self.bytes / (self.ms * 1e-3) / 1e9

    @property
    def tflops(self) -> float | None:
        return None if self.flops is None else self.flops / (self.ms * 1e-3) / 1e12

    def throughput(self) -> str:
        """'1234 GB/s' or '567.8 TFLOP/s' (flops win when both are given), '-' when neither."""
        if self.flops is not None:
            return f"{self.tflops:.1f} TFLOP/s"
        if self.bytes is not None:
            return f"{self.gbps:.0f} GB/s"
        return "-"


def timed(op: str, version: str, fn, args: tuple, moved: int, **flags) -> Result:
    """The Result of a memory-bound op's version: fn(*args) timed by time_ms, `moved` its minimal bytes; flags as
    Result's (mainline=True)."""
    return Result(op, version, time_ms(lambda: fn(*args)), bytes=moved, **flags)


def mark_bound(candidates: list[Result]) -> list[Result]:
    """Mark the fastest of several candidate bounds (e.g. torch's eager op and torch.compile) as the bound."""
    min(candidates, key=lambda r: r.ms).bound = True
    return candidates


def bound_of(results: list[Result]) -> Result | None:
    """The result marked bound=True (the expert bound), or None."""
    return next((r for r in results if r.bound), None)


def percent_of_bound(r: Result, results: list[Result]) -> float | None:
    """bound.ms / r.ms * 100: the fraction of the bound's throughput a version reaches."""
    b = bound_of(results)
    return None if b is None else b.ms / r.ms * 100


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def print_table(op: str, results: list[Result]) -> None:
    """Print version | ms | GB/s or TFLOP/s | % of bound; the mainline's version is marked with *."""
    rows = []
    for r in results:
        pct = percent_of_bound(r, results)
        name = r.version + (" *" if r.mainline else "") + (" (bound)" if r.bound else "")
        rows.append([name, f"{r.ms:.3f}", r.throughput(), "-" if pct is None else f"{pct:.0f}%"])
    print(f"\n{op}")
    print(format_table(["version", "ms", "throughput", "% of bound"], rows))
